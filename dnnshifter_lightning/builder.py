"""Turn IMP's sparse level checkpoints into a portfolio of smaller dense variants.

:func:`build_portfolio` is the whole build; :class:`PortfolioBuilder` is the post-fit Lightning
callback that calls it; :func:`portfolio_build_command` and :func:`portfolio_show_command` are
what ``dnnshifter portfolio build|show`` run. For every ``level_LL.ckpt`` the build:

1. loads the checkpoint strictly into the user's LightningModule class and reads ``ckpt["dnnshifter"]``;
2. measures the sparse model (accuracy, params, MACs, latency at batch 1 and 8);
3. removes its dead channels with :func:`~dnnshifter_lightning.structured.prune_structurally`;
4. saves the variant (:func:`~dnnshifter_lightning.portfolio.save_variant`) and reloads it, so every
   figure in the manifest (accuracy, latency, output difference) is measured on the file as served;
5. writes ``manifest.json`` last, ordered most to least accurate, plus ``portfolio.png``.

Example::

    import lightning as L
    from dnnshifter_lightning import IterativeMagnitudePruning, PortfolioBuilder
    from dnnshifter_lightning.digits import DigitsClassifier, DigitsDataModule

    imp = IterativeMagnitudePruning(levels=3, epochs_per_level=2, checkpoint_dir="imp_ckpts")
    trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp, PortfolioBuilder(out_dir="portfolio")])
    trainer.fit(DigitsClassifier(width=16), datamodule=DigitsDataModule())
    # portfolio/manifest.json, portfolio/variants/level_00.pt2.zst ..., portfolio/portfolio.png
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from . import __version__
from .portfolio import (
    MANIFEST_NAME, VARIANT_SUFFIX, ZSTD_LEVEL, load_variant, save_variant, sort_variants,
    verify_portfolio, write_manifest,
)
from .profile import count_macs, count_nonzero, count_params, measure_accuracy, measure_latency_ms, state_bytes

__all__ = ["build_portfolio", "PortfolioBuilder", "portfolio_build_command", "portfolio_show_command",
           "portfolio_table", "import_object"]

CHECKPOINT_KEY = "dnnshifter"
_LEVEL_RE = re.compile(r"level_(\d+)\.ckpt$")


def _prune(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    from .structured import prune_structurally  # imported late: the structured engine is heavy

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


def _example_batch(dataloader: Iterable[Any] | None, input_spec: dict[str, Any], n: int = 8) -> torch.Tensor:
    """``n`` real validation inputs when there is a loader (repeated if short), else seeded noise."""
    if dataloader is not None:
        xs, have = [], 0
        for batch in dataloader:
            x = batch["x"] if isinstance(batch, dict) else batch[0]
            xs.append(x)
            have += len(x)
            if have >= n:
                break
        if have:
            x = torch.cat(xs)[:n]
            return x.repeat((n + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:n].contiguous()
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, input_spec.get("dtype", "float32"))
    return torch.randn(n, *input_spec["shape"], generator=gen).to(dtype)


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / max(1, total)


def _max_abs_diff(a: nn.Module, b: nn.Module, dataloader: Iterable[Any] | None, example: torch.Tensor) -> float:
    diff = 0.0
    with torch.inference_mode():
        batches = [example] if dataloader is None else (bt["x"] if isinstance(bt, dict) else bt[0] for bt in dataloader)
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
    input_spec: dict[str, Any],
    *,
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
    ``callable(path) -> nn.Module``. ``val_dataloader`` yields ``(inputs, targets)``; with ``None``
    the accuracies are recorded as null. Latency is measured on ``latency_threads`` threads
    (``None`` keeps the current setting).

    Example::

        >>> import io, tempfile, torch
        >>> from pathlib import Path
        >>> from rich.console import Console
        >>> from dnnshifter_lightning.models import DigitsCNN
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
        ['manifest.json', 'variants', 'variants/level_00.pt2.zst', 'variants/level_01.pt2.zst']
    """
    console = console or Console(width=None if Console().is_terminal else 160)
    out = Path(out_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    paths = _level_checkpoints(checkpoints)
    spec = {"dtype": "float32", **input_spec}
    load = getattr(module_loader, "load_from_checkpoint", None)
    loader: Callable[[Path], nn.Module] = (
        (lambda p: load(p, map_location="cpu", strict=True)) if load is not None else module_loader  # type: ignore[misc]
    )
    example = _example_batch(val_dataloader, spec)
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
                                           latency_warmup, latency_repeats))
                progress.advance(task)
    finally:
        torch.set_num_threads(threads)
    manifest = {
        "format_version": 1,
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
        from .plot import plot_portfolio

        plot_portfolio(manifest, out / "portfolio.png")
    console.print(portfolio_table(manifest, title=f"portfolio {out}"))
    return manifest


def _build_one(path: Path, loader: Callable[[Path], nn.Module], out: Path, dataloader: Iterable[Any] | None,
               example: torch.Tensor, num_classes: int | None, warmup: int, repeats: int) -> dict[str, Any]:
    # The user's own training output: the same trust as load_from_checkpoint, which unpickles it too.
    meta = torch.load(path, map_location="cpu", weights_only=False).get(CHECKPOINT_KEY) or {}
    sparse = loader(path).eval().cpu()
    match = _LEVEL_RE.search(path.name)
    level = int(meta.get("level", match.group(1) if match else 0))
    sparsity = float(meta["sparsity"]) if "sparsity" in meta else _sparsity(sparse)
    with torch.inference_mode():
        classes = num_classes or int(sparse(example[:1]).shape[-1])
    sparse_acc = measure_accuracy(sparse, dataloader, classes) if dataloader is not None else None
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
        "accuracy": measure_accuracy(variant, dataloader, classes) if dataloader is not None else None,
        "sparse_accuracy": sparse_acc,
        "max_abs_diff": _max_abs_diff(variant, sparse, dataloader, example),
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

    The ``front`` column marks the accuracy/latency front (:func:`~dnnshifter_lightning.portfolio.pareto_front`,
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
    from .portfolio import pareto_front  # here, not at the top: keeps this change apart from the build's imports

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
    :class:`~dnnshifter_lightning.imp.IterativeMagnitudePruning` callback in the same Trainer. The
    validation data comes from the DataModule's ``val_dataloader()`` (or the LightningModule's), and
    the input spec from an ``input_spec`` attribute on the LightningModule or DataModule, unless
    given. The manifest is kept on ``self.manifest``.

    Example::

        trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp, PortfolioBuilder(out_dir="portfolio")])

    A complete run, tiny enough for a doctest::

        >>> import contextlib, io, tempfile
        >>> import lightning as L
        >>> from pathlib import Path
        >>> from dnnshifter_lightning import IterativeMagnitudePruning
        >>> from dnnshifter_lightning.digits import DigitsClassifier, DigitsDataModule
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
                 latency_warmup: int = 5, latency_repeats: int = 20, plot: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.input_spec = input_spec
        self.num_classes = num_classes
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.plot = plot
        self.manifest: dict[str, Any] | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ckpt_dir = self.checkpoint_dir or _find_imp_checkpoint_dir(trainer)
        if ckpt_dir is None:
            raise ValueError("PortfolioBuilder: pass checkpoint_dir=, or add an IterativeMagnitudePruning callback")
        dm = getattr(trainer, "datamodule", None)
        spec = self.input_spec or getattr(pl_module, "input_spec", None) or getattr(dm, "input_spec", None)
        if spec is None:
            raise ValueError("PortfolioBuilder: no input_spec; set `input_spec` on the LightningModule or "
                             "DataModule, or pass PortfolioBuilder(input_spec=...)")
        if dm is not None and is_overridden("val_dataloader", dm):
            loader = dm.val_dataloader()
        elif is_overridden("val_dataloader", pl_module):
            loader = pl_module.val_dataloader()
        else:
            loader = None
            warnings.warn("PortfolioBuilder: no val_dataloader; accuracies will be null", stacklevel=2)
        self.manifest = build_portfolio(
            ckpt_dir, type(pl_module), self.out_dir, loader, spec, num_classes=self.num_classes,
            latency_warmup=self.latency_warmup, latency_repeats=self.latency_repeats, plot=self.plot)


