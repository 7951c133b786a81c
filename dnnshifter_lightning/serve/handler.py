"""TorchServe handler that hosts a whole DNNShifter portfolio and switches variants as load changes.

Thin glue: :class:`~dnnshifter_lightning.serve.runtime.PortfolioRuntime` holds the variants (inactive
ones zstd-compressed), :class:`~dnnshifter_lightning.serve.policy.LoadPolicy` picks the variant for each
batch. ``dnnshifter archive`` packs this file, the portfolio (``portfolio/``) and a
``model-config.yaml`` into a ``.mar``; options live under ``handler:`` in that YAML (see
``dnnshifter_lightning.serve.defaults.DEFAULT_MODEL_CONFIG`` for the keys and defaults). Options, the served
set, the policy, request parsing and batch inference live in :mod:`dnnshifter_lightning.serve.core`,
shared with the LitServe API (:class:`dnnshifter_lightning.PortfolioLitAPI`).

Request body: PNG/JPEG bytes, or JSON ``{"data": <one input without the batch dim>}``, at most
``max_body_bytes``; images at most ``max_image_pixels`` (checked on the header before decoding,
see :mod:`dnnshifter_lightning.serve.images`). Response: ``{"label": int, "scores": [...], "variant":
"<id>"}``; a bad request gets a 4xx and ``{"error": "..."}`` while the rest of its batch is served.
A request header ``X-DNNShifter-Variant: <id>`` pins the variant for that request; a pin to a
variant that is not inflated inflates it at most once per ``pin_inflate_interval_s``, and a pin
beyond that budget gets a 429 with ``Retry-After`` (see ``docs/serving.md``).
A header ``X-Request-Start: t=<epoch>`` (as nginx or the load generator stamps it) tells the
handler how long each request waited before the worker saw it: the policy's queue-delay signal,
which TorchServe does not give a handler otherwise.

Each switch is logged as one line ``DNNSHIFTER_SWITCH {json}`` (from, to, reason, switch_ms,
time) in TorchServe's ``model_log.log``; metrics go through ``context.metrics``.

Example (after ``dnnshifter archive portfolio --model-name digits --export-path store``)::

    torchserve --start --model-store store --models digits=digits.mar --disable-token-auth
    curl -X POST http://127.0.0.1:8080/predictions/digits -T digit.png
"""

from __future__ import annotations

import json
from http import HTTPStatus
import logging
import math
import os
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from dnnshifter_lightning.serve import core
from dnnshifter_lightning.serve.defaults import INITIAL_SWITCH_REASON

logger = logging.getLogger(__name__)


def _batch_delay_ms(yaml_cfg: dict) -> float:
    """The archive's ``maxBatchDelay`` (TorchServe's default, 100 ms, when it sets none)."""
    value = yaml_cfg.get("maxBatchDelay", 100)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"maxBatchDelay must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


