"""Effective accuracy under load: the adaptive server against every front member served fixed,
on TorchServe and on LitServe, in the same run.

The metric (Model-Switching, HotCloud'20; INFaaS) is *effective accuracy*: requests answered
correctly within a deadline (default 100 ms from when each request was due) over requests offered.
Beside it: p50/p99 latency and throughput.

Protocol, on 127.0.0.1, per engine of ``--engines`` (default ``torchserve,litserve``):

1. The served set (the accuracy/latency front above the accuracy floor) is read from the manifest.
   Per engine, one contender serves it adaptively (the default policy) and one per member serves
   it fixed (``fixed_variant``). TorchServe: all contenders in ONE TorchServe (one worker per model,
   the archives' defaults: max batch 8, 5 ms batch delay). LitServe: each contender in a
   ``dnnshifter litserve`` server of its own, with the same batching (``max_batch_size`` 8,
   ``batch_timeout`` 5 ms, one worker, its generated API key), started for each run and stopped
   before the next contender starts, so it has the CPU alone (TorchServe's models then sit idle).
2. **Capacities**: a closed-loop burst (32 clients, ``--capacity-s``) against each fixed member, on
   each engine. ``C`` is TorchServe's capacity of the most accurate member (LitServe's when it
   runs alone); the traces below are the SAME for every engine, and both engines' capacities are
   reported so that a reader sees which engine is saturated at which step.
3. **Staircase** (the headline), open loop: 0.3x, 0.8x, 1.5x, 3x, 1.5x, 0.8x, 0.3x ``C``, each
   step ``--step-s`` (15 s) long.
4. **Burst** (reaction), open loop: 0.3x ``C`` for ``--step-s``/2, then 2.5x for ``--step-s``,
   then 0.3x again. Reaction time: from the burst's start to the first second in which at least
   90% of the requests were answered on time.
5. All contenders of all engines run one after another in interleaved rounds (one shuffled order
   per round, seeded by the round); figures are medians over rounds, with the range over rounds.
   Requests still unsent 1 s after they were due are not sent (a client that gave up) and count as
   offered, not answered.

Goals (checked per engine against that engine's fixed contenders, recorded under
``engines.<engine>.goals``, never relaxed): on every staircase step the adaptive server is within
2 points of the best fixed contender at that step; over the whole staircase it is at least every
fixed contender. ``litserve_vs_torchserve`` records adaptive LitServe against adaptive TorchServe.
The top-level ``overall``/``goals``/``capacity_rps`` are the reference engine's (the one ``C`` comes
from), as in the TorchServe-only report.

    python benchmarks/bench_serving.py --quick                      # smoke run, ~8 min (both engines)
    python benchmarks/bench_serving.py --readme --figure            # the full run, ~41 min (both engines)
    python benchmarks/bench_serving.py --engines torchserve         # TorchServe alone, as before, ~20 min

(Timings on the 2-core Xeon: a LitServe server starts in about 7 s; each contender costs about
9 x ``--step-s`` plus a few seconds per round.)

Without ``--portfolio`` it trains its own portfolio once and caches it (``bench_portfolio``): a
ladder of DigitsCNNs of decreasing width on the real digits, with measured validation accuracy and
batch-8 latency. The widest is heavy enough (about 152 M MACs per sample) that the serving worker,
not the frontend or the load generator, is the bottleneck on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, machine_line, markdown_table, median, update_readme, write_json  # noqa: E402

from dnnshifter_lightning.loadgen import per_second, run_load, run_schedule, summarize  # noqa: E402
from dnnshifter_lightning.serve.defaults import DEFAULT_MODEL_CONFIG, ENGINES, INITIAL_SWITCH_REASON  # noqa: E402
from dnnshifter_lightning.serve.served import resolve_served_set  # noqa: E402
from dnnshifter_lightning.serve.torchserve import (  # noqa: E402
    TorchServeServer, build_archive, check_java, read_switches,
)

NAME = "bench_serving"
STAIRCASE = (0.3, 0.8, 1.5, 3.0, 1.5, 0.8, 0.3)
BURST = (0.3, 2.5, 0.3)
WIDTHS = (64, 24, 12)
EPOCHS = 4
SIZE = 32  # the 8x8 digits, upsampled: the same information, 16x the compute per width


def _recipe(widths) -> str:
    return f"digitscnn{SIZE}px-widths{'-'.join(map(str, widths))}-adam3e-3-onecycle-{EPOCHS}ep-seed0-v1"


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _cache_dir(widths=WIDTHS) -> Path:
    home = os.environ.get("DNNSHIFTER_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dnnshifter"
    return Path(home) / "bench_serving" / _recipe(widths)


def bench_portfolio(out: Path | None = None, widths=WIDTHS, epochs: int = EPOCHS, console=print) -> Path:
    """Train DigitsCNNs of ``widths`` on the digits upsampled to ``SIZE`` x ``SIZE`` (plain torch, the
    same recipe, budget and seed for each) and write them as a portfolio with measured validation
    accuracy, MACs and batch-1/8 latency (one thread). Upsampling adds no information; it makes the
    widest member heavy (about 152 M MACs per sample) so that the worker is the bottleneck on 2 cores.
    Cached: a portfolio already at ``out`` (default: the user cache dir, keyed by the recipe) is reused."""
    from dnnshifter_lightning.demo.digits import DIGITS_INPUT_SPEC, DigitsDataModule
    from dnnshifter_lightning.demo.models import DigitsCNN
    from dnnshifter_lightning.portfolio import (FORMAT_VERSION, VARIANT_SUFFIX, Variant, save_variant, sort_variants,
                                                verify_portfolio, write_manifest)
    from dnnshifter_lightning.shrink.measure import count_macs, count_params, measure_accuracy, measure_latency_ms

    out = Path(out or _cache_dir(widths))
    if (out / "manifest.json").is_file():
        verify_portfolio(out)
        console(f"using the cached benchmark portfolio {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    variants = []
    for level, width in enumerate(widths):
        started = time.perf_counter()
        torch.manual_seed(0)
        model = DigitsCNN(width=width)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(dm.train_dataloader()))
        for _ in range(epochs):
            model.train()
            for x, y in dm.train_dataloader():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(_upsample(x)), y).backward()
                opt.step()
                sched.step()
        model.eval()
        val = [(_upsample(x), y) for x, y in dm.val_dataloader()]
        example = val[0][0][:8]
        rel = f"variants/w{width}{VARIANT_SUFFIX}"
        info = save_variant(model, example[:2], tmp / rel)
        n = count_params(model)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the builder measures
        latency = {str(b): measure_latency_ms(model, example[:b]) for b in (1, 8)}
        torch.set_num_threads(threads)
        variants.append(Variant(
            id=f"w{width}", level=level, sparsity=0.0, params=n, nonzero_params=n, file=rel,
            bytes_raw=info["bytes_raw"], bytes_compressed=info["bytes_compressed"], sha256=info["sha256"],
            macs=count_macs(model, example[:1]), latency_ms=latency,
            accuracy=measure_accuracy(model, val, 10), sparse_accuracy=None, max_abs_diff=0.0,
        ).to_dict())
        console(f"trained w{width}: accuracy {variants[-1]['accuracy']:.2%}, b8 {latency['8']:.1f} ms "
                f"({time.perf_counter() - started:.0f} s)")
    spec = dict(DIGITS_INPUT_SPEC, shape=[1, SIZE, SIZE])
    write_manifest(tmp, {"format_version": FORMAT_VERSION, "input_spec": spec, "variants": sort_variants(variants)})
    remeasure_latency(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def remeasure_latency(portfolio: Path, repeats: int = 50) -> dict[str, dict[str, float]]:
    """Measure every variant's batch-1/8 latency again, all after training, on one thread, and
    rewrite the manifest with it: the front rests on these figures, and a timing taken while the
    next model trains (or the machine is busy) can rank a cheaper variant as slower."""
    from dnnshifter_lightning.portfolio import load_variant, read_manifest, write_manifest
    from dnnshifter_lightning.shrink.measure import measure_latency_ms

    manifest = read_manifest(portfolio)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for v in manifest["variants"]:
            model = load_variant(portfolio / v["file"], sha256=v["sha256"])
            x = torch.randn(8, *manifest["input_spec"]["shape"])
            v["latency_ms"] = {str(b): round(measure_latency_ms(model, x[:b], 10, repeats), 4) for b in (1, 8)}
    finally:
        torch.set_num_threads(threads)
    write_manifest(portfolio, manifest)
    return {v["id"]: v["latency_ms"] for v in manifest["variants"]}


def held_out_requests(shape) -> tuple[list[bytes], list[int]]:
    """The held-out digits (never trained on) as JSON bodies at the portfolio's input size, and labels."""
    from dnnshifter_lightning.demo.digits import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup()
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    if list(x.shape[1:]) != list(shape):
        x = torch.nn.functional.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    # 4 decimals keep a 32x32 body near 6 KB (the frontend parses every byte); the answers are the server's
    bodies = [json.dumps({"data": row.double().numpy().round(4).tolist()}).encode() for row in x]
    return bodies, [int(v) for v in y]


