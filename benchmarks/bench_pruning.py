"""Structural pruning: time per variant, what a variant saves, DNNShifter's rule, time to a variant.

1. **Pruning time and savings** for CIFAR VGG-16 (3x32x32, 10 classes) and torchvision ResNet-50
   (3x64x64, 200 classes: Tiny-ImageNet-shaped, as in the paper). The sparse checkpoints are **not
   IMP-trained**. They have IMP's *shape* of sparsity: a randomly initialised model, global magnitude
   pruning of every conv/Linear except the classifier at 90/95/98/99%, plus, in each layer, the
   ``s/2`` fraction of filters with the smallest L1 norm zeroed whole (IMP concentrates survivors
   in few filters), with random BN statistics and shifts of both signs. For each checkpoint:
   ``prune_structurally`` time (median), variant vs sparse source parameter ratio, file-size
   ratio, and CPU latency ratio at batch 1 and 8 (medians, interleaved).
2. **DNNShifter's rule** on the same checkpoints (``_paper_rule.py``, benchmark-side): drop every
   channel whose filters are all zero, together with its BN shift, and compensate nothing. We report
   channels removed and the output error this introduces (max |y - y_sparse| / max |y_sparse| on
   fresh inputs).
3. **Time to a variant on digits.** A DigitsClassifier is trained with the IMP callback. Each
   level's checkpoint becomes a variant by structural pruning, without fine-tuning. The
   conventional route prunes the dense level-0 model to the same size with Torch-Pruning's
   ``MagnitudePruner`` (L1 filter importance, uniform ratio), then fine-tunes until it reaches the
   variant's accuracy (or ``--max-finetune-epochs``). We report both times and both accuracies.

    python benchmarks/bench_pruning.py            # full run (the lead's final figures)
    python benchmarks/bench_pruning.py --quick    # smoke run
    python benchmarks/bench_pruning.py --readme   # also replace the README table
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
import zstandard
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, machine_line, markdown_table, median, update_readme, write_json  # noqa: E402

from dnnshifter_lightning.demo.models import cifar_vgg16  # noqa: E402
from _paper_rule import prune_zero_filters  # noqa: E402

from dnnshifter_lightning.shrink.structured import clear_analysis_cache, prune_structurally  # noqa: E402

console = Console(width=200)
TIME_NOTE = ("prune ms: median time per variant once the architecture's dependency analysis is cached, as for "
             "every level of a portfolio after the first; first ms: one run with an empty cache, i.e. the first "
             "variant of an architecture, including Torch-Pruning's trace")
SPARSITY_NOTE = ("checkpoints: random init + global magnitude pruning (classifier dense) + smallest-L1 s/2 "
                 "filters zeroed per layer + random BN stats; IMP's shape of sparsity, not IMP-trained")


# ------------------------------------------------------------------------------------ checkpoints

def imp_shaped(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prunable = layers[:-1]  # the classifier stays dense
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))
        magnitudes = torch.cat([m.weight.abs().flatten() for m in prunable])
        k = int(sparsity * magnitudes.numel())
        threshold = magnitudes.kthvalue(k).values if k else -1.0
        for m in prunable:
            w = m.weight
            w[w.abs() <= threshold] = 0
            norms = w.abs().reshape(w.shape[0], -1).sum(dim=1)
            w[norms.argsort()[: int(sparsity / 2 * w.shape[0])]] = 0
    return model.eval()


ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cifar_vgg16": (lambda: cifar_vgg16(), (3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None, num_classes=200), (3, 64, 64)),
}


# --------------------------------------------------------------------------------- measurements

def file_bytes(module: nn.Module, example: torch.Tensor, method: str) -> tuple[int, int]:
    """(raw, compressed) bytes of the module as stored."""
    if method == "save_variant":
        from dnnshifter_lightning.portfolio import save_variant
        with tempfile.TemporaryDirectory() as tmp:
            info = save_variant(module, example, Path(tmp) / "v.safetensors.zst")
        return info["bytes_raw"], info["bytes_compressed"]
    raw = b"".join(t.detach().contiguous().numpy().tobytes() for t in module.state_dict().values())
    return len(raw), len(zstandard.ZstdCompressor(level=3).compress(raw))


def latencies(models: dict[str, nn.Module], shape: tuple[int, ...], batch: int, rounds: int) -> dict[str, float]:
    x = torch.randn(batch, *shape)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(2):
                m(x)
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                t0 = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - t0)
    return {k: median(v) * 1e3 for k, v in times.items()}


def relative_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))


def bench_architecture(name: str, sparsities: list[float], rounds: int, lat_rounds: int, size_method: str) -> list[dict]:
    build, shape = ARCHS[name]
    rows = []
    for s in sparsities:
        torch.manual_seed(0)
        sparse = imp_shaped(build(), s)
        example = torch.randn(2, *shape)
        # The first variant of an architecture pays for the dependency analysis (Torch-Pruning's
        # trace and the grouping); the later ones reuse it, as a portfolio build's levels do.
        clear_analysis_cache()
        first = prune_structurally(sparse, example)
        assert not first.analysis_reused
        ours_t, dnn_t = [], []
        for _ in range(rounds):  # interleaved: ours, then DNNShifter's rule, on the same checkpoint
            ours = prune_structurally(sparse, example)
            assert ours.analysis_reused
            ours_t.append(ours.seconds)
            dnn = prune_zero_filters(sparse, example)  # benchmarks/_paper_rule.py
            dnn_t.append(dnn.seconds)
        fresh = torch.randn(4, *shape)
        raw_s, zst_s = file_bytes(sparse, example, size_method)
        raw_v, zst_v = file_bytes(ours.model, example, size_method)
        lat = {b: latencies({"sparse": sparse, "variant": ours.model}, shape, b, lat_rounds) for b in (1, 8)}
        rows.append({
            "arch": name, "sparsity": s, "input_shape": list(shape),
            "prune_seconds_median": median(ours_t), "prune_seconds_all": ours_t,
            "prune_seconds_first": first.seconds, "timings_first": first.timings,
            "timings_last": ours.timings, "passes": ours.passes,
            "params_sparse": ours.params_before, "params_variant": ours.params_after,
            "nonzero_sparse": int(sum(int(p.count_nonzero()) for p in sparse.parameters())),
            "param_ratio": ours.params_before / ours.params_after,
            "bytes_raw_sparse": raw_s, "bytes_raw_variant": raw_v, "bytes_zstd_sparse": zst_s, "bytes_zstd_variant": zst_v,
            "file_ratio_raw": raw_s / raw_v, "file_ratio_zstd": zst_s / zst_v,
            "latency_ms": {str(b): lat[b] for b in lat},
            "latency_ratio": {str(b): lat[b]["sparse"] / lat[b]["variant"] for b in lat},
            "channels_removed": ours.channels_removed, "reasons": ours.reason_counts,
            "max_abs_diff": ours.max_abs_diff, "rel_error_fresh_inputs": relative_error(sparse, ours.model, fresh),
            "dnnshifter": {"channels_removed": dnn.channels_removed, "seconds_median": median(dnn_t),
                           "params": dnn.params_after, "rel_error_fresh_inputs": relative_error(sparse, dnn.model, fresh)},
        })
        console.log(f"{name} s={s:.2f}: {ours.params_before / ours.params_after:.2f}x fewer params, "
                    f"pruned in {median(ours_t) * 1e3:.0f} ms (first variant {first.seconds * 1e3:.0f} ms), "
                    f"reasons {ours.reason_counts}")
    return rows


# ------------------------------------------------------------------------------- time to variant

def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _magnitude_prune_to(dense: nn.Module, target_params: int, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's MagnitudePruner at the uniform ratio whose result is closest to target_params."""
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).train()
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[model.classifier])
        pruner.step()
        return model

    lo, hi = 0.0, 0.99
    for _ in range(12):
        mid = (lo + hi) / 2
        if sum(p.numel() for p in pruned(mid).parameters()) > target_params:
            lo = mid
        else:
            hi = mid
    return pruned(hi)


