"""The `dnnshifter` command and the README's example, run as a user would."""

from __future__ import annotations

import json
import os
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
    assert "Iterative Magnitude Pruning: 3 levels at 70%" in result.output  # the end-of-fit table
    assert sorted(p.name for p in (out / "imp").glob("level_*.ckpt")) == ["level_00.ckpt", "level_01.ckpt",
                                                                        "level_02.ckpt"]
    manifest = json.loads((out / "portfolio" / "manifest.json").read_text())
    assert len(manifest["variants"]) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [row["level"] for row in summary["imp"]] == [0, 1, 2]
    # three variants cannot make a four-member front: the demo says so instead of claiming a ladder
    assert summary["ladder"]["ok"] is False and "front has" in " ".join(summary["ladder"]["problems"])
    assert "NOT MET" in result.output
    # a second run into the same place is refused instead of overwriting the checkpoints
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--levels", "2", "--no-serve"])
    assert again.exit_code == 1 and "already holds level checkpoints" in again.output


def test_demo_refuses_bad_configuration_before_training(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--prune-fraction", "1.5", "--no-serve"])
    assert result.exit_code == 1
    assert "prune_fraction must be strictly between 0 and 1" in result.output
    assert not (tmp_path / "d" / "imp").exists()


def _listed_commands(help_text: str) -> set[str]:
    """The names in the Commands panel of a typer --help (each first word after the panel's border)."""
    panel = help_text.split("Commands", 1)[1]
    return set(re.findall(r"^│ (\S+)  ", panel, re.M))


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert _listed_commands(result.output) == {"demo", "portfolio", "archive", "serve", "litserve"}
    sub = CliRunner().invoke(app, ["portfolio", "--help"])
    assert sub.exit_code == 0 and _listed_commands(sub.output) == {"build", "show"}


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _readme_bash_block(containing: str) -> str:
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"expected one README bash block with {containing!r}"
    return blocks[0]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.serve  # its TorchServeServer block starts a real TorchServe
def test_readme_examples_run_as_written(tmp_path):
    """The README's examples, verbatim, in fresh processes, in the order a reader meets them: the
    Trainer example, the offline build from its checkpoints, prune_structurally on its last level,
    and serving its portfolio from Python with a real TorchServe."""
    block = _readme_python_blocks()[0]
    assert len(block.strip().splitlines()) <= 10
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "ckpts").glob("level_*.ckpt"))) == 14
    manifest = json.loads((tmp_path / "portfolio" / "manifest.json").read_text())
    assert len(manifest["variants"]) == 14 and (tmp_path / "portfolio" / "portfolio.png").exists()
    last = torch.load(tmp_path / "ckpts" / "level_13.ckpt", weights_only=False)
    assert last["dnnshifter"]["sparsity"] > 0.99

    proc = _run(["bash", "-euo", "pipefail", "-c", _readme_bash_block("dnnshifter portfolio build")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads((tmp_path / "my_portfolio" / "manifest.json").read_text())
    assert [v["id"] for v in rebuilt["variants"]] == [v["id"] for v in manifest["variants"]]
    assert "level_13" in proc.stdout  # the show table

    blocks = _readme_python_blocks()
    surgery = next(b for b in blocks if "prune_structurally(" in b)
    proc = _run([sys.executable, "-c", surgery], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (int(n) for n in re.match(r"(\d+) -> (\d+) parameters", proc.stdout).groups())
    assert after < before

    serving = next(b for b in blocks if "TorchServeServer(" in b)
    proc = _run([sys.executable, "-c", serving], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("200 ")
    assert "'errors': 0" in proc.stdout and "'accuracy': " in proc.stdout


def test_readme_lightningcli_commands_run_as_written(tmp_path):
    """The README's LightningCLI smoke run, then `portfolio show` and `archive`, verbatim."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the commands run from the repository root
    proc = _run(["bash", "-euo", "pipefail", "-c", _readme_bash_block("examples/cifar10.py fit --data.fake true")],
                tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "runs"
    assert sorted(p.name for p in (run / "cifar10_smoke" / "imp").glob("level_*.ckpt")) == [
        "level_00.ckpt", "level_01.ckpt", "level_02.ckpt"]
    assert (run / "model_store" / "cifar10.mar").is_file()
    assert "level_02" in proc.stdout  # portfolio show's table
