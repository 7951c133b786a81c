"""ResNet-50 on ImageNet or Tiny-ImageNet (torchvision ``ImageFolder`` layout) as a LightningCLI script.

``data_dir`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``. Tiny-ImageNet's original
``val/images`` + ``val/val_annotations.txt`` layout is recognised and regrouped by class (symlinks in
``data_dir/val_by_class``) the first time. Train on one GPU, several, or several nodes::

    python examples/imagenet.py fit --config examples/configs/imagenet_resnet50.yaml \\
        --data.data_dir /datasets/imagenet --trainer.devices 8

The config selects DDP with synchronised BatchNorm; Lightning adds the ``DistributedSampler``
itself, and nothing here names a device. ``--data.fake true`` swaps in ``FakeData`` of the same
shape (``image_size`` and ``num_classes``) for a smoke run without the data set::

    python examples/imagenet.py fit --data.fake true --data.image_size 64 --data.num_classes 10 \\
        --data.limit_train 32 --data.limit_val 16 --data.batch_size 8 --data.num_workers 0 \\
        --trainer.max_epochs 2 --trainer.callbacks+=IterativeMagnitudePruning \\
        --trainer.callbacks.levels 1 --trainer.callbacks.epochs_per_level 1 \\
        --trainer.callbacks.checkpoint_dir runs/imagenet_smoke/imp \\
        --trainer.callbacks+=PortfolioBuilder --trainer.callbacks.out_dir runs/imagenet_smoke/portfolio

``data.num_classes`` is linked to ``model.num_classes``; give it once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, models, transforms

# Imported so that jsonargparse also resolves the short callback names on the command line.
from dnnshifter_lightning.shrink.callback import PortfolioBuilder  # noqa: F401
from dnnshifter_lightning.train.imp import IterativeMagnitudePruning  # noqa: F401

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class WarmupMultiStep:
    """LR factor per epoch: linear warm-up over ``warmup`` epochs, then ``gamma`` at each milestone.

    A class rather than a lambda so that ``LambdaLR.state_dict()`` (saved in checkpoints and in
    IMP's rewind point) carries it.
    """

    def __init__(self, warmup: int, milestones: list[int], gamma: float) -> None:
        self.warmup, self.milestones, self.gamma = warmup, sorted(milestones), gamma

    def __call__(self, epoch: int) -> float:
        factor = self.gamma ** sum(epoch >= m for m in self.milestones)
        if epoch < self.warmup:
            factor *= (epoch + 1) / (self.warmup + 1)
        return factor


@torch.no_grad()
def openlth_init_(model: nn.Module) -> None:
    """OpenLTH's ``kaiming_normal`` weights and ``uniform`` BN scales."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.0, 1.0)
            m.bias.zero_()


class ImageNetClassifier(L.LightningModule):
    """torchvision ResNet-50 (``weights=None``: trained from scratch) with SGD, warm-up and step decay.

    The defaults are OpenLTH's ``imagenet_resnet_50`` (lr 0.4 for a global batch of 1024, 5 warm-up
    epochs, decay by 10x at epochs 30, 60 and 80, weight decay 1e-4). Scale ``lr`` linearly with the
    global batch (devices x nodes x batch_size): 256 -> 0.1.

    Example::

        >>> model = ImageNetClassifier(num_classes=10)
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50",
                 num_classes: int = 1000, lr: float = 0.4, momentum: float = 0.9, weight_decay: float = 1e-4,
                 warmup_epochs: int = 5, milestones: list[int] = [30, 60, 80],  # noqa: B006
                 gamma: float = 0.1, init: Literal["torchvision", "openlth"] = "torchvision") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = getattr(models, arch)(weights=None, num_classes=num_classes)
        if init == "openlth":
            openlth_init_(self.model)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_top5 = torchmetrics.classification.MulticlassAccuracy(
            num_classes=num_classes, top_k=min(5, num_classes), average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_top5(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_top5", self.val_top5)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupMultiStep(hp.warmup_epochs, list(hp.milestones), hp.gamma))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def regroup_tiny_imagenet_val(data_dir: Path) -> Path | None:
    """Tiny-ImageNet ships ``val/images/*.JPEG`` plus ``val/val_annotations.txt``, not one folder per
    class. Build ``data_dir/val_by_class/<wnid>/<file>`` (symlinks) once, atomically; return it, or
    ``None`` when ``data_dir/val`` is not in that layout."""
    val = data_dir / "val"
    notes = val / "val_annotations.txt"
    target = data_dir / "val_by_class"
    if target.is_dir():
        return target
    if not (notes.is_file() and (val / "images").is_dir()):
        return None
    tmp = Path(tempfile.mkdtemp(prefix=".val_by_class.", dir=data_dir))
    for line in notes.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        image, wnid = fields[0], fields[1]
        (tmp / wnid).mkdir(exist_ok=True)
        os.symlink((val / "images" / image).resolve(), tmp / wnid / image)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        if not target.is_dir():
            raise
    return target


class ImageFolderDataModule(L.LightningDataModule):
    """ImageNet / Tiny-ImageNet from ``data_dir/train`` and ``data_dir/val`` (``ImageFolder``).

    Train: ``RandomResizedCrop(image_size)`` and a horizontal flip. Validation:
    ``Resize(val_resize)`` then ``CenterCrop(image_size)``, ``val_resize`` defaulting to
    ``image_size / 0.875`` (256 for 224). ``image_size: 64`` suits Tiny-ImageNet.

    Args:
        fake: use ``FakeData`` (``fake_train_size`` / ``fake_val_size`` images of 3 x image_size x
            image_size, ``num_classes`` classes, deterministic) through the same transforms.
        limit_train / limit_val: keep only the first N samples.

    ``input_spec`` (read by PortfolioBuilder) is the served input: 3 x image_size x image_size,
    ImageNet normalisation, the class folder names.

    Example::

        >>> dm = ImageFolderDataModule(fake=True, image_size=32, num_classes=10, limit_train=4,
        ...                            limit_val=4, batch_size=2, num_workers=0)
        >>> dm.setup("fit")
        >>> next(iter(dm.val_dataloader()))[0].shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, data_dir: str = "data/imagenet", fake: bool = False, image_size: int = 224,
                 val_resize: int | None = None, num_classes: int = 1000, batch_size: int = 128,
                 num_workers: int = 8, limit_train: int | None = None, limit_val: int | None = None,
                 fake_train_size: int = 10_000, fake_val_size: int = 1_000) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.fake = fake
        self.image_size = image_size
        self.val_resize = val_resize or int(round(image_size / 0.875))
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit_train = limit_train
        self.limit_val = limit_val
        self.fake_train_size = fake_train_size
        self.fake_val_size = fake_val_size
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            normalize])
        self.val_transform = transforms.Compose([
            transforms.Resize(self.val_resize), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize])
        self.class_names = [str(i) for i in range(num_classes)]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def input_spec(self) -> dict[str, Any]:
        return {"shape": [3, self.image_size, self.image_size], "dtype": "float32", "color": "RGB",
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "class_names": list(self.class_names)}

    def prepare_data(self) -> None:
        if not self.fake:
            regroup_tiny_imagenet_val(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.fake:
            shape = (3, self.image_size, self.image_size)
            train: Dataset = datasets.FakeData(self.fake_train_size, shape, self.num_classes, self.train_transform)
            val: Dataset = datasets.FakeData(self.fake_val_size, shape, self.num_classes, self.val_transform,
                                             random_offset=self.fake_train_size)
        else:
            train_dir = self.data_dir / "train"
            val_dir = regroup_tiny_imagenet_val(self.data_dir) or self.data_dir / "val"
            for d in (train_dir, val_dir):
                if not d.is_dir():
                    raise FileNotFoundError(f"{d} is missing: --data.data_dir must hold train/<class>/ and "
                                            f"val/<class>/ (or use --data.fake true for a smoke run)")
            train_folder = datasets.ImageFolder(str(train_dir), transform=self.train_transform)
            val_folder = datasets.ImageFolder(str(val_dir), transform=self.val_transform)
            # Labels are folder indices: a class missing from val would shift every later label.
            if val_folder.classes != train_folder.classes:
                missing = sorted(set(train_folder.classes) ^ set(val_folder.classes))[:5]
                raise ValueError(f"{train_dir} and {val_dir} hold different classes (e.g. {missing})")
            if len(train_folder.classes) != self.num_classes:
                raise ValueError(f"{train_dir} holds {len(train_folder.classes)} classes but num_classes="
                                 f"{self.num_classes}: pass --data.num_classes {len(train_folder.classes)}")
            self.class_names = list(train_folder.classes)
            train, val = train_folder, val_folder
        self.train_set = _limit(train, self.limit_train)
        self.val_set = _limit(val, self.limit_val)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          # a last batch of 1 breaks BatchNorm after ResNet's 1x1 final maps at small sizes
                          drop_last=len(self.train_set) >= self.batch_size)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())


def _limit(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    return Subset(dataset, range(n))


class ImageNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI entry point; ``main([...], run=False)`` only builds the objects."""
    return ImageNetCLI(ImageNetClassifier, ImageFolderDataModule, args=args, run=run,
                       save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
