"""The portfolio build: offline API, the post-fit PortfolioBuilder callback, the CLI functions, the plot."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from dnnshifter_lightning import builder
from dnnshifter_lightning.builder import PortfolioBuilder, build_portfolio, portfolio_build_command, portfolio_show_command
from dnnshifter_lightning.digits import DIGITS_INPUT_SPEC, DigitsClassifier, DigitsDataModule, load_digits_tensors
from dnnshifter_lightning.portfolio import VARIANT_SUFFIX, load_variant, read_manifest, verify_portfolio

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
    real, calls = builder._prune, []

    def flaky(model, example_inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("surgery failed")
        return real(model, example_inputs)

    monkeypatch.setattr(builder, "_prune", flaky)
    with pytest.raises(RuntimeError, match="surgery failed"):
        build_portfolio(level_ckpts, DigitsClassifier, tmp_path, None, DIGITS_INPUT_SPEC, latency_repeats=1, plot=False)
    assert not (tmp_path / "manifest.json").exists()


def test_portfolio_builder_at_the_end_of_a_real_fit(tmp_path: Path) -> None:
    from dnnshifter_lightning.imp import IterativeMagnitudePruning

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
    manifest = portfolio_build_command(level_ckpts, "dnnshifter_lightning.digits:DigitsClassifier", tmp_path,
                                       "dnnshifter_lightning.digits:DigitsDataModule")
    assert all(v["accuracy"] is not None for v in manifest["variants"])
    capsys.readouterr()
    shown = portfolio_show_command(tmp_path)
    text = capsys.readouterr().out
    assert shown == manifest
    assert "sha256 ok" in text and all(v["id"] in text for v in manifest["variants"])


def test_cli_build_without_validation_data_records_null_accuracy(level_ckpts: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="accuracies will be null"):
        manifest = portfolio_build_command(level_ckpts, "dnnshifter_lightning.digits:DigitsClassifier", tmp_path)
    assert [v["level"] for v in manifest["variants"]] == [0, 1, 2]  # unmeasured: densest first
    assert all(v["accuracy"] is None and v["sparse_accuracy"] is None for v in manifest["variants"])


def test_cli_rejects_bad_model_spec(level_ckpts: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="package.module:Class"):
        portfolio_build_command(level_ckpts, "DigitsClassifier", tmp_path)


def test_plot_skips_with_a_warning_without_matplotlib(built: tuple[Path, dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from dnnshifter_lightning.plot import plot_portfolio

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
