"""The options of a served portfolio and their defaults: the archive's ``model-config.yaml``.

TorchServe reads the top-level keys (workers, batching, timeouts); the ``handler:`` section is the
options both engines take (the TorchServe handler and the LitServe API, through
:mod:`dnnshifter_lightning.serve.core`). Pure Python: the worker, the archive builder and the CLI
share it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["DEFAULT_MODEL_CONFIG", "INITIAL_SWITCH_REASON", "MAX_REQUEST_BYTES", "PIN_HEADER", "default_model_config"]

PIN_HEADER = "X-DNNShifter-Variant"
#: The engines that serve a portfolio, and their names in messages and reports.
ENGINES: dict[str, str] = {"torchserve": "TorchServe", "litserve": "LitServe"}
INITIAL_SWITCH_REASON = "initial choice"  # the handler's switch log entry for the variant it starts on
#: Largest request body TorchServe's frontend accepts (``max_request_size``): a 3x224x224 input as
#: JSON is about 1.5 MB, a photo-sized JPEG a few MB.
MAX_REQUEST_BYTES = 8 * 2**20

# Defaults written into every archive's model-config.yaml, so that a plain
# `torchserve --start --model-store STORE --models NAME=NAME.mar` batches and switches.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 5,
    "responseTimeout": 60,
    "handler": {
        "portfolio_dir": "portfolio",
        "variants": "front",
        "min_accuracy": None,
        "memory_budget_mb": None,
        "fixed_variant": None,
        "slo_ms": None,
        "pin_header": PIN_HEADER,
        "pin_inflate_interval_s": 1.0,  # a pin to a non-resident variant inflates it at most once per interval
        "max_image_pixels": 4096 * 4096,  # width x height, checked on the image header before decoding
        "max_body_bytes": MAX_REQUEST_BYTES,
        "profile_batch_sizes": [1, 8],
        "torch_threads": "auto",
        "log_signals_s": 5.0,
        "policy": {},
    },
}


def _merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, Mapping) else value
    return out


def default_model_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The archive's ``model-config.yaml`` content: built-in defaults deep-merged with ``overrides``."""
    return _merge(DEFAULT_MODEL_CONFIG, overrides or {})


def state_dir() -> Path:
    """Where ``dnnshifter serve`` and ``dnnshifter litserve`` keep their state (working dirs, keys):
    ``$DNNSHIFTER_HOME`` or ``$XDG_CACHE_HOME/dnnshifter`` (default ``~/.cache/dnnshifter``)."""
    if os.environ.get("DNNSHIFTER_HOME"):
        return Path(os.environ["DNNSHIFTER_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dnnshifter"