def bench_digits(levels: int, epochs_per_level: int, prune_fraction: float, width: int, max_ft_epochs: int) -> dict:
    import lightning as L
    from dnnshifter_lightning import IterativeMagnitudePruning
    from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0, workers=True)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    with tempfile.TemporaryDirectory() as tmp:
        imp = IterativeMagnitudePruning(levels=levels, epochs_per_level=epochs_per_level, prune_fraction=prune_fraction,
                                        rewind_to=0, checkpoint_dir=Path(tmp) / "imp", verbose=False)
        trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            default_root_dir=tmp)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(DigitsClassifier(width=width), datamodule=dm)
        imp_seconds = time.perf_counter() - t0
        modules = []
        for level in range(levels + 1):
            module = DigitsClassifier(width=width)
            ckpt = torch.load(Path(tmp) / "imp" / f"level_{level:02d}.ckpt", map_location="cpu", weights_only=False)
            module.load_state_dict(ckpt["state_dict"])
            modules.append((level, ckpt.get("dnnshifter", {}).get("sparsity", float("nan")), module.eval()))

    result = time_to_variants(modules, dm, max_ft_epochs)
    result.update({"imp_fit_seconds": imp_seconds, "levels": levels, "epochs_per_level": epochs_per_level,
                   "prune_fraction": prune_fraction, "width": width})
    return result


