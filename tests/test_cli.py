"""The TorchServe commands of ``dnnshifter`` on their failure paths (fast: no server starts).

tests/serve/test_serve.py runs ``serve`` and ``serve --stop`` against a real TorchServe.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dnnshifter_lightning import cli


def _console() -> Console:
    return Console(file=io.StringIO(), width=300)


def test_archive_of_a_directory_that_is_not_a_portfolio_exits_1_and_says_why(tmp_path):
    out = _console()
    with pytest.raises(SystemExit) as exc:
        cli.archive_command(tmp_path, "digits", tmp_path / "store", console=out)
    assert exc.value.code == 1
    assert "is not a portfolio" in out.file.getvalue() and "manifest.json is missing" in out.file.getvalue()
    assert not (tmp_path / "store" / "digits.mar").exists()


def test_serve_without_the_archive_exits_1_and_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNSHIFTER_HOME", str(tmp_path / "home"))
    out = _console()
    with pytest.raises(SystemExit) as exc:
        cli.serve_command(tmp_path / "store", "digits", console=out)
    text = " ".join(out.file.getvalue().split())
    assert exc.value.code == 1 and "digits.mar not found" in text and "dnnshifter archive PORTFOLIO" in text
    assert not (tmp_path / "home" / "serve.json").exists()


def test_stop_with_nothing_started_or_an_unreadable_state_signals_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNSHIFTER_HOME", str(tmp_path))
    out = _console()
    assert cli.serve_stop_command(out) is False
    assert "no server started by `dnnshifter serve` is running" in out.file.getvalue()
    (tmp_path / "serve.json").write_text("{not json")
    assert cli.serve_stop_command(out) is False
    assert "was unreadable; removed it, signalled nothing" in out.file.getvalue()
    assert not (tmp_path / "serve.json").exists()
    result = CliRunner().invoke(cli.app, ["serve", "--stop"])  # the command itself
    assert result.exit_code == 0 and "no server started" in result.output


def test_state_dir_follows_dnnshifter_home_then_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNSHIFTER_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cli.state_dir() == tmp_path / "a"
    monkeypatch.delenv("DNNSHIFTER_HOME")
    assert cli.state_dir() == tmp_path / "b" / "dnnshifter"
