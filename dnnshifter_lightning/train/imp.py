"""Iterative Magnitude Pruning with rewinding (lottery tickets) as one Lightning callback.

This is OpenLTH's IMP inside a single ``Trainer.fit``. Level 0 trains dense for ``epochs_per_level``
epochs. Between level L and level L+1 the callback:

1. writes level L's sparse checkpoint ``checkpoint_dir/level_LL.ckpt``;
2. prunes ``prune_fraction`` of the surviving prunable weights by global magnitude;
3. rewinds every weight and buffer (BN statistics too) to the rewind point, keeping the new masks;
4. restores the optimizer and LR-scheduler states saved at the rewind point.

Step 1 runs when level L's last epoch ends (so a fit stopped right there keeps the level); steps 2-4
run at the start of level L+1's first epoch: Lightning steps epoch-interval LR schedulers *after*
``on_train_epoch_end``, so a reset there would leave the scheduler one step past the rewind point.
A checkpoint taken at the end of a level therefore resumes through the same code path.

Each level's LR schedule restarts from the rewind point, so a scheduler sized by a step count
(``OneCycleLR(total_steps=...)``, ``CosineAnnealingLR(T_max=...)``) must cover one level from there:
:meth:`IterativeMagnitudePruning.scheduler_steps` gives that count, and the callback refuses a
scheduler sized otherwise before training. ``levels=N`` gives N+1 checkpoints,
level L at weight sparsity ``1-(1-p)^L`` over the prunable weights, in ``(N+1) * epochs_per_level``
epochs. The Trainer's ``max_epochs`` must equal that; the callback refuses to start otherwise and
names the right value (it never changes your Trainer behind your back). ``callback.total_epochs``
gives it.

Example::

    import lightning as L
    from dnnshifter_lightning import IterativeMagnitudePruning
    from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule

    imp = IterativeMagnitudePruning(levels=3, epochs_per_level=2, rewind_to="1ep",
                                    checkpoint_dir="imp_ckpts")
    trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp])
    trainer.fit(DigitsClassifier(width=16), datamodule=DigitsDataModule())
    # imp_ckpts/level_00.ckpt ... level_03.ckpt, each loadable with DigitsClassifier.load_from_checkpoint
"""

from __future__ import annotations

import copy
import io
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torch.utils._pytree import tree_flatten

from dnnshifter_lightning._atomic import atomic_write
from dnnshifter_lightning.train.checkpoints import CHECKPOINT_KEY
from dnnshifter_lightning.train.masks import (
    DEFAULT_PRUNABLE_TYPES,
    MaskEnforcer,
    count_surviving,
    find_prunable,
    fraction_for,
    mask_digest,
    prune_step,
    survivors_after,
)

__all__ = ["IterativeMagnitudePruning", "CHECKPOINT_KEY", "parse_rewind_point"]

_REWIND_RE = re.compile(r"^\s*(\d+)\s*(it|ep)\s*$")
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def parse_rewind_point(rewind_to: int | str) -> tuple[int, str]:
    """``(amount, unit)`` with unit ``"it"`` (optimizer steps) or ``"ep"`` (epochs).

    Accepts OpenLTH's forms: an int number of steps, ``"2000it"``, ``"2ep"``, or ``0`` for the
    original initialisation.
    """
    if isinstance(rewind_to, bool):
        raise ValueError(f"rewind_to must be an int or a string like '500it' or '1ep', got {rewind_to!r}")
    if isinstance(rewind_to, int):
        if rewind_to < 0:
            raise ValueError(f"rewind_to must be >= 0 steps, got {rewind_to}")
        return rewind_to, "it"
    if isinstance(rewind_to, str):
        if rewind_to.strip().isdigit():
            return int(rewind_to), "it"
        m = _REWIND_RE.match(rewind_to)
        if m:
            return int(m.group(1)), m.group(2)
    raise ValueError(
        f"rewind_to={rewind_to!r} is not understood: use an int number of steps, 'Nit' (e.g. '2000it'), "
        f"'Nep' (e.g. '1ep'), or 0 for the original initialisation"
    )