def _trace(factors, capacity: float, step_s: float, first_s: float | None = None) -> list[tuple[float, float, str]]:
    steps = []
    for i, f in enumerate(factors):
        seconds = first_s if (first_s and i in (0, len(factors) - 1)) else step_s
        steps.append((round(f * capacity, 2), seconds, f"{i}:{f:g}x"))
    return steps


@dataclass
class Target:
    """Where one contender answers: the port, the path and headers of its requests, and its switches."""

    port: int
    path: str
    headers: dict[str, str]
    switches: Callable[[], list[dict]]


def contenders(engines: Sequence[str], front: Sequence[str]) -> list[str]:
    """Every contender as ``ENGINE/MODEL``: per engine the adaptive server, then each front member fixed.

    >>> contenders(["torchserve", "litserve"], ["w64", "w12"])
    ['torchserve/adaptive', 'torchserve/fixed_w64', 'torchserve/fixed_w12', 'litserve/adaptive', 'litserve/fixed_w64', 'litserve/fixed_w12']
    """
    return [f"{e}/{m}" for e in engines for m in ("adaptive", *[f"fixed_{v}" for v in front])]


def parse_engines(text: str) -> list[str]:
    """``--engines``: a comma-separated subset of :data:`ENGINES`, in the order given, each once.

    >>> parse_engines("litserve, torchserve")
    ['litserve', 'torchserve']
    >>> parse_engines("triton")
    Traceback (most recent call last):
        ...
    ValueError: --engines triton: choose from torchserve, litserve (comma-separated)
    """
    engines = [e.strip() for e in text.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) != len(engines):
        raise ValueError(f"--engines {text}: choose from {', '.join(ENGINES)} (comma-separated)")
    return engines


