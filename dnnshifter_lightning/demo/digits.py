"""The embedded default workload: scikit-learn's 1,797 real 8x8 handwritten digits.

``DigitsDataModule`` and ``DigitsClassifier`` are what ``dnnshifter demo`` trains, and what the tests
use. They are ordinary Lightning classes, and show the two things the rest of the library reads off
a user's module:

* ``input_spec`` (on the LightningModule or the DataModule): the input shape without batch, dtype,
  normalisation and class names. The portfolio manifest records it and the TorchServe handler uses
  it to turn a PNG into a tensor.
* ``val_dataloader()``: used to measure each variant's accuracy with torchmetrics.

Example::

    >>> import lightning as L
    >>> from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule
    >>> dm = DigitsDataModule(batch_size=64, train_limit=128)   # drop train_limit for all 1,438
    >>> model = DigitsClassifier(width=16)
    >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model, datamodule=dm)
    >>> 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    True
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dnnshifter_lightning.demo.models import DigitsCNN

__all__ = ["DigitsDataModule", "DigitsClassifier", "DIGITS_INPUT_SPEC", "load_digits_tensors"]

# Pixels of load_digits() are integers 0..16; we scale them to [0, 1] (so an 8-bit grayscale PNG
# scaled by 1/255 lands in the same range), then normalise with mean 0.5 and std 0.5.
DIGITS_INPUT_SPEC: dict[str, Any] = {
    "shape": [1, 8, 8],
    "dtype": "float32",
    "color": "L",
    "mean": [0.5],
    "std": [0.5],
    "class_names": [str(i) for i in range(10)],
}


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as a normalised ``(N, 1, 8, 8)`` float tensor and ``(N,)`` int64 labels.

    Example::

        >>> x, y = load_digits_tensors()
        >>> x.shape, y.shape
        (torch.Size([1797, 1, 8, 8]), torch.Size([1797]))
        >>> x.min().item(), x.max().item(), y[:10].tolist()     # pixels in [-1, 1], labels 0..9
        (-1.0, 1.0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "The digits workload needs scikit-learn: pip install 'dnnshifter-lightning[demo]'"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


class DigitsDataModule(L.LightningDataModule):
    """Deterministic split of the digits: ``val_fraction`` held out (stratified by a fixed permutation).

    ``shuffle=False`` gives an unshuffled training loader, which together with
    ``Trainer(deterministic=True)`` makes runs bit-for-bit repeatable.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([32, 1, 8, 8]), torch.Size([32]))
        >>> len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset)   # 20% held out
        (1438, 359)
        >>> dm.input_spec["shape"], dm.input_spec["mean"], dm.input_spec["std"]
        ([1, 8, 8], [0.5], [0.5])
    """

    input_spec = DIGITS_INPUT_SPEC

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, shuffle: bool = True,
                 train_limit: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.shuffle = shuffle
        self.train_limit = train_limit
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        x, y = load_digits_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(y) * self.val_fraction))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if self.train_limit is not None:
            train_idx = train_idx[: self.train_limit]
        self._train = TensorDataset(x[train_idx], y[train_idx])
        self._val = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None
        return DataLoader(self._val, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A LightningModule around :class:`~dnnshifter_lightning.demo.models.DigitsCNN`.

    SGD with momentum and weight decay (the LTH papers' optimiser), and a step LR schedule whose
    state the IMP callback rewinds every level.

    Example::

        >>> import torch
        >>> model = DigitsClassifier(width=4)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> type(model.configure_optimizers()).__name__
        'SGD'
        >>> conf = DigitsClassifier(width=4, optimizer="adam", lr_step_epochs=2).configure_optimizers()
        >>> type(conf["optimizer"]).__name__, type(conf["lr_scheduler"]["scheduler"]).__name__
        ('Adam', 'StepLR')
    """

    input_spec = DIGITS_INPUT_SPEC

    def __init__(self, width: int = 64, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                 optimizer: str = "sgd", lr_step_epochs: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsCNN(width=width)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.lr_step_epochs:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step_epochs, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        return opt
