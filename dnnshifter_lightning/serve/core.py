"""What every server adapter shares: options, the served runtime and policy, and request parsing.

The TorchServe handler (:mod:`dnnshifter_lightning.serve.handler`) and the LitServe API
(:mod:`dnnshifter_lightning.serve.litserve`) are thin glue over this module, so both take the same
options with the same defaults and validation (``serve.defaults.DEFAULT_MODEL_CONFIG["handler"]``), serve
the same set, build the same :class:`~dnnshifter_lightning.serve.policy.LoadPolicy` and answer the same
request the same way. Imports neither ``ts`` nor ``litserve``.

A request is parsed to a tensor of the manifest's input shape, or to ``{"status": 4xx, "error":
"..."}`` for that request alone:

    >>> import torch
    >>> parser = RequestParser({"shape": [1, 2, 2]}, default_options())
    >>> parser.parse(b'{"data": [[[0, 1], [2, 3]]]}').shape
    torch.Size([1, 2, 2])
    >>> parser.parse(b'{"data": [1, 2]}')["status"]
    400
    >>> parser.parse(b"")["error"]
    'empty request body'
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import torch

from dnnshifter_lightning.portfolio import profiles_from_manifest, read_manifest
from dnnshifter_lightning.serve.defaults import default_model_config
from dnnshifter_lightning.serve.images import ImageRejected, decode_image, install_bomb_guard
from dnnshifter_lightning.serve.policy import LoadPolicy, PolicyConfig
from dnnshifter_lightning.serve.runtime import PinThrottled, PortfolioRuntime, SwitchError
from dnnshifter_lightning.serve.served import ServedSet, resolve_served_set

logger = logging.getLogger(__name__)


def bad(status: int, message: str) -> dict:
    """The result of a request that fails on its own: its HTTP status and a message."""
    return {"status": status, "error": message}


def default_options(overrides: Mapping[str, Any] | None = None) -> dict:
    """The handler options (``model-config.yaml``'s ``handler:`` section) merged over the defaults."""
    return default_model_config({"handler": dict(overrides or {})})["handler"]


def policy_config(opts: Mapping[str, Any]) -> PolicyConfig:
    """``opts["policy"]`` with the top-level ``slo_ms`` and ``fixed_variant`` merged in, validated."""
    merged = dict(opts.get("policy") or {})
    for key in ("slo_ms", "fixed_variant"):
        if opts.get(key) is not None:
            merged[key] = opts[key]
    return PolicyConfig.from_dict(merged)


def open_runtime(root: str | os.PathLike, opts: Mapping[str, Any]) -> tuple[ServedSet, PortfolioRuntime]:
    """Resolve the served set (the front above the accuracy floor by default) and open the runtime.

    Logs ``DNNSHIFTER_REFUSED`` and re-raises when the portfolio cannot be served."""
    root = str(root)
    try:
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
        runtime = PortfolioRuntime(root, memory_budget_mb=opts["memory_budget_mb"], profile_batch_sizes=None,
                                   pin_inflate_interval_s=float(opts["pin_inflate_interval_s"]),
                                   variants=list(served.ids))
    except Exception as exc:
        logger.error("DNNSHIFTER_REFUSED portfolio %s cannot be served: %s", root, exc)
        raise
    return served, runtime


def set_torch_threads(opts: Mapping[str, Any]) -> None:
    """``torch_threads``: ``"auto"`` leaves half the cores to the server's frontend and the clients."""
    threads = opts.get("torch_threads")
    if threads == "auto":
        threads = max(1, (os.cpu_count() or 2) // 2)
    if threads:
        torch.set_num_threads(int(threads))


def measure_profiles(runtime: PortfolioRuntime, opts: Mapping[str, Any], max_batch_size: int) -> dict:
    """Latency profiles measured on this machine; the manifest's build-time figures if that fails."""
    sizes = sorted({1, int(max_batch_size), *opts["profile_batch_sizes"]})
    if sizes[-1] < 2:
        sizes.append(2)
    try:
        start = time.perf_counter()
        profiles = runtime.measure_profiles(batch_sizes=sizes)
        logger.info("DNNSHIFTER_PROFILES measured in %.2f s on this machine: %s",
                    time.perf_counter() - start, json.dumps(profiles))
        return profiles
    except Exception:  # the build-time figures still let the policy work
        logger.warning("measuring latency profiles failed; using the manifest's", exc_info=True)
        return profiles_from_manifest(runtime.manifest)


def build_policy(runtime: PortfolioRuntime, opts: Mapping[str, Any], max_batch_size: int,
                 max_batch_delay_ms: float) -> LoadPolicy:
    """The policy over the served set (most accurate first); ``ValueError`` on bad options."""
    config = policy_config(opts)
    candidates = runtime.variant_ids
    logger.info("DNNSHIFTER_CANDIDATES %s of %s", json.dumps(candidates), json.dumps(runtime.portfolio_ids))
    return LoadPolicy(candidates, measure_profiles(runtime, opts, max_batch_size), config=config,
                      max_batch_size=int(max_batch_size), max_batch_delay_ms=float(max_batch_delay_ms))


def pin_error(pin: str | None, runtime: PortfolioRuntime, header: str) -> dict | None:
    """A 400 for a pin header naming a variant that is not served here, else ``None``."""
    if pin is None or pin in runtime.variant_ids:
        return None
    why = ("is in the portfolio but not served here (dominated, below the accuracy floor or not "
           "listed in `variants`)" if pin in runtime.portfolio_ids else "is unknown")
    return bad(400, f"variant {pin!r} in {header} {why}; choose one of the served variants {runtime.variant_ids}")


def prediction(vid: str, logits: torch.Tensor) -> dict:
    """The response body of one answered request."""
    scores = torch.softmax(logits.float(), dim=0)
    return {"label": int(scores.argmax()), "scores": [round(float(s), 6) for s in scores], "variant": vid}


def switch(runtime: PortfolioRuntime, policy: LoadPolicy, vid: str, reason: str):
    """Make ``vid`` active; logs ``DNNSHIFTER_SWITCH {json}`` and returns the runtime's record
    (``None`` when nothing changed). On a failed switch the runtime keeps the previous variant and
    the policy is told so."""
    try:
        record = runtime.switch_to(vid, reason)
    except SwitchError as exc:  # the runtime kept the previous variant and logged why
        logger.error("DNNSHIFTER_SWITCH_FAILED %s", exc)
        policy.sync(runtime.active_id)
        return None
    if record is not None:
        logger.info("DNNSHIFTER_SWITCH %s", json.dumps({"time": record.time, "from": record.from_id, "to": record.to_id,
                                                        "reason": reason, "switch_ms": round(record.seconds * 1e3, 3)}))
    return record


def infer_batch(runtime: PortfolioRuntime, items: list) -> tuple[list, int, float]:
    """Run one batch of ``(input tensor or bad dict, pin or None)`` on the runtime.

    Requests are grouped by variant (the pinned one, or the active one); each answered request gets
    ``(variant_id, logits)``, a bad one keeps its dict, and a pin over the inflate budget gets a 429
    with ``retry_after``. Also returns how many requests ran on a variant other than the active
    one and the seconds they took (the policy counts them as load, not as evidence)."""
    groups: dict[str, list[int]] = {}
    for idx, (item, pin) in enumerate(items):
        if not isinstance(item, dict):
            groups.setdefault(pin or runtime.active_id, []).append(idx)
    results: list = [item for item, _ in items]
    pinned_n, pinned_s = 0, 0.0
    with torch.inference_mode():
        for vid, idxs in groups.items():
            start = time.perf_counter()
            try:
                logits, vid = runtime.infer(torch.stack([items[i][0] for i in idxs]), vid)
            except PinThrottled as exc:  # over the pin-inflate budget: these requests only
                for i in idxs:
                    results[i] = dict(bad(429, str(exc)), retry_after=max(1, math.ceil(exc.retry_after_s)))
                continue
            for i, row in zip(idxs, logits.float()):
                results[i] = (vid, row)
            if vid != runtime.active_id:
                pinned_n += len(idxs)
                pinned_s += time.perf_counter() - start
    return results, pinned_n, pinned_s


class RequestParser:
    """Turns one request body into an input tensor or a :func:`bad` result; never raises.

    ``spec`` is the manifest's ``input_spec``; ``opts`` the handler options (``max_body_bytes``,
    ``max_image_pixels``). Images (PNG/JPEG) are decoded through :mod:`dnnshifter_lightning.serve.images`
    and normalised with the spec's mean/std; JSON ``{"data": ...}`` is taken as it is.

    >>> parser = RequestParser({"shape": [1, 2, 2]}, default_options())
    >>> parser.parse(b'{"data": [[[0, 1], [2, NaN]]]}')
    {'status': 400, 'error': 'data contains NaN or infinity'}
    >>> parser.parse(b"GIF89a...")["status"]
    415
    """

    def __init__(self, spec: Mapping[str, Any], opts: Mapping[str, Any]):
        self.shape = list(spec["shape"])
        self.mean = torch.tensor(spec.get("mean") or [0.0]).view(-1, 1, 1)
        self.std = torch.tensor(spec.get("std") or [1.0]).view(-1, 1, 1)
        self.color = spec.get("color") or {1: "L", 3: "RGB", 4: "RGBA"}.get(self.shape[0], "L")
        self.max_body_bytes = int(opts["max_body_bytes"])
        self.max_image_pixels = int(opts["max_image_pixels"])
        install_bomb_guard(self.max_image_pixels)

    def parse(self, body) -> torch.Tensor | dict:
        try:
            return self._parse(body)
        except Exception as exc:  # noqa: BLE001 - whatever a body does, only its own request fails
            return bad(400, f"cannot read request: {exc.__class__.__name__}: {exc}")

    def _parse(self, body) -> torch.Tensor | dict:
        if body is None:
            body = b""
        if isinstance(body, (bytes, bytearray, str)) and len(body) > self.max_body_bytes:
            return bad(413, f"request body is {len(body):,} bytes; the limit is {self.max_body_bytes:,}")
        if isinstance(body, (bytes, bytearray)):
            if not body:
                return bad(400, "empty request body")
            stripped = bytes(body[:64]).lstrip()
            if stripped[:1] in (b"{", b"["):
                try:
                    body = json.loads(bytes(body))
                except (ValueError, UnicodeDecodeError) as exc:
                    return bad(400, f"malformed JSON: {exc}")
            else:
                return self._image(bytes(body))
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError as exc:
                return bad(400, f"malformed JSON: {exc}")
        if not isinstance(body, dict) or "data" not in body:
            return bad(400, 'JSON body must be an object {"data": <one input without batch dim>}')
        return self._from_list(body["data"])

    def _from_list(self, data) -> torch.Tensor | dict:
        try:
            x = torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            return bad(400, f"data is not a rectangular list of numbers: {exc}")
        if list(x.shape) != self.shape:
            return bad(400, f"data has shape {list(x.shape)}, expected {self.shape} (one input, no batch dim)")
        if not torch.isfinite(x).all():
            return bad(400, "data contains NaN or infinity")
        return x

    def _image(self, raw: bytes) -> torch.Tensor | dict:
        try:
            x = decode_image(raw, size=(self.shape[-1], self.shape[-2]), mode=self.color,
                             max_pixels=self.max_image_pixels)
        except ImageRejected as exc:
            hint = ' (the body is not JSON {"data": ...} either)' if exc.status == 415 else ""
            return bad(exc.status, f"{exc}{hint}")
        if list(x.shape) != self.shape:
            return bad(400, f"image gives shape {list(x.shape)}, expected {self.shape}")
        return (x - self.mean) / self.std


# the functions are helpers for the two adapters; RequestParser is also useful on its own
__all__ = ["RequestParser"]
