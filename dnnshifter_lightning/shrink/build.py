"""Turn IMP's sparse level checkpoints into a portfolio of smaller dense variants.

:func:`build_portfolio` is the whole build; :class:`PortfolioBuilder` is the post-fit Lightning
callback that calls it; :func:`portfolio_build_command` and :func:`portfolio_show_command` are
what ``dnnshifter portfolio build|show`` run. For every ``level_LL.ckpt`` the build:

1. loads the checkpoint strictly into the user's LightningModule class and reads ``ckpt["dnnshifter"]``;
2. measures the sparse model (accuracy, params, MACs, latency at batch 1 and 8);
3. removes its dead channels with :func:`~dnnshifter_lightning.shrink.structured.prune_structurally`;
4. saves the variant (:func:`~dnnshifter_lightning.portfolio.save_variant`) and reloads it, so every
   figure in the manifest (accuracy, latency, output difference) is measured on the file as served;
5. writes ``manifest.json`` last, ordered most to least accurate, plus ``portfolio.png``.

Example::

    import lightning as L
    from dnnshifter_lightning import IterativeMagnitudePruning, PortfolioBuilder
    from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule

    imp = IterativeMagnitudePruning(levels=3, epochs_per_level=2, checkpoint_dir="imp_ckpts")
    trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp, PortfolioBuilder(out_dir="portfolio")])
    trainer.fit(DigitsClassifier(width=16), datamodule=DigitsDataModule())
    # portfolio/manifest.json, portfolio/variants/level_00.safetensors.zst ..., portfolio/portfolio.png
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import functools
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from dnnshifter_lightning import __version__
from dnnshifter_lightning.graph import graph_from_module
from dnnshifter_lightning.portfolio import (
    FORMAT_VERSION, MANIFEST_NAME, VARIANT_SUFFIX, ZSTD_LEVEL, load_variant, save_variant, sort_variants,
    verify_portfolio, write_manifest,
)
from dnnshifter_lightning.shrink.measure import (
    count_macs, count_nonzero, count_params, measure_accuracy, measure_latency_ms, state_bytes,
)
from dnnshifter_lightning.shrink.measure import unpack_batch as unpack_batch_default
from dnnshifter_lightning.train.checkpoints import load_checkpoint, load_module_checkpoint

__all__ = ["build_portfolio", "PortfolioBuilder", "portfolio_build_command", "portfolio_show_command",
           "portfolio_table", "import_object", "resolve_input", "batch_unpacker", "first_loader", "unwrap_compiled",
           "parse_input_shape"]

CHECKPOINT_KEY = "dnnshifter"
_LEVEL_RE = re.compile(r"level_(\d+)\.ckpt$")


def _prune(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    from dnnshifter_lightning.shrink.structured import prune_structurally  # imported late: the structured engine is heavy

    return prune_structurally(model, example_inputs)


def _level_checkpoints(checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
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


Unpack = Callable[[Any], "tuple[Any, Any]"]


def batch_unpacker(input_key: str | None = None, target_key: str | None = None,
                   unpack_batch: Unpack | None = None) -> Unpack:
    """The one ``batch -> (inputs, targets)`` function the build uses for every batch it reads.

    ``unpack_batch`` wins when given; otherwise :func:`~dnnshifter_lightning.shrink.measure.unpack_batch`
    with the named dict keys.

    Example::

        >>> import torch
        >>> unpack = batch_unpacker(input_key="pixels", target_key="digit")
        >>> x, y = unpack({"pixels": torch.zeros(2, 3), "digit": torch.tensor([4, 2])})
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [4, 2])
    """
    if unpack_batch is not None:
        return unpack_batch
    if input_key is None and target_key is None:
        return unpack_batch_default
    return functools.partial(unpack_batch_default, input_key=input_key, target_key=target_key)


def first_loader(loaders: Any, what: str = "validation") -> Any:
    """A dataloader, or the first of a list, tuple or dict of them (with a warning naming how many).

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     first = first_loader([["a batch"], ["another loader's batch"]])
        >>> first, str(seen[0].message)
        (['a batch'], 'PortfolioBuilder: 2 validation dataloaders given; accuracy is measured on the first of them')
    """
    if isinstance(loaders, Mapping):
        if len(loaders) > 1:
            warnings.warn(f"PortfolioBuilder: {len(loaders)} {what} dataloaders given; accuracy is measured on the "
                          f"first, {next(iter(loaders))!r}", stacklevel=2)
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        if len(loaders) > 1:
            warnings.warn(f"PortfolioBuilder: {len(loaders)} {what} dataloaders given; accuracy is measured on the "
                          f"first of them", stacklevel=2)
        return loaders[0] if loaders else None
    return loaders


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
                  unpack: Unpack = unpack_batch_default, n: int = 8) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(n example inputs, the manifest's input_spec)`` from Lightning's conventions.

    The input shape (without batch) comes from, in order: ``input_spec["shape"]`` (an override),
    ``example_input_array``, the first validation batch, the first training batch (``train_loader``
    is called only then). The other ``input_spec`` keys (normalisation, class names, colour mode)
    are copied. The examples are real validation (else training) inputs, repeated if fewer than
    ``n``, or seeded noise of that shape when there is no data.

    Raises:
        ValueError: when nothing gives the shape (the message names the three ways), or when the
            validation inputs do not have the shape the variants are exported for.

    Example::

        >>> import torch
        >>> x, spec = resolve_input(example_input_array=torch.zeros(1, 3, 4, 4), n=2)
        >>> tuple(x.shape), spec
        ((2, 3, 4, 4), {'shape': [3, 4, 4], 'dtype': 'float32'})
        >>> val = [(torch.ones(5, 2), torch.zeros(5, dtype=torch.long))]
        >>> x, spec = resolve_input({"class_names": ["a", "b"]}, val_loader=val, n=8)
        >>> tuple(x.shape), float(x.sum()), spec["shape"], spec["class_names"]
        ((8, 2), 16.0, [2], ['a', 'b'])
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
        example = torch.randn(n, *shape, generator=gen)
    dtype = dtype or (example.dtype if example.is_floating_point() else torch.float32)
    example = example.to(dtype)
    example = example.repeat((n + len(example) - 1) // len(example), *([1] * (example.dim() - 1)))[:n].contiguous()
    extra.update(shape=shape, dtype=str(dtype).removeprefix("torch."))
    return example, extra


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` with every ``torch.compile`` wrapper (``OptimizedModule``) replaced by its ``_orig_mod``.

    Pruning traces and edits the plain modules; the compiled wrappers hold the same parameters.
    Works in place on the submodules and returns the (possibly unwrapped) top module.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> outer = nn.Sequential(torch.compile(nn.Linear(2, 2), backend="eager"))
        >>> type(unwrap_compiled(outer)[0]).__name__
        'Linear'
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
    unpack: Unpack = unpack_batch_default,
    num_classes: int | None = None,
    latency_warmup: int = 5,
    latency_repeats: int = 20,
    latency_threads: int | None = 1,
    plot: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Build a portfolio in ``out_dir`` from level checkpoints; returns the manifest written.

    ``checkpoints`` is a directory of ``level_*.ckpt`` or a list of files. ``module_loader`` is a
    LightningModule class (``Class.load_from_checkpoint(path, strict=True)`` is used) or any
    ``callable(path) -> nn.Module``. ``val_dataloader`` is one loader; ``unpack`` turns each of its
    batches into ``(inputs, targets)`` (default: tuples, lists, or dicts such as
    ``{"image": x, "label": y}``, see :func:`batch_unpacker`). With ``None`` the accuracies are
    recorded as null. The input shape comes from ``input_spec["shape"]``, ``example_input_array``
    or the validation inputs (:func:`resolve_input`); ``input_spec``'s other keys (``mean``,
    ``std``, ``class_names``, ``color``) go into the manifest. ``accuracy`` and
    ``sparse_accuracy`` are both measured here, on ``val_dataloader``, the same way: the sparse
    checkpoint's and the variant's. Latency is measured on ``latency_threads`` threads (``None``
    keeps the current setting).

    Example::

        >>> import io, tempfile, torch
        >>> from pathlib import Path
        >>> from rich.console import Console
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
        ...                            latency_repeats=2, plot=False, console=Console(file=io.StringIO()))
        >>> for v in sorted(manifest["variants"], key=lambda v: v["level"]):
        ...     print(v["id"], v["sparse"]["params"], "->", v["params"], v["accuracy"] == v["sparse_accuracy"])
        level_00 4782 -> 4726 True
        level_01 4782 -> 4634 True
        >>> sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        ['manifest.json', 'variants', 'variants/level_00.safetensors.zst', 'variants/level_01.safetensors.zst']
    """
    console = console or Console(width=None if Console().is_terminal else 160)
    out = Path(out_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    paths = _level_checkpoints(checkpoints)
    loader = _module_loader(module_loader)
    example, spec = resolve_input(input_spec, example_input_array, val_dataloader, unpack=unpack)
    threads = torch.get_num_threads()
    if latency_threads:
        torch.set_num_threads(latency_threads)
    variants = []
    try:
        with Progress(TextColumn("[bold]building portfolio"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=False) as progress:
            task = progress.add_task("", total=len(paths))
            for path in paths:
                progress.update(task, description=path.name)
                variants.append(_build_one(path, loader, out, val_dataloader, example, num_classes,
                                           latency_warmup, latency_repeats, unpack))
                progress.advance(task)
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
    console.print(portfolio_table(manifest, title=f"portfolio {out}"))
    return manifest


def _module_loader(module_loader: type | Callable[[Path], nn.Module]) -> Callable[[Path], nn.Module]:
    # weights_only=True first, else a warning naming the file (checkpoints.py)
    if getattr(module_loader, "load_from_checkpoint", None) is not None:
        return lambda p: load_module_checkpoint(module_loader, p, map_location="cpu", strict=True)
    return module_loader  # type: ignore[return-value]


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


def check_build(path: Path, loader: Callable[[Path], nn.Module], example: torch.Tensor,
                batches: Iterable[Any] | None, num_classes: int | None = None,
                unpack: Unpack = unpack_batch_default) -> None:
    """Every step of a variant's build that can fail, without measuring or writing it: load the
    checkpoint, run the batches (and their labels), trace and prune, export. About half the time of
    building the variant; the dependency analysis it caches is reused by the build."""
    sparse, classes = _load_sparse(path, loader, example, num_classes)
    if batches is not None:
        measure_accuracy(sparse, batches, classes, unpack)
    graph_from_module(_prune(sparse, (example,)).model, example[:2])  # what save_variant writes, unwritten


def _build_one(path: Path, loader: Callable[[Path], nn.Module], out: Path, dataloader: Iterable[Any] | None,
               example: torch.Tensor, num_classes: int | None, warmup: int, repeats: int,
               unpack: Unpack = unpack_batch_default) -> dict[str, Any]:
    # The user's own training output: weights_only=True first, else a warning naming the file.
    meta = load_checkpoint(path).get(CHECKPOINT_KEY) or {}
    sparse, classes = _load_sparse(path, loader, example, num_classes)
    match = _LEVEL_RE.search(path.name)
    level = int(meta.get("level", match.group(1) if match else 0))
    sparsity = float(meta["sparsity"]) if "sparsity" in meta else _sparsity(sparse)
    sparse_acc = measure_accuracy(sparse, dataloader, classes, unpack) if dataloader is not None else None
    sparse_stats = _measure(sparse, example, warmup, repeats)
    sparse_stats["bytes_raw"] = state_bytes(sparse)

    result = _prune(sparse, (example,))
    vid = f"level_{level:02d}"
    rel = f"variants/{vid}{VARIANT_SUFFIX}"
    info = save_variant(result.model, example[:2], out / rel)
    variant = load_variant(out / rel, sha256=info["sha256"])  # measure what will be served
    stats = _measure(variant, example, warmup, repeats)
    return {
        "id": vid, "level": level, "sparsity": round(sparsity, 6),
        "params": stats["params"], "nonzero_params": stats["nonzero_params"],
        "file": rel, "bytes_raw": info["bytes_raw"], "bytes_compressed": info["bytes_compressed"],
        "sha256": info["sha256"], "macs": stats["macs"], "latency_ms": stats["latency_ms"],
        "accuracy": measure_accuracy(variant, dataloader, classes, unpack) if dataloader is not None else None,
        "sparse_accuracy": sparse_acc,
        "max_abs_diff": _max_abs_diff(variant, sparse, dataloader, example, unpack),
        "checkpoint": path.name,
        "prune_seconds": round(float(getattr(result, "seconds", 0.0)), 4),
        "sparse": sparse_stats,
    }


# --------------------------------------------------------------------------------------- showing

def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def portfolio_table(manifest: dict[str, Any], title: str = "portfolio") -> Table:
    """A rich table of the variants, most accurate first, with the sparse source alongside.

    The ``front`` column marks the accuracy/latency front (:func:`~dnnshifter_lightning.serve.served.pareto_front`,
    validation accuracy against batch-8 latency) with ``*``; dominated variants are dimmed, and the
    caption says how many variants are on the front.

    Example::

        >>> def variant(vid, acc, ms8):
        ...     return {"id": vid, "sparsity": 0.488, "accuracy": acc, "sparse_accuracy": acc,
        ...             "params": 9000, "macs": 120000, "bytes_compressed": 40960, "max_abs_diff": 1e-7,
        ...             "latency_ms": {"1": 0.2, "8": ms8},
        ...             "sparse": {"params": 18000, "latency_ms": {"1": 0.4, "8": 1.0}}}
        >>> manifest = {"variants": [variant("level_03", 0.97, 0.5), variant("level_01", 0.96, 0.9)]}
        >>> table = portfolio_table(manifest, title="my portfolio")
        >>> table.title, table.row_count, [c.header for c in table.columns][:5]
        ('my portfolio', 2, ['variant', 'front', 'sparsity', 'accuracy', 'sparse acc'])
        >>> list(table.columns[1].cells), table.caption     # level_01 is slower and less accurate
        (['*', ''], 'front (*): 1 of 2 variants (validation accuracy vs batch-8 latency)')
        >>> from rich.console import Console
        >>> Console(width=200).print(table)  # doctest: +SKIP
    """
    from dnnshifter_lightning.serve.served import pareto_front  # here, not at the top: keeps this change apart from the build's imports

    front = set(pareto_front(manifest["variants"]))
    table = Table(title=title, caption=f"front (*): {len(front)} of {len(manifest['variants'])} variants "
                                       "(validation accuracy vs batch-8 latency)")
    for col, just in [("variant", "left"), ("front", "center"), ("sparsity", "right"), ("accuracy", "right"), ("sparse acc", "right"),
                      ("params", "right"), ("x smaller", "right"), ("MACs", "right"), ("file KiB", "right"),
                      ("ms @1", "right"), ("ms @8", "right"), ("x faster @1", "right"), ("max |diff|", "right")]:
        table.add_column(col, justify=just, no_wrap=col == "variant")  # type: ignore[arg-type]
    for v in manifest["variants"]:
        sp = v.get("sparse") or {}
        ratio = f"{sp['params'] / v['params']:.2f}" if sp.get("params") and v["params"] else "-"
        speed = (f"{sp['latency_ms']['1'] / v['latency_ms']['1']:.2f}"
                 if sp.get("latency_ms") and v["latency_ms"]["1"] else "-")
        on_front = v["id"] in front
        table.add_row(v["id"], "*" if on_front else "", f"{100 * v['sparsity']:.1f}%", _fmt_pct(v["accuracy"]),
                      _fmt_pct(v["sparse_accuracy"]), _fmt_int(v["params"]), ratio, _fmt_int(v["macs"]),
                      f"{v['bytes_compressed'] / 1024:.1f}", f"{v['latency_ms']['1']:.3f}", f"{v['latency_ms']['8']:.3f}",
                      speed, "-" if v["max_abs_diff"] is None else f"{v['max_abs_diff']:.2e}",
                      style=None if on_front else "dim")
    return table


# ----------------------------------------------------------------------------------- the callback

def _find_imp_checkpoint_dir(trainer: L.Trainer) -> Path | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if type(cb).__name__ == "IterativeMagnitudePruning" and getattr(cb, "checkpoint_dir", None) is not None:
            return Path(cb.checkpoint_dir)
    return None


class PortfolioBuilder(Callback):
    """Post-fit hook: at the end of ``fit``, on global rank 0 only, build the portfolio.

    It reads the level checkpoints from ``checkpoint_dir``, or else from the
    :class:`~dnnshifter_lightning.train.imp.IterativeMagnitudePruning` callback in the same Trainer.
    Everything follows Lightning's conventions:

    * validation data: whatever ``fit`` validates on (``trainer.fit(model, val_dataloaders=...)``,
      the DataModule's or the LightningModule's ``val_dataloader()``); of several loaders, the
      first (with a warning). Without one, accuracies are null (with a warning).
    * batches: ``(inputs, targets, ...)`` tuples or dicts such as ``{"image": x, "label": y}``;
      ``input_key``/``target_key`` name other dict keys, ``unpack_batch`` (``batch -> (inputs,
      targets)``) handles anything else.
    * the input: the shape comes from the LightningModule's ``example_input_array``, else the first
      validation (else training) batch. ``input_spec`` (an argument, or an ``input_spec`` attribute
      of the LightningModule or DataModule) is an optional override that adds normalisation
      (``mean``, ``std``), ``class_names`` and ``color`` for the servers.

    Every check that can run before training does, in ``on_fit_start``: the checkpoint directory,
    the input shape, reading the validation batches, and (``dry_run=True``) the build of one
    variant from the initial weights (:func:`check_build`: load with ``load_from_checkpoint``, run a
    validation batch, trace, prune, export; 0.6 s for a digits CNN whose analysis is cached, 2.1-2.3 s
    cold, on a 2-core Xeon), so a model that cannot be rebuilt, traced or exported fails
    before the first epoch rather than after the last. Under DDP rank 0 checks and every rank
    raises its error. The manifest is kept on ``self.manifest``.

    Args:
        out_dir: the portfolio directory.
        checkpoint_dir: where the ``level_LL.ckpt`` are (default: the IMP callback's).
        input_spec: override of the served input (``shape``, ``dtype``, ``mean``, ``std``,
            ``class_names``, ``color``).
        num_classes: default: the width of the model's output.
        input_key, target_key: dict-batch keys of the inputs and the labels.
        unpack_batch: ``batch -> (inputs, targets)``, for batches of any other form.
        latency_warmup, latency_repeats: latency measurement.
        plot: write ``portfolio.png``.
        dry_run: check the build of one variant from the initial weights in ``on_fit_start``.

    Raises:
        ValueError: in ``on_fit_start``, when there is no checkpoint directory, no input shape
            (the message names the three ways to give it), or unreadable batches.

    Example::

        trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp, PortfolioBuilder(out_dir="portfolio")])
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val)   # dict batches work too

    A complete run, tiny enough for a doctest::

        >>> import contextlib, io, tempfile
        >>> import lightning as L
        >>> from pathlib import Path
        >>> from dnnshifter_lightning import IterativeMagnitudePruning
        >>> from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule
        >>> tmp = Path(tempfile.mkdtemp())
        >>> imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp / "imp", verbose=False)
        >>> builder = PortfolioBuilder(out_dir=tmp / "portfolio", latency_warmup=1, latency_repeats=2, plot=False)
        >>> trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp, builder], accelerator="cpu",
        ...                     limit_train_batches=1, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> with contextlib.redirect_stdout(io.StringIO()):     # the build prints a progress bar and a table
        ...     trainer.fit(DigitsClassifier(width=4), datamodule=DigitsDataModule(train_limit=32))
        >>> sorted((v["id"], v["accuracy"] is not None) for v in builder.manifest["variants"])
        [('level_00', True), ('level_01', True)]
        >>> sorted(p.name for p in (tmp / "portfolio").iterdir())
        ['manifest.json', 'variants']
    """

    def __init__(self, out_dir: str | os.PathLike[str] = "portfolio", checkpoint_dir: str | os.PathLike[str] | None = None,
                 input_spec: dict[str, Any] | None = None, num_classes: int | None = None,
                 latency_warmup: int = 5, latency_repeats: int = 20, plot: bool = True,
                 input_key: str | None = None, target_key: str | None = None,
                 unpack_batch: Callable[[Any], tuple[Any, Any]] | None = None, dry_run: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.input_spec = input_spec
        self.num_classes = num_classes
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.plot = plot
        self.dry_run = dry_run
        self.unpack = batch_unpacker(input_key, target_key, unpack_batch)
        self.manifest: dict[str, Any] | None = None
        self._plan: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Rank 0 checks; every rank learns the verdict, so no rank trains on while another has failed.
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                self._plan = self._prepare(trainer, pl_module)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"PortfolioBuilder failed its checks on rank 0: {message}")

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        ckpt_dir = self.checkpoint_dir or _find_imp_checkpoint_dir(trainer)
        if ckpt_dir is None:
            raise ValueError("PortfolioBuilder: pass checkpoint_dir=, or add an IterativeMagnitudePruning callback")
        dm = getattr(trainer, "datamodule", None)
        spec = self.input_spec or getattr(pl_module, "input_spec", None) or getattr(dm, "input_spec", None)
        val_loader = first_loader(_fit_loader(trainer, "val"))
        if val_loader is None:
            warnings.warn("PortfolioBuilder: fit has no validation data; accuracies will be null", stacklevel=2)
        example, spec = resolve_input(spec, getattr(pl_module, "example_input_array", None), val_loader,
                                      lambda: first_loader(_fit_loader(trainer, "train"), "training"), self.unpack)
        if val_loader is not None:  # the labels too: accuracy is measured from them at the end
            _, targets = self.unpack(next(iter(val_loader)))
            if not isinstance(targets, torch.Tensor):
                raise ValueError("PortfolioBuilder: the validation batches have no labels to measure accuracy with: "
                                 "name them with target_key=..., or pass unpack_batch=...")
        if self.dry_run:
            self._dry_run(trainer, pl_module, example, val_loader)
        return {"checkpoint_dir": ckpt_dir, "val_loader": val_loader, "spec": spec, "module": type(pl_module)}

    def _dry_run(self, trainer: L.Trainer, pl_module: L.LightningModule, example: torch.Tensor,
                 val_loader: Iterable[Any] | None) -> None:
        """Check one variant's build from the initial weights, through the same code as the real build."""
        tmp = Path(tempfile.mkdtemp(prefix="dnnshifter-dry-run-"))
        try:
            path = tmp / "level_00.ckpt"
            torch.save(trainer._checkpoint_connector.dump_checkpoint(weights_only=True), path)
            batch = [next(iter(val_loader))] if val_loader is not None else None
            check_build(path, _module_loader(type(pl_module)), example, batch, self.num_classes, self.unpack)
        except Exception as exc:
            raise ValueError(f"PortfolioBuilder's check before training (building a variant from the initial "
                            f"weights) failed; fix this first, or pass dry_run=False: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        plan = self._plan or self._prepare(trainer, pl_module)
        self.manifest = build_portfolio(
            plan["checkpoint_dir"], plan["module"], self.out_dir, plan["val_loader"], plan["spec"],
            unpack=self.unpack, num_classes=self.num_classes, latency_warmup=self.latency_warmup,
            latency_repeats=self.latency_repeats, plot=self.plot)


def _fit_loader(trainer: L.Trainer, which: str) -> Any:
    """What ``fit`` trains (``"train"``) or validates (``"val"``) on, however it was given."""
    loop = trainer.fit_loop if which == "train" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)  # Lightning's record of fit(...)'s dataloader arguments
    if source is not None:
        return source.dataloader() if source.is_defined() else None
    owner = next((o for o in (getattr(trainer, "datamodule", None), trainer.lightning_module)
                  if o is not None and is_overridden(f"{which}_dataloader", o)), None)
    return getattr(owner, f"{which}_dataloader")() if owner is not None else None


# ------------------------------------------------------------------------------------------ CLI

def import_object(spec: str) -> Any:
    """``"package.module:Name"`` -> the object.

    Example::

        >>> import_object("dnnshifter_lightning.demo.models:DigitsCNN")
        <class 'dnnshifter_lightning.demo.models.DigitsCNN'>
        >>> import_object("dnnshifter_lightning.demo.models:DigitsCNN.forward").__qualname__   # dotted attributes too
        'DigitsCNN.forward'
        >>> import_object("dnnshifter_lightning.demo.models.DigitsCNN")
        Traceback (most recent call last):
            ...
        ValueError: expected 'package.module:Class', got 'dnnshifter_lightning.demo.models.DigitsCNN'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:Class', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def parse_input_shape(text: str) -> list[int]:
    """``"3,32,32"`` -> ``[3, 32, 32]`` (the CLI's ``--input-shape``, without the batch dimension).

    Example::

        >>> parse_input_shape("1, 8,8")
        [1, 8, 8]
        >>> parse_input_shape("3x32x32")
        Traceback (most recent call last):
            ...
        ValueError: --input-shape must be comma-separated positive ints without the batch dimension, e.g. 3,32,32; got '3x32x32'
    """
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"--input-shape must be comma-separated positive ints without the batch dimension, "
                         f"e.g. 3,32,32; got {text!r}")
    return shape


def portfolio_build_command(ckpt_dir: Path, model: str, out: Path, datamodule: str | None = None,
                            input_shape: str | None = None, input_key: str | None = None,
                            target_key: str | None = None) -> dict[str, Any]:
    """``dnnshifter portfolio build CKPT_DIR --model pkg.mod:Class --out DIR [--datamodule pkg.mod:Class]
    [--input-shape C,H,W] [--input-key K --target-key K]``.

    The model class is loaded with ``load_from_checkpoint`` (from the checkpoint's hparams). The
    validation data comes from ``--datamodule`` or the model's own ``val_dataloader``. The input
    shape comes from ``--input-shape``, else an ``input_spec`` attribute (of the loaded model or
    the DataModule), else the loaded model's ``example_input_array``, else the validation batches.
    Returns the manifest written.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> portfolio_build_command(Path("imp_ckpts"), "dnnshifter_lightning.demo.digits:DigitsClassifier",
        ...                         Path("portfolio"), "dnnshifter_lightning.demo.digits:DigitsDataModule")  # doctest: +SKIP
        >>> empty = Path(tempfile.mkdtemp())
        >>> portfolio_build_command(empty, "dnnshifter_lightning.demo.digits:DigitsClassifier", empty / "portfolio")
        Traceback (most recent call last):
            ...
        FileNotFoundError: ...: no level_*.ckpt files
    """
    module_cls = import_object(model)
    paths = _level_checkpoints(ckpt_dir)
    unpack = batch_unpacker(input_key, target_key)
    # Built from the checkpoint's hparams, so attributes set in __init__ (example_input_array) are seen.
    first = _module_loader(module_cls)(paths[0])
    dm = import_object(datamodule)() if datamodule else None
    loader = None
    if dm is not None:
        dm.prepare_data()
        dm.setup("validate")
        loader = first_loader(dm.val_dataloader())
    elif is_overridden("val_dataloader", first, parent=L.LightningModule):
        loader = first_loader(first.val_dataloader())
    else:
        warnings.warn(f"{model} defines no val_dataloader and no --datamodule was given: accuracies will be null",
                      stacklevel=2)
    spec = dict(getattr(first, "input_spec", None) or getattr(dm, "input_spec", None) or {})
    if input_shape is not None:
        spec["shape"] = parse_input_shape(input_shape)
    try:
        example_input = getattr(first, "example_input_array", None)
    except Exception:  # noqa: BLE001 - a property that needs a trainer
        example_input = None
    try:
        resolve_input(spec, example_input, loader, unpack=unpack, n=1)
    except ValueError as exc:
        if "no input shape" in str(exc):
            raise ValueError(f"no input shape for {model}: give --input-shape C,H,W, set example_input_array on "
                             f"{model} (e.g. torch.zeros(1, C, H, W) in __init__), or give --datamodule "
                             f"(its validation batches give the shape)") from exc
        raise
    return build_portfolio(paths, module_cls, out, loader, spec, example_input_array=example_input, unpack=unpack)


def portfolio_show_command(dir: Path) -> dict[str, Any]:  # noqa: A002 - the CLI argument's name
    """``dnnshifter portfolio show DIR``: verify every file's sha256 and print the table.

    Example::

        >>> import contextlib, io, tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant, write_manifest
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "v0.safetensors.zst")
        >>> _ = write_manifest(d, {"format_version": FORMAT_VERSION, "input_spec": {"shape": [3], "dtype": "float32"},
        ...     "variants": [{"id": "v0", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8,
        ...                   "macs": 6, "latency_ms": {"1": 0.01, "8": 0.02}, "accuracy": None,
        ...                   "sparse_accuracy": None, "max_abs_diff": None, **info}]})
        >>> with contextlib.redirect_stdout(io.StringIO()) as shown:
        ...     manifest = portfolio_show_command(d)
        >>> "(1 variants, sha256 ok)" in " ".join(shown.getvalue().split()), manifest["variants"][0]["id"]
        (True, 'v0')
    """
    manifest = verify_portfolio(dir)
    console = Console(width=None if Console().is_terminal else 160)  # pipes and logs get the full table
    console.print(portfolio_table(manifest, title=f"portfolio {dir} ({len(manifest['variants'])} variants, sha256 ok)"))
    spec = manifest["input_spec"]
    console.print(f"input: shape {spec['shape']} {spec['dtype']}; built {manifest.get('created', '?')} "
                  f"on {manifest.get('build', {}).get('platform', '?')}; manifest {Path(dir) / MANIFEST_NAME}")
    return manifest

