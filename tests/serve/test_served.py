"""The served set and the accuracy floor: what the handler holds, what it may serve, what it refuses.

Runs the TorchServe handler's ``initialize``/``preprocess`` on a stand-in context (no Java, a few
seconds), the policy under simulated load, and ``build_archive``'s checks.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from dnnshifter_lightning.serve.policy import LoadPolicy
from dnnshifter_lightning.portfolio import write_manifest
from dnnshifter_lightning.serve.runtime import PortfolioRuntime
from dnnshifter_lightning.serve.served import resolve_served_set
from dnnshifter_lightning.serve.defaults import PIN_HEADER
from dnnshifter_lightning.serve.torchserve import ServingError, build_archive
from serve_fixtures import build_test_portfolio, digits_samples, json_body
from test_policy import PROFILES, FakeClock, poisson, simulate

# level_01 is slower than level_02 and less accurate: dominated, so off the front
ACCURACIES = (0.97, 0.90, 0.93)


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("served") / "portfolio"
    manifest = build_test_portfolio(path, widths=(32, 16, 8), accuracies=ACCURACIES)  # small: a fast start
    b8 = {v["id"]: v["latency_ms"]["8"] for v in manifest["variants"]}
    assert b8["level_02"] < b8["level_01"], b8  # the widths' costs differ ~10x, so this holds
    return path


class _Context:
    """The parts of TorchServe's Context the handler uses."""

    def __init__(self, model_dir: Path, handler_options: dict, pins: dict[int, str] | None = None) -> None:
        self.system_properties = {"model_dir": str(model_dir), "batch_size": 8}
        self.model_yaml_config = {"maxBatchDelay": 5, "handler": {"profile_batch_sizes": [1], **handler_options}}
        self.metrics = None
        self._pins = pins or {}

    def get_all_request_header(self, idx: int) -> dict:
        return {PIN_HEADER: self._pins[idx]} if idx in self._pins else {}


def _handler(portfolio: Path, **options):
    from dnnshifter_lightning.serve.handler import PortfolioHandler

    handler = PortfolioHandler()
    ctx = _Context(portfolio.parent, {"portfolio_dir": portfolio.name, **options})
    handler.initialize(ctx)
    handler.context = ctx
    return handler


def test_default_served_set_is_the_front_and_dominated_variants_are_not_resident(portfolio, caplog):
    caplog.set_level(logging.INFO)
    handler = _handler(portfolio)
    assert handler.runtime.variant_ids == ["level_00", "level_02"]
    assert handler.policy.variant_ids == ["level_00", "level_02"]
    assert handler.runtime.portfolio_ids == ["level_00", "level_02", "level_01"]
    with pytest.raises(ValueError, match="not served"):  # level_01 was never loaded
        handler.runtime.variant_memory("level_01")
    served = json.loads(caplog.text.split("DNNSHIFTER_SERVED ", 1)[1].splitlines()[0])
    assert served["dominated"] == ["level_01"] and served["floor"] == pytest.approx(0.9 * 0.97)
    memory = json.loads(caplog.text.split("DNNSHIFTER_MEMORY ", 1)[1].splitlines()[0])
    whole = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    assert memory["served_all_inflated_bytes"] == handler.runtime.all_inflated_bytes() < whole.all_inflated_bytes()
    assert memory["total_bytes"] == handler.runtime.resident_bytes() < memory["served_all_inflated_bytes"] + \
        memory["compressed_bytes"]
    # a pin to the dominated variant is a clear 400; the served ones still answer
    x, _ = digits_samples(2)
    handler.context._pins = {0: "level_01", 1: "level_02"}
    items = handler.preprocess([{"body": json_body(x[0])}, {"body": json_body(x[1])}])
    assert items[0][0]["status"] == 400 and "not served" in items[0][0]["error"]
    out = handler.inference(items)
    assert out[1][0] == "level_02"
    with pytest.raises(ValueError, match="not served"):
        handler.runtime.infer(x[:1], "level_01")


def test_variants_all_and_ids_choose_the_served_set(portfolio):
    assert _handler(portfolio, variants="all").runtime.variant_ids == ["level_00", "level_02", "level_01"]
    assert _handler(portfolio, variants=["level_01", "level_02"]).runtime.variant_ids == ["level_02", "level_01"]


