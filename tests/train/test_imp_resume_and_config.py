"""IMP resumes from a mid-level checkpoint exactly; bad configuration is refused before training."""

from __future__ import annotations

import copy
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from dnnshifter_lightning import IterativeMagnitudePruning
from dnnshifter_lightning.train.imp import CHECKPOINT_KEY
from imp_helpers import load_level, make_trainer, new_model, small_datamodule

LEVELS, EPOCHS = 2, 2


class Crash(RuntimeError):
    pass


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Crash(f"simulated crash at the start of epoch {self.epoch}")


def _imp(ckpt_dir):
    return IterativeMagnitudePruning(levels=LEVELS, epochs_per_level=EPOCHS, rewind_to="4it",
                                     checkpoint_dir=ckpt_dir, verbose=False)


def _fit(root, ckpt_dir, crash_epoch=None, ckpt_path=None):
    L.seed_everything(7)
    imp = _imp(ckpt_dir)
    callbacks = [ModelCheckpoint(dirpath=root / "lightning", save_last=True, save_top_k=1)]
    if crash_epoch is not None:
        callbacks.append(CrashAtEpoch(crash_epoch))
    trainer = make_trainer(imp, root, extra_callbacks=callbacks, deterministic=True, enable_checkpointing=True)
    # The crash runs before the IMP callback's hooks, so a crash at a level boundary hits before the
    # level transition (checkpoint, pruning, rewind) that the resumed run then has to perform.
    trainer.callbacks.sort(key=lambda cb: not isinstance(cb, CrashAtEpoch))
    trainer.fit(new_model(lr_step_epochs=1), datamodule=small_datamodule(train_limit=256), ckpt_path=ckpt_path)
    return imp


@pytest.mark.parametrize("crash_epoch", [3, 4], ids=["mid-level", "level-boundary"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, crash_epoch):
    _fit(tmp_path / "a", tmp_path / "a" / "imp")

    root = tmp_path / "b"
    with pytest.raises(Crash):
        _fit(root, root / "imp", crash_epoch=crash_epoch)
    last = root / "lightning" / "last.ckpt"
    assert last.exists()
    # Epoch 3 is mid level 1. Epoch 4 starts level 2: level 1's checkpoint was written when its last
    # epoch ended, and the crash hits right before its pruning and rewind, which the resumed run must
    # perform (last.ckpt was saved after validation, before the level's end: it rewrites level 1 too).
    written = ["level_00.ckpt"] if crash_epoch == 3 else ["level_00.ckpt", "level_01.ckpt"]
    assert sorted(p.name for p in (root / "imp").glob("level_*.ckpt")) == written
    _fit(root, root / "imp", ckpt_path=str(last))

    for level in range(LEVELS + 1):
        a = load_level(tmp_path / "a" / "imp" / f"level_{level:02d}.ckpt")
        b = load_level(root / "imp" / f"level_{level:02d}.ckpt")
        ma, mb = a[CHECKPOINT_KEY]["masks"], b[CHECKPOINT_KEY]["masks"]
        assert ma.keys() == mb.keys()
        for name in ma:
            assert torch.equal(ma[name], mb[name]), f"level {level}: mask of {name} differs after resume"
        for key in a["state_dict"]:
            torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-5,
                                       msg=lambda m, k=key: f"level {level} {k}: {m}")
        assert a["global_step"] == b["global_step"]


def test_resume_with_a_different_schedule_is_refused(tmp_path):
    root = tmp_path
    with pytest.raises(Crash):
        _fit(root, root / "imp", crash_epoch=1)
    imp = IterativeMagnitudePruning(levels=LEVELS, epochs_per_level=EPOCHS, prune_fraction=0.5, rewind_to="4it",
                                    checkpoint_dir=root / "imp", verbose=False)
    trainer = make_trainer(imp, root)
    with pytest.raises(ValueError, match="Resume with the same settings"):
        trainer.fit(new_model(lr_step_epochs=1), datamodule=small_datamodule(train_limit=256),
                    ckpt_path=str(root / "lightning" / "last.ckpt"))


