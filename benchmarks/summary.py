"""One table from every benchmark's JSON, side by side with the DNNShifter paper's figures.

Reads ``benchmarks/results/{bench_training,bench_pruning,bench_switching,bench_serving}.json`` (the
full runs, not ``*_quick.json``) and prints the table; ``--readme`` puts it in README.md's
``<!-- bench:summary -->`` block. Rows whose benchmark has not been run say so; nothing is
estimated. Paper figures are from Eccles et al., arXiv 2309.06973, on their models and hardware.

    python benchmarks/summary.py --readme
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, markdown_table, update_readme  # noqa: E402

from dnnshifter_lightning.serve.defaults import ENGINES  # noqa: E402


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _where(result: dict[str, Any]) -> str:
    m = result["machine"]
    cpu = " ".join(w for w in m.get("cpu", "").replace("(R)", "").replace("(TM)", "").split() if w != "Processor")
    return f"{m['date']}, {m['cpu_count']} CPU cores" + (f" ({cpu})" if cpu else "") + (f", {m['gpu']}" if m.get("gpu") else "")


def rows() -> list[list[str]]:
    out: list[list[str]] = []
    missing = "not run yet"

    training = _load("bench_training")
    if training:
        by = {r["contender"]: r for r in training["results"]}
        imp = by["IterativeMagnitudePruning"]["ratio_to_plain"]
        mp = by["ModelPruning (lottery ticket)"]["ratio_to_plain"]
        text = f"{imp:.3f}x with 1.2 s levels (ModelPruning: {mp:.3f}x)"
        long = _load("bench_training_long")
        if long:
            by_long = {r["contender"]: r for r in long["results"]}
            text += (f"; {by_long['IterativeMagnitudePruning']['ratio_to_plain']:.3f}x with longer levels "
                     f"(ModelPruning: {by_long['ModelPruning (lottery ticket)']['ratio_to_plain']:.3f}x)")
        out.append(["IMP callback: whole-fit time vs the same fit without it", "(not reported; goal <= 1.03x)",
                    text, _where(training), "bench_training"])
    else:
        out.append(["IMP callback: whole-fit time vs the same fit without it", "(goal <= 1.03x)", missing, "", "bench_training"])

    pruning = _load("bench_pruning")
    if pruning:
        arch = pruning["architectures"]
        ms = {a: [r["prune_seconds_median"] * 1e3 for r in arch if r["arch"] == a] for a in {r["arch"] for r in arch}}
        first = {a: [r["prune_seconds_first"] * 1e3 for r in arch if r["arch"] == a and "prune_seconds_first" in r]
                 for a in ms}
        times = ", ".join(f"{a} {min(v):.0f}-{max(v):.0f} ms" + (f" (first variant {min(first[a]):.0f}-{max(first[a]):.0f} ms)"
                                                                 if first[a] else "") for a, v in sorted(ms.items()))
        out.append(["Structural pruning time per variant", "100-220 ms", times, _where(pruning), "bench_pruning"])
        best_p = max(arch, key=lambda r: r["param_ratio"])
        digits_meta = pruning["digits_time_to_variant"]
        # the digits tables may come from another machine than the architectures' (bench_pruning --digits-only)
        digits_where = _where({"machine": digits_meta["machine"]}) if "machine" in digits_meta else _where(pruning)
        versus = digits_meta.get("variant_vs_sparse") or []
        if versus:
            real = max(versus, key=lambda v: v["param_ratio"])
            fast = max(versus, key=lambda v: v["latency_ratio"]["8"])
            out.append(["Variant smaller than its sparse source, real IMP checkpoints (digits, best)", "up to 5.14x",
                        f"{real['param_ratio']:.2f}x (level {real['level']}, {real['sparsity']:.2%} sparse, "
                        f"accuracy {real['accuracy_variant']:.1%})", digits_where, "bench_pruning"])
            out.append(["Variant faster than its sparse source, real IMP checkpoints (digits, CPU, batch 8, best)",
                        "up to 1.67x", f"{fast['latency_ratio']['8']:.2f}x (level {fast['level']}, "
                        f"{fast['sparsity']:.2%} sparse, accuracy {fast['accuracy_variant']:.1%}; batch 1: "
                        f"{fast['latency_ratio']['1']:.2f}x)", digits_where, "bench_pruning"])
        elif digits_meta["rows"]:
            real = max(digits_meta["rows"], key=lambda d: digits_meta["dense_params"] / d["params_variant"])
            out.append(["Variant smaller than its sparse source, real IMP checkpoints (digits, best)", "up to 5.14x",
                        f"{digits_meta['dense_params'] / real['params_variant']:.2f}x (level {real['level']}, "
                        f"{real['sparsity']:.1%} sparse, accuracy {real['ours_accuracy']:.1%})",
                        digits_where, "bench_pruning"])
        out.append(["Variant smaller than its sparse source, IMP-shaped synthetic checkpoints (best)", "up to 5.14x",
                    f"{best_p['param_ratio']:.2f}x ({best_p['arch']}, {best_p['sparsity']:.0%} sparse)",
                    _where(pruning), "bench_pruning"])
        best_l = max(arch, key=lambda r: r["latency_ratio"]["1"])
        out.append(["Variant faster than its sparse source, synthetic checkpoints (CPU, batch 1, best)", "up to 1.67x",
                    f"{best_l['latency_ratio']['1']:.2f}x ({best_l['arch']}, {best_l['sparsity']:.0%} sparse)",
                    _where(pruning), "bench_pruning"])
        wrong = [r["dnnshifter"]["rel_error_fresh_inputs"] for r in arch]
        ours = [r["rel_error_fresh_inputs"] for r in arch]
        out.append(["Output error of the surgery (max relative, fresh inputs)", "(not reported)",
                    f"ours {max(ours):.1e}; DNNShifter's rule {min(wrong):.1e} to {max(wrong):.1e}",
                    _where(pruning), "bench_pruning"])
        digits = pruning["digits_time_to_variant"]["rows"]
        speed = [d["speedup"] for d in digits if d["recovered"]]
        text = (f"{min(speed):.0f}x to {max(speed):.0f}x (median {statistics.median(speed):.0f}x, {len(speed)} levels)"
                if speed else "no level recovered")
        lower = [d["speedup"] for d in digits if not d["recovered"]]
        if lower:
            text += f"; >= {min(lower):.0f}x for {len(lower)} levels fine-tuning never caught up with"
        out.append(["Time to a variant vs prune + fine-tune (digits)", "93x faster", text,
                    digits_where, "bench_pruning"])
    else:
        out.append(["Structural pruning", "100-220 ms; 5.14x smaller; 1.67x faster; 93x", missing, "", "bench_pruning"])

    switching = _load("bench_switching")
    if switching:
        s = switching["summary"]
        vs_b = (f"; {s['switch_speedup_vs_b_median']:.0f}x vs TorchServe versions"
                if "switch_speedup_vs_b_median" in s else "")
        out.append(["Switch overhead vs loading the variant from disk (median)", "11.9x lower",
                    f"{s['switch_speedup_vs_a_median']:.1f}x lower (goal 12x: "
                    f"{'met' if s['goal_switch_12x_vs_a'] else 'not met'}){vs_b}", _where(switching), "bench_switching"])
        out.append(["Weight memory vs every variant resident (median)", "3.8x less",
                    f"{s['memory_saving_vs_c_median']:.2f}x less (goal 4x: "
                    f"{'met' if s['goal_memory_4x_vs_c'] else 'not met'})", _where(switching), "bench_switching"])
    else:
        out.append(["Switching and memory", "11.9x; 3.8x", missing, "", "bench_switching"])

    serving = _load("bench_serving")
    if serving:
        # one row per engine (runs before the LitServe column had only TorchServe's, at the top level)
        engines = serving.get("engines") or {serving.get("reference_engine", "torchserve"): serving}
        for engine, rep in engines.items():
            overall, goals = rep["overall"], rep["goals"]
            ad = overall["adaptive"]
            best = max((c for c in overall if c != "adaptive"), key=lambda c: overall[c]["effective_accuracy"])
            steps = goals["steps_within_2_points"].values()
            name = ENGINES.get(engine, engine)
            out.append([f"Serving a staircase on {name}: effective accuracy (correct within 100 ms / offered), "
                        "adaptive vs best fixed variant", "(not reported)",
                        f"{ad['effective_accuracy']:.1%} vs {overall[best]['effective_accuracy']:.1%} ({best}); "
                        f"within 2 points of the step's best fixed on {sum(g['met'] for g in steps)} of "
                        f"{len(steps)} steps (goal: all, and the upper envelope: "
                        f"{'met' if goals['upper_envelope_met'] else 'not met'})",
                        _where(serving), "bench_serving"])
    else:
        out.append(["Serving under bursty load", "", missing, "", "bench_serving"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readme", action="store_true", help="put the table into README.md")
    args = ap.parse_args(argv)
    headers = ["what", "paper", "measured here", "machine, date", "benchmark"]
    table = markdown_table(headers, rows())
    print(table)
    if args.readme and not update_readme("summary", table):
        print("README has no <!-- bench:summary --> block; table not inserted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