def bench_digits_checkpoints(imp_dir: Path, max_ft_epochs: int, lat_rounds: int = 30,
                             levels: list[int] | None = None) -> dict:
    """Variant vs sparse source and time to a variant, from level checkpoints that IMP already wrote
    (e.g. ``make demo``'s)."""
    from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    modules = []
    for path in sorted(Path(imp_dir).glob("level_*.ckpt")):
        module = DigitsClassifier.load_from_checkpoint(path, map_location="cpu", strict=True).eval()
        meta = torch.load(path, map_location="cpu", weights_only=False).get("dnnshifter", {})
        modules.append((int(meta.get("level", path.stem[-2:])), meta.get("sparsity", float("nan")), module))
    if len(modules) < 2 or modules[0][0] != 0:
        raise SystemExit(f"--imp-dir {imp_dir}: need level_00.ckpt and later levels")
    result = time_to_variants(modules, dm, max_ft_epochs, levels=levels)
    result.update({"imp_dir": str(imp_dir), "width": modules[0][2].hparams.get("width"),
                   "levels": modules[-1][0], "conventional_levels": levels,
                   "variant_vs_sparse": variant_vs_sparse(modules, dm, lat_rounds),
                   "torch_threads": torch.get_num_threads(), "machine": machine()})
    return result


def variant_vs_sparse(modules: list, dm, lat_rounds: int) -> list[dict]:
    """Every level's variant against its own sparse checkpoint: parameters, zstd file size (as
    ``save_variant`` stores it), and CPU latency at batch 1 and 8 (medians of interleaved rounds, on
    the torch threads of this process), plus both accuracies on the validation split."""
    xv, yv = dm._val.tensors
    shape = tuple(xv.shape[1:])
    rows = []
    for level, sparsity, module in modules:
        sparse = module.model.eval()
        ours = prune_structurally(sparse, xv[:64])
        lat = {b: latencies({"sparse": sparse, "variant": ours.model}, shape, b, lat_rounds) for b in (1, 8)}
        _, zst_s = file_bytes(sparse, xv[:2], "save_variant")
        _, zst_v = file_bytes(ours.model, xv[:2], "save_variant")
        rows.append({
            "level": level, "sparsity": sparsity, "params_sparse": ours.params_before, "params_variant": ours.params_after,
            "param_ratio": ours.params_before / ours.params_after, "bytes_zstd_sparse": zst_s, "bytes_zstd_variant": zst_v,
            "file_ratio_zstd": zst_s / zst_v, "latency_ms": {str(b): lat[b] for b in lat},
            "latency_ratio": {str(b): lat[b]["sparse"] / lat[b]["variant"] for b in lat},
            "accuracy_sparse": _accuracy(sparse, xv, yv), "accuracy_variant": _accuracy(ours.model, xv, yv),
        })
        console.log(f"digits level {level}: {rows[-1]['param_ratio']:.2f}x fewer params, "
                    f"{rows[-1]['latency_ratio']['8']:.2f}x faster at batch 8")
    return rows


