"""Size, compute, latency and accuracy of one model or variant (plain torch + torchmetrics).
"""

from __future__ import annotations

import functools
import statistics
from typing import Any, Callable, Iterable

import torch
import torchmetrics
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dnnshifter_lightning._timing import forward_seconds

__all__ = ["count_params", "count_nonzero", "count_macs", "forward_seconds", "measure_latency_ms", "measure_accuracy",
           "state_bytes", "unpack_batch", "batch_unpacker", "Unpack", "INPUT_KEYS", "TARGET_KEYS"]


def _tensors(module: nn.Module, buffers: bool) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    if buffers:
        yield from (b for b in module.buffers() if b is not None and b.is_floating_point())


def count_params(module: nn.Module) -> int:
    """Number of stored parameter entries (zeros included; shared parameters counted once).
    """
    return sum(p.numel() for p in module.parameters())


def count_nonzero(module: nn.Module) -> int:
    """Number of parameter entries that are not exactly zero.
    """
    return sum(int(torch.count_nonzero(p.detach())) for p in module.parameters())


def state_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and floating-point buffers as stored (dense).
    """
    return sum(t.numel() * t.element_size() for t in _tensors(module, buffers=True))


def count_macs(module: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (FLOPs / 2, dense counting).

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matmul/conv-like ATen ops,
    so sparse models count their zeros: that is the compute a dense kernel spends on them.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(example_input)
    return int(counter.get_total_flops()) // 2


def measure_latency_ms(module: nn.Module, example_input_batch: torch.Tensor, warmup: int = 5,
                       repeats: int = 20) -> float:
    """Median milliseconds of ``module(example_input_batch)`` (:func:`forward_seconds`); the builder
    measures on one thread.

    Raises:
        ValueError: when ``repeats < 1``.
    """
    return float(statistics.median([t * 1e3 for t in forward_seconds(module, example_input_batch, warmup, repeats)]))


#: Dict-batch keys tried, in order, for the input and for the labels when none are named.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "data", "features")
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "class", "cls")


def unpack_batch(batch: Any, input_key: str | None = None, target_key: str | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch; the one place the library reads a user's batch.

    A tuple or list is ``(inputs, targets, *anything)`` (a single tensor is inputs without
    targets). A dict (``{"image": x, "label": y}``) is read at ``input_key``/``target_key``, or
    else at the first of :data:`INPUT_KEYS` / :data:`TARGET_KEYS` it has. ``targets`` is ``None``
    when the batch has none.

    Raises:
        ValueError: a dict batch without a known (or the named) input key, naming the keys it has.
    """
    if isinstance(batch, dict):
        keys = list(batch)
        ikey = input_key or next((k for k in INPUT_KEYS if k in batch), None)
        if ikey is None or ikey not in batch:
            wanted = [input_key] if input_key else list(INPUT_KEYS)
            raise ValueError(
                f"a dict batch with keys {keys} has none of the input keys {wanted}: name them with "
                f"input_key=... and target_key=... (or pass unpack_batch=a callable batch -> (inputs, targets))")
        if target_key is not None and target_key not in batch:
            raise ValueError(f"a dict batch with keys {keys} has no target_key={target_key!r}")
        tkey = target_key or next((k for k in TARGET_KEYS if k in batch), None)
        return batch[ikey], (batch[tkey] if tkey is not None else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ValueError(f"cannot read inputs from a batch of type {type(batch).__name__}: pass unpack_batch=a callable "
                     f"batch -> (inputs, targets)")


Unpack = Callable[[Any], "tuple[Any, Any]"]


def batch_unpacker(input_key: str | None = None, target_key: str | None = None,
                   unpack: Unpack | None = None) -> Unpack:
    """The ``batch -> (inputs, targets)`` function for the given options: ``unpack`` when given, else
    :func:`unpack_batch` reading dict batches at ``input_key``/``target_key``.
    """
    if unpack is not None:
        return unpack
    if input_key is None and target_key is None:
        return unpack_batch
    return functools.partial(unpack_batch, input_key=input_key, target_key=target_key)


def measure_accuracy(module: nn.Module, dataloader: Iterable[Any], num_classes: int,
                     unpack: Callable[[Any], tuple[Any, Any]] = unpack_batch) -> float:
    """Top-1 accuracy (micro average) of ``module`` over ``dataloader`` with torchmetrics.

    ``unpack`` turns a batch into ``(inputs, targets)`` (default :func:`unpack_batch`: tuples,
    lists, or dicts such as ``{"image": x, "label": y}``). The module is put in eval mode.
    """
    module.eval()
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
    seen = 0
    with torch.inference_mode():
        for batch in dataloader:
            x, y = unpack(batch)
            if y is None:
                raise ValueError("measure_accuracy: a batch has no targets (labels)")
            metric.update(module(x), y)
            seen += len(y)
    if seen == 0:
        raise ValueError("measure_accuracy: the dataloader yielded no samples")
    return float(metric.compute())
