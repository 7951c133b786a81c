"""``PortfolioBuilder``: the post-fit Lightning callback that builds the portfolio (a thin adapter).

It finds what :func:`~dnnshifter_lightning.shrink.build.build_portfolio` needs in the Trainer, the
LightningModule and the DataModule, following Lightning's conventions, checks it before training,
and after ``fit`` runs the build with a progress bar and the table
(:mod:`~dnnshifter_lightning.shrink.report`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from dnnshifter_lightning.shrink.build import build_portfolio, check_build, resolve_input
from dnnshifter_lightning.shrink.measure import batch_unpacker
from dnnshifter_lightning.shrink.report import BuildProgress, build_console, portfolio_table

__all__ = ["PortfolioBuilder", "first_loader"]


def first_loader(loaders: Any, what: str = "validation") -> Any:
    """A dataloader, or the first of a list, tuple or dict of them (with a warning naming how many)."""
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


def _find_imp_checkpoint_dir(trainer: L.Trainer) -> Path | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if type(cb).__name__ == "IterativeMagnitudePruning" and getattr(cb, "checkpoint_dir", None) is not None:
            return Path(cb.checkpoint_dir)
    return None


def _fit_loader(trainer: L.Trainer, which: str) -> Any:
    """What ``fit`` trains (``"train"``) or validates (``"val"``) on, however it was given."""
    loop = trainer.fit_loop if which == "train" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)  # Lightning's record of fit(...)'s dataloader arguments
    if source is not None:
        return source.dataloader() if source.is_defined() else None
    owner = next((o for o in (getattr(trainer, "datamodule", None), trainer.lightning_module)
                  if o is not None and is_overridden(f"{which}_dataloader", o)), None)
    return getattr(owner, f"{which}_dataloader")() if owner is not None else None
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
    variant from the initial weights (:func:`~dnnshifter_lightning.shrink.build.check_build`: load with ``load_from_checkpoint``, run a
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
            check_build(path, type(pl_module), example, batch, self.num_classes, self.unpack)
        except Exception as exc:
            raise ValueError(f"PortfolioBuilder's check before training (building a variant from the initial "
                            f"weights) failed; fix this first, or pass dry_run=False: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        plan = self._plan or self._prepare(trainer, pl_module)
        console = build_console()
        with BuildProgress(console) as progress:
            self.manifest = build_portfolio(
                plan["checkpoint_dir"], plan["module"], self.out_dir, plan["val_loader"], plan["spec"],
                unpack=self.unpack, num_classes=self.num_classes, latency_warmup=self.latency_warmup,
                latency_repeats=self.latency_repeats, plot=self.plot, progress=progress)
        console.print(portfolio_table(self.manifest, title=f"portfolio {self.out_dir}"))


