"""IMP under everyday Lightning set-ups: a reused callback, sparse validation, a stop at a level
boundary, shuffled resumes, step-count schedulers, and the errors that name the fix."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from dnnshifter_lightning import IterativeMagnitudePruning
from dnnshifter_lightning.demo.digits import DigitsClassifier
from dnnshifter_lightning.train.imp import CHECKPOINT_KEY
from dnnshifter_lightning.shrink.measure import measure_accuracy
from imp_helpers import level_meta, load_level, make_trainer, new_model, small_datamodule
from test_imp_resume_and_config import Crash, CrashAtEpoch, Untouched, _refused


def _level_files(d):
    return sorted(p.name for p in d.glob("level_*.ckpt"))


def test_a_reused_callback_runs_a_fresh_imp_in_every_fit(tmp_path):
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, prune_fraction=0.5, checkpoint_dir=tmp_path / "imp",
                                    overwrite=True, verbose=False)
    for run in range(2):  # a notebook cell run twice: same callback, fresh Trainer and model
        for old in (tmp_path / "imp").glob("level_*.ckpt"):
            old.unlink()
        L.seed_everything(run)
        make_trainer(imp, tmp_path, limit_train_batches=2, limit_val_batches=1).fit(
            new_model(width=4), datamodule=small_datamodule(train_limit=128))
        assert _level_files(tmp_path / "imp") == ["level_00.ckpt", "level_01.ckpt", "level_02.ckpt"], run
        assert [round(level_meta(tmp_path / "imp" / f"level_{lv:02d}.ckpt")["sparsity"], 3) for lv in range(3)] \
            == [0.0, 0.5, 0.75]
        assert [row["level"] for row in imp.history] == [0, 1, 2]


class LogsAccAndValAcc(DigitsClassifier):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        x, y = batch
        self.log("acc", (self(x).argmax(1) == y).float().mean())  # a name without "val"


def test_a_level_records_its_own_final_validation_or_nothing(tmp_path):
    L.seed_everything(4)
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, checkpoint_dir=tmp_path / "imp", verbose=False)
    dm = small_datamodule(train_limit=128)
    trainer = make_trainer(imp, tmp_path, limit_train_batches=2, check_val_every_n_epoch=2)
    with pytest.warns(UserWarning, match="records no validation metrics") as seen:
        trainer.fit(LogsAccAndValAcc(width=4), datamodule=dm)
    assert sum("records no validation metrics" in str(w.message) for w in seen) == 1  # once per fit
    # Validation ran only after epoch 1 (level 1): levels 0 and 2 record nothing, not level 1's result.
    metrics = [level_meta(tmp_path / "imp" / f"level_{lv:02d}.ckpt")["metrics"] for lv in range(3)]
    assert metrics[0] == {} and metrics[2] == {}
    assert set(metrics[1]) == {"acc", "val_acc", "val_loss"}
    level1 = LogsAccAndValAcc.load_from_checkpoint(tmp_path / "imp" / "level_01.ckpt")
    assert metrics[1]["val_acc"] == pytest.approx(measure_accuracy(level1, dm.val_dataloader(), 10), abs=1e-6)


class StopAfterEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_fit_stopped_at_a_level_boundary_keeps_the_finished_level(tmp_path):
    L.seed_everything(5)
    imp = IterativeMagnitudePruning(levels=2, epochs_per_level=2, checkpoint_dir=tmp_path / "imp", verbose=False)
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[StopAfterEpoch(1)], limit_train_batches=2,
                           limit_val_batches=1)
    with pytest.warns(UserWarning, match="IMP stopped at epoch 2 of 6"):
        trainer.fit(new_model(width=4), datamodule=small_datamodule(train_limit=128))
    assert _level_files(tmp_path / "imp") == ["level_00.ckpt"]
    meta = level_meta(tmp_path / "imp" / "level_00.ckpt")
    assert meta["level"] == 0 and meta["epoch"] == 1 and meta["global_step"] == 4 and "val_acc" in meta["metrics"]


def _shuffled_fit(root, crash_epoch=None, ckpt_path=None):
    L.seed_everything(8)
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, rewind_to="2it", checkpoint_dir=root / "imp",
                                    verbose=False)
    callbacks = [ModelCheckpoint(dirpath=root / "lightning", save_last=True, save_top_k=1)]
    if crash_epoch is not None:
        callbacks.insert(0, CrashAtEpoch(crash_epoch))
    trainer = make_trainer(imp, root, extra_callbacks=callbacks, deterministic=True, enable_checkpointing=True,
                           limit_val_batches=1)
    trainer.callbacks.sort(key=lambda cb: not isinstance(cb, CrashAtEpoch))
    trainer.fit(new_model(width=4), datamodule=small_datamodule(train_limit=128, batch_size=32, shuffle=True),
                ckpt_path=ckpt_path)


def test_a_resumed_run_with_shuffled_batches_writes_the_same_checkpoints(tmp_path):
    _shuffled_fit(tmp_path / "a")
    with pytest.raises(Crash):
        _shuffled_fit(tmp_path / "b", crash_epoch=1)  # at the start of level 1, after one shuffled epoch
    _shuffled_fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "lightning" / "last.ckpt"))
    for level in range(2):
        a = load_level(tmp_path / "a" / "imp" / f"level_{level:02d}.ckpt")
        b = load_level(tmp_path / "b" / "imp" / f"level_{level:02d}.ckpt")
        assert a["global_step"] == b["global_step"]
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), f"level {level}: {key} differs after resume"
        assert a[CHECKPOINT_KEY]["mask_sha256"] == b[CHECKPOINT_KEY]["mask_sha256"]


class OneCycle(DigitsClassifier):
    def __init__(self, total_steps: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.total_steps = total_steps

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.total_steps == -1:  # the helper
            imp = next(cb for cb in self.trainer.callbacks if isinstance(cb, IterativeMagnitudePruning))
            total = imp.scheduler_steps(self.trainer)
        else:
            total = self.total_steps or int(self.trainer.estimated_stepping_batches)  # the usual recipe: the whole fit
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_a_one_cycle_schedule_over_the_whole_fit_is_refused_with_the_right_total_steps(tmp_path):
    # 128 samples / 32 = 4 steps per epoch; each level restarts the schedule at step 2, then trains 4 steps.
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, rewind_to="2it", checkpoint_dir=tmp_path / "imp",
                                    verbose=False)
    model = OneCycle(width=4)
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[Untouched()], limit_val_batches=1)
    with pytest.raises(ValueError, match=r"OneCycleLR\(total_steps=8, interval='step'\).*Use total_steps=6"):
        trainer.fit(model, datamodule=small_datamodule(train_limit=128, batch_size=32))
    # The value it names (here from the helper, in configure_optimizers) trains every level through;
    # a shorter schedule would raise "Tried to step".
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, rewind_to="2it", checkpoint_dir=tmp_path / "imp2",
                                    verbose=False)
    trainer = make_trainer(imp, tmp_path, limit_val_batches=1)
    trainer.fit(OneCycle(width=4, total_steps=-1), datamodule=small_datamodule(train_limit=128, batch_size=32))
    assert _level_files(tmp_path / "imp2") == ["level_00.ckpt", "level_01.ckpt"]
    assert imp.scheduler_steps(trainer) == 6 and imp.scheduler_steps(trainer, "epoch") == 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6  # level 1 annealed to the end


def test_max_steps_without_max_epochs_names_both(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    _refused(tmp_path, imp, match=r"max_steps=3\).*Leave max_steps unset.*max_epochs=2", max_steps=3, max_epochs=None)


def test_early_stopping_message_suggests_what_works(tmp_path):
    imp = IterativeMagnitudePruning(levels=1, epochs_per_level=1, checkpoint_dir=tmp_path)
    trainer = make_trainer(imp, tmp_path, extra_callbacks=[Untouched(), EarlyStopping("val_loss")])
    with pytest.raises(ValueError, match="Remove EarlyStopping") as err:
        trainer.fit(new_model(width=4), datamodule=small_datamodule(train_limit=64))
    assert "or choose fewer epochs_per_level" not in str(err.value)  # that never made the combination work
    assert "ModelCheckpoint" in str(err.value)
