"""Serving under bursty load: the adaptive portfolio against each of its variants served fixed.

Every contender is the same handler in the same TorchServe (one worker each, 127.0.0.1): the
adaptive portfolio (default policy) and one archive per variant with ``fixed_variant`` set. Each
round replays the same bursty trace against every contender, in a shuffled (interleaved) order:

    light (``--light-rate`` req/s) -> burst (``--burst-rate`` req/s, open loop) -> light

The trace is open loop: latency counts from when each request was due, so a contender that falls
behind pays for its queue (requests still unsent well after the phase are dropped and count as
errors). The burst rate defaults to 1.5x the measured capacity of the most accurate variant (capped
at 0.8x that of the cheapest), measured first with a closed-loop burst. Reported per contender
(median over rounds): p50/p99 latency, throughput, accuracy, and accuracy-weighted throughput
(correct answers per second), plus ratios against the adaptive portfolio.

    python benchmarks/bench_serving.py --quick           # smoke run, ~1-2 min
    python benchmarks/bench_serving.py --portfolio demo_out/portfolio --rounds 3 --readme

Without ``--portfolio`` it trains a small DigitsCNN portfolio (widths 128/32/8, a few epochs each,
real accuracies on the held-out digits) so that it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, markdown_table, median, update_readme, write_json  # noqa: E402

from dnnshifter_lightning.serving import (  # noqa: E402
    TorchServeServer, build_archive, check_java, json_bodies, read_switches, run_load, summarize,
)
from dnnshifter_lightning.portfolio import pareto_front  # noqa: E402

NAME = "bench_serving"


def quick_portfolio(out: Path, widths=(128, 32, 8), epochs: int = 4) -> Path:
    """Train DigitsCNNs of a few widths on the digits (plain torch) and write them as a portfolio."""
    from dnnshifter_lightning.digits import DIGITS_INPUT_SPEC, DigitsDataModule
    from dnnshifter_lightning.models import DigitsCNN
    from dnnshifter_lightning.portfolio import save_variant, sort_variants, write_manifest
    from dnnshifter_lightning.profile import count_macs, count_params, measure_accuracy, measure_latency_ms

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    variants = []
    for level, width in enumerate(widths):
        torch.manual_seed(level)
        model = DigitsCNN(width=width)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            model.train()
            for x, y in dm.train_dataloader():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        model.eval()
        example = next(iter(dm.val_dataloader()))[0][:8]
        rel = f"variants/w{width}.safetensors.zst"
        info = save_variant(model, example[:2], out / rel)
        n = count_params(model)
        variants.append({
            "id": f"w{width}", "level": level, "sparsity": 0.0, "params": n, "nonzero_params": n, "file": rel,
            "bytes_raw": info["bytes_raw"], "bytes_compressed": info["bytes_compressed"], "sha256": info["sha256"],
            "macs": count_macs(model, example[:1]), "latency_ms": {str(b): measure_latency_ms(model, example[:b]) for b in (1, 8)},
            "accuracy": measure_accuracy(model, dm.val_dataloader(), 10), "sparse_accuracy": None, "max_abs_diff": 0.0,
        })
    write_manifest(out, {"format_version": 2, "input_spec": dict(DIGITS_INPUT_SPEC), "variants": sort_variants(variants)})
    return out


def held_out_requests() -> tuple[list[bytes], list[int]]:
    from dnnshifter_lightning.digits import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup()
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    return json_bodies(x), [int(v) for v in y]


def run_trace(ts: TorchServeServer, model: str, bodies, labels, args, burst_rate: float) -> dict:
    path, hdrs = f"/predictions/{model}", ts.inference_headers()
    res = []
    for phase, rate, seconds in (("light", args.light_rate, args.light_s), ("burst", burst_rate, args.burst_s),
                                 ("light", args.light_rate, args.light_s * 2)):
        res += run_load(ts.ports.inference, path, bodies, concurrency=64 if phase == "burst" else 4, rate=rate,
                        duration_s=seconds, max_requests=200_000, headers=hdrs, phase=phase)
    span = args.light_s * 3 + args.burst_s
    out = summarize(res, labels, span_s=span)
    burst = summarize([r for r in res if r.phase == "burst"], labels, span_s=args.burst_s)
    out.update({"burst_p99_ms": burst["p99_ms"], "burst_errors": burst["errors"], "burst_variants": burst["variants"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--portfolio", type=Path, help="portfolio dir (default: train a small one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fixed", nargs="+", help="variants served fixed as contenders (default: the accuracy/latency "
                    "front the policy switches along, plus level_00)")
    ap.add_argument("--light-rate", type=float, default=10.0)
    ap.add_argument("--light-s", type=float, default=2.0)
    ap.add_argument("--burst-s", type=float, default=4.0)
    ap.add_argument("--burst-rate", type=float, help="requests/s in the burst (default: from measured capacity)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short phases")
    ap.add_argument("--readme", action="store_true", help="put the table into README.md")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.light_s, args.burst_s = 1, 1.0, 2.0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    check_java()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        portfolio = args.portfolio or quick_portfolio(work / "portfolio", epochs=2 if args.quick else 4)
        manifest = json.loads((portfolio / "manifest.json").read_text())
        ids = [v["id"] for v in manifest["variants"]]
        # The policy switches along the accuracy/latency front; the fixed contenders are those variants
        # (or --fixed), plus the dense level-0 model if the portfolio has one.
        fixed = args.fixed or pareto_front(manifest["variants"])
        unknown = sorted(set(fixed) - set(ids))
        if unknown:
            raise SystemExit(f"--fixed: no variant {unknown} in {portfolio} (it has {ids})")
        if not args.fixed and "level_00" in ids and "level_00" not in fixed:
            fixed.append("level_00")
        macs = {v["id"]: v.get("macs") or 0 for v in manifest["variants"]}
        cheapest = min(fixed, key=lambda v: macs[v])
        top = next(v for v in ids if v in fixed)  # most accurate contender
        store = work / "store"
        models = {"adaptive": build_archive(portfolio, "adaptive", store).name}
        for vid in fixed:
            name = f"fixed_{vid}"
            models[name] = build_archive(portfolio, name, store, config={"handler": {"fixed_variant": vid}}).name
        bodies, labels = held_out_requests()
        with TorchServeServer(store, models, workdir=work / "ts") as ts:
            capacity = {}
            for vid in dict.fromkeys((top, cheapest)):
                res = run_load(ts.ports.inference, f"/predictions/fixed_{vid}", bodies, concurrency=16, duration_s=2.0,
                               headers=ts.inference_headers())
                capacity[vid] = summarize(res, span_s=2.0)["throughput_rps"]
            burst_rate = args.burst_rate or round(min(1.5 * capacity[top], 0.8 * capacity[cheapest]), 1)
            console.print(f"closed-loop capacity (req/s): {capacity}; burst rate {burst_rate} req/s")
            runs: dict[str, list[dict]] = {m: [] for m in models}
            order = list(models)
            for r in range(args.rounds):
                random.Random(r).shuffle(order)
                for model in order:
                    runs[model].append(run_trace(ts, model, bodies, labels, args, burst_rate))
            switches = read_switches(ts)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    keys = ("p50_ms", "p99_ms", "burst_p99_ms", "throughput_rps", "accuracy", "correct_per_s", "errors")
    summary = {m: {k: median([run[k] for run in rs if run[k] is not None] or [float("nan")]) for k in keys}
               for m, rs in runs.items()}
    ref = summary["adaptive"]
    for m, s in summary.items():
        s["correct_per_s_vs_adaptive"] = round(s["correct_per_s"] / ref["correct_per_s"], 3) if ref["correct_per_s"] else None
        s["p99_vs_adaptive"] = round(s["p99_ms"] / ref["p99_ms"], 3) if ref["p99_ms"] else None
    result = {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "variants": ids, "fixed_contenders": fixed, "cheapest": cheapest, "accuracy_manifest": {v["id"]: v["accuracy"] for v in manifest["variants"]},
              "capacity_rps": capacity, "burst_rate_rps": burst_rate, "summary": summary, "runs": runs,
              "adaptive_switches": len(switches), "quick": args.quick}
    path = write_json(NAME + ("_quick" if args.quick else ""), result)

    headers = ["contender", "p50 ms", "p99 ms", "burst p99 ms", "req/s", "accuracy", "correct/s", "errors",
               "correct/s vs adaptive"]
    rows = [[m, f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['burst_p99_ms']:.1f}", f"{s['throughput_rps']:.1f}",
             f"{s['accuracy']:.1%}", f"{s['correct_per_s']:.1f}", f"{s['errors']:.0f}",
             f"{s['correct_per_s_vs_adaptive']:.2f}x"] for m, s in summary.items()]
    table = Table(title=f"serving under bursty load (burst {burst_rate} req/s; median of {args.rounds} rounds)")
    for h in headers:
        table.add_column(h, justify="left" if h == "contender" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"machine: {machine_line(result['machine'])}; wrote {path}")
    if args.readme and not update_readme(NAME, markdown_table(headers, rows) + f"\n\n{machine_line(result['machine'])}"):
        console.print("README has no <!-- bench:bench_serving --> block; table not inserted")


if __name__ == "__main__":
    main()