def test_archive_records_and_validates_the_served_set(portfolio, tmp_path):
    def handler_options(mar: Path) -> dict:
        with zipfile.ZipFile(mar) as z:
            name = next(n for n in z.namelist() if n.endswith("model-config.yaml"))
            return yaml.safe_load(z.read(name))["handler"]

    assert handler_options(build_archive(portfolio, "front", tmp_path))["variants"] == "front"
    assert handler_options(build_archive(portfolio, "all", tmp_path, variants="all"))["variants"] == "all"
    mar = build_archive(portfolio, "ids", tmp_path, variants="level_00,level_01")
    assert handler_options(mar)["variants"] == "level_00,level_01"
    with pytest.raises(ServingError, match=r"no variant \['nope'\].*valid ids: \['level_00', 'level_02', 'level_01'\]"):
        build_archive(portfolio, "bad", tmp_path, variants="level_00,nope")
    with pytest.raises(ServingError, match="below the accuracy floor"):
        build_archive(portfolio, "bad", tmp_path, variants="level_01", config={"handler": {"min_accuracy": 0.95}})
    assert not (tmp_path / "bad.mar").exists()


def test_floor_never_serves_a_below_floor_variant_under_a_burst():
    # v3 is the cheapest and the only one that keeps up with the burst, but it diverged (10%)
    accuracies = {"v0": 0.97, "v1": 0.96, "v2": 0.95, "v3": 0.10}
    variants = [{"id": v, "accuracy": accuracies[v], "latency_ms": {"8": 1000 * p[8]}} for v, p in PROFILES.items()]
    arrivals = poisson(lambda t: 20.0 if t < 5 else 2400.0, 15.0, seed=3)  # v2 saturates at ~1600/s

    def run(min_accuracy):
        served = resolve_served_set(variants, min_accuracy=min_accuracy)
        clock = FakeClock()
        policy = LoadPolicy(list(served.ids), PROFILES, clock=clock, max_batch_size=8, max_batch_delay_ms=0.0)
        return served, simulate(policy, clock, arrivals)

    served, result = run(None)  # the default floor: 0.9 x 97%
    assert served.below_floor == ("v3",) and "v3" not in served.ids
    assert "v3" not in result.served_by and result.variant_at(14.0) == "v2"  # stepped down, to v2 at most
    _, unfloored = run(0.0)  # the same burst with the floor off does serve the garbage variant
    assert "v3" in unfloored.served_by
    with pytest.raises(ValueError, match="below the accuracy floor"):
        resolve_served_set(variants, fixed_variant="v3")
    with pytest.raises(ValueError, match="min_accuracy must be"):
        resolve_served_set(variants, min_accuracy=97)  # a percentage, not a fraction
    assert resolve_served_set(variants, min_accuracy=0.955).ids == ("v0", "v1")


def test_portfolio_without_accuracies_is_served_whole_with_a_warning(portfolio, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "portfolio"
    shutil.copytree(portfolio, path)
    manifest = json.loads((path / "manifest.json").read_text())
    for v in manifest["variants"]:
        v["accuracy"] = None  # as a portfolio built without validation data
    write_manifest(path, manifest)
    handler = _handler(path)
    assert handler.runtime.variant_ids == ["level_00", "level_02", "level_01"]  # all, in the manifest's order
    assert handler.served.floor is None and not handler.served.measured
    warning = [r for r in caplog.records if "DNNSHIFTER_WARNING" in r.getMessage()]
    assert warning and warning[0].levelno == logging.WARNING
    assert "no variant has a measured accuracy" in warning[0].getMessage()
    assert "floor off" in warning[0].getMessage()


def test_partly_measured_portfolio_leaves_unmeasured_variants_out(portfolio, tmp_path):
    manifest = json.loads((portfolio / "manifest.json").read_text())
    manifest["variants"][1]["accuracy"] = None  # level_02
    served = resolve_served_set(manifest["variants"])
    assert served.ids == ("level_00", "level_01") and served.unmeasured == ("level_02",)
    assert "no measured accuracy" in served.warnings[0]
    assert resolve_served_set(manifest["variants"], ["level_00", "level_02"]).ids == ("level_00", "level_02")


def test_parse_selection_and_unknown_ids():
    from dnnshifter_lightning.serve.served import parse_selection
    assert parse_selection(None) == "front" and parse_selection(" all ") == "all"
    assert parse_selection("level_00, level_05") == ["level_00", "level_05"] and parse_selection(["a"]) == ["a"]
    for bad in ("", ",", [], [3]):
        with pytest.raises(ValueError, match="variants must be 'front', 'all' or a list of variant ids"):
            parse_selection(bad)
    vs = [{"id": "a", "accuracy": 0.9, "latency_ms": {"8": 5.0}}, {"id": "b", "accuracy": 0.3, "latency_ms": {"8": 1.0}}]
    with pytest.raises(ValueError, match=r"no variant \['c'\] in this portfolio; valid ids: \['a', 'b'\]"):
        resolve_served_set(vs, ["a", "c"])
    with pytest.raises(ValueError, match=r"variant 'b' \(accuracy 30.0%\) is below the accuracy floor 81.0%"):
        resolve_served_set(vs, ["b"])
