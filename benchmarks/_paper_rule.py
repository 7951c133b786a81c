"""DNNShifter's zero-filter rule, for bench_pruning's comparison only (not part of the library).

The paper drops every channel whose producing filters are all zero, together with its BN shift, and
compensates nothing: a dead filter followed by BN (and ReLU) still emits a constant, so the rule can
change the function. :func:`prune_zero_filters` applies it through the library's own channel
machinery (the same dependency analysis, reference forward, slicing and BN fusion as
``prune_structurally``, which is why it reaches private helpers), in one round, and reports the
output difference instead of refusing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dnnshifter_lightning.shrink import _surgery as surgery
from dnnshifter_lightning.shrink import structured

ZERO_FILTER_DROPPED = "zero_filter_dropped"


@dataclass
class PaperRuleResult:
    model: nn.Module
    params_after: int
    channels_removed: int
    max_abs_diff: float
    seconds: float


def _zero_filter_channels(plan: surgery.GroupPlan, nonzero: surgery.NonzeroMap) -> list[int]:
    """Root channels of a group that are read and whose every producer's filter is all zero."""
    n = plan.n
    live_write = np.zeros(n)
    has_consumer = np.zeros(n, dtype=bool)
    has_producer = np.zeros(n, dtype=bool)
    for m in plan.members:
        if m.role in (surgery.CONSUMER, surgery.DEPTHWISE):
            has_consumer[m.roots] = True
        if m.role in (surgery.PRODUCER, surgery.DEPTHWISE):
            zero_out = nonzero.zero_slices(m.module)[1]
            live_write += np.bincount(m.roots, weights=~zero_out[m.idxs], minlength=n)
            has_producer[m.roots] = True
    dead = np.flatnonzero(has_consumer & has_producer & (live_write == 0)).tolist()
    return dead[1:] if dead and len(dead) >= n else dead  # never empty a layer: keep one channel


def prune_zero_filters(model: nn.Module, example: torch.Tensor, fuse_bn: bool = True) -> PaperRuleResult:
    """``model`` without its zero-filter channels (the paper's rule); ``model`` is left untouched."""
    start = time.perf_counter()
    inputs = (example,)
    src, modules, names, arch, _ = structured._analysis(model, inputs)
    shared = structured._shared_layers(modules)
    reference, _ = structured._reference(model, src, modules, inputs)
    plans, _ = arch.bind(modules, shared)
    nonzero = surgery.NonzeroMap()
    for plan in plans:
        plan.remove.update({r: ZERO_FILTER_DROPPED for r in _zero_filter_channels(plan, nonzero)})
    cuts = surgery.removals(plans, surgery.SurgeryLog())
    work = structured._sliced_copy(src, modules, names, cuts, {}, arch.fusions if fuse_bn else [], shared)
    diff, _ = structured._verify(model, work, inputs, reference)
    before, after = structured._out_channels(src), structured._out_channels(work)
    removed = sum(n - after.get(name, n) for name, n in before.items())
    return PaperRuleResult(model=work, params_after=structured._count_params(work), channels_removed=removed,
                           max_abs_diff=diff, seconds=time.perf_counter() - start)
