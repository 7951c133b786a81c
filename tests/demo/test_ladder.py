"""The ladder criteria of the demo's portfolio, and the front as `portfolio show` and the plot mark it."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from dnnshifter_lightning.cli import portfolio_show_command
from dnnshifter_lightning.demo.run import ladder_report
from dnnshifter_lightning.shrink.plot import plot_points, plot_portfolio
from dnnshifter_lightning.portfolio import FORMAT_VERSION, VARIANT_SUFFIX, Variant, save_variant, write_manifest


def _v(vid: str, acc: float | None, ms8: float, level: int = 0) -> dict:
    return {"id": vid, "level": level, "accuracy": acc, "params": 1000, "latency_ms": {"1": ms8 / 4, "8": ms8}}


# Most to least accurate, each faster than the one before: all four on the front.
LADDER = [_v("l02", 0.995, 30.0, 2), _v("l08", 0.985, 20.0, 8), _v("l10", 0.97, 11.0, 10), _v("l12", 0.95, 6.0, 12)]


def test_a_real_ladder_meets_every_criterion():
    report = ladder_report({"variants": LADDER + [_v("l00", 0.98, 35.0)]}, val_samples=360)  # l00 is dominated
    assert report.ok, report.problems
    assert report.front == ["l02", "l08", "l10", "l12"]
    assert report.accuracy_points == pytest.approx(4.5)
    assert report.accuracy_samples == 16 and report.latency_ratio == pytest.approx(5.0)


@pytest.mark.parametrize("variants, val_samples, problem", [
    # the old demo: every level within half a point, one or two ms apart
    ([_v("a", 0.997, 2.0), _v("b", 0.996, 1.9), _v("c", 0.994, 1.5), _v("d", 0.992, 0.9)], 360, "points < 3"),
    (LADDER[:3], 360, "front has 3 variants < 4"),
    # 4.5 points is only 9 samples of 200
    (LADDER, 200, "9 validation samples < 10"),
    (LADDER[:3] + [_v("l12", 0.95, 10.5)], 360, "latency spread 2.9x < 3x"),
    (LADDER[:3] + [_v("l12", None, 6.0)], 360, "accuracy not measured"),
    (LADDER, None, "validation sample count unknown"),
    # dominated variants do not count: l20 is slower than l12 and less accurate, so the front stays at 3
    (LADDER[:3] + [_v("l20", 0.90, 12.0)], 360, "front has 3 variants < 4"),
])
def test_a_flat_or_short_ladder_fails_and_says_why(variants, val_samples, problem):
    report = ladder_report({"variants": variants}, val_samples=val_samples)
    assert not report.ok
    assert any(problem in p for p in report.problems), report.problems
    assert any(line.startswith("NOT MET") for line in report.lines())


def _portfolio(tmp_path):
    """A real portfolio directory: level_01 is slower than level_02 and less accurate, so it is dominated."""
    variants = []
    for vid, acc, ms8 in [("level_00", 0.99, 9.0), ("level_02", 0.97, 4.0), ("level_01", 0.96, 6.0)]:
        info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), tmp_path / f"{vid}{VARIANT_SUFFIX}")
        variants.append(Variant(id=vid, level=int(vid[-1]), sparsity=0.0, params=8, nonzero_params=8,
                                macs=6, latency_ms={"1": ms8 / 4, "8": ms8}, accuracy=acc, sparse_accuracy=acc,
                                max_abs_diff=0.0, **info).to_dict())
    write_manifest(tmp_path, {"format_version": FORMAT_VERSION, "input_spec": {"shape": [3], "dtype": "float32"},
                              "variants": variants})
    return tmp_path


def test_portfolio_show_marks_the_front(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        portfolio_show_command(_portfolio(tmp_path))
    rows = {line.split()[1]: line for line in shown.getvalue().splitlines() if "level_0" in line and "│" in line}
    assert set(rows) == {"level_00", "level_01", "level_02"}
    marks = {vid: rows[vid].split("│")[2].strip() for vid in rows}
    assert marks == {"level_00": "*", "level_02": "*", "level_01": ""}
    assert "front (*): 2 of 3 variants" in shown.getvalue()


def test_the_plot_draws_the_front_and_greys_the_rest(tmp_path):
    from dnnshifter_lightning.portfolio import read_manifest

    manifest = read_manifest(_portfolio(tmp_path))
    points = plot_points(manifest)
    assert [(p["id"], p["front"]) for p in points] == [("level_00", True), ("level_01", False), ("level_02", True)]
    pytest.importorskip("matplotlib")
    png = plot_portfolio(manifest, tmp_path / "portfolio.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_ladder_report_lines_end_with_what_is_not_met():
    from dnnshifter_lightning.demo.run import LadderReport
    report = LadderReport(["l2", "l9"], 4.2, 15, 2.0, ["front has 2 variants < 4"])
    assert not report.ok and report.lines()[-1] == "NOT MET: front has 2 variants < 4"
