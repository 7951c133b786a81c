"""TorchServe handler that hosts a whole DNNShifter portfolio and switches variants as load changes.

Thin glue: :class:`~dnnshifter_lightning.runtime.PortfolioRuntime` holds the variants (inactive
ones zstd-compressed), :class:`~dnnshifter_lightning.policy.LoadPolicy` picks the variant for each
batch. ``dnnshifter archive`` packs this file, the portfolio (``portfolio/``) and a
``model-config.yaml`` into a ``.mar``; options live under ``handler:`` in that YAML (see
``dnnshifter_lightning.serving.DEFAULT_MODEL_CONFIG`` for the keys and defaults).

Request body: PNG/JPEG bytes, or JSON ``{"data": <one input without the batch dim>}``, at most
``max_body_bytes``; images at most ``max_image_pixels`` (checked on the header before decoding,
see :mod:`dnnshifter_lightning.images`). Response: ``{"label": int, "scores": [...], "variant":
"<id>"}``; a bad request gets a 4xx and ``{"error": "..."}`` while the rest of its batch is served.
A request header ``X-DNNShifter-Variant: <id>`` pins the variant for that request; a pin to a
variant that is not inflated inflates it at most once per ``pin_inflate_interval_s``, and a pin
beyond that budget gets a 429 with ``Retry-After`` (see ``docs/serving.md``).

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

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from dnnshifter_lightning.images import ImageRejected, decode_image, install_bomb_guard
from dnnshifter_lightning.policy import LoadPolicy, PolicyConfig, profiles_from_manifest
from dnnshifter_lightning.portfolio import read_manifest
from dnnshifter_lightning.runtime import PinThrottled, PortfolioRuntime, SwitchError
from dnnshifter_lightning.served import resolve_served_set
from dnnshifter_lightning.serving import INITIAL_SWITCH_REASON, default_model_config

logger = logging.getLogger(__name__)


def _bad(status: int, message: str) -> dict:
    return {"status": status, "error": message}


def _batch_delay_ms(yaml_cfg: dict) -> float:
    """The archive's ``maxBatchDelay`` (TorchServe's default, 100 ms, when it sets none)."""
    value = yaml_cfg.get("maxBatchDelay", 100)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"maxBatchDelay must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


class PortfolioHandler(BaseHandler):
    """Serves the portfolio packed into the ``.mar``; see the module docstring."""

    def initialize(self, context):
        props = context.system_properties
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.options = opts = default_model_config({"handler": yaml_cfg.get("handler") or {}})["handler"]
        root = os.path.join(props.get("model_dir"), opts["portfolio_dir"])
        try:  # which variants to hold: the front above the accuracy floor, by default
            fixed = opts.get("fixed_variant") or (opts.get("policy") or {}).get("fixed_variant")
            served = resolve_served_set(read_manifest(root)["variants"], opts.get("variants"),
                                        opts.get("min_accuracy"), fixed)
        except Exception as exc:
            logger.error("DNNSHIFTER_REFUSED portfolio %s cannot be served: %s", root, exc)
            raise
        logger.info("DNNSHIFTER_SERVED %s", json.dumps(served.to_dict()))
        for warning in served.warnings:
            logger.warning("DNNSHIFTER_WARNING %s", warning)
        try:  # checks every file's sha256 and loads every served variant once
            self.runtime = PortfolioRuntime(root, memory_budget_mb=opts["memory_budget_mb"], profile_batch_sizes=None,
                                            pin_inflate_interval_s=float(opts["pin_inflate_interval_s"]),
                                            variants=list(served.ids))
            self.manifest = self.runtime.manifest
        except Exception as exc:
            logger.error("DNNSHIFTER_REFUSED portfolio %s cannot be served: %s", root, exc)
            raise
        self.served = served
        self._log_memory()
        threads = opts.get("torch_threads")
        if threads == "auto":  # leave half the cores to TorchServe's frontend and the clients
            threads = max(1, (os.cpu_count() or 2) // 2)
        if threads:
            torch.set_num_threads(int(threads))
        spec = self.manifest["input_spec"]
        self.shape = list(spec["shape"])
        self.mean = torch.tensor(spec.get("mean") or [0.0]).view(-1, 1, 1)
        self.std = torch.tensor(spec.get("std") or [1.0]).view(-1, 1, 1)
        self.color = spec.get("color") or {1: "L", 3: "RGB", 4: "RGBA"}.get(self.shape[0], "L")
        self.pin_header = str(opts["pin_header"]).lower()
        self.max_body_bytes = int(opts["max_body_bytes"])
        self.max_image_pixels = int(opts["max_image_pixels"])
        install_bomb_guard(self.max_image_pixels)
        self.switch_count, self.last_switch_ms = 0, math.nan
        try:
            config = self._policy_config()
            # the policy moves along the served set (the runtime holds nothing else), most accurate first
            candidates = self.runtime.variant_ids
            logger.info("DNNSHIFTER_CANDIDATES %s of %s", json.dumps(candidates), json.dumps(self.runtime.portfolio_ids))
            self.policy = LoadPolicy(candidates, self._profiles(props), config=config,
                                     max_batch_size=int(props.get("batch_size") or 1),
                                     max_batch_delay_ms=_batch_delay_ms(yaml_cfg))
        except ValueError as exc:
            logger.error("DNNSHIFTER_REFUSED bad handler options in model-config.yaml: %s", exc)
            raise
        self._switch(self.policy.active_id, INITIAL_SWITCH_REASON)
        self.initialized = True

    def _log_memory(self) -> None:
        """Weights held for the served set (compressed + active) against the same set all inflated."""
        rt = self.runtime
        raw = {v["id"]: v.get("bytes_raw") for v in self.manifest["variants"]}
        report = {"served": len(rt.variant_ids), "portfolio": len(rt.portfolio_ids),
                  **{f"{k}_bytes": v for k, v in rt.resident_breakdown().items()},
                  "served_all_inflated_bytes": rt.all_inflated_bytes(),
                  "portfolio_file_bytes_raw": sum(b for b in raw.values() if isinstance(b, int))}
        logger.info("DNNSHIFTER_MEMORY %s", json.dumps(report))

    def _policy_config(self) -> PolicyConfig:
        opts = self.options
        merged = dict(opts.get("policy") or {})
        for key in ("slo_ms", "fixed_variant"):
            if opts.get(key) is not None:
                merged[key] = opts[key]
        return PolicyConfig.from_dict(merged)

    def _profiles(self, props) -> dict:
        sizes = sorted({1, int(props.get("batch_size") or 1), *self.options["profile_batch_sizes"]})
        if sizes[-1] < 2:
            sizes.append(2)
        try:
            start = time.perf_counter()
            profiles = self.runtime.measure_profiles(batch_sizes=sizes)
            logger.info("DNNSHIFTER_PROFILES measured in %.2f s on this machine: %s",
                        time.perf_counter() - start, json.dumps(profiles))
            return profiles
        except Exception:  # the build-time figures still let the policy work
            logger.warning("measuring latency profiles failed; using the manifest's", exc_info=True)
            return profiles_from_manifest(self.manifest)

    # ------------------------------------------------------------------ per request
    def _tensor(self, body) -> torch.Tensor | dict:
        try:
            return self._parse(body)
        except Exception as exc:  # noqa: BLE001 - whatever a body does, only its own request fails
            return _bad(400, f"cannot read request: {exc.__class__.__name__}: {exc}")

    def _parse(self, body) -> torch.Tensor | dict:
        if isinstance(body, (bytes, bytearray, str)) and len(body) > self.max_body_bytes:
            return _bad(413, f"request body is {len(body):,} bytes; the limit is {self.max_body_bytes:,}")
        if isinstance(body, (bytes, bytearray)):
            if not body:
                return _bad(400, "empty request body")
            stripped = bytes(body[:64]).lstrip()
            if stripped[:1] in (b"{", b"["):
                try:
                    body = json.loads(bytes(body))
                except (ValueError, UnicodeDecodeError) as exc:
                    return _bad(400, f"malformed JSON: {exc}")
            else:
                return self._image(bytes(body))
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError as exc:
                return _bad(400, f"malformed JSON: {exc}")
        if not isinstance(body, dict) or "data" not in body:
            return _bad(400, 'JSON body must be an object {"data": <one input without batch dim>}')
        return self._from_list(body["data"])

    def _from_list(self, data) -> torch.Tensor | dict:
        try:
            x = torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            return _bad(400, f"data is not a rectangular list of numbers: {exc}")
        if list(x.shape) != self.shape:
            return _bad(400, f"data has shape {list(x.shape)}, expected {self.shape} (one input, no batch dim)")
        if not torch.isfinite(x).all():
            return _bad(400, "data contains NaN or infinity")
        return x

    def _image(self, raw: bytes) -> torch.Tensor | dict:
        try:
            x = decode_image(raw, size=(self.shape[-1], self.shape[-2]), mode=self.color,
                             max_pixels=self.max_image_pixels)
        except ImageRejected as exc:
            hint = ' (the body is not JSON {"data": ...} either)' if exc.status == 415 else ""
            return _bad(exc.status, f"{exc}{hint}")
        if list(x.shape) != self.shape:
            return _bad(400, f"image gives shape {list(x.shape)}, expected {self.shape}")
        return (x - self.mean) / self.std

    # ------------------------------------------------------------------ batch steps
    def preprocess(self, data):
        self._batch_start = time.perf_counter()
        items = []
        for idx, row in enumerate(data):
            headers = {k.lower(): v for k, v in self.context.get_all_request_header(idx).items()
                       if isinstance(v, str)}
            body = row.get("data") if row.get("data") is not None else row.get("body")
            item = self._tensor(body if body is not None else b"")
            pin = headers.get(self.pin_header)
            if pin is not None and pin not in self.runtime.variant_ids and not isinstance(item, dict):
                why = ("is in the portfolio but not served here (dominated, below the accuracy floor or not "
                       "listed in `variants`)" if pin in self.runtime.portfolio_ids else "is unknown")
                item = _bad(400, f"variant {pin!r} in {self.options['pin_header']} {why}; "
                                 f"choose one of the served variants {self.runtime.variant_ids}")
            items.append((item, pin))
        return items

    def inference(self, items, *args, **kwargs):
        decision = self.policy.choose()
        if decision.variant_id != self.runtime.active_id:
            self._switch(decision.variant_id, decision.reason)
        groups: dict[str, list[int]] = {}
        for idx, (item, pin) in enumerate(items):
            if not isinstance(item, dict):
                groups.setdefault(pin or self.runtime.active_id, []).append(idx)
        results: list = [item for item, _ in items]
        self._pinned = [0, 0.0]  # requests that pinned another variant, and the seconds they took
        with torch.inference_mode():
            for vid, idxs in groups.items():
                start = time.perf_counter()
                try:
                    logits, vid = self.runtime.infer(torch.stack([items[i][0] for i in idxs]), vid)
                except PinThrottled as exc:  # over the pin-inflate budget: these requests only
                    for i in idxs:
                        results[i] = dict(_bad(429, str(exc)), retry_after=max(1, math.ceil(exc.retry_after_s)))
                    continue
                for i, row in zip(idxs, logits.float()):
                    results[i] = (vid, row)
                if vid != self.runtime.active_id:
                    self._pinned[0] += len(idxs)
                    self._pinned[1] += time.perf_counter() - start
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
            scores = torch.softmax(logits, dim=0)
            per_variant[vid] = per_variant.get(vid, 0) + 1
            self.context.set_response_content_type(idx, "application/json")
            out.append(json.dumps({"label": int(scores.argmax()), "scores": [round(float(s), 6) for s in scores],
                                   "variant": vid}))
        service = time.perf_counter() - self._batch_start
        if per_variant:
            self.policy.observe(len(results), service, pinned_requests=self._pinned[0],
                                pinned_seconds=min(self._pinned[1], service))
        self._emit(per_variant)
        self._log_signals()
        return out

    def _log_signals(self) -> None:
        every = float(self.options.get("log_signals_s") or 0)
        now = time.monotonic()
        if every > 0 and now >= getattr(self, "_next_signals_log", 0.0):
            self._next_signals_log = now + every
            sig = {k: round(v, 4) for k, v in self.policy.signals().items()}
            logger.info("DNNSHIFTER_SIGNALS %s", json.dumps({"active": self.runtime.active_id, **sig}))

    # ------------------------------------------------------------------ switching and metrics
    def _switch(self, vid: str, reason: str) -> None:
        try:
            record = self.runtime.switch_to(vid, reason)
        except SwitchError as exc:  # the runtime kept the previous variant and logged why
            logger.error("DNNSHIFTER_SWITCH_FAILED %s", exc)
            self.policy.sync(self.runtime.active_id)
            return
        if record is None:
            return
        self.switch_count += 1
        self.last_switch_ms = record.seconds * 1000.0
        logger.info("DNNSHIFTER_SWITCH %s", json.dumps({"time": record.time, "from": record.from_id, "to": record.to_id,
                                                        "reason": reason, "switch_ms": round(self.last_switch_ms, 3)}))

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
