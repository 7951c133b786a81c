"""The one timing loop of the library, shared by the builder's measurements (``shrink/measure``) and
the server's latency profiles (``serve/runtime``). Plain torch: it sits at the top so that neither
phase imports the other for it."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["forward_seconds"]


def forward_seconds(module: nn.Module, batch: Any, warmup: int = 5, repeats: int = 20,
                    sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls ``module(batch)``, after ``warmup`` untimed calls.

    The one timing loop of the library. Runs under :func:`torch.inference_mode`; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called after each timed call, inside the timing. The thread
    count is the caller's choice (``torch.set_num_threads``).

    Raises:
        ValueError: when ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            module(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            module(batch)
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    return times