def litserve_options(fixed_variant: str | None = None) -> dict:
    """The ``dnnshifter litserve --config`` of a LitServe contender: the batching of the TorchServe
    archives (max batch ``batchSize``, ``maxBatchDelay`` as ``batch_timeout``; one worker is the
    command's default) and, for a fixed contender, the one variant it serves, as its archive holds.

    >>> litserve_options("w12")
    {'max_batch_size': 8, 'batch_timeout': 0.005, 'fixed_variant': 'w12', 'variants': ['w12']}
    """
    opts = {"max_batch_size": int(DEFAULT_MODEL_CONFIG["batchSize"]),
            "batch_timeout": DEFAULT_MODEL_CONFIG["maxBatchDelay"] / 1000.0}
    if fixed_variant is not None:
        opts.update(fixed_variant=fixed_variant, variants=[fixed_variant])
    return opts


def _run(target: Target, bodies, labels, steps, deadline_s: float, wall_switches: bool) -> dict:
    """One contender over one trace: per-step and whole-trace figures, and the per-second series."""
    wall0, mono0 = time.time(), time.monotonic()
    res = run_schedule(target.port, target.path, bodies, steps, concurrency=64, drop_late_s=1.0,
                       headers=target.headers)
    t0 = min(r.scheduled for r in res)
    total_s = sum(s for _, s, _ in steps)
    out = {"overall": summarize(res, labels, span_s=total_s, deadline_s=deadline_s), "steps": {}}
    for rate, seconds, phase in steps:
        part = [r for r in res if r.phase == phase]
        out["steps"][phase] = dict(summarize(part, labels, span_s=seconds, deadline_s=deadline_s), rate=rate)
    out["series"] = per_second(res, labels, t0, int(total_s), deadline_s)
    for b, (rate, _, _) in zip(out["series"], [(r, 0, 0) for r, s, _ in steps for _ in range(int(s))]):
        b["rate"] = rate
    if wall_switches:  # when the adaptive server switched, in seconds since the trace's start
        offset = wall0 + (t0 - mono0)
        out["switches"] = [dict(s, at_s=round(s["time"] - offset, 3)) for s in target.switches()
                           if s["time"] >= offset and s.get("reason") != INITIAL_SWITCH_REASON]
    return out