def time_to_variants(modules: list, dm, max_ft_epochs: int, min_shrink: float = 1.1,
                     levels: list[int] | None = None) -> dict:
    """Ours (structural pruning, no fine-tuning) against Torch-Pruning to the same size + fine-tuning,
    for every level whose variant is at least ``min_shrink`` times smaller than the dense model (for
    the others there is nothing to prune conventionally), or only for ``levels`` when given."""
    xv, yv = dm._val.tensors
    xt, yt = dm._train.tensors
    dense = modules[0][2].model
    dense_params = sum(p.numel() for p in dense.parameters())
    rows, skipped = [], []
    for level, sparsity, module in modules[1:]:
        if levels is not None and level not in levels:
            continue
        ours = prune_structurally(module, xv[:64])
        if ours.params_after * min_shrink > dense_params:
            skipped.append(level)
            continue
        acc_variant, acc_sparse = _accuracy(ours.model, xv, yv), _accuracy(module, xv, yv)
        torch.manual_seed(level)
        t0 = time.perf_counter()  # conventional: structured magnitude pruning + fine-tuning
        conv = _magnitude_prune_to(dense, ours.params_after, xv[:2])
        search_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt = torch.optim.SGD(conv.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        acc_conv, epochs = _accuracy(conv, xv, yv), 0
        while acc_conv < acc_variant and epochs < max_ft_epochs:
            conv.train()
            perm = torch.randperm(len(yt))
            for i in range(0, len(yt), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(conv(xt[idx]), yt[idx]).backward()
                opt.step()
            epochs += 1
            acc_conv = _accuracy(conv, xv, yv)
        conv_seconds = time.perf_counter() - t0
        rows.append({
            "level": level, "sparsity": sparsity, "params_variant": ours.params_after,
            "params_conventional": sum(p.numel() for p in conv.parameters()),
            "ours_seconds": ours.seconds, "ours_accuracy": acc_variant, "sparse_accuracy": acc_sparse,
            "conventional_seconds": conv_seconds, "conventional_ratio_search_seconds": search_seconds,
            "conventional_accuracy": acc_conv, "conventional_finetune_epochs": epochs,
            "recovered": acc_conv >= acc_variant, "speedup": conv_seconds / ours.seconds,
        })
        console.log(f"digits level {level}: ours {ours.seconds * 1e3:.0f} ms acc {acc_variant:.3f}; "
                    f"conventional {conv_seconds:.2f} s ({epochs} epochs) acc {acc_conv:.3f}")
    return {"max_finetune_epochs": max_ft_epochs, "dense_params": dense_params,
            "levels_skipped_not_smaller": skipped,
            "note": "IMP-trained with IterativeMagnitudePruning (real checkpoints); conventional = Torch-Pruning "
                    "MagnitudePruner (L1, uniform ratio found by bisection, excluded from its time) + SGD fine-tuning "
                    "until the variant's accuracy (or max_finetune_epochs); neither side counts IMP training",
            "rows": rows}


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one sparsity, few rounds, small digits run")
    ap.add_argument("--rounds", type=int, default=5, help="pruning repetitions per checkpoint")
    ap.add_argument("--latency-rounds", type=int, default=30)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--max-finetune-epochs", type=int, default=20)
    ap.add_argument("--imp-dir", type=Path, help="digits level checkpoints to use (e.g. demo_out/imp from make demo) "
                    "instead of training a small IMP run here")
    ap.add_argument("--conventional-levels", type=int, nargs="+",
                    help="with --imp-dir: run prune + fine-tune only for these levels (it is the slow part)")
    ap.add_argument("--digits-only", action="store_true",
                    help="with --imp-dir: only the digits tables; keeps the architectures' results of the last run")
    ap.add_argument("--readme", action="store_true", help="replace the README blocks bench:bench_pruning(_digits)")
    args = ap.parse_args(argv)
    if args.digits_only and not args.imp_dir:
        ap.error("--digits-only needs --imp-dir")
    if args.quick:
        args.rounds, args.latency_rounds, args.sparsities, args.max_finetune_epochs = 2, 3, [0.95], 2
    size_method = "state_dict+zstd" if args.quick else "save_variant"
    torch.manual_seed(0)

    arch_rows = []
    previous = RESULTS / "bench_pruning.json"
    if args.digits_only:  # the architectures' rows (and their machine) stay those of the last full run
        old = json.loads(previous.read_text()) if previous.exists() else {}
        arch_rows = old.get("architectures", [])
    else:
        for name in args.archs:
            arch_rows += bench_architecture(name, args.sparsities, args.rounds, args.latency_rounds, size_method)
    if args.imp_dir:
        digits = bench_digits_checkpoints(args.imp_dir, args.max_finetune_epochs, args.latency_rounds,
                                          args.conventional_levels)
    else:
        digits = bench_digits(levels=2 if args.quick else 5, epochs_per_level=1 if args.quick else 4,
                              prune_fraction=0.5 if args.quick else 0.4, width=16 if args.quick else 32,
                              max_ft_epochs=args.max_finetune_epochs)
    result = {"benchmark": "bench_pruning", "machine": machine(), "quick": args.quick, "checkpoints": SPARSITY_NOTE,
              "file_size_method": size_method, "architectures": arch_rows, "digits_time_to_variant": digits}
    if args.digits_only:
        result["machine"] = old.get("machine", result["machine"])  # the architectures' machine; digits has its own
    path = write_json("bench_pruning" + ("_quick" if args.quick else ""), result)

    headers = ["model", "sparsity", "prune ms", "first ms", "params x", "file x (zstd)", "latency x b1", "latency x b8",
               "removed (ours)", "removed (DNNShifter)", "DNNShifter rel. error", "ours rel. error"]
    rows = [[r["arch"], f"{r['sparsity']:.0%}", f"{r['prune_seconds_median'] * 1e3:.0f}",
             f"{r['prune_seconds_first'] * 1e3:.0f}", f"{r['param_ratio']:.2f}",
             f"{r['file_ratio_zstd']:.2f}", f"{r['latency_ratio']['1']:.2f}", f"{r['latency_ratio']['8']:.2f}",
             r["channels_removed"], r["dnnshifter"]["channels_removed"],
             f"{r['dnnshifter']['rel_error_fresh_inputs']:.2e}", f"{r['rel_error_fresh_inputs']:.1e}"] for r in arch_rows]
    dheaders = ["level", "sparsity", "params", "ours ms", "ours acc", "conventional s", "conv. acc", "conv. epochs", "speed-up"]
    drows = [[d["level"], f"{d['sparsity']:.1%}", d["params_variant"], f"{d['ours_seconds'] * 1e3:.0f}",
              f"{d['ours_accuracy']:.3f}", f"{d['conventional_seconds']:.2f}", f"{d['conventional_accuracy']:.3f}",
              d["conventional_finetune_epochs"],
              f"{d['speedup']:.0f}x" if d["recovered"] else f">= {d['speedup']:.0f}x (not recovered)"]
             for d in digits["rows"]]
    vheaders = ["level", "sparsity", "acc sparse", "acc variant", "params (sparse -> variant)", "params x",
                "file x (zstd)", "ms b1 (sparse -> variant)", "latency x b1", "ms b8 (sparse -> variant)", "latency x b8"]
    vrows = [[v["level"], f"{v['sparsity']:.2%}", f"{v['accuracy_sparse']:.3f}", f"{v['accuracy_variant']:.3f}",
              f"{v['params_sparse']:,} -> {v['params_variant']:,}", f"{v['param_ratio']:.2f}", f"{v['file_ratio_zstd']:.2f}",
              f"{v['latency_ms']['1']['sparse']:.2f} -> {v['latency_ms']['1']['variant']:.2f}",
              f"{v['latency_ratio']['1']:.2f}",
              f"{v['latency_ms']['8']['sparse']:.2f} -> {v['latency_ms']['8']['variant']:.2f}",
              f"{v['latency_ratio']['8']:.2f}"] for v in digits.get("variant_vs_sparse", [])]
    digits_machine = digits.get("machine", result["machine"])
    digits_note = (f"Digits: {'level checkpoints of ' + digits['imp_dir'] if 'imp_dir' in digits else 'a small IMP run'}"
                   f" (DigitsCNN width {digits['width']}, dense {digits['dense_params']:,} parameters); levels "
                   f"{digits['levels_skipped_not_smaller'] or 'none'} skipped: their variant is not 1.1x smaller than "
                   f"the dense model. Ours = structural pruning time, no fine-tuning; conventional = fine-tuning time "
                   f"after Torch-Pruning's L1 pruning to the same size, until the variant's accuracy or "
                   f"{digits['max_finetune_epochs']} epochs. Neither counts IMP training.")
    for title, h, rs in (("Structural pruning: variant vs sparse source", headers, rows),
                         ("Digits: each variant vs its sparse source", vheaders, vrows),
                         ("Digits: time to a variant (ours: no fine-tuning)", dheaders, drows)):
        table = Table(title=title)
        for col in h:
            table.add_column(col)
        for row in rs:
            table.add_row(*[str(c) for c in row])
        console.print(table)
    console.print(f"Machine: {machine_line(result['machine'])}. {SPARSITY_NOTE}. Results: {path}")
    if args.readme:
        if not args.digits_only:
            md = (markdown_table(headers, rows) + f"\n\n{TIME_NOTE}. {SPARSITY_NOTE}. "
                  f"Machine: {machine_line(result['machine'])}.")
            if not update_readme("bench_pruning", md):
                console.print("README has no <!-- bench:bench_pruning --> block; table not written")
        vnote = (f"Each level of {digits.get('imp_dir', 'the IMP run')} against its own sparse checkpoint: the variant "
                 f"is what structural pruning made of it, no fine-tuning; latency medians of {args.latency_rounds} "
                 f"interleaved rounds on {digits.get('torch_threads', '?')} torch thread(s).")
        md = ((markdown_table(vheaders, vrows) + f"\n\n{vnote}\n\n" if vrows else "")
              + markdown_table(dheaders, drows) + f"\n\n{digits_note} Machine: {machine_line(digits_machine)}.")
        if not update_readme("bench_pruning_digits", md):
            console.print("README has no <!-- bench:bench_pruning_digits --> block; table not written")
    return result


if __name__ == "__main__":
    main()
