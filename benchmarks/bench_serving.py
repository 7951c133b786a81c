"""Effective accuracy under load: the adaptive server against every front member served fixed.

The metric (Model-Switching, HotCloud'20; INFaaS) is *effective accuracy*: requests answered
correctly within a deadline (default 100 ms from when each request was due) over requests offered.
Beside it: p50/p99 latency and throughput.

Protocol, all in ONE TorchServe on 127.0.0.1 (one worker per model, the archives' defaults):

1. The served set (the accuracy/latency front above the accuracy floor) is read from the manifest.
   One model serves it adaptively (the default policy); one model per member serves it fixed.
2. **Capacities**: a closed-loop burst (32 clients, ``--capacity-s``) against each fixed member.
   ``C`` is the capacity of the most accurate member.
3. **Staircase** (the headline), open loop: 0.3x, 0.8x, 1.5x, 3x, 1.5x, 0.8x, 0.3x ``C``, each
   step ``--step-s`` (15 s) long.
4. **Burst** (reaction), open loop: 0.3x ``C`` for ``--step-s``/2, then 2.5x for ``--step-s``,
   then 0.3x again. Reaction time: from the burst's start to the first second in which at least
   90% of the requests were answered on time.
5. Contenders run one after another in interleaved rounds (a shuffled order per round); figures are
   medians over rounds. Requests still unsent 1 s after they were due are not sent (a client that
   gave up) and count as offered, not answered.

Goals (checked and recorded, never relaxed): on every staircase step the adaptive server is within
2 points of the best fixed contender at that step; over the whole staircase it is at least every
fixed contender.

    python benchmarks/bench_serving.py --quick                      # smoke run, ~5 min
    python benchmarks/bench_serving.py --readme --figure            # the full run, ~20 min

Without ``--portfolio`` it trains its own portfolio once and caches it (``bench_portfolio``): a
ladder of DigitsCNNs of decreasing width on the real digits, with measured validation accuracy and
batch-8 latency. The widest is heavy enough (about 152 M MACs per sample) that the TorchServe worker,
not the frontend or the load generator, is the bottleneck on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, machine_line, markdown_table, median, update_readme, write_json  # noqa: E402

from dnnshifter_lightning.loadgen import per_second, run_load, run_schedule, summarize  # noqa: E402
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


def _run(ts: TorchServeServer, model: str, bodies, labels, steps, deadline_s: float, wall_switches: bool) -> dict:
    """One contender over one trace: per-step and whole-trace figures, and the per-second series."""
    wall0, mono0 = time.time(), time.monotonic()
    res = run_schedule(ts.ports.inference, f"/predictions/{model}", bodies, steps, concurrency=64,
                       drop_late_s=1.0, headers=ts.inference_headers())
    t0 = min(r.scheduled for r in res)
    total_s = sum(s for _, s, _ in steps)
    out = {"overall": summarize(res, labels, span_s=total_s, deadline_s=deadline_s), "steps": {}}
    for rate, seconds, phase in steps:
        part = [r for r in res if r.phase == phase]
        out["steps"][phase] = dict(summarize(part, labels, span_s=seconds, deadline_s=deadline_s), rate=rate)
    out["series"] = per_second(res, labels, t0, int(total_s), deadline_s)
    for b, (rate, _, _) in zip(out["series"], [(r, 0, 0) for r, s, _ in steps for _ in range(int(s))]):
        b["rate"] = rate
    if wall_switches:  # when the adaptive handler switched, in seconds since the trace's start
        offset = wall0 + (t0 - mono0)
        out["switches"] = [dict(s, at_s=round(s["time"] - offset, 3)) for s in read_switches(ts)
                           if s["time"] >= offset and s.get("reason") != "initial choice"]
    return out


def _reaction_s(run: dict, burst_start: int, burst_len: int, on_time: float = 0.9) -> float | None:
    """Seconds from the burst's start to the first second with >= 90% of requests on time."""
    for b in run["series"][burst_start:burst_start + burst_len]:
        if b["offered"] and (b.get("on_time") or 0) >= on_time:
            return float(b["t"] - burst_start)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--portfolio", type=Path, help="portfolio dir (default: train and cache the benchmark's own)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per staircase step (>= 15 for the README)")
    ap.add_argument("--capacity-s", type=float, default=4.0)
    ap.add_argument("--deadline-ms", type=float, default=100.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 s steps")
    ap.add_argument("--readme", action="store_true", help="put the tables into README.md")
    ap.add_argument("--figure", type=Path, nargs="?", const=ROOT / "docs" / "serving.png",
                    help="write the figure over time (default docs/serving.png)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.step_s, args.capacity_s = 1, 4.0, 2.0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    check_java()
    deadline_s = args.deadline_ms / 1000.0
    portfolio = args.portfolio or bench_portfolio(console=console.print)
    manifest = json.loads((portfolio / "manifest.json").read_text())
    served = resolve_served_set(manifest["variants"])
    front = list(served.ids)
    acc = {v["id"]: v["accuracy"] for v in manifest["variants"]}
    top = front[0]
    console.print(f"served set (front above the floor {served.floor}): {front}; dominated {list(served.dominated)}, "
                  f"below the floor {list(served.below_floor)}")
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    runs: dict[str, dict[str, list[dict]]] = {"staircase": {}, "burst": {}}
    try:
        store = work / "store"
        models = {"adaptive": build_archive(portfolio, "adaptive", store).name}
        for vid in front:
            models[f"fixed_{vid}"] = build_archive(portfolio, f"fixed_{vid}", store, variants=[vid],
                                                   config={"handler": {"fixed_variant": vid}}).name
        bodies, labels = held_out_requests(manifest["input_spec"]["shape"])
        with TorchServeServer(store, models, workdir=work / "ts") as ts:
            for m in models:  # first requests pay one-off costs
                ts.predict(m, bodies[0])
            capacity = {}
            for vid in front:
                res = run_load(ts.ports.inference, f"/predictions/fixed_{vid}", bodies, concurrency=32,
                               duration_s=args.capacity_s, max_requests=200_000, headers=ts.inference_headers())
                capacity[vid] = summarize(res, span_s=args.capacity_s)["throughput_rps"]
            cap = capacity[top]
            console.print(f"closed-loop capacity (req/s, 32 clients): {capacity}")
            stair = _trace(STAIRCASE, cap, args.step_s)
            burst = _trace(BURST, cap, args.step_s, first_s=max(2.0, round(args.step_s / 2)))
            order = list(models)
            for r in range(args.rounds):
                random.Random(r).shuffle(order)
                for trace_name, steps in (("staircase", stair), ("burst", burst)):
                    for model in order:
                        console.print(f"round {r + 1}/{args.rounds}: {trace_name} on {model}")
                        ts.predict(model, bodies[0])
                        time.sleep(1.0)  # let the previous contender's last requests finish
                        run = _run(ts, model, bodies, labels, steps, deadline_s, model == "adaptive")
                        runs[trace_name].setdefault(model, []).append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = _report(args, console, Table, manifest, served, front, acc, capacity, stair, burst, runs, deadline_s)
    path = write_json(NAME + ("_quick" if args.quick else ""), result)
    console.print(f"machine: {machine_line(result['machine'])}; wrote {path}")


def _median_of(rs: list[dict], get) -> float | None:
    vals = [get(r) for r in rs]
    vals = [v for v in vals if v is not None]
    return median(vals) if vals else None


def _report(args, console, Table, manifest, served, front, acc, capacity, stair, burst, runs, deadline_s) -> dict:
    contenders = ["adaptive", *[f"fixed_{v}" for v in front]]
    fixed = [m for m in contenders if m != "adaptive"]
    steps = [p for _, _, p in stair]
    step_ea = {m: {p: _median_of(runs["staircase"][m], lambda r, p=p: r["steps"][p]["effective_accuracy"])
                   for p in steps} for m in contenders}
    overall = {m: {k: _median_of(runs["staircase"][m], lambda r, k=k: r["overall"][k])
                   for k in ("effective_accuracy", "on_time", "accuracy", "p50_ms", "p99_ms", "throughput_rps")}
               for m in contenders}
    step_rows, goals_steps = [], {}
    for rate, _, p in stair:
        best = max(fixed, key=lambda m: step_ea[m][p] or 0)
        gap = (step_ea["adaptive"][p] or 0) - (step_ea[best][p] or 0)
        goals_steps[p] = {"adaptive": step_ea["adaptive"][p], "best_fixed": best, "best_fixed_value": step_ea[best][p],
                          "gap_points": round(100 * gap, 2), "met": gap >= -0.02}
        step_rows.append([p.split(":")[1], f"{rate:.0f}", *[f"{100 * (step_ea[m][p] or 0):.1f}" for m in contenders],
                          best.replace("fixed_", ""), f"{100 * gap:+.1f}", "yes" if gap >= -0.02 else "**no**"])
    envelope = {m: overall["adaptive"]["effective_accuracy"] >= overall[m]["effective_accuracy"] for m in fixed}
    step_rows.append(["whole staircase", "", *[f"**{100 * overall[m]['effective_accuracy']:.1f}**" for m in contenders],
                      max(fixed, key=lambda m: overall[m]["effective_accuracy"]).replace("fixed_", ""), "",
                      "yes" if all(envelope.values()) else "**no**"])
    names = [m.replace("fixed_", "") for m in contenders]
    headers = ["step (x C)", "req/s", *[f"{n} ({100 * acc[n]:.1f}%)" if n in acc else n for n in names],
               "best fixed", "adaptive - best (pts)", "within 2 pts"]
    detail = [[n, f"{100 * (o['effective_accuracy'] or 0):.1f}", f"{100 * (o['on_time'] or 0):.1f}",
               f"{100 * (o['accuracy'] or 0):.1f}", f"{o['p50_ms']:.0f}" if o["p50_ms"] else "-",
               f"{o['p99_ms']:.0f}" if o["p99_ms"] else "-", f"{o['throughput_rps']:.0f}"]
              for n, o in zip(names, overall.values())]
    detail_headers = ["contender", "effective acc. %", "on time %", "accuracy of answers %", "p50 ms", "p99 ms", "req/s"]

    # the burst: reaction time and on-time share, adaptive against the most accurate fixed member
    pre = int(burst[0][1])
    blen = int(burst[1][1])
    burst_phase = burst[1][2]
    burst_rows, burst_info = [], {}
    for m in ("adaptive", f"fixed_{front[0]}", f"fixed_{front[-1]}"):
        rs = runs["burst"][m]
        on_time = _median_of(rs, lambda r: r["steps"][burst_phase]["on_time"])
        ea = _median_of(rs, lambda r: r["steps"][burst_phase]["effective_accuracy"])
        reactions = [_reaction_s(run, pre, blen) for run in rs]
        react = median([x for x in reactions if x is not None]) if any(x is not None for x in reactions) else None
        burst_info[m] = {"on_time": on_time, "effective_accuracy": ea, "reaction_s": react, "reactions_s": reactions}
        burst_rows.append([m.replace("fixed_", "fixed "), f"{react:.0f} s" if react is not None else "never",
                           f"{100 * (on_time or 0):.1f}", f"{100 * (ea or 0):.1f}"])
    burst_headers = ["contender", "reaction time", "on time in the burst %", "effective acc. in the burst %"]

    m = machine()
    result = {"machine": m, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "served": served.to_dict(), "front": front, "accuracy": acc,
              "latency_b8_ms": {v["id"]: v["latency_ms"]["8"] for v in manifest["variants"]},
              "macs": {v["id"]: v["macs"] for v in manifest["variants"]},
              "capacity_rps": capacity, "staircase": [list(s) for s in stair], "burst": [list(s) for s in burst],
              "deadline_ms": deadline_s * 1000, "step_effective_accuracy": step_ea, "overall": overall,
              "goals": {"steps_within_2_points": goals_steps, "all_steps_met": all(g["met"] for g in goals_steps.values()),
                        "upper_envelope": envelope, "upper_envelope_met": all(envelope.values())},
              "burst_report": burst_info, "runs": runs, "quick": args.quick}
    table = Table(title=f"effective accuracy (%) per staircase step, deadline {deadline_s * 1000:g} ms, C = "
                        f"{capacity[front[0]]:.0f} req/s (median of {args.rounds} rounds)")
    for h in headers:
        table.add_column(h)
    for row in step_rows:
        table.add_row(*[str(c).replace("**", "") for c in row])
    console.print(table)
    for title, hs, rows in (("whole staircase", detail_headers, detail), ("burst 0.3x -> 2.5x C", burst_headers, burst_rows)):
        t = Table(title=title)
        for h in hs:
            t.add_column(h)
        for row in rows:
            t.add_row(*row)
        console.print(t)
    if args.figure:
        _figure(args.figure, runs, front, acc, stair, deadline_s)
    if args.readme:
        md = (f"Staircase, effective accuracy (%) per step (column header: the variant's validation accuracy); "
              f"C = {capacity[front[0]]:.0f} req/s, the closed-loop capacity of {front[0]}; deadline "
              f"{deadline_s * 1000:g} ms; {args.step_s:g} s per step; median of {args.rounds} interleaved rounds.\n\n"
              + markdown_table(headers, step_rows) + "\n\nWhole staircase per contender:\n\n"
              + markdown_table(detail_headers, detail) + "\n\nSudden burst 0.3x -> 2.5x C:\n\n"
              + markdown_table(burst_headers, burst_rows)
              + "\n\nCapacities (req/s, closed loop, 32 clients): "
              + ", ".join(f"{k} {v:.0f}" for k, v in capacity.items())
              + f".\n\n{machine_line(m)}; exclusive CPU lock.")
        if not update_readme(NAME, md):
            console.print("README has no <!-- bench:bench_serving --> block; table not inserted")
    return result


def _figure(path: Path, runs, front, acc, stair, deadline_s) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {m: runs["staircase"][m][0]["series"] for m in ("adaptive", f"fixed_{front[0]}", f"fixed_{front[-1]}")}
    t = [b["t"] for b in series["adaptive"]]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax = axes[0]
    ax.step(t, [b["rate"] for b in series["adaptive"]], where="post", color="k", label="offered load (req/s)")
    ax.set_ylabel("offered req/s")
    ax2 = ax.twinx()
    idx = {v: i for i, v in enumerate(front)}
    ax2.plot(t, [idx.get(b["variant"], float("nan")) for b in series["adaptive"]], "o", ms=3, color="tab:blue",
             label="active variant (adaptive)")
    ax2.set_yticks(range(len(front)), [f"{v} ({100 * acc[v]:.1f}%)" for v in front])
    ax2.invert_yaxis()
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    colors = {"adaptive": "tab:blue", f"fixed_{front[0]}": "tab:red", f"fixed_{front[-1]}": "tab:green"}
    for m, s in series.items():
        axes[1].plot(t, [b["p99_ms"] for b in s], color=colors[m], label=m.replace("_", " "))
        axes[2].plot(t, [100 * (b["effective_accuracy"] or 0) for b in s], color=colors[m], label=m.replace("_", " "))
    axes[1].axhline(deadline_s * 1000, ls="--", color="gray", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p99 latency (ms)")
    axes[2].set_ylabel("effective accuracy (%)\nper second")
    axes[2].set_xlabel("seconds into the staircase")
    for a in axes[1:]:
        a.legend(fontsize=8)
    fig.suptitle("staircase: adaptive vs the most accurate and the cheapest front member, each fixed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
