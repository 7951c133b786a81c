"""Run by test_imp_ddp.py: IMP under strategy='ddp' with 2 CPU processes.

Lightning's DDP launcher re-executes this script for rank 1. Each rank writes rank<R>.json with the
mask digest of every level it went through, the files it wrote, and a digest of its final weights.
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning as L

import dnnshifter_lightning.train.imp as imp_mod
from dnnshifter_lightning import IterativeMagnitudePruning
from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule

out = Path(sys.argv[1])
written: list[str] = []
_save = imp_mod._atomic_torch_save


def recording_save(obj, path):
    written.append(Path(path).name)
    _save(obj, path)


imp_mod._atomic_torch_save = recording_save

L.seed_everything(11)
imp = IterativeMagnitudePruning(levels=2, epochs_per_level=1, rewind_to="2it", checkpoint_dir=out / "imp")
trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[imp], strategy="ddp", accelerator="cpu", devices=2,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out))
model = DigitsClassifier(width=8)
trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, shuffle=False, train_limit=256))

h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(v.detach().cpu().numpy().tobytes())
rank = trainer.global_rank
(out / f"rank{rank}.json").write_text(json.dumps({
    "world_size": trainer.world_size,
    "levels": [{"level": r["level"], "mask_sha256": r["mask_sha256"]} for r in imp.history],
    "written": written,
    "weights_sha256": h.hexdigest(),
}))
