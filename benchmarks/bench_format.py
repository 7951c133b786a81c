"""Variant format 2 (safetensors + interpreted JSON graph) against format 1 (torch.export .pt2).

For the same portfolios, written in both formats, it measures (contenders interleaved, medians):

* file size: the compressed variant files on disk;
* cold open: ``PortfolioRuntime(path)`` (verify every sha256, load and validate every variant,
  build the skeletons, compress the weights in memory);
* switch: ``switch_to`` between variants (inflate one flat weight buffer);
* forward: one batch of 1 and of 8 on the active variant (the interpreter against the exported
  GraphModule).

Format 1 is loaded with the portfolio module of the last commit that wrote it (``git show
12fbec3:dnnshifter_lightning/portfolio.py``), so this needs the git history.

    python benchmarks/bench_format.py            # full run
    python benchmarks/bench_format.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnnshifter_lightning import portfolio as new  # noqa: E402
from dnnshifter_lightning.demo.models import DigitsCNN, cifar_resnet  # noqa: E402
from dnnshifter_lightning.serve import runtime as rt_mod  # noqa: E402
from _common import machine, machine_line, markdown_table, write_json  # noqa: E402

OLD_COMMIT = "12fbec3"


def _old_module() -> Any:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:dnnshifter_lightning/portfolio.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "portfolio_format1.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("portfolio_format1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own code from git history, not a portfolio file
    return module


def _models(name: str) -> tuple[list[torch.nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    if name == "digits":
        models = [DigitsCNN(width=w) for w in (128, 96, 64, 32)]
        x = torch.randn(8, 1, 8, 8)
    else:
        models = [cifar_resnet(20, width_mult=m) for m in (1.0, 0.5)]
        x = torch.randn(8, 3, 32, 32)
    for m in models:
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
    return [m.eval() for m in models], x


def _write(fmt: Any, version: int, suffix: str, models: list[torch.nn.Module], x: torch.Tensor, out: Path) -> int:
    variants = []
    for i, m in enumerate(models):
        info = fmt.save_variant(m, x[:2], out / f"v{i}{suffix}")
        variants.append({"id": f"v{i}", "level": i, "sparsity": 0.0, "params": 0, "nonzero_params": 0, "macs": 0,
                         "latency_ms": {"1": 1.0, "8": 2.0}, "accuracy": 0.9 - 0.01 * i, "sparse_accuracy": None,
                         "max_abs_diff": None, **info})
    fmt.write_manifest(out, {"format_version": version, "input_spec": {"shape": list(x.shape[1:]), "dtype": "float32"},
                             "variants": variants})
    return sum(v["bytes_compressed"] for v in variants)


def _open(fmt_name: str, path: Path, old: Any) -> rt_mod.PortfolioRuntime:
    if fmt_name == "new":
        return rt_mod.PortfolioRuntime(path, profile_batch_sizes=None, pin_inflate_interval_s=0.0)
    saved = rt_mod.load_variant, rt_mod.verify_portfolio
    rt_mod.load_variant = lambda p, sha256=None, **_: old.load_variant(p, sha256=sha256)
    rt_mod.verify_portfolio = old.verify_portfolio
    try:
        return rt_mod.PortfolioRuntime(path, profile_batch_sizes=None, pin_inflate_interval_s=0.0)
    finally:
        rt_mod.load_variant, rt_mod.verify_portfolio = saved


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = _old_module()
    opens, switches, forwards = (2, 8, 30) if args.quick else (7, 120, 100)
    results: dict[str, Any] = {"machine": machine(), "old_commit": OLD_COMMIT, "torch_threads": 1, "portfolios": {}}
    for name in ("digits", "resnet20"):
        models, x = _models(name)
        tmp = Path(tempfile.mkdtemp())
        dirs = {"old": tmp / "old", "new": tmp / "new"}
        size = {"old": _write(old, 1, ".pt2.zst", models, x, dirs["old"]),
                "new": _write(new, new.FORMAT_VERSION, new.VARIANT_SUFFIX, models, x, dirs["new"])}
        samples: dict[str, dict[str, list[float]]] = {f: {"open": [], "switch": [], "b1": [], "b8": []} for f in dirs}
        per_target: dict[str, dict[str, list[float]]] = {f: {} for f in dirs}
        runtimes = {f: _open(f, dirs[f], old) for f in dirs}
        ids = runtimes["new"].variant_ids
        for f in dirs:  # same outputs in both formats
            for vid in ids:
                a = runtimes[f].infer(x, variant_id=vid)[0]
                b = runtimes["new"].infer(x, variant_id=vid)[0]
                assert torch.allclose(a, b, atol=1e-5), (name, vid)
        for _ in range(opens):
            for f in random.sample(list(dirs), 2):
                samples[f]["open"].append(_time(lambda: _open(f, dirs[f], old)))
        for i in range(switches):
            target = ids[(i + 1) % len(ids)]
            for f in random.sample(list(dirs), 2):
                seconds = _time(lambda: runtimes[f].switch_to(target))
                samples[f]["switch"].append(seconds)
                per_target[f].setdefault(target, []).append(seconds)
        x1, x8 = x[:1], x
        with torch.inference_mode():
            for _ in range(forwards):
                for f in random.sample(list(dirs), 2):
                    samples[f]["b1"].append(_time(lambda: runtimes[f](x1)))
                    samples[f]["b8"].append(_time(lambda: runtimes[f](x8)))
        summary: dict[str, Any] = {"variants": len(ids), "bytes_compressed": size}
        for key in ("open", "switch", "b1", "b8"):
            med = {f: statistics.median(samples[f][key]) * 1e3 for f in dirs}
            q = {f: statistics.quantiles(samples[f][key], n=4) if len(samples[f][key]) >= 4 else [math_nan()] * 3
                 for f in dirs}
            summary[key + "_ms"] = {f: {"median": med[f], "p25": q[f][0] * 1e3, "p75": q[f][2] * 1e3} for f in dirs}
            summary[key + "_ratio_new_over_old"] = med["new"] / med["old"]
        summary["switch_by_target_ms"] = {
            vid: {f: statistics.median(per_target[f][vid]) * 1e3 for f in dirs} for vid in ids}
        summary["switch_by_target_bytes"] = {vid: runtimes["new"].variant_memory(vid).inflated_bytes for vid in ids}
        results["portfolios"][name] = summary
        print(name, json.dumps(summary, indent=1), file=sys.stderr)
    rows = []
    for name, s in results["portfolios"].items():
        rows.append([f"{name} ({s['variants']} variants)", "file size (KB)", f"{s['bytes_compressed']['old'] / 1e3:.1f}",
                     f"{s['bytes_compressed']['new'] / 1e3:.1f}",
                     f"{s['bytes_compressed']['new'] / s['bytes_compressed']['old']:.2f}"])
        for key, label in (("open", "cold open (ms)"), ("switch", "switch, all targets (ms)"),
                           ("b1", "forward batch 1 (ms)"), ("b8", "forward batch 8 (ms)")):
            m = s[key + "_ms"]
            rows.append(["", label, f"{m['old']['median']:.3f} [{m['old']['p25']:.3f}-{m['old']['p75']:.3f}]",
                         f"{m['new']['median']:.3f} [{m['new']['p25']:.3f}-{m['new']['p75']:.3f}]",
                         f"{s[key + '_ratio_new_over_old']:.2f}"])
            if key == "switch":
                for vid, t in s["switch_by_target_ms"].items():
                    rows.append(["", f"switch to {vid} ({s['switch_by_target_bytes'][vid] / 2**20:.1f} MiB)",
                                 f"{t['old']:.3f}", f"{t['new']:.3f}", f"{t['new'] / t['old']:.2f}"])
    table = markdown_table(["portfolio", "measure", "format 1 (torch.export)", "format 2 (safetensors + graph)",
                            "ratio 2/1"], rows)
    results["table"] = table
    print(table)
    print(machine_line(results["machine"]))
    if not args.quick:
        write_json("bench_format", results)


def math_nan() -> float:
    return float("nan")


if __name__ == "__main__":
    main()
