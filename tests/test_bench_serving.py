"""bench_serving's report: the goals are checked per engine against that engine's own fixed
contenders, and adaptive LitServe is compared with adaptive TorchServe, on synthetic runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_serving as bench  # noqa: E402

from dnnshifter_lightning.serve.defaults import DEFAULT_MODEL_CONFIG  # noqa: E402

STAIR = [(10.0, 4.0, "0:0.3x"), (50.0, 4.0, "1:3x")]
BURST = [(10.0, 2.0, "0:0.3x"), (50.0, 4.0, "1:2.5x"), (10.0, 2.0, "2:0.3x")]


def _run(step_ea, *, switches=None, burst_on_time=(1.0,) * 8):
    """One run: effective accuracy per staircase step (and over all), or a burst's per-second series."""
    steps = {p: {"effective_accuracy": ea, "on_time": ea} for (_, _, p), ea in zip(STAIR, step_ea)}
    mean = sum(step_ea) / len(step_ea)
    run = {"steps": {**steps, "1:2.5x": {"effective_accuracy": mean, "on_time": mean}},
           "overall": {"effective_accuracy": mean, "on_time": mean, "accuracy": 0.99, "p50_ms": 10.0,
                       "p99_ms": 50.0, "throughput_rps": 30.0},
           "series": [{"t": t, "offered": 10, "on_time": v} for t, v in enumerate(burst_on_time)]}
    if switches is not None:
        run["switches"] = [{"time": 0.0}] * switches
    return run


def _runs(per_contender: dict) -> dict:
    return {"staircase": {k: [v] for k, v in per_contender.items()}, "burst": {k: [v] for k, v in per_contender.items()}}


def test_goals_are_per_engine_against_its_own_fixed_contenders():
    # LitServe's fixed w12 is far better at 3x than anything on TorchServe; TorchServe's adaptive
    # must be judged against TorchServe's fixed contenders only, LitServe's against LitServe's
    runs = _runs({
        "torchserve/adaptive": _run([0.99, 0.90], switches=2), "torchserve/fixed_w64": _run([0.99, 0.0]),
        "torchserve/fixed_w12": _run([0.98, 0.89]),
        "litserve/adaptive": _run([0.99, 0.90], switches=1), "litserve/fixed_w64": _run([0.99, 0.10]),
        "litserve/fixed_w12": _run([0.98, 0.97]),
    })
    ts = bench.engine_report(runs, "torchserve", ["w64", "w12"], STAIR, BURST)
    ls = bench.engine_report(runs, "litserve", ["w64", "w12"], STAIR, BURST)
    assert ts["goals"]["all_steps_met"] and ts["goals"]["upper_envelope_met"]
    g = ls["goals"]["steps_within_2_points"]["1:3x"]
    assert (g["best_fixed"], g["gap_points"], g["met"]) == ("fixed_w12", -7.0, False)
    assert not ls["goals"]["all_steps_met"]
    assert ls["goals"]["upper_envelope"] == {"fixed_w64": True, "fixed_w12": False}
    assert (ts["switches"]["adaptive"], ts["switches"]["fixed_w64"]) == (2, None)
    versus = bench.compare_adaptive({"torchserve": ts, "litserve": ls}, STAIR)
    assert versus["step_points"] == {"0:0.3x": 0.0, "1:3x": 0.0}
    assert bench.compare_adaptive({"torchserve": ts}, STAIR) is None


def test_spread_and_reaction_over_rounds():
    runs = {"staircase": {"litserve/adaptive": [_run([0.9, 0.8]), _run([0.7, 0.6]), _run([0.8, 0.7])],
                          "litserve/fixed_w12": [_run([0.5, 0.5])]},
            # the burst starts at second 2: one round reacts 1 s in, one never
            "burst": {"litserve/adaptive": [_run([0.9, 0.8], burst_on_time=[1, 1, 0.2, 0.95, 1, 1, 1, 1]),
                                            _run([0.9, 0.8], burst_on_time=[1, 1, 0, 0, 0, 0, 1, 1])],
                      "litserve/fixed_w12": [_run([0.5, 0.5])]}}
    rep = bench.engine_report(runs, "litserve", ["w12"], STAIR, BURST)
    spread = rep["overall_spread"]["adaptive"]["effective_accuracy"]
    assert (spread["median"], spread["min"], spread["max"], spread["n"]) == (pytest.approx(0.75), pytest.approx(0.65),
                                                                            pytest.approx(0.85), 3)
    assert bench._pct_spread(spread) == "75.0 (65.0-85.0)"
    assert rep["burst_report"]["adaptive"]["reactions_s"] == [1.0, None]
    assert rep["burst_report"]["adaptive"]["reaction_s"] == 1.0


def test_litserve_contenders_batch_as_the_torchserve_archives():
    opts = bench.litserve_options()
    assert opts == {"max_batch_size": DEFAULT_MODEL_CONFIG["batchSize"],
                    "batch_timeout": DEFAULT_MODEL_CONFIG["maxBatchDelay"] / 1000.0}
    assert bench.litserve_options("w24")["fixed_variant"] == "w24"


def test_engines_option_and_the_interleaved_contenders():
    assert bench.parse_engines("torchserve") == ["torchserve"]
    with pytest.raises(ValueError):
        bench.parse_engines("torchserve,torchserve")
    # --engines torchserve keeps today's contenders in today's order, so the per-round shuffle is today's
    names = bench.contenders(["torchserve"], ["w64", "w24", "w12"])
    assert [n.split("/", 1)[1] for n in names] == ["adaptive", "fixed_w64", "fixed_w24", "fixed_w12"]
