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
from pathlib import Path
from typing import Any, Mapping

import torch

from dnnshifter_lightning.portfolio import read_manifest
from dnnshifter_lightning.serve.defaults import default_model_config
from dnnshifter_lightning.serve.images import ImageRejected, decode_image, install_bomb_guard
from dnnshifter_lightning.serve.policy import LoadPolicy, PolicyConfig
from dnnshifter_lightning.serve.runtime import PinThrottled, PortfolioRuntime, SwitchError, profiles_from_manifest
from dnnshifter_lightning.serve.served import ServedSet, resolve_served_set

logger = logging.getLogger(__name__)


def bad(status: int, message: str) -> dict:
    """The result of a request that fails on its own: its HTTP status and a message."""
    return {"status": status, "error": message}


def default_options(overrides: Mapping[str, Any] | None = None) -> dict:
    """The handler options (``model-config.yaml``'s ``handler:`` section) merged over the defaults."""
    return default_model_config({"handler": dict(overrides or {})})["handler"]


#: options a LitServe config file may set besides the handler's: LitServe's own batching
LITSERVE_BATCHING = {"max_batch_size": 8, "batch_timeout": 0.005}


def check_options(opts: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Refuse unknown option names and values of the wrong kind, naming what to change.

    ``extra`` names further accepted keys (e.g. :data:`LITSERVE_BATCHING`). What needs the
    portfolio (``variants``, ``fixed_variant``, ``min_accuracy``) is checked by
    :func:`~dnnshifter_lightning.served.resolve_served_set`, the policy by :func:`policy_config`.
    """
    known = set(default_options()) | set(extra if extra is not None else LITSERVE_BATCHING)
    for key in opts:
        if key not in known:
            raise ValueError(f"unknown option {key!r}; known options: {', '.join(sorted(known))}")

    def number(key: str, *, nullable: bool, integer: bool = False, minimum: float = 0.0, strict: bool = True,
               what: str = "") -> None:
        value = opts.get(key)
        if value is None and nullable:
            return
        ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) \
            and math.isfinite(value) and (value > minimum if strict else value >= minimum)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{key} must be {kind} {'>' if strict else '>='} {minimum:g}"
                             f"{' or null' if nullable else ''}{what}, got {value!r}")

    if "memory_budget_mb" in opts:
        number("memory_budget_mb", nullable=True, what=" (no cache)")
    if "min_accuracy" in opts and opts["min_accuracy"] is not None:
        number("min_accuracy", nullable=True, strict=False)
        if opts["min_accuracy"] > 1:
            raise ValueError(f"min_accuracy is a fraction in [0, 1], got {opts['min_accuracy']!r}")
    if "pin_inflate_interval_s" in opts:
        number("pin_inflate_interval_s", nullable=False, strict=False)
    for key in ("max_image_pixels", "max_body_bytes", "max_batch_size"):
        if key in opts:
            number(key, nullable=False, integer=True)
    for key in ("batch_timeout", "log_signals_s"):
        if key in opts:
            number(key, nullable=False, strict=False)
    if "profile_batch_sizes" in opts:
        sizes = opts["profile_batch_sizes"]
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                          and b >= 1 for b in sizes):
            raise ValueError(f"profile_batch_sizes must be a list of batch sizes >= 1, got {sizes!r}")
    threads = opts.get("torch_threads")
    if threads is not None and threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int)
                                                      or threads < 1):
        raise ValueError(f"torch_threads must be 'auto', an integer >= 1 or null, got {threads!r}")
    for key in ("fixed_variant", "pin_header", "portfolio_dir"):
        if opts.get(key) is not None and not isinstance(opts[key], str):
            raise ValueError(f"{key} must be a string{' or null' if key == 'fixed_variant' else ''}, "
                             f"got {opts[key]!r}")
    policy_config(default_options({k: v for k, v in opts.items() if k in default_options()}))


def read_options_file(path: str | os.PathLike) -> dict:
    r"""Options from a YAML file: the handler's keys (``policy``, ``slo_ms``, ``fixed_variant``,
    ``memory_budget_mb``, ``min_accuracy``, ``variants``, ...) at the top level, or under ``handler:``
    as in an archive's ``model-config.yaml``, plus LitServe's ``max_batch_size`` / ``batch_timeout``.
    Checked with :func:`check_options`; errors name the file.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the options file: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping of options (e.g. 'slo_ms: 50'), got {type(data).__name__}")
    if "handler" in data:  # an archive's model-config.yaml: its handler section
        torchserve_only = sorted(set(data) - {"handler"})
        if torchserve_only:
            logger.warning("%s: ignoring TorchServe settings %s (LitServe takes max_batch_size and batch_timeout "
                           "under handler:)", path, torchserve_only)
        data = data["handler"] or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: handler: must be a mapping of options")
    try:
        check_options(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return data


def policy_config(opts: Mapping[str, Any]) -> PolicyConfig:
    """``opts["policy"]`` with the top-level ``slo_ms`` and ``fixed_variant`` merged in, validated."""
    merged = dict(opts.get("policy") or {})
    for key in ("slo_ms", "fixed_variant"):
        if opts.get(key) is not None:
            merged[key] = opts[key]
    return PolicyConfig.from_dict(merged)


def open_runtime(root: str | os.PathLike, opts: Mapping[str, Any],
                 device: str = "cpu") -> tuple[ServedSet, PortfolioRuntime]:
    """Resolve the served set (the front above the accuracy floor by default) and open the runtime
    with its inflated variants on ``device``.

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
                                   variants=list(served.ids), device=device)
    except Exception as exc:
        logger.error("DNNSHIFTER_REFUSED portfolio %s cannot be served: %s", root, exc)
        raise
    return served, runtime


def memory_report(runtime: PortfolioRuntime) -> dict:
    """Weights held for the served set (compressed + active) against the same set all inflated."""
    raw = [v.get("bytes_raw") for v in runtime.manifest["variants"]]
    return {"served": len(runtime.variant_ids), "portfolio": len(runtime.portfolio_ids),
            **{f"{k}_bytes": v for k, v in runtime.resident_breakdown().items()},
            "served_all_inflated_bytes": runtime.all_inflated_bytes(),
            "portfolio_file_bytes_raw": sum(b for b in raw if isinstance(b, int))}


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


REQUEST_START_HEADER = "X-Request-Start"  #: when the request started, stamped by the client or a proxy


def queue_delay_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds since ``X-Request-Start`` (``t=<epoch>`` or ``<epoch>``, in s, ms, us or ns, the
    convention proxies such as nginx and APM agents use), at wall time ``now``. ``None`` when the
    header is absent, malformed or implausible (more than 1 s in the future or 1 h in the past):
    a bad header is never an error, it only leaves the policy without this signal.
    """
    if not value:
        return None
    text = value.strip()
    if text.startswith("t="):
        text = text[2:]
    try:
        stamp = float(text)
    except ValueError:
        return None
    if not math.isfinite(stamp) or stamp <= 0:
        return None
    for scale in (1e9, 1e6, 1e3):  # ns, us, ms: an epoch in seconds is near 1.7e9
        if stamp > 1e11 * scale / 1e3:
            stamp /= scale
            break
    delay = (time.time() if now is None else now) - stamp
    if not -1.0 <= delay <= 3600.0:
        return None
    return max(0.0, delay)


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
