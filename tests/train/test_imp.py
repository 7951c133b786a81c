"""IterativeMagnitudePruning on real digits: checkpoints, sparsity, masks, rewinding, resets, logging."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from dnnshifter_lightning import IterativeMagnitudePruning
from dnnshifter_lightning.demo.digits import DigitsClassifier
from dnnshifter_lightning.train.imp import CHECKPOINT_KEY, parse_rewind_point
from imp_helpers import level_meta, load_level, make_trainer, new_model, small_datamodule

LEVELS, EPOCHS, REWIND_STEP = 3, 2, 5


class Probe(Callback):
    """Records what the tests check; runs after the IMP callback in every hook."""

    def __init__(self, imp: IterativeMagnitudePruning) -> None:
        self.imp = imp
        self.rewind_point: dict | None = None
        self.level_starts: dict[int, dict] = {}
        self.violations = 0
        self.state_violations = 0
        self.steps_checked = 0

    def _snapshot(self, trainer, pl_module) -> dict:
        opt = trainer.optimizers[0]
        return {
            "model": copy.deepcopy(pl_module.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
            if trainer.lr_scheduler_configs else None,
            "lr": opt.param_groups[0]["lr"],
            "global_step": trainer.global_step,
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == REWIND_STEP and self.rewind_point is None:
            self.rewind_point = self._snapshot(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch % EPOCHS == 0 and trainer.current_epoch > 0:
            self.level_starts[self.imp.level] = self._snapshot(trainer, pl_module)
            self.level_starts[self.imp.level]["masks"] = {k: v.clone() for k, v in self.imp.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        opt_state = trainer.optimizers[0].state
        for name, mask in self.imp.masks.items():
            self.violations += int((params[name].detach()[~mask] != 0).sum())
            for value in opt_state.get(params[name], {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    self.state_violations += int((value[~mask] != 0).sum())
        self.steps_checked += 1


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    L.seed_everything(0)
    imp = IterativeMagnitudePruning(levels=LEVELS, epochs_per_level=EPOCHS, prune_fraction=0.2,
                                    rewind_to=f"{REWIND_STEP}it", checkpoint_dir=root / "ckpts", verbose=False)
    probe = Probe(imp)
    logger = CSVLogger(str(root), name="logs")
    model = new_model(lr_step_epochs=1, weight_decay=1e-3)
    trainer = make_trainer(imp, root, extra_callbacks=[probe], logger=logger)
    trainer.fit(model, datamodule=small_datamodule())
    return imp, probe, root, trainer


def test_checkpoint_names_and_count(imp_run):
    imp, _, root, _ = imp_run
    names = sorted(p.name for p in (root / "ckpts").iterdir())
    assert names == [f"level_{i:02d}.ckpt" for i in range(LEVELS + 1)]  # and no temp files left behind


def test_sparsity_per_level_follows_the_schedule(imp_run):
    imp, _, root, _ = imp_run
    for level in range(LEVELS + 1):
        meta = level_meta(root / "ckpts" / f"level_{level:02d}.ckpt")
        assert meta["level"] == level
        assert meta["sparsity"] == pytest.approx(1 - 0.8**level, abs=1e-4)
        surviving = sum(int(m.sum()) for m in meta["masks"].values())
        assert surviving == meta["surviving"]
        # the stored weights have exactly that many zeros at the masked positions (and no more forced)
        state = load_level(root / "ckpts" / f"level_{level:02d}.ckpt")["state_dict"]
        for name, mask in meta["masks"].items():
            assert torch.all(state[name][~mask] == 0.0), name


def test_masks_are_nested(imp_run):
    _, _, root, _ = imp_run
    metas = [level_meta(root / "ckpts" / f"level_{lv:02d}.ckpt") for lv in range(LEVELS + 1)]
    for before, after in zip(metas, metas[1:]):
        for name in before["masks"]:
            pruned_before = ~before["masks"][name]
            pruned_after = ~after["masks"][name]
            assert torch.all(pruned_after[pruned_before]), f"{name}: a pruned weight came back"
            assert int(pruned_after.sum()) > int(pruned_before.sum()) or pruned_before.all()


def test_pruned_weights_stay_exactly_zero_through_sgd_momentum_and_weight_decay(imp_run):
    _, probe, _, _ = imp_run
    assert probe.steps_checked > 20
    assert probe.violations == 0
    # gradients of pruned entries are masked, so their momentum never builds up either
    assert probe.state_violations == 0


def test_rewind_restores_rewind_point_weights_and_buffers(imp_run):
    imp, probe, _, _ = imp_run
    assert probe.rewind_point is not None and probe.rewind_point["global_step"] == REWIND_STEP
    ref = probe.rewind_point["model"]
    assert sorted(probe.level_starts) == list(range(1, LEVELS + 1))
    for level, snap in probe.level_starts.items():
        for key, value in snap["model"].items():
            expected = ref[key]
            if key in snap["masks"]:
                mask = snap["masks"][key]
                assert torch.equal(value[mask], expected[mask]), f"level {level}: {key} survivors not rewound"
                assert torch.all(value[~mask] == 0)
            else:  # biases, BN affine and running statistics
                assert torch.equal(value, expected), f"level {level}: {key} not rewound"


def test_optimizer_and_scheduler_reset_to_rewind_point(imp_run):
    imp, probe, _, _ = imp_run
    ref = probe.rewind_point
    assert ref["lr"] == pytest.approx(0.05)
    for level, snap in probe.level_starts.items():
        assert snap["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
        assert snap["lr"] == pytest.approx(ref["lr"])
        opt_ref = ref["optimizer"]["state"]
        opt_now = snap["optimizer"]["state"]
        assert opt_ref.keys() == opt_now.keys() and len(opt_ref) > 0
        names = list(dict(new_model().named_parameters()))
        for idx, state in opt_now.items():
            buf, buf_ref = state["momentum_buffer"], opt_ref[idx]["momentum_buffer"]
            mask = snap["masks"].get(names[idx])
            if mask is None:
                assert torch.equal(buf, buf_ref)
            else:  # survivors keep the rewind-point momentum; pruned entries are cleared
                assert torch.equal(buf[mask], buf_ref[mask]) and torch.all(buf[~mask] == 0)


def test_level_checkpoints_are_ordinary_strict_lightning_checkpoints(imp_run):
    _, _, root, _ = imp_run
    path = root / "ckpts" / f"level_{LEVELS:02d}.ckpt"
    ckpt = load_level(path)
    assert not any(k.endswith(("_orig", "_mask")) for k in ckpt["state_dict"])
    model = DigitsClassifier.load_from_checkpoint(path, strict=True)
    assert model.hparams.width == 8
    meta = ckpt[CHECKPOINT_KEY]
    assert {"level", "sparsity", "masks", "metrics", "prune_fraction", "levels"} <= meta.keys()
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0
    x = torch.randn(3, 1, 8, 8)
    assert torch.isfinite(model.eval()(x)).all()


def test_logs_per_level_through_the_trainer_logger(imp_run):
    _, _, _, trainer = imp_run
    trainer.logger.save()
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    levels = sorted({float(r["imp/level"]) for r in rows if r.get("imp/level")})
    assert levels == [float(lv) for lv in range(LEVELS + 1)]
    assert any(r.get("imp/sparsity") and r.get("imp/surviving_params") and r.get("imp/val_acc") for r in rows)


def test_adam_does_not_regrow_pruned_weights(tmp_path):
    L.seed_everything(1)
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, rewind_to="3it", checkpoint_dir=tmp_path,
                                    verbose=False)
    probe = Probe(imp)
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[probe])
    trainer.fit(new_model(optimizer="adam", lr=1e-3, weight_decay=1e-2), datamodule=small_datamodule(train_limit=256))
    assert probe.violations == 0 and probe.state_violations == 0 and probe.steps_checked >= 8
    meta = level_meta(tmp_path / "level_02.ckpt")
    state = load_level(tmp_path / "level_02.ckpt")["state_dict"]
    assert all(torch.all(state[n][~m] == 0) for n, m in meta["masks"].items())


def test_rewind_to_zero_restores_the_initialisation(tmp_path):
    L.seed_everything(2)
    model = new_model()
    init = copy.deepcopy(model.state_dict())
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, rewind_to=0, checkpoint_dir=tmp_path, verbose=False)
    starts = {}

    class AtLevelStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            starts[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())

    trainer = make_trainer(imp, tmp_path, extra_callbacks=[AtLevelStart()])
    trainer.fit(model, datamodule=small_datamodule(train_limit=128))
    masks = level_meta(tmp_path / "level_01.ckpt")["masks"]
    for key, value in starts[1].items():
        mask = masks.get(key)
        ref = init[key] if mask is None else init[key] * mask
        assert torch.equal(value, ref), key


def test_excluded_and_lower_rate_layers(tmp_path):
    L.seed_everything(3)
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, prune_fraction=0.5, checkpoint_dir=tmp_path,
                                    exclude=["model.features.0"], layer_prune_fractions={"model.classifier": 0.25},
                                    verbose=False)
    make_trainer(imp, tmp_path).fit(new_model(), datamodule=small_datamodule(train_limit=128))
    masks = level_meta(tmp_path / "level_02.ckpt")["masks"]
    assert "model.features.0.weight" not in masks
    cls = masks["model.classifier.weight"]
    assert 1 - cls.float().mean().item() == pytest.approx(1 - 0.75**2, abs=0.02)
    others = [m for n, m in masks.items() if n != "model.classifier.weight"]
    assert 1 - torch.cat([m.flatten() for m in others]).float().mean().item() == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize(
    "value, expected",
    [(0, (0, "it")), (2000, (2000, "it")), ("2000it", (2000, "it")), ("1ep", (1, "ep")), ("7", (7, "it"))],
)
def test_parse_rewind_point(value, expected):
    assert parse_rewind_point(value) == expected


class _NoisySGD(torch.optim.SGD):
    """An 'exotic' optimizer: after the SGD step it nudges every parameter, zero gradient or not."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


class _NoisyClassifier(DigitsClassifier):
    def configure_optimizers(self):
        return _NoisySGD(self.parameters(), lr=0.01)


def test_an_optimizer_that_moves_zero_gradient_weights_cannot_regrow_them(tmp_path):
    """torch's own optimizers skip the post-step re-zeroing (they provably keep zeros); any other
    optimizer, a subclass included, gets it after every step."""
    L.seed_everything(2)
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, rewind_to=0, checkpoint_dir=tmp_path, verbose=False)
    probe = Probe(imp)
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[probe])
    trainer.fit(_NoisyClassifier(width=8), datamodule=small_datamodule(train_limit=256))
    assert probe.violations == 0 and probe.steps_checked >= 8
    state = load_level(tmp_path / "level_02.ckpt")["state_dict"]
    meta = level_meta(tmp_path / "level_02.ckpt")
    assert all(torch.all(state[n][~m] == 0) for n, m in meta["masks"].items())
    assert all(torch.all(state[n][m] != 0) for n, m in meta["masks"].items())  # the noise did reach survivors
