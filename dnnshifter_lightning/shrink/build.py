"""Turn IMP's sparse level checkpoints into a portfolio of smaller dense variants (plain PyTorch).

:func:`build_portfolio` is the whole build; it prints nothing and imports no framework. Progress
goes to an optional callback as :class:`BuildEvent` values (:mod:`~dnnshifter_lightning.shrink.report`
turns them into a rich progress bar, :class:`~dnnshifter_lightning.shrink.callback.PortfolioBuilder`
calls the build after ``fit``). For every ``level_LL.ckpt`` the build:

1. loads the checkpoint strictly into the user's LightningModule class and reads ``ckpt["dnnshifter"]``;
2. measures the sparse model (accuracy, params, MACs, latency at batch 1 and 8);
3. removes its dead channels with :func:`~dnnshifter_lightning.shrink.structured.prune_structurally`;
4. saves the variant (:func:`~dnnshifter_lightning.portfolio.save_variant`) and reloads it, so every
   figure in the manifest (accuracy, latency, output difference) is measured on the file as served;
5. writes ``manifest.json`` last, ordered most to least accurate, plus ``portfolio.png``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dnnshifter_lightning import __version__
from dnnshifter_lightning.graph import graph_from_module
from dnnshifter_lightning.portfolio import (
    FORMAT_VERSION, VARIANT_SUFFIX, ZSTD_LEVEL, Variant, load_variant, random_batch, save_variant, sort_variants,
    write_manifest,
)
from dnnshifter_lightning.shrink.measure import (
    Unpack, count_macs, count_nonzero, count_params, measure_accuracy, measure_latency_ms, state_bytes, unpack_batch,
)
from dnnshifter_lightning.shrink.structured import prune_structurally
from dnnshifter_lightning.train.checkpoints import CHECKPOINT_KEY, load_checkpoint
from dnnshifter_lightning.train.checkpoints import module_loader as _as_loader  # build_portfolio has an argument of that name

__all__ = ["build_portfolio", "BuildEvent", "check_build", "level_checkpoints", "resolve_input", "unwrap_compiled",
           "NO_SHAPE_HELP"]

_LEVEL_RE = re.compile(r"level_(\d+)\.ckpt$")


@dataclass(frozen=True)
class BuildEvent:
    """What :func:`build_portfolio` tells its ``progress`` callback.

    ``stage`` is ``"start"`` (before the first checkpoint), ``"checkpoint"`` (one starts: ``checkpoint``
    names it), ``"variant"`` (it is built: ``level`` and ``variant``, the manifest record) or
    ``"done"`` (the manifest is written). ``done`` of ``total`` checkpoints are built.
    """

    stage: str
    done: int
    total: int
    checkpoint: str | None = None
    level: int | None = None
    variant: dict[str, Any] | None = None


def level_checkpoints(checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The ``level_*.ckpt`` of a directory (sorted), or the given file(s).

    Raises:
        FileNotFoundError: an empty directory, or a file that does not exist.
    """
    if isinstance(checkpoints, (str, os.PathLike)) and Path(checkpoints).is_dir():
        paths = sorted(Path(checkpoints).glob("level_*.ckpt"))
        if not paths:
            raise FileNotFoundError(f"{checkpoints}: no level_*.ckpt files")
        return paths
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths = [Path(p) for p in checkpoints]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such checkpoint")
    return paths


def _inputs_of(loader: Iterable[Any] | None, unpack: Unpack, n: int) -> torch.Tensor | None:
    """The first ``n`` inputs of ``loader`` (fewer if it is short), or None without a loader."""
    if loader is None:
        return None
    xs, have = [], 0
    for batch in loader:
        x, _ = unpack(batch)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"the batch inputs must be one tensor with a batch dimension, got {type(x).__name__}: "
                             f"pass unpack_batch=a callable batch -> (inputs, targets)")
        xs.append(x.detach().cpu())
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n] if have else None


NO_SHAPE_HELP = ("set `example_input_array` on the LightningModule (e.g. torch.zeros(1, C, H, W) in __init__), "
                 "give validation data (a DataModule or val_dataloaders; offline: --datamodule), or give the shape "
                 "(PortfolioBuilder(input_spec={'shape': [C, H, W]}); offline: --input-shape C,H,W)")


