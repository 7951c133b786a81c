"""LitServe API that hosts a whole DNNShifter portfolio and switches variants as load changes.

The same contract as the TorchServe handler, through the same code
(:mod:`dnnshifter_lightning.serve.core`): ``POST /predict`` takes PNG/JPEG bytes or JSON
``{"data": <one input without the batch dim>}`` and answers ``{"label", "scores", "variant"}``;
a bad request gets a 4xx ``{"error": ..., "code": ...}`` while the rest of its batch is answered;
the header ``X-DNNShifter-Variant: <id>`` pins a variant for one request. Options are the TorchServe
handler's (``serve.defaults.DEFAULT_MODEL_CONFIG["handler"]``), with the same defaults and validation.

Batching is LitServe's (``max_batch_size``, ``batch_timeout`` in seconds); auth belongs to the
``LitServer``. The policy reads, per batch: its size, its service time (first request decoded to
last output), the mean queue delay of its requests (arrival at the HTTP endpoint to decoding) and
the arrival time of its first request, which TorchServe does not expose: with it, the time the
worker spent between batches while a request was already waiting counts as busy, exactly, instead
of being guessed from gaps and full batches (see docs/policy.md).

Each worker (``workers_per_device``) holds its own runtime and policy. ``setup(device)`` opens the
runtime on LitServe's device for that worker: the active variant is inflated there, the compressed
ones stay in host memory. With ``litserve.LitServer(..., loggers=PortfolioMetricsLogger())``
(:mod:`dnnshifter_lightning.serve.litserve_metrics`) each worker reports its setup, switches and requests
per variant, served as Prometheus metrics on ``/metrics``.

Example::

    import litserve
    from dnnshifter_lightning import PortfolioLitAPI

    api = PortfolioLitAPI("portfolio", max_batch_size=8, batch_timeout=0.005, slo_ms=50)
    litserve.LitServer(api, accelerator="cpu").run(host="127.0.0.1", port=8000)
"""

# no ``from __future__ import annotations``: LitServe reads decode_request's annotation as an object
import collections
import logging
import os
import time
from typing import Annotated, Any

import litserve as ls
from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from dnnshifter_lightning.portfolio import read_manifest
from dnnshifter_lightning.serve import core
from dnnshifter_lightning.serve.defaults import INITIAL_SWITCH_REASON
from dnnshifter_lightning.serve.served import resolve_served_set
from dnnshifter_lightning.serve.litserve_metrics import METRICS_KEY

logger = logging.getLogger(__name__)

__all__ = ["PortfolioLitAPI"]


async def _read_request(request: Request) -> dict:
    """The raw body, the headers and the arrival time: LitServe would otherwise parse JSON only."""
    return {"body": await request.body(), "headers": {k.lower(): v for k, v in request.headers.items()},
            "arrival": time.monotonic()}


RawRequest = Annotated[dict, Depends(_read_request)]


class PortfolioLitAPI(ls.LitAPI):
    """Serves the portfolio in ``portfolio_dir``; ``options`` are the TorchServe handler's.

    Options are checked here, in the process that builds the server (the policy settings, the
    served set against the manifest), so a mistake fails before any worker starts:

    >>> PortfolioLitAPI("no_such_dir")
    Traceback (most recent call last):
        ...
    dnnshifter_lightning.portfolio.PortfolioError: no_such_dir/manifest.json: cannot read manifest (...)
    """

    def __init__(self, portfolio_dir: str | os.PathLike, *, max_batch_size: int = 8, batch_timeout: float = 0.005,
                 api_path: str = "/predict", **options: Any):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.portfolio_dir = str(portfolio_dir)
        core.check_options(options, extra={})  # batching is max_batch_size / batch_timeout above
        self.options = opts = core.default_options(options)
        core.policy_config(opts)  # ValueError now, not in a worker
        fixed = opts.get("fixed_variant") or (opts.get("policy") or {}).get("fixed_variant")
        resolve_served_set(read_manifest(self.portfolio_dir)["variants"], opts.get("variants"),
                           opts.get("min_accuracy"), fixed)
        self.pin_header = str(opts["pin_header"]).lower()
        self._batch_start: float | None = None  # when the current batch's first request was decoded

    def setup(self, device) -> None:
        opts = self.options
        self.device = "cpu" if device in (None, "None") else str(device)
        self.served, self.runtime = core.open_runtime(self.portfolio_dir, opts, device=self.device)
        core.set_torch_threads(opts)
        self.parser = core.RequestParser(self.runtime.manifest["input_spec"], opts)
        self.policy = core.build_policy(self.runtime, opts, self.max_batch_size, self.batch_timeout * 1000.0)
        self.switch_count = 0
        self.worker = os.environ.get("LITSERVE_WORKER_ID", "0")  # set by LitServe in each inference worker
        self._switch(self.policy.active_id, INITIAL_SWITCH_REASON)
        self._report(event="setup", pid=os.getpid(), device=self.device, variants=list(self.runtime.variant_ids),
                     active=self.runtime.active_id, memory=core.memory_report(self.runtime),
                     served=self.served.to_dict())

    def _report(self, **event) -> None:
        """One event for :class:`~dnnshifter_lightning.litserve_metrics.PortfolioMetricsLogger`, if the server has loggers."""
        if self._logger_queue is not None:  # LitAPI.log warns on every call without a logger
            self.log(METRICS_KEY, {"api": self.api_path, "worker": self.worker, **event})

    def _switch(self, vid: str, reason: str):
        record = core.switch(self.runtime, self.policy, vid, reason)
        if record is not None:
            self._report(event="switch", **{"from": record.from_id}, to=record.to_id, seconds=record.seconds,
                         reason=reason, time=record.time)
        return record

    def decode_request(self, request: RawRequest):
        if self._batch_start is None:
            self._batch_start = time.perf_counter()
        item = self.parser.parse(request.get("body"))
        pin = request.get("headers", {}).get(self.pin_header)
        if not isinstance(item, dict):
            item = core.pin_error(pin, self.runtime, self.options["pin_header"]) or item
        now = time.monotonic()  # the system-wide monotonic clock: comparable with the HTTP process's
        arrival = min(now, request.get("arrival", now))
        return item, pin, now - arrival, arrival

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x):
        if not isinstance(x, list):  # max_batch_size=1: LitServe passes the one request as it is
            return self.predict([x])[0]
        start = self._batch_start or time.perf_counter()
        decision = self.policy.choose()
        if decision.variant_id != self.runtime.active_id:
            if self._switch(decision.variant_id, decision.reason) is not None:
                self.switch_count += 1
        results, pinned_n, pinned_s = core.infer_batch(self.runtime, [(item, pin) for item, pin, _, _ in x])
        served = collections.Counter(r[0] for r in results if not isinstance(r, dict))
        if served:
            service = time.perf_counter() - start
            delay = sum(d for _, _, d, _ in x) / len(x)
            self.policy.observe(len(x), service, delay, pinned_requests=pinned_n,
                                pinned_seconds=min(pinned_s, service), first_arrival=min(a for *_, a in x))
            self._report(event="batch", served=dict(served))
        self._batch_start = None
        return results

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        if isinstance(output, dict):
            headers = {"Retry-After": str(output["retry_after"])} if "retry_after" in output else None
            return JSONResponse({"error": output["error"], "code": output["status"]}, status_code=output["status"],
                                headers=headers)
        vid, logits = output
        return core.prediction(vid, logits)
