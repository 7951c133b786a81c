"""The portfolio build: offline API, the post-fit PortfolioBuilder callback, the CLI functions, the plot."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from dnnshifter_lightning.cli import portfolio_build_command, portfolio_show_command
from dnnshifter_lightning.shrink import build as builder
from dnnshifter_lightning.shrink.build import BuildEvent, build_portfolio
from dnnshifter_lightning.shrink.callback import PortfolioBuilder
from dnnshifter_lightning.demo.digits import DIGITS_INPUT_SPEC, DigitsClassifier, DigitsDataModule, load_digits_tensors
from dnnshifter_lightning.portfolio import VARIANT_SUFFIX, Variant, load_variant, read_manifest, verify_portfolio

SPARSITIES = [0.0, 0.6, 0.85]


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw)


def _prune_global_magnitude_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest weights globally (like one IMP level) plus a few whole filters; return masks."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    with torch.no_grad():
        if sparsity > 0:
            everything = torch.cat([w.abs().flatten() for w in weights.values()])
            threshold = torch.kthvalue(everything, int(sparsity * everything.numel())).values
            for w in weights.values():
                w.mul_(w.abs() > threshold)
            # IMP at high sparsity kills whole filters; make sure some are dead (both BN shift signs).
            conv = model.model.features[3]
            bn = model.model.features[4]
            conv.weight[: int(8 * sparsity)] = 0.0
            bn.bias[0], bn.bias[1] = 0.3, -0.3
    return {f"{n}.weight": (w != 0) for n, w in weights.items()}


@pytest.fixture(scope="module")
def level_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real digits training (1 epoch), then 3 sparsity levels saved as Lightning level checkpoints."""
    L.seed_everything(0, workers=True)
    ckpt_dir = tmp_path_factory.mktemp("imp")
    model = DigitsClassifier(width=16)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, shuffle=False))
    for level, sparsity in enumerate(SPARSITIES):
        masks = _prune_global_magnitude_(model, sparsity)
        path = ckpt_dir / f"level_{level:02d}.ckpt"
        trainer.save_checkpoint(path)
        ckpt = torch.load(path, weights_only=False)
        ckpt["dnnshifter"] = {"level": level, "sparsity": sparsity, "masks": masks, "metrics": {}, "levels": 2,
                              "prune_fraction": 0.5}
        torch.save(ckpt, path)
    return ckpt_dir