# ------------------------------------------------------------------------------------------ CLI

def import_object(spec: str) -> Any:
    """``"package.module:Name"`` -> the object.

    Example::

        >>> import_object("dnnshifter_lightning.models:DigitsCNN")
        <class 'dnnshifter_lightning.models.DigitsCNN'>
        >>> import_object("dnnshifter_lightning.models:DigitsCNN.forward").__qualname__   # dotted attributes too
        'DigitsCNN.forward'
        >>> import_object("dnnshifter_lightning.models.DigitsCNN")
        Traceback (most recent call last):
            ...
        ValueError: expected 'package.module:Class', got 'dnnshifter_lightning.models.DigitsCNN'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:Class', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def portfolio_build_command(ckpt_dir: Path, model: str, out: Path, datamodule: str | None = None) -> dict[str, Any]:
    """``dnnshifter portfolio build CKPT_DIR --model pkg.mod:Class --out DIR [--datamodule pkg.mod:Class]``.

    The model class is loaded with ``load_from_checkpoint``; the validation data comes from
    ``--datamodule`` or the model's own ``val_dataloader``, the input spec from an ``input_spec``
    attribute on either. Returns the manifest written.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> portfolio_build_command(Path("imp_ckpts"), "dnnshifter_lightning.digits:DigitsClassifier",
        ...                         Path("portfolio"), "dnnshifter_lightning.digits:DigitsDataModule")  # doctest: +SKIP
        >>> empty = Path(tempfile.mkdtemp())
        >>> portfolio_build_command(empty, "dnnshifter_lightning.digits:DigitsClassifier", empty / "portfolio")
        Traceback (most recent call last):
            ...
        FileNotFoundError: ...: no level_*.ckpt files
    """
    module_cls = import_object(model)
    paths = _level_checkpoints(ckpt_dir)
    dm = import_object(datamodule)() if datamodule else None
    loader = None
    if dm is not None:
        dm.prepare_data()
        dm.setup("validate")
        loader = dm.val_dataloader()
    elif is_overridden("val_dataloader", module_cls, parent=L.LightningModule):
        first = module_cls.load_from_checkpoint(paths[0], map_location="cpu", strict=True)
        loader = first.val_dataloader()
    else:
        warnings.warn(f"{model} defines no val_dataloader and no --datamodule was given: accuracies will be null",
                      stacklevel=2)
    spec = getattr(module_cls, "input_spec", None) or getattr(dm, "input_spec", None)
    if spec is None:
        raise ValueError(f"no input_spec: set an `input_spec` attribute on {model} or on the DataModule")
    return build_portfolio(paths, module_cls, out, loader, spec)


def portfolio_show_command(dir: Path) -> dict[str, Any]:  # noqa: A002 - the CLI argument's name
    """``dnnshifter portfolio show DIR``: verify every file's sha256 and print the table.

    Example::

        >>> import contextlib, io, tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant, write_manifest
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "v0.pt2.zst")
        >>> _ = write_manifest(d, {"format_version": 1, "input_spec": {"shape": [3], "dtype": "float32"},
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

