"""IMP under DDP with 2 CPU processes (gloo): identical masks on every rank, only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dnnshifter_lightning.train.imp import CHECKPOINT_KEY
from dnnshifter_lightning.train.masks import mask_digest


def test_ddp_two_processes_identical_masks_and_rank_zero_writes(tmp_path):
    script = Path(__file__).resolve().parents[1] / "ddp_imp_script.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["levels"] == ranks[1]["levels"] and len(ranks[0]["levels"]) == 3
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["written"] == ["level_00.ckpt", "level_01.ckpt", "level_02.ckpt"]
    assert ranks[1]["written"] == []
    for row in ranks[0]["levels"]:
        ckpt = torch.load(tmp_path / "imp" / f"level_{row['level']:02d}.ckpt", weights_only=False)
        assert mask_digest(ckpt[CHECKPOINT_KEY]["masks"]) == row["mask_sha256"]