@pytest.fixture(scope="module")
def built(level_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dm = DigitsDataModule()
    dm.setup("validate")
    out = tmp_path_factory.mktemp("portfolio")
    manifest = build_portfolio(level_ckpts, DigitsClassifier, out, dm.val_dataloader(), DIGITS_INPUT_SPEC,
                               latency_warmup=1, latency_repeats=3)
    return out, manifest


def test_manifest_is_valid_ordered_and_complete(built: tuple[Path, dict]) -> None:
    out, manifest = built
    assert read_manifest(out) == manifest
    assert verify_portfolio(out) == manifest
    assert manifest["input_spec"] == DIGITS_INPUT_SPEC
    vs = manifest["variants"]
    assert sorted(v["level"] for v in vs) == [0, 1, 2]
    assert {v["level"]: v["sparsity"] for v in vs} == dict(enumerate(SPARSITIES))
    accs = [v["accuracy"] for v in vs]
    assert accs == sorted(accs, reverse=True)
    for v in vs:
        assert 0.0 <= v["accuracy"] <= 1.0
        assert v["accuracy"] == pytest.approx(v["sparse_accuracy"], abs=1e-9)  # no prediction changed
        assert v["max_abs_diff"] < 1e-3
        assert v["params"] <= v["sparse"]["params"] and v["macs"] <= v["sparse"]["macs"]
        assert v["nonzero_params"] <= v["params"]
        assert set(v["latency_ms"]) == {"1", "8"} and all(t > 0 for t in v["latency_ms"].values())
    for v in vs:  # the record is a Variant, written key for key in its field order
        assert Variant.from_dict(v).to_dict() == v and list(Variant.from_dict(v).to_dict()) == list(v)
        assert list(v)[:14] == ["id", "level", "sparsity", "params", "nonzero_params", "file", "bytes_raw",
                                "bytes_compressed", "sha256", "macs", "latency_ms", "accuracy", "sparse_accuracy",
                                "max_abs_diff"]
        assert list(v)[14:] == ["checkpoint", "prune_seconds", "sparse"]
    dead = next(v for v in vs if v["level"] == 2)
    assert dead["params"] < dead["sparse"]["params"]  # dead channels were physically removed
    assert sorted(p.name for p in (out / "variants").iterdir()) == [f"level_0{i}{VARIANT_SUFFIX}" for i in range(3)]
    assert (out / "portfolio.png").stat().st_size > 10_000


def test_variant_predictions_equal_sparse_checkpoint_on_every_digit(built: tuple[Path, dict], level_ckpts: Path) -> None:
    out, manifest = built
    x, _ = load_digits_tensors()
    for v in manifest["variants"]:
        sparse = DigitsClassifier.load_from_checkpoint(level_ckpts / v["checkpoint"], map_location="cpu").eval()
        variant = load_variant(out / v["file"], sha256=v["sha256"])
        with torch.inference_mode():
            ys, yv = sparse(x), variant(x)
        assert torch.equal(ys.argmax(1), yv.argmax(1)), v["id"]
        torch.testing.assert_close(yv, ys, rtol=1e-4, atol=1e-4)


def test_failed_build_leaves_no_manifest(level_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = builder.prune_structurally, []

    def flaky(model, example_inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("surgery failed")
        return real(model, example_inputs)

    monkeypatch.setattr(builder, "prune_structurally", flaky)
    with pytest.raises(RuntimeError, match="surgery failed"):
        build_portfolio(level_ckpts, DigitsClassifier, tmp_path, None, DIGITS_INPUT_SPEC, latency_repeats=1, plot=False)
    assert not (tmp_path / "manifest.json").exists()


def test_build_reports_progress_through_the_callback_and_prints_nothing(level_ckpts: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    events: list[BuildEvent] = []
    paths = sorted(level_ckpts.glob("level_*.ckpt"))[-2:]
    manifest = build_portfolio(paths, DigitsClassifier, tmp_path, None, DIGITS_INPUT_SPEC, latency_repeats=1,
                               plot=False, progress=events.append)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    assert [(e.stage, e.done, e.total, e.checkpoint, e.level) for e in events] == [
        ("start", 0, 2, None, None),
        ("checkpoint", 0, 2, "level_01.ckpt", None), ("variant", 1, 2, "level_01.ckpt", 1),
        ("checkpoint", 1, 2, "level_02.ckpt", None), ("variant", 2, 2, "level_02.ckpt", 2),
        ("done", 2, 2, None, None)]
    reported = {e.variant["id"]: e.variant for e in events if e.variant is not None}
    assert reported == {v["id"]: v for v in manifest["variants"]}


def test_portfolio_builder_at_the_end_of_a_real_fit(tmp_path: Path) -> None:
    from dnnshifter_lightning.train.imp import IterativeMagnitudePruning

    L.seed_everything(0, workers=True)
    imp = IterativeMagnitudePruning(levels=2, prune_fraction=0.5, epochs_per_level=1, rewind_to=0,
                                    checkpoint_dir=tmp_path / "imp")
    pb = PortfolioBuilder(out_dir=tmp_path / "portfolio", latency_warmup=1, latency_repeats=3)
    trainer = _trainer(max_epochs=imp.total_epochs, callbacks=[imp, pb])
    trainer.fit(DigitsClassifier(width=8), datamodule=DigitsDataModule(batch_size=128, train_limit=512))
    manifest = read_manifest(tmp_path / "portfolio")
    assert pb.manifest == manifest
    assert sorted(v["level"] for v in manifest["variants"]) == [0, 1, 2]
    assert [v["sparsity"] for v in sorted(manifest["variants"], key=lambda v: v["level"])] == \
        pytest.approx([0.0, 0.5, 0.75], abs=0.01)
    assert all(v["accuracy"] is not None for v in manifest["variants"])
    assert (tmp_path / "portfolio" / "portfolio.png").exists()
    verify_portfolio(tmp_path / "portfolio")


def test_portfolio_builder_needs_a_checkpoint_dir(tmp_path: Path) -> None:
    trainer = _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                       callbacks=[PortfolioBuilder(out_dir=tmp_path)])
    with pytest.raises(ValueError, match="checkpoint_dir"):
        trainer.fit(DigitsClassifier(width=4), datamodule=DigitsDataModule())


def test_cli_build_with_datamodule_and_show(level_ckpts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = portfolio_build_command(level_ckpts, "dnnshifter_lightning.demo.digits:DigitsClassifier", tmp_path,
                                       "dnnshifter_lightning.demo.digits:DigitsDataModule")
    assert all(v["accuracy"] is not None for v in manifest["variants"])
    built_text = " ".join(capsys.readouterr().out.split())
    assert "building portfolio" in built_text and "3/3" in built_text  # the progress bar, then the table
    assert f"portfolio {tmp_path}" in built_text and all(v["id"] in built_text for v in manifest["variants"])
    shown = portfolio_show_command(tmp_path)
    text = capsys.readouterr().out
    assert shown == manifest
    assert "sha256 ok" in text and all(v["id"] in text for v in manifest["variants"])


def test_cli_build_without_validation_data_records_null_accuracy(level_ckpts: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="accuracies will be null"):
        manifest = portfolio_build_command(level_ckpts, "dnnshifter_lightning.demo.digits:DigitsClassifier", tmp_path)
    assert [v["level"] for v in manifest["variants"]] == [0, 1, 2]  # unmeasured: densest first
    assert all(v["accuracy"] is None and v["sparse_accuracy"] is None for v in manifest["variants"])


def test_cli_rejects_bad_model_spec(level_ckpts: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="package.module:Class"):
        portfolio_build_command(level_ckpts, "DigitsClassifier", tmp_path)


def test_plot_skips_with_a_warning_without_matplotlib(built: tuple[Path, dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from dnnshifter_lightning.shrink.plot import plot_portfolio

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_portfolio(built[1], tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_build_with_a_plain_module_loader(level_ckpts: Path, tmp_path: Path) -> None:
    """Any ``callable(path) -> nn.Module`` works as the loader (here the inner plain nn.Module)."""
    paths = sorted(level_ckpts.glob("level_*.ckpt"))[-1:]
    manifest = build_portfolio(paths, lambda p: DigitsClassifier.load_from_checkpoint(p, map_location="cpu").model,
                               tmp_path, None, DIGITS_INPUT_SPEC, latency_repeats=1, plot=False)
    (v,) = manifest["variants"]
    assert v["id"] == "level_02" and v["accuracy"] is None and v["max_abs_diff"] < 1e-3
    assert not (tmp_path / "portfolio.png").exists()


# ------------------------------------------------- Lightning's conventions, checked before training

class _DictDigits(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class DictBatchDigits(DigitsClassifier):
    """Reads ``{"image": x, "label": y}`` batches, validates on several loaders, has no input_spec."""

    input_spec = None

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch["image"], batch["label"]
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), add_dataloader_idx=True)


def _fit_imp_and_builder(tmp_path: Path, model: L.LightningModule, *extra, levels: int = 1, **fit_kwargs) -> PortfolioBuilder:
    from dnnshifter_lightning.train.imp import IterativeMagnitudePruning

    imp = IterativeMagnitudePruning(levels=levels, epochs_per_level=1, prune_fraction=0.5,
                                    checkpoint_dir=tmp_path / "imp", verbose=False)
    pb = PortfolioBuilder(out_dir=tmp_path / "portfolio", latency_warmup=0, latency_repeats=1, plot=False)
    trainer = _trainer(max_epochs=imp.total_epochs, callbacks=[imp, pb, *extra], limit_train_batches=2,
                       limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, **fit_kwargs)
    return pb


def test_fit_with_dataloaders_dict_batches_and_two_val_loaders(tmp_path: Path) -> None:
    """trainer.fit(model, train_dataloaders=..., val_dataloaders=[a, b]) with dict batches, no input_spec:
    the shape comes from the validation batches and accuracy is measured on the first loader."""
    from torch.utils.data import DataLoader

    from dnnshifter_lightning.shrink.measure import measure_accuracy, unpack_batch

    x, y = load_digits_tensors()
    train = DataLoader(_DictDigits(x[:128], y[:128]), batch_size=64)
    val_a, val_b = (DataLoader(_DictDigits(x[s], y[s]), batch_size=100) for s in (slice(1500, 1700), slice(1700, None)))
    L.seed_everything(0, workers=True)
    with pytest.warns(UserWarning, match="2 validation dataloaders given; accuracy is measured on the first"):
        pb = _fit_imp_and_builder(tmp_path, DictBatchDigits(width=4), train_dataloaders=train,
                                  val_dataloaders=[val_a, val_b])
    manifest = pb.manifest
    assert manifest["input_spec"] == {"shape": [1, 8, 8], "dtype": "float32"}
    for v in manifest["variants"]:
        sparse = DictBatchDigits.load_from_checkpoint(tmp_path / "imp" / v["checkpoint"], map_location="cpu")
        # both accuracies are measured by the build, on the first loader, the same way
        assert v["sparse_accuracy"] == pytest.approx(measure_accuracy(sparse, val_a, 10, unpack_batch), abs=1e-9)
        assert v["accuracy"] == pytest.approx(v["sparse_accuracy"], abs=1e-9)


class NotTraceable(DigitsClassifier):
    """A forward with data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return self.model(x) if bool(x.sum() > -1e9) else -self.model(x)


class NoTrainingAllowed(L.Callback):
    def on_train_batch_start(self, *args, **kwargs):
        raise AssertionError("training started although the portfolio build could only fail")


def test_a_model_that_cannot_be_pruned_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="check before training") as err:
        _fit_imp_and_builder(tmp_path, NotTraceable(width=4), NoTrainingAllowed(),
                             datamodule=DigitsDataModule(train_limit=64))
    assert not list((tmp_path / "imp").glob("level_*.ckpt"))
    assert "trace" in str(err.value).lower() or "symbolic" in str(err.value).lower()


def test_unreadable_dict_batches_are_refused_before_training_and_the_keys_can_be_named(tmp_path: Path,
                                                                                     level_ckpts: Path) -> None:
    from torch.utils.data import DataLoader, default_collate

    x, y = load_digits_tensors()
    odd = DataLoader([{"pixels": a, "digit": b} for a, b in zip(x[:64], y[:64])], batch_size=32,
                     collate_fn=default_collate)
    with pytest.raises(ValueError, match=r"keys \['pixels', 'digit'\] has none of the input keys"):
        _fit_imp_and_builder(tmp_path, DigitsClassifier(width=4), NoTrainingAllowed(),
                             train_dataloaders=DataLoader(list(zip(x[:64], y[:64])), batch_size=32),
                             val_dataloaders=odd)
    from dnnshifter_lightning.shrink.measure import batch_unpacker

    manifest = build_portfolio(sorted(level_ckpts.glob("level_*.ckpt"))[-1:], DigitsClassifier, tmp_path / "p", odd,
                               unpack=batch_unpacker("pixels", "digit"), latency_repeats=1, plot=False)
    assert manifest["variants"][0]["accuracy"] is not None and manifest["input_spec"]["shape"] == [1, 8, 8]


def test_the_shape_from_example_input_array_when_there_is_no_validation_data(tmp_path: Path) -> None:
    from imp_helpers import ShapeFromExampleInput

    class TrainOnly(DigitsDataModule):
        val_dataloader = None  # type: ignore[assignment]
        input_spec = None

    L.seed_everything(0, workers=True)
    with pytest.warns(UserWarning, match="no validation data; accuracies will be null"):
        pb = _fit_imp_and_builder(tmp_path, ShapeFromExampleInput(width=4), levels=0,
                                  datamodule=TrainOnly(train_limit=64))
    assert pb.manifest["input_spec"] == {"shape": [1, 8, 8], "dtype": "float32"}
    assert pb.manifest["variants"][0]["accuracy"] is None


def test_an_inner_torch_compile_submodule_is_unwrapped_for_pruning(tmp_path: Path) -> None:
    class Compiled(DigitsClassifier):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.model = torch.compile(self.model, backend="eager")  # the usual `self.net = torch.compile(net)`

    L.seed_everything(0, workers=True)
    pb = _fit_imp_and_builder(tmp_path, Compiled(width=4), datamodule=DigitsDataModule(train_limit=64))
    assert sorted(v["level"] for v in pb.manifest["variants"]) == [0, 1]
    x, _ = load_digits_tensors()
    for v in pb.manifest["variants"]:
        sparse = Compiled.load_from_checkpoint(tmp_path / "imp" / v["checkpoint"], map_location="cpu").eval()
        with torch.inference_mode():
            torch.testing.assert_close(load_variant(tmp_path / "portfolio" / v["file"])(x[:64]), sparse(x[:64]),
                                       rtol=1e-4, atol=1e-4)


@pytest.fixture()
def one_level(level_ckpts: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "one"
    d.mkdir()
    shutil.copy(level_ckpts / "level_02.ckpt", d)
    return d


def test_cli_without_any_shape_names_the_three_ways(one_level: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="accuracies will be null"), \
            pytest.raises(ValueError, match=r"--input-shape C,H,W.*example_input_array.*--datamodule"):
        portfolio_build_command(one_level, "imp_helpers:NoInputHints", tmp_path / "p")


def test_cli_input_shape_and_the_loaded_instance_attributes(one_level: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="accuracies will be null"):
        by_flag = portfolio_build_command(one_level, "imp_helpers:NoInputHints", tmp_path / "a", input_shape="1,8,8")
    with pytest.warns(UserWarning, match="accuracies will be null"):
        by_attr = portfolio_build_command(one_level, "imp_helpers:ShapeFromExampleInput", tmp_path / "b")
    assert by_flag["input_spec"] == by_attr["input_spec"] == {"shape": [1, 8, 8], "dtype": "float32"}
    assert by_flag["variants"][0]["params"] == by_attr["variants"][0]["params"]
