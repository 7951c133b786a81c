"""The demo's serving step: the engine choice (unit tests) and one run on LitServe."""

from __future__ import annotations

from unittest import mock

import pytest

from dnnshifter_lightning.demo import serving as demo_serving
from dnnshifter_lightning.serve.torchserve import JavaMissingError


def _no_java():
    raise JavaMissingError("`java` is not on PATH.\nTorchServe 0.12 needs Java 17 ...")


def test_default_engine_is_torchserve_while_java_is_present_and_says_why():
    with mock.patch.object(demo_serving, "check_java", return_value="/usr/bin/java"):
        engine, why = demo_serving.choose_engine()
    assert engine == "torchserve" and "Java 17 is present (/usr/bin/java)" in why and "--engine litserve" in why


def test_without_java_the_default_is_litserve_and_says_why():
    with mock.patch.object(demo_serving, "check_java", side_effect=_no_java):
        engine, why = demo_serving.choose_engine()
        assert engine == "litserve" and "TorchServe needs Java 17 and `java` is not on PATH" in why
        with pytest.raises(JavaMissingError):  # asked for by name: an error before training, not a skip
            demo_serving.choose_engine("torchserve")
        with mock.patch("importlib.util.find_spec", return_value=None), pytest.raises(JavaMissingError,
                                                                                       match="--no-serve"):
            demo_serving.choose_engine()  # neither engine can run
    assert demo_serving.choose_engine("litserve")[0] == "litserve"


def test_demo_command_refuses_an_engine_it_cannot_run_before_training(tmp_path):
    from typer.testing import CliRunner

    from dnnshifter_lightning.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--engine", "triton"])
    assert result.exit_code == 1 and "choose torchserve or litserve" in result.output
    assert not (tmp_path / "d" / "imp").exists()


@pytest.mark.litserve
@pytest.mark.slow
def test_demo_serving_on_litserve_measures_capacity_bursts_and_prints_the_switches(portfolio, tmp_path):
    pytest.importorskip("litserve")
    from rich.console import Console

    from dnnshifter_lightning.cli import DemoPrinter

    console, events = Console(record=True, width=200), []
    with DemoPrinter(console) as printer:  # what `dnnshifter demo` prints

        def record(event, info):
            events.append((event, info.get("phase")))
            printer(event, info)

        report = demo_serving.run_demo_serving(portfolio, tmp_path / "serve", record, engine="litserve",
                                               burst_s=3.0, idle_s=6.0, capacity_s=1.0)
    steps = [(e, p) for e, p in events if e.startswith("phase")]
    assert [e for e, _ in events if not e.startswith("phase")] == ["requests", "engine", "result"]
    assert steps == [(e, p) for p in ("capacity", "settle", "light", "burst", "recovery")
                     for e in ("phase_start", "phase_end")]
    text = " ".join(console.export_text().split())
    assert report["engine"] == "litserve" and report["capacity_rps"] > 0
    assert report["burst_rate"] == pytest.approx(2.5 * report["capacity_rps"])  # sized from the measured capacity
    assert all(phase["requests"] > 0 for phase in report["phases"].values())
    downs = [s for s in report["switches"] if s["direction"] == "down"]
    assert downs, report["switches"]
    assert "variant switches seen by the LitServe worker" in text and downs[0]["reason"].split(":")[0] in text
    assert report["memory"]["total_bytes"] > 0 and "resident for the 3 served variants" in text
