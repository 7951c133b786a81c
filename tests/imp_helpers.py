"""Shared helpers for the IMP tests (small, fast digits runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule
from dnnshifter_lightning.train.imp import CHECKPOINT_KEY, IterativeMagnitudePruning


def make_trainer(imp: IterativeMagnitudePruning, root: Path, extra_callbacks=(), **kwargs: Any) -> L.Trainer:
    opts = dict(
        max_epochs=imp.total_epochs,
        callbacks=[imp, *extra_callbacks],
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


def small_datamodule(**kwargs: Any) -> DigitsDataModule:
    opts = dict(batch_size=64, shuffle=False, train_limit=512)
    opts.update(kwargs)
    return DigitsDataModule(**opts)


def load_level(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def level_meta(path: Path) -> dict[str, Any]:
    return load_level(path)[CHECKPOINT_KEY]


def new_model(**kwargs: Any) -> DigitsClassifier:
    opts = dict(width=8)
    opts.update(kwargs)
    return DigitsClassifier(**opts)


class ShapeFromExampleInput(DigitsClassifier):
    """A DigitsClassifier that gives its input only the Lightning way: ``example_input_array``
    set on the instance (no ``input_spec`` attribute)."""

    input_spec = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 8, 8)


class NoInputHints(DigitsClassifier):
    """A DigitsClassifier with neither ``input_spec`` nor ``example_input_array``."""

    input_spec = None