class PortfolioHandler(BaseHandler):
    """Serves the portfolio packed into the ``.mar``; see the module docstring."""

    def initialize(self, context):
        # Per-batch state that preprocess/inference/postprocess hand on, set here so every step can rely on it
        self._batch_start = time.perf_counter()  # when preprocess of the current batch began
        self._pinned = [0, 0.0]  # requests of the batch that pinned another variant, and the seconds they took
        self._next_signals_log = 0.0  # monotonic time of the next DNNSHIFTER_SIGNALS line
        self._queue_delay = None  # mean queue delay (s) of the current batch's requests, None if unknown
        props = context.system_properties
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.options = opts = core.default_options(yaml_cfg.get("handler") or {})
        root = os.path.join(props.get("model_dir"), opts["portfolio_dir"])
        self.served, self.runtime = core.open_runtime(root, opts)
        self.manifest = self.runtime.manifest
        self._log_memory()
        core.set_torch_threads(opts)
        self.parser = core.RequestParser(self.manifest["input_spec"], opts)
        self.pin_header = str(opts["pin_header"]).lower()
        self.start_header = core.REQUEST_START_HEADER.lower()
        self.switch_count, self.last_switch_ms = 0, math.nan
        try:
            self.policy = core.build_policy(self.runtime, opts, int(props.get("batch_size") or 1),
                                            _batch_delay_ms(yaml_cfg))
        except ValueError as exc:
            logger.error("DNNSHIFTER_REFUSED bad handler options in model-config.yaml: %s", exc)
            raise
        self._switch(self.policy.active_id, INITIAL_SWITCH_REASON)
        self.initialized = True

    def _log_memory(self) -> None:
        """Weights held for the served set (compressed + active) against the same set all inflated."""
        logger.info("DNNSHIFTER_MEMORY %s", json.dumps(core.memory_report(self.runtime)))

    # ------------------------------------------------------------------ batch steps
    def preprocess(self, data):
        self._batch_start = time.perf_counter()
        wall = time.time()
        items, delays = [], []
        for idx, row in enumerate(data):
            headers = {k.lower(): v for k, v in self.context.get_all_request_header(idx).items()
                       if isinstance(v, str)}
            delay = core.queue_delay_s(headers.get(self.start_header), wall)
            if delay is not None:
                delays.append(delay)
            body = row.get("data") if row.get("data") is not None else row.get("body")
            item = self.parser.parse(body)
            pin = headers.get(self.pin_header)
            if not isinstance(item, dict):
                item = core.pin_error(pin, self.runtime, self.options["pin_header"]) or item
            items.append((item, pin))
        # how long this batch's requests waited before the worker saw them, when clients stamp them
        self._queue_delay = sum(delays) / len(delays) if delays else None
        return items

    def inference(self, items, *args, **kwargs):
        decision = self.policy.choose()
        if decision.variant_id != self.runtime.active_id:
            self._switch(decision.variant_id, decision.reason)
        results, pinned_n, pinned_s = core.infer_batch(self.runtime, items)
        self._pinned = [pinned_n, pinned_s]
        return results

    def postprocess(self, results):
        out, per_variant = [], {}
        for idx, res in enumerate(results):
            if isinstance(res, dict):
                self.context.set_response_status(res["status"], HTTPStatus(res["status"]).phrase, idx)
                self.context.set_response_content_type(idx, "application/json")
                if "retry_after" in res:
                    self.context.set_response_header(idx, "Retry-After", str(res["retry_after"]))
                out.append(json.dumps({"error": res["error"], "code": res["status"]}))
                continue
            vid, logits = res
            per_variant[vid] = per_variant.get(vid, 0) + 1
            self.context.set_response_content_type(idx, "application/json")
            out.append(json.dumps(core.prediction(vid, logits)))
        service = time.perf_counter() - self._batch_start
        if per_variant:
            self.policy.observe(len(results), service, self._queue_delay, pinned_requests=self._pinned[0],
                                pinned_seconds=min(self._pinned[1], service))
        self._emit(per_variant)
        self._log_signals()
        return out

    def _log_signals(self) -> None:
        every = float(self.options.get("log_signals_s") or 0)
        now = time.monotonic()
        if every > 0 and now >= self._next_signals_log:
            self._next_signals_log = now + every
            sig = {k: round(v, 4) for k, v in self.policy.signals().items()}
            logger.info("DNNSHIFTER_SIGNALS %s", json.dumps({"active": self.runtime.active_id, **sig}))

    # ------------------------------------------------------------------ switching and metrics
    def _switch(self, vid: str, reason: str) -> None:
        record = core.switch(self.runtime, self.policy, vid, reason)
        if record is None:
            return
        self.switch_count += 1
        self.last_switch_ms = record.seconds * 1000.0

    def _emit(self, per_variant: dict) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            metrics.add_metric("DNNShifterActiveVariantIndex", self.runtime.variant_ids.index(self.runtime.active_id),
                               "count", None, [], MetricTypes.GAUGE)
            metrics.add_metric("DNNShifterSwitches", self.switch_count, "count", None, [], MetricTypes.GAUGE)
            if not math.isnan(self.last_switch_ms):
                metrics.add_metric("DNNShifterLastSwitchMs", self.last_switch_ms, "ms", None, [], MetricTypes.GAUGE)
            metrics.add_metric("DNNShifterResidentBytes", self.runtime.resident_bytes(), "bytes", None, [],
                               MetricTypes.GAUGE)
            metrics.add_metric("DNNShifterAllInflatedBytes", self.runtime.all_inflated_bytes(), "bytes", None, [],
                               MetricTypes.GAUGE)
            for vid, n in per_variant.items():
                metrics.add_metric("DNNShifterRequests", n, "count", None, [Dimension("Variant", vid)],
                                   MetricTypes.COUNTER)
        except Exception:  # metrics must never fail a batch
            logger.warning("emitting metrics failed", exc_info=True)