def resolve_input(input_spec: dict[str, Any] | None = None, example_input_array: Any = None,
                  val_loader: Iterable[Any] | None = None, train_loader: Callable[[], Iterable[Any] | None] | None = None,
                  unpack: Unpack = unpack_batch, n: int = 8) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(n example inputs, the manifest's input_spec)`` from Lightning's conventions.

    The input shape (without batch) comes from, in order: ``input_spec["shape"]`` (an override),
    ``example_input_array``, the first validation batch, the first training batch (``train_loader``
    is called only then). The other ``input_spec`` keys (normalisation, class names, colour mode)
    are copied. The examples are real validation (else training) inputs, repeated if fewer than
    ``n``, or seeded noise of that shape when there is no data.

    Raises:
        ValueError: when nothing gives the shape (the message names the three ways), or when the
            validation inputs do not have the shape the variants are exported for.
    """
    extra = {k: v for k, v in (input_spec or {}).items()}
    val_x = _inputs_of(val_loader, unpack, n)
    shape: list[int] | None = [int(d) for d in extra["shape"]] if extra.get("shape") else None
    source = "input_spec['shape']"
    dtype = getattr(torch, extra["dtype"]) if extra.get("dtype") else None
    example: torch.Tensor | None = None
    if shape is None and isinstance(example_input_array, torch.Tensor) and example_input_array.dim() >= 1:
        shape, source = list(example_input_array.shape[1:]), "example_input_array"
        dtype = dtype or example_input_array.dtype
    elif shape is None and example_input_array is not None:
        raise ValueError(f"example_input_array must be one tensor with a batch dimension to build a portfolio, got "
                         f"{type(example_input_array).__name__}; or give input_spec={{'shape': [...]}}")
    if val_x is not None:
        if shape is not None and list(val_x.shape[1:]) != shape:
            raise ValueError(f"the validation inputs have shape {list(val_x.shape[1:])} but {source} gives {shape}: "
                             f"variants are exported for one input shape, so make them agree")
        shape = shape or list(val_x.shape[1:])
        example = val_x
    if shape is None or example is None:
        train_x = _inputs_of(train_loader() if train_loader is not None else None, unpack, n)
        if train_x is not None and (shape is None or list(train_x.shape[1:]) == shape):
            shape = shape or list(train_x.shape[1:])
            example = train_x
    if shape is None:
        raise ValueError(f"no input shape for the portfolio: {NO_SHAPE_HELP}")
    if example is None:
        gen = torch.Generator().manual_seed(0)
        example = random_batch({"shape": shape}, n, generator=gen, dtype=torch.float32)
    dtype = dtype or (example.dtype if example.is_floating_point() else torch.float32)
    example = example.to(dtype)
    example = example.repeat((n + len(example) - 1) // len(example), *([1] * (example.dim() - 1)))[:n].contiguous()
    extra.update(shape=shape, dtype=str(dtype).removeprefix("torch."))
    return example, extra


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` with every ``torch.compile`` wrapper (``OptimizedModule``) replaced by its ``_orig_mod``.

    Pruning traces and edits the plain modules; the compiled wrappers hold the same parameters.
    Works in place on the submodules and returns the (possibly unwrapped) top module.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, OptimizedModule):
                while isinstance(child, OptimizedModule):
                    child = child._orig_mod
                module._modules[name] = child
                unwrap_compiled(child)
    return model


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / max(1, total)


def _max_abs_diff(a: nn.Module, b: nn.Module, dataloader: Iterable[Any] | None, example: torch.Tensor,
                  unpack: Unpack) -> float:
    diff = 0.0
    with torch.inference_mode():
        batches = [example] if dataloader is None else (unpack(bt)[0] for bt in dataloader)
        for x in batches:
            diff = max(diff, float((a(x) - b(x)).abs().max()))
    return diff


def _measure(module: nn.Module, example: torch.Tensor, warmup: int, repeats: int) -> dict[str, Any]:
    return {
        "params": count_params(module),
        "nonzero_params": count_nonzero(module),
        "macs": count_macs(module, example[:1]),
        "latency_ms": {str(b): round(measure_latency_ms(module, example[:b], warmup, repeats), 4) for b in (1, 8)},
    }


def build_portfolio(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    module_loader: type | Callable[[Path], nn.Module],
    out_dir: str | os.PathLike[str],
    val_dataloader: Iterable[Any] | None,
    input_spec: dict[str, Any] | None = None,
    *,
    example_input_array: torch.Tensor | None = None,
    unpack: Unpack = unpack_batch,
    num_classes: int | None = None,
    latency_warmup: int = 5,
    latency_repeats: int = 20,
    latency_threads: int | None = 1,
    plot: bool = True,
    progress: Callable[[BuildEvent], None] | None = None,
) -> dict[str, Any]:
    """Build a portfolio in ``out_dir`` from level checkpoints; returns the manifest written.

    ``accuracy`` and ``sparse_accuracy`` are both measured here, on ``val_dataloader``, the same
    way: the variant's and the sparse checkpoint's (null without a loader). Nothing is printed.

    Args:
        checkpoints: a directory of ``level_*.ckpt``, or a list of files.
        module_loader: a LightningModule class (``Class.load_from_checkpoint(path, strict=True)``
            is used) or any ``callable(path) -> nn.Module``.
        out_dir: the portfolio directory.
        val_dataloader: one loader, or ``None``.
        input_spec: ``shape`` (an override), and ``mean``, ``std``, ``class_names``, ``color`` for
            the manifest. Otherwise the shape comes from ``example_input_array`` or the validation
            inputs (:func:`resolve_input`).
        example_input_array: as on a LightningModule.
        unpack: ``batch -> (inputs, targets)`` (default
            :func:`~dnnshifter_lightning.shrink.measure.unpack_batch`).
        num_classes: default: the width of the model's output.
        latency_warmup, latency_repeats: latency measurement.
        latency_threads: threads the latency is measured on (``None`` keeps the current setting).
        plot: also write ``portfolio.png``.
        progress: called with a :class:`BuildEvent` before and after every checkpoint.

    Raises:
        FileNotFoundError: no checkpoints.
        ValueError: no input shape, unreadable batches, or a model whose output is not ``(batch, classes)``.
        StructuralPruningError: a checkpoint that cannot be pruned exactly. No manifest is written
            then: it is written last.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.demo.models import DigitsCNN
        >>> _ = torch.manual_seed(0)
        >>> ckpts = Path(tempfile.mkdtemp())
        >>> net = DigitsCNN(width=4).eval()
        >>> torch.save({"state_dict": net.state_dict()}, ckpts / "level_00.ckpt")
        >>> with torch.no_grad():
        ...     net.features[0].weight[:2] = 0             # a sparser level: 2 of 4 first filters are zero
        >>> torch.save({"state_dict": net.state_dict()}, ckpts / "level_01.ckpt")
        >>> def load(path):                                # any callable(path) -> nn.Module will do
        ...     model = DigitsCNN(width=4)
        ...     model.load_state_dict(torch.load(path)["state_dict"])
        ...     return model
        >>> val = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
        >>> out = Path(tempfile.mkdtemp())
        >>> manifest = build_portfolio(ckpts, load, out, val, {"shape": [1, 8, 8]}, latency_warmup=1,
        ...                            latency_repeats=2, plot=False)
        >>> for v in sorted(manifest["variants"], key=lambda v: v["level"]):
        ...     print(v["id"], v["sparse"]["params"], "->", v["params"], v["accuracy"] == v["sparse_accuracy"])
        level_00 4782 -> 4726 True
        level_01 4782 -> 4634 True
        >>> sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        ['manifest.json', 'variants', 'variants/level_00.safetensors.zst', 'variants/level_01.safetensors.zst']
    """
    report = progress or (lambda event: None)
    out = Path(out_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    paths = level_checkpoints(checkpoints)
    loader = _as_loader(module_loader)  # weights_only=True first, else a warning naming the file (checkpoints.py)
    example, spec = resolve_input(input_spec, example_input_array, val_dataloader, unpack=unpack)
    threads = torch.get_num_threads()
    if latency_threads:
        torch.set_num_threads(latency_threads)
    variants = []
    try:
        report(BuildEvent("start", 0, len(paths)))
        for i, path in enumerate(paths):
            report(BuildEvent("checkpoint", i, len(paths), checkpoint=path.name))
            variant = _build_one(path, loader, out, val_dataloader, example, num_classes,
                                 latency_warmup, latency_repeats, unpack).to_dict()
            variants.append(variant)
            report(BuildEvent("variant", i + 1, len(paths), checkpoint=path.name, level=variant["level"],
                              variant=variant))
    finally:
        torch.set_num_threads(threads)
    manifest = {
        "format_version": FORMAT_VERSION,
        "input_spec": spec,
        "variants": sort_variants(variants),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build": {"library_version": __version__, "torch_version": torch.__version__,
                  "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "latency_threads": latency_threads or threads, "latency_repeats": latency_repeats,
                  "zstd_level": ZSTD_LEVEL, "accuracy_measured": val_dataloader is not None},
    }
    write_manifest(out, manifest)  # last: a crash before this leaves no manifest pointing at missing files
    keep = {out / v["file"] for v in manifest["variants"]}
    for stale in (out / "variants").glob(f"*{VARIANT_SUFFIX}"):
        if stale not in keep:
            stale.unlink()
    if plot:
        from dnnshifter_lightning.shrink.plot import plot_portfolio

        plot_portfolio(manifest, out / "portfolio.png")
    report(BuildEvent("done", len(paths), len(paths)))
    return manifest


def _load_sparse(path: Path, loader: Callable[[Path], nn.Module], example: torch.Tensor,
                 num_classes: int | None) -> tuple[nn.Module, int]:
    """The checkpoint's module, unwrapped from torch.compile, in eval mode on the CPU; its class count."""
    sparse = unwrap_compiled(loader(path)).eval().cpu()
    with torch.inference_mode():
        out_shape = sparse(example[:1]).shape
    if len(out_shape) != 2:
        raise ValueError(f"{path.name}: the model's output has shape {list(out_shape)}; a portfolio serves "
                         f"classifiers whose forward returns (batch, classes) scores")
    return sparse, num_classes or int(out_shape[-1])


def check_build(path: Path, loader: type | Callable[[Path], nn.Module], example: torch.Tensor,
                batches: Iterable[Any] | None, num_classes: int | None = None,
                unpack: Unpack = unpack_batch) -> None:
    """Every step of a variant's build that can fail, without measuring or writing it: load the
    checkpoint, run the batches (and their labels), trace and prune, export. About half the time of
    building the variant; the dependency analysis it caches is reused by the build.

    Raises:
        ValueError, StructuralPruningError, GraphError: what the build would raise.
    """
    sparse, classes = _load_sparse(path, _as_loader(loader), example, num_classes)
    if batches is not None:
        measure_accuracy(sparse, batches, classes, unpack)
    graph_from_module(prune_structurally(sparse, (example,)).model, example[:2])  # what save_variant writes, unwritten


def _build_one(path: Path, loader: Callable[[Path], nn.Module], out: Path, dataloader: Iterable[Any] | None,
               example: torch.Tensor, num_classes: int | None, warmup: int, repeats: int,
               unpack: Unpack = unpack_batch) -> Variant:
    # The user's own training output: weights_only=True first, else a warning naming the file.
    meta = load_checkpoint(path).get(CHECKPOINT_KEY) or {}
    sparse, classes = _load_sparse(path, loader, example, num_classes)
    match = _LEVEL_RE.search(path.name)
    level = int(meta.get("level", match.group(1) if match else 0))
    sparsity = float(meta["sparsity"]) if "sparsity" in meta else _sparsity(sparse)
    sparse_acc = measure_accuracy(sparse, dataloader, classes, unpack) if dataloader is not None else None
    sparse_stats = _measure(sparse, example, warmup, repeats)
    sparse_stats["bytes_raw"] = state_bytes(sparse)

    result = prune_structurally(sparse, (example,))
    vid = f"level_{level:02d}"
    rel = f"variants/{vid}{VARIANT_SUFFIX}"
    info = save_variant(result.model, example[:2], out / rel)
    variant = load_variant(out / rel, sha256=info["sha256"])  # measure what will be served
    stats = _measure(variant, example, warmup, repeats)
    return Variant(
        id=vid, level=level, sparsity=round(sparsity, 6),
        params=stats["params"], nonzero_params=stats["nonzero_params"],
        file=rel, bytes_raw=info["bytes_raw"], bytes_compressed=info["bytes_compressed"],
        sha256=info["sha256"], macs=stats["macs"], latency_ms=stats["latency_ms"],
        accuracy=measure_accuracy(variant, dataloader, classes, unpack) if dataloader is not None else None,
        sparse_accuracy=sparse_acc,
        max_abs_diff=_max_abs_diff(variant, sparse, dataloader, example, unpack),
        checkpoint=path.name,
        prune_seconds=round(float(getattr(result, "seconds", 0.0)), 4),
        sparse=sparse_stats,
    )
