"""The `dnnshifter` command and the README's example, run as a user would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dnnshifter_lightning.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_trains_and_builds_a_portfolio(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--levels", "2", "--epochs-per-level", "1",
                                      "--width", "8", "--no-serve"])
    assert result.exit_code == 0, result.output
    assert "Iterative Magnitude Pruning: 3 levels at 30%" in result.output  # the end-of-fit table
    assert sorted(p.name for p in (out / "imp").glob("level_*.ckpt")) == ["level_00.ckpt", "level_01.ckpt",
                                                                        "level_02.ckpt"]
    manifest = json.loads((out / "portfolio" / "manifest.json").read_text())
    assert len(manifest["variants"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [row["level"] for row in summary["imp"]] == [0, 1, 2]
    # a second run into the same place is refused instead of overwriting the checkpoints
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--levels", "2", "--no-serve"])
    assert again.exit_code == 1 and "already holds level checkpoints" in again.output


def test_demo_refuses_bad_configuration_before_training(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--prune-fraction", "1.5", "--no-serve"])
    assert result.exit_code == 1
    assert "prune_fraction must be strictly between 0 and 1" in result.output
    assert not (tmp_path / "d" / "imp").exists()


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "portfolio", "archive", "serve"):
        assert command in result.output


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_trainer_example_runs_as_written(tmp_path):
    """The README's 'add the callbacks to your Trainer' example, verbatim, in a fresh process."""
    block = _readme_python_blocks()[0]
    assert len(block.strip().splitlines()) <= 10
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "ckpts").glob("level_*.ckpt"))) == 14
    manifest = json.loads((tmp_path / "portfolio" / "manifest.json").read_text())
    assert len(manifest["variants"]) == 14 and (tmp_path / "portfolio" / "portfolio.png").exists()
    last = torch.load(tmp_path / "ckpts" / "level_13.ckpt", weights_only=False)
    assert last["dnnshifter"]["sparsity"] > 0.99
