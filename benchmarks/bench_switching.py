"""Switch latency and resident weight memory of PortfolioRuntime against the alternatives.

Contenders, run interleaved (every round visits every target variant, contenders in shuffled order):

* ``ours``   PortfolioRuntime: inactive variants zstd-compressed in memory, skeletons built once,
             a switch inflates one flat weight buffer;
* ``(a)``    loading the variant from disk on each switch (``portfolio.load_variant``: read, sha256,
             decompress, parse the exported program);
* ``(b)``    TorchServe's own model versions: register the variant as a new version, then
             set-default (``benchmarks/_torchserve_versions.py``; skipped with the reason if TorchServe
             or Java is missing);
* ``(c)``    every variant resident and uncompressed: a switch swaps a reference;
* ``(d)``    PortfolioRuntime with DEFLATE (zlib), the paper's choice, instead of zstd;
* ``(e)``    PortfolioRuntime with zstd's fastest levels (``--fast-level``, default -50): the
             switch-first setting, which trades memory for inflate speed.

Memory is the bytes held for model weights while each variant is active. Goals (from the issue):
switches at least 12x cheaper than (a), and at least 4x less memory than (c).

Portfolio: ``demo_out/portfolio`` if it exists (or ``--portfolio``); else one built here from
DigitsCNN (random weights, global magnitude pruning at the sparsities in ``SPARSITIES``, then
structural pruning), which the JSON records.

    python benchmarks/bench_switching.py            # full run
    python benchmarks/bench_switching.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnnshifter_lightning.demo.models import DigitsCNN  # noqa: E402
from dnnshifter_lightning.portfolio import load_variant, read_manifest, Variant, save_variant, write_manifest  # noqa: E402
from dnnshifter_lightning.serve.runtime import PortfolioRuntime  # noqa: E402
from _common import machine, machine_line, markdown_table, update_readme  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)
RESULTS = ROOT / "benchmarks" / "results" / "bench_switching.json"


def _magnitude_prune(model: torch.nn.Module, sparsity: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        for m in model.modules():  # BN with real-looking statistics and shifts of both signs
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
        if sparsity > 0:
            scores = torch.cat([w.abs().flatten() for w in weights])
            threshold = scores.kthvalue(max(1, int(sparsity * scores.numel()))).values
            for w in weights:
                w.mul_((w.abs() > threshold).float())
    return model.eval()


def build_portfolio(out: Path, width: int) -> dict[str, Any]:
    """A DigitsCNN portfolio at SPARSITIES (structurally pruned where structured.py manages)."""
    example = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    variants, structural = [], []
    for level, sparsity in enumerate(SPARSITIES):
        torch.manual_seed(level)
        model = _magnitude_prune(DigitsCNN(width=width), sparsity, seed=level)
        try:
            from dnnshifter_lightning.shrink.structured import prune_structurally
            model = prune_structurally(model, (example,)).model
            structural.append(True)
        except Exception as exc:  # noqa: BLE001 - the bench measures switching, not pruning
            print(f"[warn] structural pruning of level {level} failed ({exc}); keeping the sparse model")
            structural.append(False)
        vid = f"level_{level:02d}"
        info = save_variant(model, example, out / f"{vid}.safetensors.zst")
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        variants.append(Variant(id=vid, level=level, sparsity=sparsity, params=params, nonzero_params=nonzero,
                                macs=0, latency_ms={"1": 1.0, "8": 1.0}, accuracy=None, sparse_accuracy=None,
                                max_abs_diff=None, **info).to_dict())
    write_manifest(out, {"format_version": 2, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
                         "variants": variants})
    return {"source": "built by bench_switching.py", "model": f"DigitsCNN(width={width}), random weights",
            "sparsities": list(SPARSITIES), "structurally_pruned": structural}


class _Resident:
    """(c): every variant loaded and uncompressed; a switch swaps the reference."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.modules = {v["id"]: load_variant(path / v["file"], sha256=v["sha256"]) for v in manifest["variants"]}
        self.bytes = {vid: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
                      for vid, m in self.modules.items()}
        self.active = next(iter(self.modules.values()))

    def switch_to(self, vid: str) -> None:
        self.active = self.modules[vid]

    def resident_bytes(self) -> int:
        return sum(self.bytes.values())