def _reaction_s(run: dict, burst_start: int, burst_len: int, on_time: float = 0.9) -> float | None:
    """Seconds from the burst's start to the first second with >= 90% of requests on time."""
    for b in run["series"][burst_start:burst_start + burst_len]:
        if b["offered"] and (b.get("on_time") or 0) >= on_time:
            return float(b["t"] - burst_start)
    return None


def _capacity(target: Target, bodies, seconds: float) -> float:
    """Closed-loop capacity (req/s): 32 clients for ``seconds``."""
    res = run_load(target.port, target.path, bodies, concurrency=32, duration_s=seconds, max_requests=200_000,
                   headers=target.headers)
    return summarize(res, span_s=seconds)["throughput_rps"]


@contextlib.contextmanager
def _litserve(portfolio: Path, model: str, workdir: Path) -> Iterator[Target]:
    """A LitServe server of its own for one contender (``adaptive`` or ``fixed_<id>``); stopped after."""
    from dnnshifter_lightning.serve.litserve_command import LitServeServer

    fixed = model.removeprefix("fixed_") if model.startswith("fixed_") else None
    with LitServeServer(portfolio, litserve_options(fixed), workdir=workdir) as ls:
        yield Target(ls.port, "/predict", ls.headers(), ls.switches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--portfolio", type=Path, help="portfolio dir (default: train and cache the benchmark's own)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: torchserve, litserve (default: both)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per staircase step (>= 15 for the README)")
    ap.add_argument("--capacity-s", type=float, default=4.0)
    ap.add_argument("--deadline-ms", type=float, default=100.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 s steps")
    ap.add_argument("--readme", action="store_true", help="put the tables into README.md")
    ap.add_argument("--figure", type=Path, nargs="?", const=ROOT / "docs" / "serving.png",
                    help="write the figure over time (default docs/serving.png)")
    args = ap.parse_args()
    try:
        engines = parse_engines(args.engines)
    except ValueError as exc:
        ap.error(str(exc))
    if args.quick:
        args.rounds, args.step_s, args.capacity_s = 1, 4.0, 2.0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log: the tables' full width (a contender per row, a column per step)
        console = Console(width=200)
    if "torchserve" in engines:
        check_java()
    deadline_s = args.deadline_ms / 1000.0
    portfolio = args.portfolio or bench_portfolio(console=console.print)
    manifest = json.loads((portfolio / "manifest.json").read_text())
    served = resolve_served_set(manifest["variants"])
    front = list(served.ids)
    acc = {v["id"]: v["accuracy"] for v in manifest["variants"]}
    top = front[0]
    console.print(f"served set (front above the floor {served.floor}): {front}; dominated {list(served.dominated)}, "
                  f"below the floor {list(served.below_floor)}; engines {engines}")
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    runs: dict[str, dict[str, list[dict]]] = {"staircase": {}, "burst": {}}
    capacity: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    try:
        models = ["adaptive", *[f"fixed_{vid}" for vid in front]]
        bodies, labels = held_out_requests(manifest["input_spec"]["shape"])
        with contextlib.ExitStack() as stack:
            ts = None
            if "torchserve" in engines:
                store = work / "store"
                archives = {"adaptive": build_archive(portfolio, "adaptive", store).name}
                for vid in front:
                    archives[f"fixed_{vid}"] = build_archive(portfolio, f"fixed_{vid}", store, variants=[vid],
                                                             config={"handler": {"fixed_variant": vid}}).name
                ts = stack.enter_context(TorchServeServer(store, archives, workdir=work / "ts"))
                for m in models:  # first requests pay one-off costs
                    ts.predict(m, bodies[0])

            def target(name: str, n: int) -> contextlib.AbstractContextManager[Target]:
                engine, model = name.split("/", 1)
                if engine == "torchserve":
                    return contextlib.nullcontext(Target(ts.ports.inference, f"/predictions/{model}",
                                                         ts.inference_headers(), lambda: read_switches(ts)))
                return _litserve(portfolio, model, work / "ls" / f"{model}-{n}")

            n = 0
            for engine in engines:  # the closed-loop capacity of every fixed member, on each engine
                capacity[engine] = {}
                for vid in front:
                    n += 1
                    with target(f"{engine}/fixed_{vid}", n) as t:
                        _http_warm(t, bodies[0])
                        capacity[engine][vid] = _capacity(t, bodies, args.capacity_s)
                console.print(f"{engine}: closed-loop capacity (req/s, 32 clients): {capacity[engine]}")
            ref = engines[0] if len(engines) == 1 else "torchserve"  # the traces are the same for every engine
            cap = capacity[ref][top]
            stair = _trace(STAIRCASE, cap, args.step_s)
            burst = _trace(BURST, cap, args.step_s, first_s=max(2.0, round(args.step_s / 2)))
            order = contenders(engines, front)
            for r in range(args.rounds):
                random.Random(r).shuffle(order)
                for trace_name, steps in (("staircase", stair), ("burst", burst)):
                    for name in order:
                        console.print(f"round {r + 1}/{args.rounds}: {trace_name} on {name} "
                                      f"({(time.monotonic() - started) / 60:.1f} min so far)")
                        n += 1
                        with target(name, n) as t:
                            _http_warm(t, bodies[0])
                            time.sleep(1.0)  # let the previous contender's last requests finish
                            run = _run(t, bodies, labels, steps, deadline_s, name.endswith("/adaptive"))
                        runs[trace_name].setdefault(name, []).append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed_s = time.monotonic() - started
    result = _report(args, console, Table, manifest, served, front, acc, engines, ref, capacity, stair, burst, runs,
                     deadline_s, elapsed_s)
    path = write_json(NAME + ("_quick" if args.quick else ""), result)
    console.print(f"machine: {machine_line(result['machine'])}; {elapsed_s / 60:.1f} min; wrote {path}")


def _http_warm(target: Target, body: bytes) -> None:
    """One request first: it pays the one-off costs; a failure stops the benchmark."""
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
    try:
        conn.request("POST", target.path, body=body, headers=target.headers)
        resp = conn.getresponse()
        reply = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"warm-up request to {target.path} on {target.port}: {resp.status} {reply[:300]!r}")


def _stats(rs: list[dict], get) -> dict | None:
    """Median, min and max over rounds of ``get(run)`` (values that are ``None`` left out)."""
    vals = [v for v in (get(r) for r in rs) if v is not None]
    return {"median": median(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def _median_of(rs: list[dict], get) -> float | None:
    s = _stats(rs, get)
    return s["median"] if s else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pct_spread(s: dict | None) -> str:
    """``98.9`` for one round, ``98.9 (98.7-99.0)`` for several: the median and the range over rounds."""
    if s is None:
        return "-"
    if s["n"] < 2:
        return _pct(s["median"])
    return f"{_pct(s['median'])} ({_pct(s['min'])}-{_pct(s['max'])})"


def engine_report(runs: dict, engine: str, front: Sequence[str], stair, burst) -> dict:
    """One engine's figures and goals, keyed as the TorchServe-only report was (``adaptive``,
    ``fixed_<id>``): medians over rounds with their spread, per step and over the whole staircase,
    the burst's reaction, and the goals checked against this engine's fixed contenders."""
    models = ["adaptive", *[f"fixed_{v}" for v in front]]
    fixed = models[1:]
    rs = {m: runs["staircase"][f"{engine}/{m}"] for m in models}
    steps = [p for _, _, p in stair]
    step_stats = {m: {p: _stats(rs[m], lambda r, p=p: r["steps"][p]["effective_accuracy"]) for p in steps}
                  for m in models}
    step_ea = {m: {p: (step_stats[m][p] or {}).get("median") for p in steps} for m in models}
    keys = ("effective_accuracy", "on_time", "accuracy", "p50_ms", "p99_ms", "throughput_rps")
    overall = {m: {k: _median_of(rs[m], lambda r, k=k: r["overall"][k]) for k in keys} for m in models}
    overall_spread = {m: {k: _stats(rs[m], lambda r, k=k: r["overall"][k]) for k in keys} for m in models}
    switches = {m: _median_of(rs[m], lambda r: len(r["switches"]) if "switches" in r else None) for m in models}
    goals_steps = {}
    for rate, _, p in stair:
        best = max(fixed, key=lambda m: step_ea[m][p] or 0)
        gap = (step_ea["adaptive"][p] or 0) - (step_ea[best][p] or 0)
        goals_steps[p] = {"adaptive": step_ea["adaptive"][p], "best_fixed": best, "best_fixed_value": step_ea[best][p],
                          "gap_points": round(100 * gap, 2), "met": gap >= -0.02}
    envelope = {m: (overall["adaptive"]["effective_accuracy"] or 0) >= (overall[m]["effective_accuracy"] or 0)
                for m in fixed}
    pre, blen, burst_phase = int(burst[0][1]), int(burst[1][1]), burst[1][2]
    burst_info = {}
    for m in models:
        brs = runs["burst"][f"{engine}/{m}"]
        reactions = [_reaction_s(run, pre, blen) for run in brs]
        known = [x for x in reactions if x is not None]
        burst_info[m] = {
            "on_time": _median_of(brs, lambda r: r["steps"][burst_phase]["on_time"]),
            "effective_accuracy": _median_of(brs, lambda r: r["steps"][burst_phase]["effective_accuracy"]),
            "effective_accuracy_spread": _stats(brs, lambda r: r["steps"][burst_phase]["effective_accuracy"]),
            "on_time_spread": _stats(brs, lambda r: r["steps"][burst_phase]["on_time"]),
            # the median over the rounds that reacted; reactions_s shows the rounds that never did (None)
            "reaction_s": median(known) if known else None, "reactions_s": reactions,
            "switches": _median_of(brs, lambda r: len(r["switches"]) if "switches" in r else None)}
    return {"step_effective_accuracy": step_ea, "step_effective_accuracy_spread": step_stats, "overall": overall,
            "overall_spread": overall_spread, "switches": switches,
            "goals": {"steps_within_2_points": goals_steps, "all_steps_met": all(g["met"] for g in goals_steps.values()),
                      "upper_envelope": envelope, "upper_envelope_met": all(envelope.values())},
            "burst_report": burst_info}


def compare_adaptive(reports: dict, stair) -> dict | None:
    """Adaptive LitServe against adaptive TorchServe: LitServe minus TorchServe, in points, per step
    and over the whole staircase and the burst; p50/p99 and throughput side by side."""
    if not {"torchserve", "litserve"} <= set(reports):
        return None
    ts, ls = reports["torchserve"], reports["litserve"]

    def pts(a, b):
        return None if a is None or b is None else round(100 * (a - b), 2)

    o_ts, o_ls = ts["overall"]["adaptive"], ls["overall"]["adaptive"]
    return {"step_points": {p: pts(ls["step_effective_accuracy"]["adaptive"][p], ts["step_effective_accuracy"]["adaptive"][p])
                            for _, _, p in stair},
            "staircase_points": pts(o_ls["effective_accuracy"], o_ts["effective_accuracy"]),
            "burst_points": pts(ls["burst_report"]["adaptive"]["effective_accuracy"],
                                ts["burst_report"]["adaptive"]["effective_accuracy"]),
            "reaction_s": {"torchserve": ts["burst_report"]["adaptive"]["reaction_s"],
                           "litserve": ls["burst_report"]["adaptive"]["reaction_s"]},
            **{k: {"torchserve": o_ts[k], "litserve": o_ls[k]} for k in ("p50_ms", "p99_ms", "throughput_rps")}}


def _label(name: str) -> str:
    """``torchserve/fixed_w64`` -> ``TorchServe w64``; ``litserve/adaptive`` -> ``LitServe adaptive``."""
    engine, model = name.split("/", 1)
    return f"{ENGINES[engine]} {model.removeprefix('fixed_')}"


def _ms(x: float | None) -> str:
    return f"{x:.0f}" if x else "-"


def _report(args, console, Table, manifest, served, front, acc, engines, ref, capacity, stair, burst, runs,
            deadline_s, elapsed_s) -> dict:
    reports = {e: engine_report(runs, e, front, stair, burst) for e in engines}
    versus = compare_adaptive(reports, stair)
    names = contenders(engines, front)
    steps = [p for _, _, p in stair]

    def rep(name):
        engine, model = name.split("/", 1)
        return reports[engine], model

    # the staircase: one row per contender
    stair_headers = ["contender", "capacity req/s", *[f"{p.split(':')[1]} ({rate:.0f}/s)" for rate, _, p in stair],
                     "whole staircase", "p50 ms", "p99 ms", "req/s", "switches"]
    stair_rows = []
    for name in names:
        r, m = rep(name)
        o = r["overall"][m]
        vid = m.removeprefix("fixed_")
        stair_rows.append([f"{_label(name)}" + (f" ({100 * acc[vid]:.1f}%)" if vid in acc else ""),
                           f"{capacity[name.split('/')[0]][vid]:.0f}" if vid in acc else "-",
                           *[_pct(r["step_effective_accuracy"][m][p]) for p in steps],
                           f"**{_pct_spread(r['overall_spread'][m]['effective_accuracy'])}**",
                           _ms(o["p50_ms"]), _ms(o["p99_ms"]), f"{o['throughput_rps'] or 0:.0f}",
                           f"{r['switches'][m]:g}" if r["switches"][m] is not None else "-"])
    # the goals, per engine against its own fixed contenders
    goal_headers = ["step", *[h for e in engines for h in (f"{ENGINES[e]}: best fixed", "adaptive - best (pts)",
                                                          "within 2 pts")]]
    goal_rows = []
    for _, _, p in stair:
        row = [p.split(":")[1]]
        for e in engines:
            g = reports[e]["goals"]["steps_within_2_points"][p]
            row += [g["best_fixed"].removeprefix("fixed_"), f"{g['gap_points']:+.1f}", "yes" if g["met"] else "**no**"]
        goal_rows.append(row)
    row = ["whole staircase"]
    for e in engines:
        ov = reports[e]["overall"]
        best = max((m for m in ov if m != "adaptive"), key=lambda m: ov[m]["effective_accuracy"] or 0)
        gap = (ov["adaptive"]["effective_accuracy"] or 0) - (ov[best]["effective_accuracy"] or 0)
        row += [best.removeprefix("fixed_"), f"{100 * gap:+.1f}",
                "yes" if reports[e]["goals"]["upper_envelope_met"] else "**no**"]
    goal_rows.append(row)
    # the burst: one row per contender
    burst_headers = ["contender", "reaction time", "on time in the burst %", "effective acc. in the burst %", "switches"]
    burst_rows = []
    for name in names:
        r, m = rep(name)
        b = r["burst_report"][m]
        never = sum(x is None for x in b["reactions_s"])
        react = "never" if b["reaction_s"] is None else f"{b['reaction_s']:g} s" + (
            f" ({never} round(s) never)" if never else "")
        burst_rows.append([_label(name), react, _pct_spread(b["on_time_spread"]),
                           _pct_spread(b["effective_accuracy_spread"]),
                           f"{b['switches']:g}" if b["switches"] is not None else "-"])
    caps = "; ".join(f"{ENGINES[e]} " + ", ".join(f"{k} {v:.0f}" for k, v in capacity[e].items()) for e in engines)
    cap = capacity[ref][front[0]]

    m = machine()
    r0 = reports[ref]
    result = {"machine": m, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "elapsed_s": round(elapsed_s, 1), "served": served.to_dict(), "front": front, "accuracy": acc,
              "latency_b8_ms": {v["id"]: v["latency_ms"]["8"] for v in manifest["variants"]},
              "macs": {v["id"]: v["macs"] for v in manifest["variants"]},
              "staircase": [list(s) for s in stair], "burst": [list(s) for s in burst],
              "deadline_ms": deadline_s * 1000,
              # the traces are sized from this engine's capacity of the most accurate member; the
              # top-level figures below are this engine's, as in the TorchServe-only report
              "reference_engine": ref, "capacity_rps": capacity[ref],
              "step_effective_accuracy": r0["step_effective_accuracy"], "overall": r0["overall"],
              "goals": r0["goals"], "burst_report": r0["burst_report"],
              "engines": {e: dict(reports[e], capacity_rps=capacity[e],
                                  load_over_capacity={vid: [round(rate / c, 2) if c else None for rate, _, _ in stair]
                                                      for vid, c in capacity[e].items()})
                          for e in engines},
              "litserve_vs_torchserve": versus, "runs": runs, "quick": args.quick}
    title = (f"staircase, effective accuracy (%), deadline {deadline_s * 1000:g} ms, C = {cap:.0f} req/s "
             f"({ENGINES[ref]} {front[0]}), median of {args.rounds} round(s)")
    for t_title, hs, rows in ((title, stair_headers, stair_rows),
                              ("goals, per engine against its own fixed contenders", goal_headers, goal_rows),
                              ("burst 0.3x -> 2.5x C", burst_headers, burst_rows)):
        t = Table(title=t_title)
        for h in hs:
            t.add_column(h)
        for row in rows:
            t.add_row(*[str(c).replace("**", "") for c in row])
        console.print(t)
    console.print(f"capacities (req/s, closed loop, 32 clients): {caps}")
    vs_line = ""
    if versus:
        vs_line = (f"Adaptive LitServe against adaptive TorchServe: {versus['staircase_points']:+.1f} points over the "
                   f"whole staircase, {versus['burst_points']:+.1f} in the burst; p99 "
                   f"{_ms(versus['p99_ms']['litserve'])} vs {_ms(versus['p99_ms']['torchserve'])} ms.")
        console.print(vs_line)
    if args.figure:
        _figure(args.figure, runs, ref, front, acc, stair, deadline_s)
    if args.readme:
        md = (f"Staircase, effective accuracy (%) per step; the traces are the same for every engine, sized from "
              f"C = {cap:.0f} req/s, the closed-loop capacity of {front[0]} on {ENGINES[ref]}; deadline "
              f"{deadline_s * 1000:g} ms; {args.step_s:g} s per step; median of {args.rounds} interleaved rounds "
              f"(whole staircase: median and range over rounds). Each LitServe contender ran in its own server, "
              f"alone.\n\n"
              + markdown_table(stair_headers, stair_rows)
              + "\n\nGoals, per engine against its own fixed contenders:\n\n" + markdown_table(goal_headers, goal_rows)
              + "\n\nSudden burst 0.3x -> 2.5x C:\n\n" + markdown_table(burst_headers, burst_rows)
              + f"\n\nCapacities (req/s, closed loop, 32 clients): {caps}."
              + (f"\n\n{vs_line}" if vs_line else "")
              + f"\n\n{machine_line(m)}; exclusive CPU lock.")
        if not update_readme(NAME, md):
            console.print("README has no <!-- bench:bench_serving --> block; table not inserted")
    return result


def _figure(path: Path, runs, ref: str, front, acc, stair, deadline_s) -> None:
    """The staircase over time (round 1): the reference engine's adaptive server against its most accurate
    and cheapest members fixed, and the other engine's adaptive server (dashed) where it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stair_runs = runs["staircase"]
    lines = {f"{ref}/adaptive": ("tab:blue", "-"), f"{ref}/fixed_{front[0]}": ("tab:red", "-"),
             f"{ref}/fixed_{front[-1]}": ("tab:green", "-")}
    for other in ENGINES:
        if other != ref and f"{other}/adaptive" in stair_runs:
            lines[f"{other}/adaptive"] = ("tab:purple", "--")
    series = {name: stair_runs[name][0]["series"] for name in lines}

    def label(name: str) -> str:
        engine, model = name.split("/", 1)
        return f"{ENGINES[engine]} {model.replace('_', ' ')}"

    adaptive = series[f"{ref}/adaptive"]
    t = [b["t"] for b in adaptive]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax = axes[0]
    ax.step(t, [b["rate"] for b in adaptive], where="post", color="k", label="offered load (req/s)")
    ax.set_ylabel("offered req/s")
    ax2 = ax.twinx()
    idx = {v: i for i, v in enumerate(front)}
    for name, (color, _) in lines.items():
        if name.endswith("/adaptive"):
            shift = 0.0 if name.startswith(ref) else 0.12  # side by side, not on top of each other
            ax2.plot([x + 0.0 for x in t], [idx.get(b["variant"], float("nan")) + shift for b in series[name]], "o",
                     ms=3, color=color, label=f"active variant ({label(name)})")
    ax2.set_yticks(range(len(front)), [f"{v} ({100 * acc[v]:.1f}%)" for v in front])
    ax2.invert_yaxis()
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    for name, s in series.items():
        color, style = lines[name]
        axes[1].plot(t, [b["p99_ms"] for b in s], color=color, ls=style, label=label(name))
        axes[2].plot(t, [100 * (b["effective_accuracy"] or 0) for b in s], color=color, ls=style, label=label(name))
    axes[1].axhline(deadline_s * 1000, ls="--", color="gray", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p99 latency (ms)")
    axes[2].set_ylabel("effective accuracy (%)\nper second")
    axes[2].set_xlabel("seconds into the staircase (round 1)")
    for a in axes[1:]:
        a.legend(fontsize=8)
    fig.suptitle("staircase: adaptive vs the most accurate and the cheapest front member, each fixed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
