"""The paper's workloads (examples/cifar10.py, examples/imagenet.py) run as a user runs them.

The data sets cannot be downloaded here, so the end-to-end runs use ``--data.fake true``
(torchvision FakeData of the same shape) on a small slice: fit with IMP and PortfolioBuilder for 2
levels of 1 epoch, then check the level checkpoints, the portfolio and the .mar archive.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = EXAMPLES / "configs"


def _load_example(name: str) -> ModuleType:
    module_name = f"_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _run_example(script: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when sys.argv carries pytest's own arguments
    monkeypatch.setattr(sys, "argv", ["example.py"])


def _callbacks(cli, cls_name: str):
    found = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == cls_name]
    assert len(found) == 1, f"expected one {cls_name} in {[type(c).__name__ for c in cli.trainer.callbacks]}"
    return found[0]


_QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------------------ configs

def test_paper_config_parses_to_the_papers_setup(tmp_path: Path) -> None:
    cifar10 = _load_example("cifar10")
    cli = cifar10.main(["--config", str(CONFIGS / "cifar10_vgg16.yaml"),
                        "--trainer.default_root_dir", str(tmp_path)], run=False)
    imp = _callbacks(cli, "IterativeMagnitudePruning")
    assert (imp.levels, imp.prune_fraction, imp.epochs_per_level) == (25, 0.2, 160)
    assert (imp.rewind_amount, imp.rewind_unit) == (2000, "it")
    assert imp.exclude == ("model.classifier",)  # OpenLTH: pruning_layers_to_ignore='fc.weight'
    assert cli.trainer.max_epochs == 4160 == imp.total_epochs
    _callbacks(cli, "PortfolioBuilder")
    assert cli.model.hparams.arch == "vgg16" and cli.model.hparams.width_mult == 1.0
    assert sum(p.numel() for p in cli.model.parameters()) > 14_000_000  # full-width VGG-16
    assert cli.datamodule.batch_size == 128 and cli.datamodule.download and not cli.datamodule.fake

    opt_cfg = cli.model.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(sched.milestones) == {80: 1, 120: 1} and sched.gamma == 0.1
    assert opt_cfg["lr_scheduler"]["interval"] == "epoch"


def test_command_line_overrides_the_config_imp_settings(tmp_path: Path) -> None:
    """IMP is the last callback in the configs, so --trainer.callbacks.NAME reaches it."""
    cifar10 = _load_example("cifar10")
    cli = cifar10.main(["--config", str(CONFIGS / "cifar10_vgg16.yaml"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.callbacks.levels", "3", "--trainer.callbacks.rewind_to", "1ep",
                        "--trainer.max_epochs", "640", "--model.width_mult", "0.25"], run=False)
    imp = _callbacks(cli, "IterativeMagnitudePruning")
    assert (imp.levels, imp.epochs_per_level, imp.rewind_amount, imp.rewind_unit) == (3, 160, 1, "ep")
    assert cli.trainer.max_epochs == imp.total_epochs == 640
    _callbacks(cli, "PortfolioBuilder")


@pytest.mark.parametrize("script,config,arch,levels,epochs", [
    ("cifar10", "cifar10_resnet20.yaml", "resnet20", 25, 160),
    ("imagenet", "imagenet_resnet50.yaml", "resnet50", 5, 90),
    ("imagenet", "tinyimagenet_resnet50.yaml", "resnet50", 10, 60),
])
def test_other_configs_parse_and_match_imp_budget(tmp_path: Path, script: str, config: str, arch: str,
                                                  levels: int, epochs: int) -> None:
    module = _load_example(script)
    # The configs name GPUs and DDP; parse them on this CPU machine with the accelerator overridden.
    cli = module.main(["--config", str(CONFIGS / config), "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"],
                      run=False)
    imp = _callbacks(cli, "IterativeMagnitudePruning")
    assert (imp.levels, imp.epochs_per_level) == (levels, epochs)
    assert cli.trainer.max_epochs == imp.total_epochs == (levels + 1) * epochs
    assert cli.model.hparams.arch == arch
    if script == "imagenet":
        # data.num_classes is linked into the model: the classifier has that many outputs
        assert cli.model.model.fc.out_features == cli.datamodule.num_classes == cli.model.hparams.num_classes


def test_imagenet_config_selects_ddp_with_sync_batchnorm() -> None:
    import yaml

    trainer = yaml.safe_load((CONFIGS / "imagenet_resnet50.yaml").read_text())["trainer"]
    assert trainer["strategy"] == "ddp" and trainer["sync_batchnorm"] is True and trainer["devices"] == 8


def test_wrong_max_epochs_is_refused_with_the_right_value(tmp_path: Path) -> None:
    cifar10 = _load_example("cifar10")
    cli = cifar10.main(["--data.fake", "true", "--data.limit_train", "8", "--data.limit_val", "8",
                        "--data.num_workers", "0", "--model.width_mult", "0.125", "--trainer.max_epochs", "2",
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *_QUIET,
                        "--trainer.callbacks+=IterativeMagnitudePruning", "--trainer.callbacks.levels", "2",
                        "--trainer.callbacks.epochs_per_level", "1"], run=False)
    with pytest.raises(ValueError, match="max_epochs=3"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


# --------------------------------------------------------------------------------------------- data

def test_fake_cifar_has_cifar_shape_and_is_deterministic() -> None:
    cifar10 = _load_example("cifar10")
    batches = []
    for _ in range(2):
        dm = cifar10.CIFAR10DataModule(fake=True, limit_train=16, limit_val=12, batch_size=8, num_workers=0)
        dm.setup("fit")
        assert len(dm.train_set) == 16 and len(dm.val_set) == 12
        batches.append(next(iter(dm.val_dataloader())))
    (x, y), (x2, y2) = batches
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    assert torch.equal(x, x2) and torch.equal(y, y2)
    train_x, _ = next(iter(dm.train_dataloader()))
    assert train_x.shape == (8, 3, 32, 32)
    assert dm.input_spec["shape"] == [3, 32, 32] and len(dm.input_spec["class_names"]) == 10


def test_missing_real_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    cifar10 = _load_example("cifar10")
    dm = cifar10.CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), download=False, num_workers=0)
    with pytest.raises(RuntimeError, match=r"--data.fake true"):
        dm.setup("fit")


def _write_png(path: Path, color: tuple[int, int, int], size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_tiny_imagenet_val_layout_is_regrouped_by_class(tmp_path: Path) -> None:
    imagenet = _load_example("imagenet")
    root = tmp_path / "tiny"
    wnids = ["n01443537", "n01629819", "n01641577"]
    for i, wnid in enumerate(wnids):
        for j in range(2):
            _write_png(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", (80 * i, 0, 0))
    notes = []
    for k, wnid in enumerate([wnids[2], wnids[0], wnids[1], wnids[2]]):
        _write_png(root / "val" / "images" / f"val_{k}.JPEG", (0, 80 * k, 0))
        notes.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t16\t16")
    (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")

    dm = imagenet.ImageFolderDataModule(data_dir=str(root), image_size=8, num_classes=3, batch_size=4,
                                        num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == wnids and dm.input_spec["class_names"] == wnids
    assert dm.input_spec["shape"] == [3, 8, 8]
    labels = sorted(label for _, label in dm.val_set.samples)
    assert labels == [0, 1, 2, 2]  # val_0 and val_3 are wnids[2]
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 8, 8)

    dm_wrong = imagenet.ImageFolderDataModule(data_dir=str(root), image_size=8, num_classes=200, num_workers=0)
    with pytest.raises(ValueError, match="--data.num_classes 3"):
        dm_wrong.setup("fit")


def test_imagenet_val_missing_a_class_is_refused(tmp_path: Path) -> None:
    imagenet = _load_example("imagenet")
    for split, classes in (("train", ["a", "b", "c"]), ("val", ["a", "c"])):
        for c in classes:
            _write_png(tmp_path / split / c / "0.png", (10, 20, 30))
    dm = imagenet.ImageFolderDataModule(data_dir=str(tmp_path), image_size=8, num_classes=3, num_workers=0)
    with pytest.raises(ValueError, match="different classes"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------- end to end

def _check_level_checkpoints(imp_dir: Path) -> None:
    ckpts = sorted(imp_dir.glob("level_*.ckpt"))
    assert [p.name for p in ckpts] == ["level_00.ckpt", "level_01.ckpt", "level_02.ckpt"]
    sparsities = [torch.load(p, map_location="cpu", weights_only=False)["dnnshifter"]["sparsity"] for p in ckpts]
    assert sparsities == pytest.approx([0.0, 0.2, 0.36], abs=1e-3)


@pytest.mark.slow
def test_cifar10_fake_fit_builds_portfolio_and_archive(tmp_path: Path) -> None:
    """VGG-16 (width 1/8) on FakeData, callbacks given on the command line as a user would."""
    run = tmp_path / "run"
    _run_example("cifar10.py", [
        "fit", "--data.fake", "true", "--data.limit_train", "64", "--data.limit_val", "32",
        "--data.batch_size", "32", "--data.num_workers", "0", "--model.width_mult", "0.125",
        "--seed_everything", "0", "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(run), *_QUIET,
        "--trainer.callbacks+=dnnshifter_lightning.IterativeMagnitudePruning",
        "--trainer.callbacks.levels", "2", "--trainer.callbacks.epochs_per_level", "1",
        "--trainer.callbacks.rewind_to", "1it", "--trainer.callbacks.checkpoint_dir", str(run / "imp"),
        "--trainer.callbacks+=dnnshifter_lightning.PortfolioBuilder",
        "--trainer.callbacks.out_dir", str(run / "portfolio"), "--trainer.callbacks.latency_repeats", "3",
    ], cwd=tmp_path)
    _check_level_checkpoints(run / "imp")

    from dnnshifter_lightning.portfolio import load_variant, verify_portfolio

    manifest = verify_portfolio(run / "portfolio")  # sha256 of every file
    cifar10 = _load_example("cifar10")
    assert manifest["input_spec"] == {**cifar10.CIFAR10_INPUT_SPEC}
    assert sorted(v["id"] for v in manifest["variants"]) == ["level_00", "level_01", "level_02"]

    # Each variant computes its sparse checkpoint's function, loaded strictly into the example's class.
    dm = cifar10.CIFAR10DataModule(fake=True, limit_val=32, num_workers=0)
    dm.setup("validate")
    x, _ = next(iter(dm.val_dataloader()))
    for v in manifest["variants"]:
        sparse = cifar10.CIFAR10Classifier.load_from_checkpoint(run / "imp" / v["checkpoint"], map_location="cpu",
                                                               strict=True).eval()
        variant = load_variant(run / "portfolio" / v["file"], sha256=v["sha256"])
        assert v["params"] <= sum(p.numel() for p in sparse.parameters())
        with torch.inference_mode():
            expected, got = sparse(x), variant(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), v["id"]

    from dnnshifter_lightning.cli import archive_command

    mar = archive_command(run / "portfolio", "cifar10_vgg16", tmp_path / "store")
    assert mar == tmp_path / "store" / "cifar10_vgg16.mar" and mar.is_file()
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        assert "MAR-INF/MANIFEST.json" in names
        assert json.loads(zf.read("portfolio/manifest.json")) == manifest
        assert {f"portfolio/{v['file']}" for v in manifest["variants"]} <= names


@pytest.mark.slow
def test_imagenet_resnet50_fake_fit_builds_portfolio(tmp_path: Path) -> None:
    """ResNet-50 on 32x32 FakeData with 10 classes, callbacks given in a YAML config.

    One optimizer step per epoch: a ResNet-50 step costs seconds on a busy 2-core CPU.
    """
    import yaml

    run = tmp_path / "run"
    config = {"trainer": {"max_epochs": 3, "default_root_dir": str(run), "logger": False,
                          "enable_checkpointing": False, "num_sanity_val_steps": 0, "callbacks": [
                              {"class_path": "dnnshifter_lightning.IterativeMagnitudePruning",
                               "init_args": {"levels": 2, "epochs_per_level": 1, "rewind_to": "1ep",
                                             "checkpoint_dir": str(run / "imp")}},
                              {"class_path": "dnnshifter_lightning.PortfolioBuilder",
                               "init_args": {"out_dir": str(run / "portfolio"), "latency_warmup": 1,
                                             "latency_repeats": 2, "plot": False}}]},
              "model": {"lr": 0.01, "warmup_epochs": 1},
              "data": {"fake": True, "image_size": 32, "num_classes": 10, "limit_train": 8, "limit_val": 8,
                       "batch_size": 8, "num_workers": 0}}
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(config))
    _run_example("imagenet.py", ["fit", "--config", str(tmp_path / "smoke.yaml"), *_QUIET], cwd=tmp_path)
    _check_level_checkpoints(run / "imp")

    from dnnshifter_lightning.portfolio import verify_portfolio

    manifest = verify_portfolio(run / "portfolio")
    spec = manifest["input_spec"]
    assert spec["shape"] == [3, 32, 32] and spec["class_names"] == [str(i) for i in range(10)]
    assert len(manifest["variants"]) == 3
    for v in manifest["variants"]:
        assert v["max_abs_diff"] is not None and v["accuracy"] is not None