class _FromDisk:
    """(a): load the variant from its file on every switch; only the active one is in memory."""

    def __init__(self, path: Path, manifest: dict[str, Any], raw_bytes: dict[str, int]) -> None:
        self.path, self.info = path, {v["id"]: v for v in manifest["variants"]}
        self.raw_bytes, self.active_id, self.active = raw_bytes, None, None

    def switch_to(self, vid: str) -> None:
        info = self.info[vid]
        self.active = None  # drop the old one first, as a memory-frugal server would
        self.active = load_variant(self.path / info["file"], sha256=info["sha256"])
        self.active_id = vid

    def resident_bytes(self) -> int:
        return self.raw_bytes[self.active_id] if self.active_id else 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (3 if args.quick else 30)
    tmp = tempfile.TemporaryDirectory(prefix="bench-switching-")
    path = Path(args.portfolio) if args.portfolio else ROOT / "demo_out" / "portfolio"
    if (path / "manifest.json").is_file():
        source = {"source": str(path)}
    else:
        path = Path(tmp.name) / "portfolio"
        print(f"no portfolio at demo_out/portfolio: building one in {path} ...")
        source = build_portfolio(path, width=16 if args.quick else 64)
    manifest = read_manifest(path)
    ids = [v["id"] for v in manifest["variants"]]

    print("loading contenders ...")
    ours = PortfolioRuntime(path, profile_batch_sizes=None)
    deflate = PortfolioRuntime(path, profile_batch_sizes=None, codec="zlib")
    fast = PortfolioRuntime(path, profile_batch_sizes=None, compression_level=args.fast_level)
    fast_name = f"(e) zstd {args.fast_level}"
    resident = _Resident(path, manifest)
    disk = _FromDisk(path, manifest, resident.bytes)
    contenders: dict[str, Any] = {"ours": ours, "(a) from disk": disk, "(c) all resident": resident,
                                  "(d) DEFLATE": deflate, fast_name: fast}
    times: dict[str, dict[str, list[float]]] = {c: {v: [] for v in ids} for c in contenders}
    memory: dict[str, dict[str, int]] = {c: {} for c in contenders}
    x = torch.randn(4, *manifest["input_spec"]["shape"])
    rng = random.Random(0)
    for r in range(rounds + 1):  # round 0 warms up
        order = ids[:]
        rng.shuffle(order)
        if len(ids) > 1 and order[0] == ours.active_id:
            order.append(order.pop(0))
        for vid in order:
            names = list(contenders)
            rng.shuffle(names)
            for name in names:
                c = contenders[name]
                t0 = time.perf_counter()
                c.switch_to(vid)
                seconds = time.perf_counter() - t0
                if r:
                    times[name][vid].append(seconds)
                    memory[name][vid] = c.resident_bytes()
        # every contender serves the same function after its switch
        ref = ours(x)
        for name in ("(d) DEFLATE", fast_name):
            torch.testing.assert_close(contenders[name](x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(resident.active(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(disk.active(x), ref, rtol=0, atol=1e-6)

    torchserve: dict[str, Any]
    if args.no_torchserve:
        torchserve = {"skipped": "--no-torchserve"}
    else:
        from _torchserve_versions import measure_versions
        torchserve = measure_versions(path, manifest, rounds=1 if args.quick else max(2, rounds // 10))

    medians = {c: {v: statistics.median(t) for v, t in per.items()} for c, per in times.items()}
    per_variant = []
    for v in ids:
        row = {"variant": v, "raw_bytes": resident.bytes[v], "compressed_bytes": ours.variant_memory(v).compressed_bytes,
               "switch_ms": {c: 1e3 * medians[c][v] for c in contenders},
               "resident_bytes": {c: memory[c][v] for c in contenders}}
        if "per_variant_s" in torchserve:
            row["switch_ms"]["(b) TorchServe versions"] = 1e3 * torchserve["per_variant_s"][v]
        row["switch_speedup_vs_a"] = medians["(a) from disk"][v] / medians["ours"][v]
        row["switch_speedup_vs_d"] = medians["(d) DEFLATE"][v] / medians["ours"][v]
        row["memory_saving_vs_c"] = memory["(c) all resident"][v] / memory["ours"][v]
        row["fast_speedup_vs_a"] = medians["(a) from disk"][v] / medians[fast_name][v]
        row["fast_memory_saving_vs_c"] = memory["(c) all resident"][v] / memory[fast_name][v]
        per_variant.append(row)
    med = lambda key: statistics.median(r[key] for r in per_variant)  # noqa: E731
    summary = {
        "switch_speedup_vs_a_median": med("switch_speedup_vs_a"),
        "switch_speedup_vs_d_median": med("switch_speedup_vs_d"),
        "memory_saving_vs_c_median": med("memory_saving_vs_c"),
        "memory_saving_vs_c_worst": min(r["memory_saving_vs_c"] for r in per_variant),
        "goal_switch_12x_vs_a": med("switch_speedup_vs_a") >= 12,
        "goal_memory_4x_vs_c": med("memory_saving_vs_c") >= 4,
        "fast_level": args.fast_level,
        "fast_speedup_vs_a_median": med("fast_speedup_vs_a"),
        "fast_speedup_vs_a_worst": min(r["fast_speedup_vs_a"] for r in per_variant),
        "fast_memory_saving_vs_c_median": med("fast_memory_saving_vs_c"),
    }
    if "per_variant_s" in torchserve:
        summary["switch_speedup_vs_b_median"] = statistics.median(
            torchserve["per_variant_s"][v] / medians["ours"][v] for v in ids)
    result = {"benchmark": "bench_switching", "machine": machine(), "quick": args.quick, "rounds": rounds,
              "portfolio": {**source, "variants": ids}, "per_variant": per_variant, "summary": summary,
              "torchserve_versions": torchserve}
    tmp.cleanup()
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["per_variant"]
    contenders = list(rows[0]["switch_ms"])
    table = Table(title=f"switch latency (median ms) and resident weight memory, {result['rounds']} rounds")
    table.add_column("variant")
    table.add_column("raw / zstd KB", justify="right")
    for c in contenders:
        table.add_column(c, justify="right")
    table.add_column("(a)/ours", justify="right")
    table.add_column("mem ours KB", justify="right")
    table.add_column("(c)/ours mem", justify="right")
    for r in rows:
        table.add_row(r["variant"], f"{r['raw_bytes'] / 1024:.0f} / {r['compressed_bytes'] / 1024:.0f}",
                      *[f"{r['switch_ms'][c]:.3f}" for c in contenders], f"{r['switch_speedup_vs_a']:.1f}x",
                      f"{r['resident_bytes']['ours'] / 1024:.0f}", f"{r['memory_saving_vs_c']:.2f}x")
    console = Console(width=max(150, Console().width))
    console.print(table)
    s = result["summary"]
    console.print(f"median switch speed-up vs (a) disk: {s['switch_speedup_vs_a_median']:.1f}x "
                  f"(goal 12x: {'met' if s['goal_switch_12x_vs_a'] else 'NOT met'}); vs (d) DEFLATE: "
                  f"{s['switch_speedup_vs_d_median']:.2f}x"
                  + (f"; vs (b) TorchServe versions: {s['switch_speedup_vs_b_median']:.0f}x"
                     if "switch_speedup_vs_b_median" in s else ""))
    console.print(f"median memory saving vs (c) all resident: {s['memory_saving_vs_c_median']:.2f}x, worst "
                  f"{s['memory_saving_vs_c_worst']:.2f}x (goal 4x: {'met' if s['goal_memory_4x_vs_c'] else 'NOT met'})")
    console.print(f"switch-first (e) zstd level {s['fast_level']}: {s['fast_speedup_vs_a_median']:.1f}x faster than "
                  f"(a) (worst {s['fast_speedup_vs_a_worst']:.1f}x), {s['fast_memory_saving_vs_c_median']:.2f}x "
                  f"less memory than (c)")
    ts = result["torchserve_versions"]
    if "skipped" in ts:
        console.print(f"(b) TorchServe versions: skipped ({ts['skipped']})")
    console.print(f"machine: {machine_line(result['machine'])}")


def readme_table(result: dict[str, Any]) -> str:
    rows = result["per_variant"]
    contenders = list(rows[0]["switch_ms"])
    headers = ["variant", "raw / zstd KB", *[f"{c} ms" for c in contenders], "(a) / ours",
               "weights held, ours KB", "(c) / ours memory"]
    body = [[r["variant"], f"{r['raw_bytes'] / 1024:.0f} / {r['compressed_bytes'] / 1024:.0f}",
             *[f"{r['switch_ms'][c]:.2f}" for c in contenders], f"{r['switch_speedup_vs_a']:.0f}x",
             f"{r['resident_bytes']['ours'] / 1024:.0f}", f"{r['memory_saving_vs_c']:.2f}x"] for r in rows]
    s = result["summary"]
    lines = [markdown_table(headers, body), "",
             f"Median switch: {s['switch_speedup_vs_a_median']:.1f}x faster than loading from disk (goal 12x: "
             f"{'met' if s['goal_switch_12x_vs_a'] else 'not met'})"
             + (f", {s['switch_speedup_vs_b_median']:.0f}x faster than TorchServe's register + set-default"
                if "switch_speedup_vs_b_median" in s else "")
             + f". Weights held: {s['memory_saving_vs_c_median']:.2f}x less than all variants resident "
             f"(goal 4x: {'met' if s['goal_memory_4x_vs_c'] else 'not met'}). "
             f"The switch-first setting, (e) zstd level {s['fast_level']}: switches "
             f"{s['fast_speedup_vs_a_median']:.1f}x faster than disk (worst variant "
             f"{s['fast_speedup_vs_a_worst']:.1f}x), weights held {s['fast_memory_saving_vs_c_median']:.2f}x less "
             f"than (c). Median of {result['rounds']} interleaved rounds. {machine_line(result['machine'])}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small portfolio, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30, quick 3)")
    parser.add_argument("--portfolio", default=None, help="portfolio dir (default demo_out/portfolio, else built)")
    parser.add_argument("--fast-level", type=int, default=-50,
                        help="zstd level of (e), the switch-first setting (default -50; negative = fast)")
    parser.add_argument("--no-torchserve", action="store_true", help="skip (b), TorchServe's model versions")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/bench_switching[_quick].json)")
    parser.add_argument("--readme", action="store_true", help="put the table into README.md")
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS.with_name("bench_switching_quick.json" if args.quick else RESULTS.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")
    if args.readme and not update_readme("switching", readme_table(result)):
        print("README has no <!-- bench:switching --> block; table not inserted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
