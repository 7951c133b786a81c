"""The TorchServe commands of ``dnnshifter`` on their failure paths, and the demo's printer on made-up
events (fast: no server starts).

tests/serve/test_serve.py runs ``serve`` and ``serve --stop`` against a real TorchServe, and the demo's
serving step through :class:`~dnnshifter_lightning.cli.DemoPrinter`.
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


def _result(**over):
    phase = {"requests": 30, "errors": 0, "p50_ms": 4.1, "p90_ms": 6.0, "p99_ms": 9.5, "throughput_rps": 10.0,
             "accuracy": 0.9, "effective_accuracy": 0.8, "variants": {"level_01": 30}}
    result = {"served": {"served": ["level_00", "level_01"], "selection": "front", "floor": 0.9,
                         "floor_rule": "0.9 x the best", "dominated": ["level_02"], "below_floor": [],
                         "warnings": []},
              "front": ["level_00", "level_01"], "most_accurate": "level_00",
              "memory": {"total_bytes": 3 * 2**20, "served_all_inflated_bytes": 5 * 2**20},
              "capacity_rps": 612.4, "light_rate": 183.7, "burst_rate": 1531.0, "switches": [],
              "switch_source": "handler", "fixed_variant": None,
              "fixed_by": {"config": "the archive's config", "key": "handler.fixed_variant"},
              "phases": {"light": phase, "burst": dict(phase, p99_ms=None, accuracy=None)},
              "effective_accuracy": 0.8125, "requests": 60, "deadline_ms": 100.0}
    return result | over


def _shown(*events) -> str:
    out = _console()
    with cli.DemoPrinter(out) as printer:
        for event, info in events:
            printer(event, info)
    return " ".join(out.file.getvalue().split())


def test_demo_printer_shows_the_served_set_memory_capacity_phases_and_the_runs_effective_accuracy():
    text = _shown(("result", _result()))
    assert ("served set (front): level_00, level_01; dominated, not loaded: level_02 (accuracy floor 90.0%, "
            "0.9 x the best)") in text
    assert "memory for model weights: 3.00 MB resident for the 2 served variants" in text and "5.00 MB" in text
    assert "capacity of level_00: 612 req/s (closed loop, 16 clients); light load 184 req/s, burst 1531 req/s" in text
    assert "no switch happened: the burst did not saturate the worker on level_00" in text
    assert "effective accuracy of the run: 81.2% of 60 requests answered correctly within 100 ms" in text
    assert "│ burst │ 30 │ 0 │ 4.1 │ 6.0 │ - │ 10.0 │ - │ 80.0% │ level_01: 30 │" in text  # unmeasured is "-"


def test_demo_printer_says_why_there_was_no_switch_or_lists_the_switches():
    fixed = _shown(("result", _result(fixed_variant="level_01")))
    assert "no switch: the archive's config fixes the variant to level_01 (handler.fixed_variant)" in fixed
    one = _shown(("result", _result(front=["level_00"])))
    assert "no switch: level_00 is the only served variant" in one and "nothing to switch to" in one
    switch = {"at_s": 1.234, "direction": "down", "from": "level_00", "to": "level_01",
              "reason": "queue 31 ms > 25 ms", "switch_ms": 0.41}
    listed = _shown(("result", _result(switches=[switch])))
    assert "variant switches seen by the handler" in listed
    assert "│ 1.23 │ down │ level_00 │ level_01 │ queue 31 ms > 25 ms │ 0.41 │" in listed
    assert "no switch" not in listed


def test_demo_printer_stops_a_phase_spinner_left_running_when_the_run_fails():
    import threading

    before = threading.active_count()
    with pytest.raises(RuntimeError), cli.DemoPrinter(_console()) as printer:
        printer("phase_start", {"phase": "burst", "rate": 1500.0, "factor": 2.5, "seconds": 6.0})
        assert threading.active_count() == before + 1  # the spinner's refresh thread
        raise RuntimeError("the server died")
    import time

    deadline = time.monotonic() + 3.0  # the refresh thread ends within one refresh (1/12.5 s) of the stop
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # stopped, not left spinning over the error message


def test_demo_serving_reports_phase_end_even_when_the_step_fails():
    from dnnshifter_lightning.demo.serving import _phase

    events = []
    with pytest.raises(OSError), _phase(lambda e, i: events.append((e, i)), "burst", rate=2.0):
        raise OSError("connection refused")
    assert events == [("phase_start", {"phase": "burst", "rate": 2.0}), ("phase_end", {"phase": "burst"})]
