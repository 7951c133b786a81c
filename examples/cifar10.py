"""CIFAR-10 with VGG-16 or ResNet-20/56: the paper's workload as a LightningCLI script.

Train, prune (IMP with rewinding) and build the portfolio from one config file::

    python examples/cifar10.py fit --config examples/configs/cifar10_vgg16.yaml

The data is downloaded into ``--data.data_dir`` (``download: true``). On a machine without the
data set, ``--data.fake true`` swaps in torchvision's ``FakeData`` of the same shape (3x32x32, 10
classes), which runs the whole path (training, IMP, portfolio) on noise. Callbacks can be given in
YAML (see ``examples/configs/``) or on the command line::

    python examples/cifar10.py fit --data.fake true --data.limit_train 256 --data.limit_val 128 \\
        --model.width_mult 0.125 --trainer.max_epochs 3 \\
        --trainer.callbacks+=dnnshifter_lightning.IterativeMagnitudePruning \\
        --trainer.callbacks.levels 2 --trainer.callbacks.epochs_per_level 1 \\
        --trainer.callbacks.checkpoint_dir runs/cifar10_smoke/imp \\
        --trainer.callbacks+=dnnshifter_lightning.PortfolioBuilder \\
        --trainer.callbacks.out_dir runs/cifar10_smoke/portfolio

``examples/README.md`` has every command; ``python examples/cifar10.py fit --help`` lists every option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

# Imported so that jsonargparse also resolves the short names
# (`--trainer.callbacks+=IterativeMagnitudePruning`), not only the full class paths.
from dnnshifter_lightning.shrink.callback import PortfolioBuilder  # noqa: F401
from dnnshifter_lightning.train.imp import IterativeMagnitudePruning  # noqa: F401
from dnnshifter_lightning.demo.models import cifar_resnet, cifar_vgg16

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_INPUT_SPEC: dict[str, Any] = {
    "shape": [3, 32, 32],
    "dtype": "float32",
    "color": "RGB",
    "mean": CIFAR10_MEAN,
    "std": CIFAR10_STD,
    "class_names": CIFAR10_CLASSES,
}

Arch = Literal["vgg16", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def build_model(arch: str, width_mult: float = 1.0, num_classes: int = 10) -> nn.Module:
    """``"vgg16"`` -> CIFAR VGG-16 (BN); ``"resnetN"`` -> CIFAR ResNet-N (N = 6n+2)."""
    if arch == "vgg16":
        return cifar_vgg16(num_classes=num_classes, width_mult=width_mult)
    if arch.startswith("resnet") and arch[len("resnet"):].isdigit():
        return cifar_resnet(int(arch[len("resnet"):]), num_classes=num_classes, width_mult=width_mult)
    raise ValueError(f"unknown arch {arch!r}: use vgg16 or resnet20/32/44/56/110")


@torch.no_grad()
def openlth_init_(model: nn.Module) -> None:
    """OpenLTH's ``kaiming_normal`` weights and ``uniform`` BN scales (its CIFAR defaults)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.0, 1.0)
            m.bias.zero_()


class CIFAR10Classifier(L.LightningModule):
    """Image classifier over ``dnnshifter_lightning.demo.models``' CIFAR VGG-16 / ResNets.

    SGD (lr 0.1, momentum 0.9, weight decay 1e-4) with a MultiStepLR dropping the rate by ``gamma``
    at ``milestones`` (epochs). Under IMP the scheduler is rewound with the weights at every level,
    so the milestones count epochs from the rewind point within each level (see examples/README.md).

    Example::

        >>> model = CIFAR10Classifier(arch="resnet20", width_mult=0.25)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    #: Read by PortfolioBuilder into the manifest, and by the TorchServe handler to decode images.
    input_spec = CIFAR10_INPUT_SPEC

    def __init__(self, arch: Arch = "vgg16", width_mult: float = 1.0, num_classes: int = 10, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4, milestones: list[int] = [80, 120],  # noqa: B006
                 gamma: float = 0.1, init: Literal["openlth", "pytorch"] = "openlth") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, width_mult, num_classes)
        if init == "openlth":
            openlth_init_(self.model)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class CIFAR10DataModule(L.LightningDataModule):
    """torchvision's CIFAR10 with the standard augmentation (random crop 32 with padding 4, flip).

    Args:
        data_dir: where CIFAR-10 lives or is downloaded to.
        download: download it when missing (``prepare_data`` runs on one process per node).
        fake: use ``torchvision.datasets.FakeData`` of the same shape instead (deterministic noise:
            each image is seeded by its index), through the same transforms and loaders.
        limit_train / limit_val: keep only the first N samples (smoke runs, tests).
        fake_train_size / fake_val_size: FakeData sizes (default: CIFAR-10's 50,000 / 10,000).

    Example::

        >>> dm = CIFAR10DataModule(fake=True, limit_train=8, limit_val=8, batch_size=4, num_workers=0)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([4, 3, 32, 32])
    """

    input_spec = CIFAR10_INPUT_SPEC

    def __init__(self, data_dir: str = "data/cifar10", download: bool = True, fake: bool = False,
                 batch_size: int = 128, num_workers: int = 4, limit_train: int | None = None,
                 limit_val: int | None = None, fake_train_size: int = 50_000, fake_val_size: int = 10_000) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.download = download
        self.fake = fake
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit_train = limit_train
        self.limit_val = limit_val
        self.fake_train_size = fake_train_size
        self.fake_val_size = fake_val_size
        normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.train_transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
        self.val_transform = transforms.Compose([transforms.ToTensor(), normalize])
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        if not self.fake and self.download:
            datasets.CIFAR10(str(self.data_dir), train=True, download=True)
            datasets.CIFAR10(str(self.data_dir), train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.fake:
            train: Dataset = datasets.FakeData(self.fake_train_size, (3, 32, 32), 10, self.train_transform)
            # a separate seed range, so no validation image repeats a training image
            val: Dataset = datasets.FakeData(self.fake_val_size, (3, 32, 32), 10, self.val_transform,
                                             random_offset=self.fake_train_size)
        else:
            try:
                train = datasets.CIFAR10(str(self.data_dir), train=True, transform=self.train_transform)
                val = datasets.CIFAR10(str(self.data_dir), train=False, transform=self.val_transform)
            except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
                raise RuntimeError(f"CIFAR-10 not found in {self.data_dir}: pass --data.download true, point "
                                   f"--data.data_dir at it, or use --data.fake true for a smoke run") from exc
        self.train_set = _limit(train, self.limit_train)
        self.val_set = _limit(val, self.limit_val)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


def _limit(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    return Subset(dataset, range(n))


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI entry point; ``main(["fit", "--config", ...], run=False)`` only builds the objects."""
    return LightningCLI(CIFAR10Classifier, CIFAR10DataModule, args=args, run=run,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
