"""The TorchServe worker code (``serve/handler.py``) on TorchServe's own ``MockContext``, in-process.

A batch goes in as TorchServe's worker hands it over (``Service.predict``): one input dict per
request (a JSON body already decoded, image bytes as they came), the request headers in a real
``RequestProcessor`` per request, and the worker's metrics cache. No Java, no server: the
real-TorchServe tests (test_serve.py) check the same over HTTP.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("ts")

from ts.context import Context, RequestProcessor  # noqa: E402
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.metrics.metric_type_enum import MetricTypes  # noqa: E402
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext  # noqa: E402

from dnnshifter_lightning.serve.defaults import PIN_HEADER  # noqa: E402
from dnnshifter_lightning.serve.handler import PortfolioHandler  # noqa: E402
from dnnshifter_lightning.serve.runtime import PortfolioRuntime  # noqa: E402
from serve_fixtures import bomb_png, digits_samples, png_body, small_image  # noqa: E402

METRICS_YAML = Path(__import__("ts").__file__).parent / "configs" / "metrics.yaml"


class WorkerContext(MockContext):
    """TorchServe's ``MockContext`` plus the per-request half of ``ts.context.Context`` (request headers
    in, status and headers out), which the worker fills for every batch."""

    get_all_request_header = Context.get_all_request_header
    set_response_status = Context.set_response_status
    set_response_content_type = Context.set_response_content_type
    set_response_header = Context.set_response_header
    get_response_status = Context.get_response_status
    get_response_headers = Context.get_response_headers

    def __init__(self, model_dir: Path, handler_options: dict) -> None:
        super().__init__(model_pt_file=None, model_dir=str(model_dir), model_file=None, model_name="digits")
        self.system_properties["batch_size"] = 8
        self.model_yaml_config = {"maxBatchDelay": 5, "handler": {"profile_batch_sizes": [1], **handler_options}}
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))  # what the worker uses
        self.metrics.initialize_cache()
        self._request_processor = None

    def batch(self, bodies: list, headers: list[dict] | None = None) -> list[dict]:
        """Set up one batch as ``Service.predict`` does; returns the handler's ``data``."""
        headers = headers or [{}] * len(bodies)
        data, processors = [], []
        for body, extra in zip(bodies, headers):
            is_json = isinstance(body, dict)
            data.append({"body": body if is_json else bytearray(body)})
            ctype = "application/json" if is_json else "image/png"
            processors.append(RequestProcessor({"body": {"content-type": ctype}, **extra}))
        self._request_processor = processors
        self.request_ids = {i: f"req-{i}" for i in range(len(bodies))}
        self.metrics.request_ids = self.request_ids
        return data


GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_portfolio"  # two small digit CNNs, prebuilt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mar")  # what TorchServe extracts a .mar into
    shutil.copytree(GOLDEN, root / "portfolio", ignore=shutil.ignore_patterns("expected.json"))
    return root


def _handler(model_dir: Path, **options) -> tuple[PortfolioHandler, WorkerContext]:
    # both variants served (the golden manifest's second one is dominated and below the default floor)
    ctx = WorkerContext(model_dir, {"portfolio_dir": "portfolio", "variants": "all", "min_accuracy": 0, **options})
    handler = PortfolioHandler()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="module")
def served(model_dir):
    return _handler(model_dir)


@pytest.fixture(scope="module")
def local(model_dir) -> PortfolioRuntime:
    return PortfolioRuntime(model_dir / "portfolio", profile_batch_sizes=None)


def _answers(handler, ctx, bodies, headers=None) -> list[tuple[int, dict]]:
    out = handler.handle(ctx.batch(bodies, headers), ctx)
    assert len(out) == len(bodies)
    return [(ctx.get_response_status(i)[0], json.loads(body)) for i, body in enumerate(out)]


def test_initialize_sets_the_state_every_batch_step_reads(served):
    handler, _ = served
    assert {"_batch_start", "_pinned", "_next_signals_log"} <= set(vars(handler))
    assert handler.initialized and handler.runtime.variant_ids == ["w2_seed0", "w2_seed1"]


def test_a_batch_is_answered_as_local_inference_answers_it(served, local, caplog):
    handler, ctx = served
    x, _ = digits_samples(4)
    png, decoded = png_body(x[3])
    with caplog.at_level(logging.WARNING):
        answers = _answers(handler, ctx, [{"data": x[i].tolist()} for i in range(3)] + [png])
    active = handler.runtime.active_id
    logits, _ = local.infer(torch.cat([x[:3], decoded.unsqueeze(0)]), active)
    for i, (status, reply) in enumerate(answers):
        assert status == 200 and reply["variant"] == active, (i, reply)
        assert ctx.get_response_headers(i)["content-type"] == "application/json"
        expected = torch.softmax(logits[i], dim=0)
        assert reply["label"] == int(expected.argmax())
        torch.testing.assert_close(torch.tensor(reply["scores"]), expected, rtol=0, atol=2e-6)
    assert "emitting metrics failed" not in caplog.text
    requests = ctx.metrics.get_metric("DNNShifterRequests", MetricTypes.COUNTER)
    assert "Variant" in requests.dimension_names


def test_bad_requests_get_their_own_4xx_and_the_rest_of_the_batch_is_served(served):
    handler, ctx = served
    x, _ = digits_samples(2)
    bodies = [{"data": x[0].tolist()}, b"", {"data": [1.0, 2.0]}, {"nodata": 1}, small_image("GIF"),
              bomb_png(10_000, 10_000), b"{not json", {"data": x[1].tolist()}]
    answers = _answers(handler, ctx, bodies)
    assert [status for status, _ in answers] == [200, 400, 400, 400, 415, 413, 400, 200]
    for status, reply in answers[1:-1]:
        assert reply["code"] == status and reply["error"], reply
    assert "empty request body" in answers[1][1]["error"] and "pixels" in answers[5][1]["error"]
    assert answers[0][1]["variant"] == answers[-1][1]["variant"] == handler.runtime.active_id


def test_a_pin_serves_its_variant_and_a_pin_to_an_unknown_one_is_a_400(served, local):
    handler, ctx = served
    x, _ = digits_samples(3)
    active = handler.runtime.active_id
    answers = _answers(handler, ctx, [{"data": x[i].tolist()} for i in range(3)],
                       [{PIN_HEADER: "w2_seed1"}, {}, {PIN_HEADER.lower(): "nope"}])
    (s0, r0), (s1, r1), (s2, r2) = answers
    assert s0 == 200 and r0["variant"] == "w2_seed1"
    expected, _ = local.infer(x[:1], "w2_seed1")
    assert r0["label"] == int(expected[0].argmax())
    assert s1 == 200 and r1["variant"] == active
    assert s2 == 400 and "'nope'" in r2["error"] and "unknown" in r2["error"]
    assert handler.runtime.active_id == active  # a pin serves one request; it never switches


def test_a_fixed_variant_is_the_only_one_served_whatever_the_load(model_dir):
    handler, ctx = _handler(model_dir, fixed_variant="w2_seed1")
    x, _ = digits_samples(8)
    assert handler.runtime.active_id == "w2_seed1"
    for _ in range(5):  # full batches back to back: a load that would move an adaptive policy
        answers = _answers(handler, ctx, [{"data": row.tolist()} for row in x])
        assert {(s, r["variant"]) for s, r in answers} == {(200, "w2_seed1")}
    assert handler.runtime.active_id == "w2_seed1" and handler.switch_count == 1  # the initial choice only