def _cpu_clone(obj: Any) -> Any:
    """Deep copy with every tensor detached onto the CPU (rewind state must not hold GPU memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return type(obj)((k, _cpu_clone(v)) for k, v in obj.items()) if not isinstance(obj, dict) else {
            k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to memory, then one :func:`atomic_write` (a crash never leaves half a checkpoint)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def _validation_metrics(trainer: L.Trainer) -> dict[str, float]:
    """Every metric logged by the validation that just ended, whatever its name."""
    # Private on purpose: no public API says which metrics the validation logged. At
    # on_validation_end, trainer.callback_metrics and trainer.logged_metrics (Lightning 2.6) both
    # also hold the training step's metrics (e.g. train_loss); the validation loop's returned metrics
    # do not exist yet (fit discards them later anyway). trainer._results is the validation loop's
    # own result collection at this moment; when absent, fall back to names containing "val".
    results = getattr(trainer, "_results", None)
    names = {getattr(getattr(r, "meta", None), "name", None) for r in results.values()} if results is not None else None
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        base = key.split("/dataloader_idx_")[0]
        if (base in names) if names is not None else ("val" in key.lower()):
            metrics[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return metrics


def _random_samplers(loaders: Any) -> list[torch.utils.data.RandomSampler]:
    found = []
    for loader in tree_flatten(loaders)[0]:
        for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if isinstance(sampler, torch.utils.data.RandomSampler) and sampler not in found:
                found.append(sampler)
    return found


class IterativeMagnitudePruning(Callback):
    """Iterative Magnitude Pruning with weight rewinding; one sparse checkpoint per level.

    Args:
        levels: number of pruning rounds N; the fit produces N+1 checkpoints (level 0 is dense).
        prune_fraction: fraction of the *surviving* prunable weights removed at each level, in (0, 1).
        epochs_per_level: epochs trained at every level.
        rewind_to: the rewind point: an int number of optimizer steps, ``"Nit"``, ``"Nep"``, or ``0``
            for the original initialisation (OpenLTH's ``--rewinding_steps``). It must not be later
            than the end of level 0.
        checkpoint_dir: where ``level_LL.ckpt`` files go (default ``<default_root_dir>/imp``). Must be
            local: files are written to a temporary name and renamed.
        exclude: module names or fnmatch patterns to leave dense (e.g. ``["model.classifier"]``).
        layer_prune_fractions: ``{module name or pattern: fraction}`` for layers pruned at their own
            rate, ranked on their own (e.g. ``{"model.classifier": 0.1}`` prunes the classifier at half
            of a 0.2 rate, as the LTH papers do).
        prunable_types: module types whose ``weight`` is prunable (default Conv1d/2d/3d and Linear).
        include: optional ``(module_name, module) -> bool`` filter on top of ``prunable_types``.
        overwrite: allow replacing level checkpoints left in ``checkpoint_dir`` by another run.
        verbose: print one line per finished level and a table at the end (rank 0).

    Metadata: each level checkpoint carries ``checkpoint["dnnshifter"]`` (see :data:`CHECKPOINT_KEY`).
    Resuming: the callback's state (level, masks, rewind-point weights, optimizer and scheduler state
    at the rewind point, per-level history) is saved in Lightning's own checkpoints, so
    ``trainer.fit(model, ckpt_path=".../last.ckpt")`` continues IMP where it stopped.

    Example::

        >>> import tempfile
        >>> import lightning as L
        >>> from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule
        >>> imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, prune_fraction=0.5,
        ...                                 checkpoint_dir=tempfile.mkdtemp(), verbose=False)
        >>> imp.total_epochs, imp.target_sparsity(2)
        (3, 0.75)
        >>> trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp], accelerator="cpu",
        ...                     limit_train_batches=1, limit_val_batches=1, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsClassifier(width=4), datamodule=DigitsDataModule(train_limit=32))
        >>> [(row["level"], round(row["sparsity"], 2)) for row in imp.history]
        [(0, 0.0), (1, 0.5), (2, 0.75)]
        >>> sorted(path.name for path in imp.checkpoint_dir.glob("level_*.ckpt"))
        ['level_00.ckpt', 'level_01.ckpt', 'level_02.ckpt']
        >>> meta = torch.load(imp.checkpoint_dir / "level_02.ckpt", weights_only=False)[CHECKPOINT_KEY]
        >>> meta["level"], round(meta["sparsity"], 2), sorted(meta["masks"])[:2]
        (2, 0.75, ['model.classifier.weight', 'model.features.0.weight'])
        >>> sparse = DigitsClassifier.load_from_checkpoint(imp.checkpoint_dir / "level_02.ckpt")
        >>> pruned = ~meta["masks"]["model.features.0.weight"]
        >>> bool((sparse.model.features[0].weight[pruned] == 0).all())
        True
    """

    def __init__(
        self,
        levels: int,
        epochs_per_level: int,
        prune_fraction: float = 0.2,
        rewind_to: int | str = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        exclude: Sequence[str] = (),
        layer_prune_fractions: Mapping[str, float] | None = None,
        prunable_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
        include: Callable[[str, nn.Module], bool] | None = None,
        overwrite: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ValueError(f"levels must be an int >= 0, got {levels!r}")
        if isinstance(epochs_per_level, bool) or not isinstance(epochs_per_level, int) or epochs_per_level < 1:
            raise ValueError(f"epochs_per_level must be an int >= 1, got {epochs_per_level!r}")
        if not isinstance(prune_fraction, (int, float)) or not 0.0 < float(prune_fraction) < 1.0:
            raise ValueError(f"prune_fraction must be strictly between 0 and 1 (e.g. 0.2), got {prune_fraction!r}")
        for name, frac in (layer_prune_fractions or {}).items():
            if not isinstance(frac, (int, float)) or not 0.0 <= float(frac) < 1.0:
                raise ValueError(f"layer_prune_fractions[{name!r}] must be in [0, 1), got {frac!r}")
        self.rewind_amount, self.rewind_unit = parse_rewind_point(rewind_to)
        if self.rewind_unit == "ep" and self.rewind_amount > epochs_per_level:
            raise ValueError(
                f"rewind_to={rewind_to!r} is later than the end of level 0 ({epochs_per_level} epochs): "
                f"use at most '{epochs_per_level}ep'"
            )
        self.levels = levels
        self.epochs_per_level = epochs_per_level
        self.prune_fraction = float(prune_fraction)
        self.rewind_to = rewind_to
        self._checkpoint_dir_arg = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_dir = self._checkpoint_dir_arg
        self.exclude = tuple(exclude)
        self.layer_prune_fractions = dict(layer_prune_fractions or {})
        self.prunable_types = tuple(prunable_types)
        self.include = include
        self.overwrite = overwrite
        self.verbose = verbose

        self._weights: dict[str, nn.Parameter] = {}
        self._enforcer: MaskEnforcer | None = None
        self._reset()

    def _reset(self) -> None:
        """A fresh IMP: every fit starts here, and a resumed one then loads its state over it."""
        # State saved with Lightning checkpoints.
        self.level = 0
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self._rewind: dict[str, Any] | None = None
        # The last validation: {"level", "global_step", "metrics"}; a level records it only if it
        # validated that level's final weights.
        self._last_val: dict[str, Any] | None = None
        self._level_started_at: float | None = None
        self._level_seconds_before_resume = 0.0
        # Runtime only.
        self._restored = False
        self._warned_no_metrics = False
        self._sampler_seeds: dict[int, int] = {}

    # ------------------------------------------------------------------ configuration
    @property
    def total_epochs(self) -> int:
        """``(levels + 1) * epochs_per_level``: the ``max_epochs`` your Trainer needs."""
        return (self.levels + 1) * self.epochs_per_level

    def target_sparsity(self, level: int) -> float:
        """``1 - (1 - prune_fraction) ** level``."""
        return 1.0 - (1.0 - self.prune_fraction) ** level

    def scheduler_steps(self, trainer: L.Trainer, interval: str = "step") -> int:
        """The length a step-count-sized LR scheduler needs: the rewind point plus one level.

        Every level restarts the schedule where it stood at the rewind point and then trains
        ``epochs_per_level`` epochs, so ``OneCycleLR(total_steps=...)``, ``CosineAnnealingLR(T_max=...)``,
        ``LinearLR``/``PolynomialLR(total_iters=...)`` must count that many steps (``interval="step"``,
        optimizer steps) or epochs (``interval="epoch"``). Usable in ``configure_optimizers``::

            imp = next(cb for cb in self.trainer.callbacks if isinstance(cb, IterativeMagnitudePruning))
            OneCycleLR(opt, max_lr=0.1, total_steps=imp.scheduler_steps(self.trainer))
        """
        if interval == "epoch":
            rewind_epochs = self.rewind_amount if self.rewind_unit == "ep" else \
                self.rewind_amount // self._steps_per_epoch(trainer)
            return rewind_epochs + self.epochs_per_level
        if interval != "step":
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        per_epoch = self._steps_per_epoch(trainer)
        rewind_steps = self.rewind_amount if self.rewind_unit == "it" else self.rewind_amount * per_epoch
        return rewind_steps + per_epoch * self.epochs_per_level

    @staticmethod
    def _steps_per_epoch(trainer: L.Trainer) -> int:
        batches = trainer.num_training_batches
        if batches == float("inf"):  # before the training data is set up, e.g. in configure_optimizers
            total = trainer.estimated_stepping_batches  # sets it up
            if total == float("inf") or not trainer.max_epochs or trainer.max_epochs < 1:
                raise ValueError("the length of a level in steps is unknown: the training loader has no length "
                                 "(set limit_train_batches to an int)")
            return max(1, int(total) // trainer.max_epochs)
        return max(1, -(-int(batches) // trainer.accumulate_grad_batches))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit (a notebook cell run again, a sweep) starts a fresh IMP; a resumed fit's state is
        # loaded by Lightning after `setup`, over this.
        self._reset()
        self.checkpoint_dir = self._checkpoint_dir_arg
        strategy = type(trainer.strategy).__name__
        if strategy in _UNSUPPORTED_STRATEGIES:
            raise ValueError(
                f"IterativeMagnitudePruning does not support {strategy}: it shards parameters, so global "
                f"magnitude ranks and masks would be computed on shards. Use strategy='ddp' (or a single device)."
            )
        if trainer.max_steps not in (-1, None):
            raise ValueError(
                f"Trainer(max_steps={trainer.max_steps}) would cut IMP short: IMP counts epochs. Leave max_steps "
                f"unset and create the Trainer with max_epochs={self.total_epochs} "
                f"(({self.levels}+1)*{self.epochs_per_level}; got max_epochs={trainer.max_epochs})."
            )
        if trainer.max_epochs != self.total_epochs:
            raise ValueError(
                f"IterativeMagnitudePruning(levels={self.levels}, epochs_per_level={self.epochs_per_level}) "
                f"trains ({self.levels}+1)*{self.epochs_per_level} = {self.total_epochs} epochs: create the "
                f"Trainer with max_epochs={self.total_epochs} (got max_epochs={trainer.max_epochs})."
            )
        if any(isinstance(cb, EarlyStopping) for cb in trainer.callbacks):
            raise ValueError(
                "EarlyStopping cannot be combined with IterativeMagnitudePruning: it would end the whole fit, and "
                "IMP with it, before the last level. Remove EarlyStopping. Every level trains epochs_per_level "
                "epochs and records its own final validation metrics; to keep each level's best epoch instead, "
                "add a ModelCheckpoint(monitor=...) per run, and to train less, lower epochs_per_level (and "
                "max_epochs to match: (levels+1)*epochs_per_level)."
            )
        if not pl_module.automatic_optimization and trainer.accumulate_grad_batches != 1:
            raise ValueError("manual optimization with accumulate_grad_batches is not supported")
        self._weights = find_prunable(pl_module, types=self.prunable_types, exclude=self.exclude,
                                      include=self.include)
        if not self._weights:
            raise ValueError(
                f"IterativeMagnitudePruning found no prunable parameters in {type(pl_module).__name__}: it prunes "
                f"the weight of {[t.__name__ for t in self.prunable_types]} modules. Pass prunable_types=... "
                f"or check exclude={list(self.exclude)}."
            )
        self._check_levels_leave_weights()
        if self.checkpoint_dir is None:
            self.checkpoint_dir = Path(trainer.default_root_dir) / "imp"

    def _check_levels_leave_weights(self) -> None:
        groups: dict[float, int] = {}
        for name, w in self._weights.items():
            frac = fraction_for(name, self.layer_prune_fractions, self.prune_fraction)
            groups[frac] = groups.get(frac, 0) + w.numel()
        for frac, n in groups.items():
            if frac > 0 and survivors_after(n, frac, self.levels) == 0:
                raise ValueError(
                    f"levels={self.levels} at prune_fraction={frac} would prune every one of {n} prunable weights. "
                    f"Use fewer levels or a smaller prune_fraction."
                )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        elapsed = self._level_seconds_before_resume
        if self._level_started_at is not None:
            elapsed += time.perf_counter() - self._level_started_at
        return {
            "config": {"levels": self.levels, "prune_fraction": self.prune_fraction,
                       "epochs_per_level": self.epochs_per_level, "rewind": [self.rewind_amount, self.rewind_unit]},
            "level": self.level,
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "rewind": self._rewind,
            "history": self.history,
            "last_val": self._last_val,
            "level_seconds": elapsed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        cfg = state_dict["config"]
        mine = {"levels": self.levels, "prune_fraction": self.prune_fraction,
                "epochs_per_level": self.epochs_per_level, "rewind": [self.rewind_amount, self.rewind_unit]}
        if {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()} != mine:
            raise ValueError(
                f"this checkpoint was written by IterativeMagnitudePruning with {cfg}; resuming it with {mine} "
                f"would mix two schedules. Resume with the same settings."
            )
        self.level = int(state_dict["level"])
        self.masks = {k: v.to(torch.bool) for k, v in state_dict["masks"].items()}
        self._rewind = state_dict["rewind"]
        self.history = list(state_dict["history"])
        self._last_val = state_dict.get("last_val")
        self._level_seconds_before_resume = float(state_dict.get("level_seconds", 0.0))
        self._restored = True

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rewind_unit == "it" and trainer.num_training_batches != float("inf"):
            steps_per_epoch = self._steps_per_epoch(trainer)
            end_of_level0 = steps_per_epoch * self.epochs_per_level
            if self.rewind_amount > end_of_level0:
                raise ValueError(
                    f"rewind_to={self.rewind_to!r} is later than the end of level 0 ({end_of_level0} optimizer "
                    f"steps = {self.epochs_per_level} epochs x {steps_per_epoch} steps): use at most {end_of_level0}."
                )
        self._check_schedulers(trainer)
        # Lightning restores callback state after `setup`, so whether this is a resume is known only here.
        existing = sorted(self.checkpoint_dir.glob("level_*.ckpt")) if self.checkpoint_dir.exists() else []
        if existing and not self._restored and not self.overwrite:
            raise FileExistsError(
                f"{self.checkpoint_dir} already holds level checkpoints from another run ({existing[0].name}, ...). "
                f"Use a new checkpoint_dir, delete them, or pass overwrite=True."
            )
        if trainer.is_global_zero:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("dnnshifter.checkpoint_dir")
        # Parameters may have been moved or wrapped by the strategy since `setup`: look them up again.
        self._weights = find_prunable(pl_module, types=self.prunable_types, exclude=self.exclude,
                                      include=self.include)
        if not self.masks:
            self.masks = {n: torch.ones_like(w, dtype=torch.bool, device="cpu") for n, w in self._weights.items()}
        missing = set(self._weights) - set(self.masks)
        if missing:
            raise ValueError(f"restored IMP masks lack prunable parameters {sorted(missing)}: the model changed")
        self._enforcer = MaskEnforcer(self._weights, self.masks)
        self._enforcer.attach(trainer.optimizers)
        if self._level_started_at is None:
            self._level_started_at = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        due_level = min(epoch // self.epochs_per_level, self.levels)
        if self.level < due_level:
            self._maybe_capture_rewind(trainer, pl_module, at_level_end=True)
            if not self._level_written():  # resumed from a checkpoint saved before the level's end hook
                self._finish_level(trainer, pl_module)
            self._start_next_level(trainer, pl_module)
        if self.rewind_unit == "ep":
            self._maybe_capture_rewind(trainer, pl_module)
        self._seed_train_samplers(trainer, epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The level's checkpoint is written now, so a fit that stops at the boundary keeps it.
        # Pruning and rewinding wait for the next epoch (see the module docstring).
        if (trainer.current_epoch + 1) % self.epochs_per_level == 0 and not self._level_written():
            self._finish_level(trainer, pl_module)
            if self.level == self.levels:
                self._print_table()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.rewind_unit == "it" and self._rewind is None:
            self._maybe_capture_rewind(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._last_val = {"level": self.level, "global_step": trainer.global_step,
                          "metrics": _validation_metrics(trainer)}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch < self.total_epochs or not self._level_written() or self.level < self.levels:
            rank_zero_warn(
                f"IMP stopped at epoch {trainer.current_epoch} of {self.total_epochs} (level {self.level} of "
                f"{self.levels}, {len(self.history)} level checkpoints written); resume with "
                f"trainer.fit(..., ckpt_path=...) to finish the remaining levels."
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._enforcer is not None:
            self._enforcer.detach()
            self._enforcer = None

    # ------------------------------------------------------------------ the level cycle
    def _rewind_due(self, trainer: L.Trainer) -> bool:
        if self.rewind_unit == "ep":
            return trainer.current_epoch >= self.rewind_amount
        return trainer.global_step >= self.rewind_amount

    def _maybe_capture_rewind(self, trainer: L.Trainer, pl_module: L.LightningModule,
                              at_level_end: bool = False) -> None:
        if self._rewind is not None or not (at_level_end or self._rewind_due(trainer)):
            return
        self._rewind = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "model": _cpu_clone(pl_module.state_dict()),
            "optimizers": [_cpu_clone(opt.state_dict()) for opt in trainer.optimizers],
            "schedulers": [_cpu_clone(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        }

    def _level_written(self) -> bool:
        return bool(self.history) and self.history[-1]["level"] == self.level

    def _level_metrics(self, trainer: L.Trainer) -> dict[str, float]:
        """The validation of this level's final weights, or {} (with one warning per fit)."""
        last = self._last_val
        if last is not None and last["level"] == self.level and last["global_step"] == trainer.global_step:
            return dict(last["metrics"])
        if not self._warned_no_metrics:
            self._warned_no_metrics = True
            seen = ("no validation ran in this level" if last is None or last["level"] != self.level else
                    f"its last validation was at step {last['global_step']}, before the level ended at step "
                    f"{trainer.global_step}")
            rank_zero_warn(
                f"IMP level {self.level} records no validation metrics: {seen}. A level records only a validation "
                f"of its own final weights: validate at every level's last epoch (check_val_every_n_epoch dividing "
                f"epochs_per_level={self.epochs_per_level}, val_check_interval=1.0, limit_val_batches > 0). "
                f"This warning is shown once per fit.")
        return {}

    def _check_schedulers(self, trainer: L.Trainer) -> None:
        """Refuse a scheduler sized by a step count that one level from the rewind point does not match."""
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            for attr, exact in (("total_steps", True), ("T_max", False), ("total_iters", False)):
                length = getattr(sched, attr, None)
                if not isinstance(length, int) or isinstance(length, bool):
                    continue
                interval = cfg.interval if cfg.interval in ("step", "epoch") else "epoch"
                need = -(-self.scheduler_steps(trainer, interval) // max(1, cfg.frequency))
                if length > need or (exact and length != need):
                    raise ValueError(
                        f"{type(sched).__name__}({attr}={length}, interval={interval!r}) does not fit IMP: every level "
                        f"restarts the schedule at the rewind point and then trains one level, so it must count "
                        f"{need} {interval}s (rewind point + {self.epochs_per_level} epochs of one level, not the whole "
                        f"fit). Use {attr}={need}; imp.scheduler_steps(trainer, {interval!r}) gives it in "
                        f"configure_optimizers.")

    def _seed_train_samplers(self, trainer: L.Trainer, epoch: int) -> None:
        """Seed each shuffling RandomSampler by its epoch, so a resumed run sees the same order.

        Lightning does not checkpoint a sampler's generator, so without this a resumed run reshuffles
        from the generator's initial state. The seed is the generator's own initial seed (or torch's,
        as ``seed_everything`` sets it) plus the epoch. The sampler gets a generator of its own: the
        DataLoader draws its workers' base seed from the generator it was given, and for the first
        epoch of a fit it does so before this hook. DistributedSampler is already seeded by its epoch.
        """
        for sampler in _random_samplers(trainer.train_dataloader):
            key = id(sampler)
            if key not in self._sampler_seeds:
                generator = sampler.generator
                self._sampler_seeds[key] = generator.initial_seed() if generator is not None else torch.initial_seed()
            sampler.generator = torch.Generator().manual_seed(self._sampler_seeds[key] + epoch)

    @torch.no_grad()
    def _finish_level(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the sparse checkpoint of the level just trained, log it, record it."""
        for name, w in self._weights.items():  # belt and braces: an exotic optimizer may have regrown zeros
            m = self.masks[name].to(w.device)
            if bool((w.ne(0) & ~m).any()):
                rank_zero_warn(f"pruned entries of {name} were non-zero at the end of level {self.level}; re-zeroed")
                w.mul_(m.to(w.dtype))
        surviving, prunable = count_surviving(self.masks)
        metrics = self._level_metrics(trainer)
        seconds = self._level_seconds_before_resume + (
            time.perf_counter() - self._level_started_at if self._level_started_at is not None else 0.0)
        row = {
            "level": self.level,
            "sparsity": 1.0 - surviving / prunable,
            "target_sparsity": self.target_sparsity(self.level),
            "surviving": surviving,
            "prunable": prunable,
            "metrics": metrics,
            "seconds": seconds,
            "epoch": (self.level + 1) * self.epochs_per_level - 1,  # the level's last epoch
            "global_step": trainer.global_step,
            "mask_sha256": mask_digest(self.masks),
            "path": str(self.checkpoint_dir / f"level_{self.level:02d}.ckpt"),
        }
        self._write_level_checkpoint(trainer, row)
        self.history.append(row)
        log = {"imp/level": float(self.level), "imp/sparsity": row["sparsity"],
               "imp/surviving_params": float(surviving)}
        log.update({f"imp/{k}": v for k, v in row["metrics"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(log, step=trainer.global_step)
        if self.verbose:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
            rank_zero_info(
                f"IMP level {self.level}/{self.levels}: sparsity {row['sparsity']:.2%}, {surviving:,} of "
                f"{prunable:,} weights left{', ' + shown if shown else ''} ({seconds:.1f} s) -> {row['path']}"
            )

    def _write_level_checkpoint(self, trainer: L.Trainer, row: dict[str, Any]) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        checkpoint["epoch"] = row["epoch"]  # the same whether written at the level's end or on resume
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "level": self.level,
            "levels": self.levels,
            "prune_fraction": self.prune_fraction,
            "sparsity": row["sparsity"],
            "target_sparsity": row["target_sparsity"],
            "surviving": row["surviving"],
            "prunable": row["prunable"],
            "masks": {k: v.cpu().clone() for k, v in self.masks.items()},
            "mask_sha256": row["mask_sha256"],
            "metrics": row["metrics"],
            "epoch": row["epoch"],
            "global_step": row["global_step"],
        }
        if trainer.is_global_zero:
            _atomic_torch_save(checkpoint, Path(row["path"]))
        trainer.strategy.barrier("dnnshifter.level_checkpoint")

    @torch.no_grad()
    def _start_next_level(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prune, rewind weights/buffers and optimizer/scheduler state, and start level + 1."""
        assert self._rewind is not None and self._enforcer is not None
        new_masks = prune_step({n: w.detach() for n, w in self._weights.items()}, self.masks,
                               self.prune_fraction, self.layer_prune_fractions)
        new_masks = {k: v.cpu() for k, v in new_masks.items()}
        # Identical weights give identical masks on every rank; broadcasting rank 0's makes it certain.
        self.masks = trainer.strategy.broadcast(new_masks, src=0)
        pl_module.load_state_dict(self._rewind["model"], strict=True)
        for opt, state in zip(trainer.optimizers, self._rewind["optimizers"]):
            opt.load_state_dict(copy.deepcopy(state))
        for cfg, state in zip(trainer.lr_scheduler_configs, self._rewind["schedulers"]):
            cfg.scheduler.load_state_dict(copy.deepcopy(state))
        self._enforcer.set_masks(self.masks)  # zeroes the newly pruned (rewound) weights
        for opt in trainer.optimizers:
            self._enforcer.zero_optimizer_state(opt)
        self.level += 1
        self._level_started_at = time.perf_counter()
        self._level_seconds_before_resume = 0.0

    # ------------------------------------------------------------------ output
    @rank_zero_only
    def _print_table(self) -> None:
        if not self.verbose or not self.history:
            return
        from rich.console import Console
        from rich.table import Table

        metric_names = sorted({k for row in self.history for k in row["metrics"]})
        table = Table(title=f"Iterative Magnitude Pruning: {self.levels + 1} levels at {self.prune_fraction:.0%}")
        for col in ["level", "sparsity", "weights left", *metric_names, "time (s)", "checkpoint"]:
            table.add_column(col, justify="left" if col == "checkpoint" else "right")
        for row in self.history:
            table.add_row(
                str(row["level"]), f"{row['sparsity']:.2%}", f"{row['surviving']:,}",
                *[f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "-" for m in metric_names],
                f"{row['seconds']:.1f}", Path(row["path"]).name,
            )
        Console().print(table)