# ---------------------------------------------------------------- bad configuration
@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.2, 1.5, "0.2"])
def test_prune_fraction_outside_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="prune_fraction must be strictly between 0 and 1"):
        IterativeMagnitudePruning(levels=2, epochs_per_level=1, prune_fraction=fraction)


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=-1, epochs_per_level=1), "levels must be"),
    (dict(levels=2, epochs_per_level=0), "epochs_per_level must be"),
    (dict(levels=2, epochs_per_level=2, rewind_to="3ep"), "later than the end of level 0"),
    (dict(levels=2, epochs_per_level=2, rewind_to="soon"), "is not understood"),
    (dict(levels=2, epochs_per_level=2, rewind_to=-5), "rewind_to must be >= 0"),
    (dict(levels=2, epochs_per_level=2, layer_prune_fractions={"model.classifier": 1.0}), "must be in"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IterativeMagnitudePruning(**kwargs)


class Untouched(Callback):
    """Fails the test if any training batch runs."""

    def on_train_batch_start(self, *args, **kwargs):
        raise AssertionError("training started despite a bad configuration")


def _refused(tmp_path, imp, model=None, match="", error=ValueError, **trainer_kwargs):
    model = model or new_model()
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[Untouched()], **trainer_kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(model, datamodule=small_datamodule(train_limit=128))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed before the error"


def test_rewind_steps_later_than_level_zero_refused_before_training(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, rewind_to=1000, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match=r"later than the end of level 0 \(2 optimizer steps")


def test_max_epochs_that_disagree_name_the_right_value(tmp_path):
    imp = IterativeMagnitudePruning(levels=3, epochs_per_level=2, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match=r"max_epochs=8 \(got max_epochs=5\)", max_epochs=5)


def test_max_steps_refused(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match="max_steps", max_steps=3)


def test_early_stopping_refused(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    model = new_model()
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[Untouched(), EarlyStopping("val_loss")])
    with pytest.raises(ValueError, match="EarlyStopping cannot be combined"):
        trainer.fit(model, datamodule=small_datamodule(train_limit=128))


class NoPrunable(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 1, 8, 8))
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.norm(x * self.scale).flatten(1)[:, :10]

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_prunable_parameters_refused(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, model=NoPrunable(), match="found no prunable parameters")


def test_exclude_typo_refused(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path, exclude=["model.clasifier"])
    _refused(tmp_path, imp, match=r"exclude=\['model.clasifier'\] matches no prunable layer")


def test_levels_that_would_prune_every_weight_refused(tmp_path):
    imp = IterativeMagnitudePruning(levels=60, epochs_per_level=1, prune_fraction=0.9, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match="would prune every one of")


def test_sharding_strategy_refused(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    model = new_model()
    trainer = make_trainer(imp, tmp_path)
    trainer.strategy.__class__ = type("FSDPStrategy", (type(trainer.strategy),), {})  # no GPU/NCCL here
    assert issubclass(FSDPStrategy, object)  # the real class exists in this Lightning
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        trainer.fit(model, datamodule=small_datamodule(train_limit=128))


def test_existing_level_checkpoints_are_not_overwritten(tmp_path):
    (tmp_path / "level_00.ckpt").write_bytes(b"precious")
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match="already holds level checkpoints", error=FileExistsError)
    assert (tmp_path / "level_00.ckpt").read_bytes() == b"precious"


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import dnnshifter_lightning.train.imp as imp_mod

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(imp_mod.torch, "save", failing_save)
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path / "ck", verbose=False)
    trainer = make_trainer(imp, tmp_path)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(new_model(), datamodule=small_datamodule(train_limit=64))
    assert os.listdir(tmp_path / "ck") == []
