"""Channel surgery behind :func:`dnnshifter_lightning.structured.prune_structurally` (internal).

Torch-Pruning's ``DependencyGraph`` tells us which layers must agree on a channel (a *group*: residual
adds, concatenation, BN, depthwise convs) and slices every member of a group consistently. Which
channels are dead, and what to fold into biases before slicing, is decided here, conservatively:

* every member of a group gets a role: ``consumer`` (a dense conv or Linear that reads the channel),
  ``producer`` (a dense conv or Linear that writes it), ``depthwise`` (both, channel by channel) or
  ``pass`` (BN, concat, split, flatten and a whitelist of channel-wise ops). Anything else (grouped
  convs, LayerNorm, GroupNorm, unknown autograd ops, bare parameters...) makes the whole group
  ``unsupported``: its channels are kept and the caller warns.
* a channel is ``unread`` when every consumer's weights that read it are zero.
* a channel whose producers all have all-zero filters is a data-independent value at every consumer.
  We measure that value on the example inputs (it must be the same at every position, which rules out
  border effects of padding); a zero value needs nothing, a non-zero one is folded into the bias of a
  consumer that can absorb it exactly (a Linear or an unpadded conv), else the channel stays (unless
  ``approximate``).
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd

OPTYPE = tp.ops.OPTYPE

CONSUMER, PRODUCER, DEPTHWISE, PASS, OUTPUT, UNSUPPORTED = "consumer", "producer", "depthwise", "pass", "output", "unsupported"

UNREAD, ZERO_CONSTANT, FOLDED, FOLDED_APPROX = "unread", "zero_constant", "folded", "folded_approx"
ZERO_FILTER_DROPPED = "zero_filter_dropped"  # DNNShifter's rule, for comparison only

# Autograd ops that act on each channel separately, so a channel's value after them depends only on
# the same channel before them. Anything not listed here (permute, transpose, softmax over channels,
# matmul, ...) is "unsupported" and its group keeps every channel.
_CHANNELWISE_OPS = re.compile(
    r"^(add|sub|rsub|mul|div|neg|relu|relu6|hardtanh|clamp|clampmin|clampmax|threshold|sigmoid|silu|"
    r"hardswish|hardsigmoid|gelu|tanh|leakyrelu|elu|selu|celu|mish|softplus|abs|pow|sqrt|exp|"
    r"maxpool\dd(withindices)?|avgpool\dd|adaptiveavgpool\dd|adaptivemaxpool\dd|"
    r"upsample\w*|clone|alias|detach|tocopy|contiguous|identity|squeeze|unsqueeze)\d*$"
)
_REDUCTIONS = re.compile(r"^(mean|sum|amax|amin|max|min)\d*$")


@dataclass
class _Member:
    role: str
    module: Any
    name: str
    idxs: torch.Tensor  # plain channel indices in this member's own coordinates
    roots: torch.Tensor  # the group's root index for each entry of ``idxs``


@dataclass
class GroupPlan:
    """What one pass decided for one group: indices (root coordinates) to remove and why."""

    group: Any
    members: list[_Member]
    remove: dict[int, str] = field(default_factory=dict)


@dataclass
class SurgeryLog:
    removed_reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    unsupported: dict[str, str] = field(default_factory=dict)  # layer name -> why its channels were kept
    approx_folds: int = 0
    passes: list[int] = field(default_factory=list)  # channels removed per pass
    timings: Counter = field(default_factory=Counter)  # seconds per stage, summed over passes

    def lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] += now - since
        return now


def _op_name(node) -> str:
    grad_fn = node.grad_fn
    name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else str(node.module)
    return re.sub(r"backward\d*$", "", name.lower())


def _channelwise(node) -> bool:
    name = _op_name(node)
    if _CHANNELWISE_OPS.match(name):
        return True
    if _REDUCTIONS.match(name):  # e.g. torch.mean(x, (2, 3)): fine unless it reduces the channel dim
        dims = getattr(node.grad_fn, "_saved_dim", None)
        shape = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if dims is None or shape is None or len(shape) < 2:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(d % len(shape) != 1 for d in dims)
    return False


def _role(dg, dep) -> tuple[str, str]:
    """The member's role in its group and, for ``unsupported``, why."""
    node, module, handler = dep.target, dep.target.module, dep.handler
    if node.type == OPTYPE.OUTPUT:
        return OUTPUT, ""
    if node.type in (OPTYPE.CONV, OPTYPE.LINEAR):
        if isinstance(module, _ConvNd) and (module.transposed or module.groups != 1):
            return UNSUPPORTED, f"grouped or transposed conv ({module})"
        pruner = dg.get_pruner_of_module(module)
        if handler == pruner.prune_out_channels:
            return (OUTPUT if not node.outputs else PRODUCER), ""
        return CONSUMER, ""
    if node.type == OPTYPE.DEPTHWISE_CONV:
        if module.transposed or not (module.in_channels == module.out_channels == module.groups):
            return UNSUPPORTED, f"depthwise conv with a channel multiplier ({module})"
        return (DEPTHWISE if node.outputs else OUTPUT), ""
    if node.type in (OPTYPE.BN, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE):
        return (PASS if node.outputs else OUTPUT), ""
    if node.type == OPTYPE.ELEMENTWISE:
        if not node.inputs and _op_name(node) in ("t", "transpose", "permute") and all(
                o.type == OPTYPE.LINEAR for o in node.outputs):
            return PASS, ""  # a Linear's own weight transposed for addmm: not on the data path
        if not _channelwise(node):
            return UNSUPPORTED, f"operation {_op_name(node)!r} may mix channels"
        return (PASS if node.outputs else OUTPUT), ""
    return UNSUPPORTED, f"{node.type.name} layer ({type(module).__name__})"


class NonzeroMap:
    """For each conv/Linear, which (output, input) channel pairs hold a nonzero weight.

    Built with one scan per weight. Removals stay virtual until the end: each layer keeps, per
    output row and per input column, how many live pairs it still has, and a removal subtracts the
    removed rows' (or columns') pairs from those counts. So the cascade of channels that die because
    their only readers or writers went is found without slicing or re-scanning anything, at a cost
    proportional to what was removed; each layer is sliced once at the end.
    """

    def __init__(self) -> None:
        self._nz: dict[int, torch.Tensor] = {}
        # per module: [live pairs per row, live pairs per column, rows gone, columns gone]
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pending: dict[int, tuple[nn.Module, list, list]] = {}

    def _pairs(self, module: nn.Module) -> torch.Tensor:
        key = id(module)
        if key not in self._nz:
            w = module.weight.detach()
            # uint8 + amax: bool .any(dim) is an order of magnitude slower on CPU
            pairs = w.ne(0).view(torch.uint8).reshape(w.shape[0], w.shape[1], -1).amax(dim=2)
            self._nz[key] = pairs
            self._state[key] = (pairs.sum(dim=1, dtype=torch.int32), pairs.sum(dim=0, dtype=torch.int32),
                                torch.zeros(w.shape[0], dtype=torch.bool), torch.zeros(w.shape[1], dtype=torch.bool))
        return self._nz[key]

    def zero_slices(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Booleans per channel: (input slice all zero, output filter all zero), ignoring the
        weights of removed outputs and removed inputs (removed channels count as zero)."""
        self._pairs(module)
        rows, cols, gone_rows, gone_cols = self._state[id(module)]
        return (cols == 0) | gone_cols, (rows == 0) | gone_rows

    def record(self, module: nn.Module, axis: int, idxs: list[int]) -> None:
        """Marks channels as removed (axis 0: outputs, 1: inputs); takes effect at :meth:`commit`."""
        entry = self._pending.setdefault(id(module), (module, [], []))
        entry[1 + axis].extend(idxs)

    def commit(self) -> set[int]:
        """Applies the recorded removals; returns the ids of modules in which some remaining
        channel became all-zero because of them (only groups touching those can lose more)."""
        new_dead: set[int] = set()
        for key, (module, rows, cols) in self._pending.items():
            pairs = self._pairs(module)
            row_live, col_live, gone_rows, gone_cols = self._state[key]
            before_in, before_out = self.zero_slices(module)
            new_rows = torch.as_tensor(sorted(set(rows)), dtype=torch.long)
            new_rows = new_rows[~gone_rows[new_rows]]
            if new_rows.numel():
                col_live -= pairs[new_rows].sum(dim=0, dtype=torch.int32)
                gone_rows[new_rows] = True
            if gone_cols.numel() > 1:  # a depthwise conv's single input column is never removed
                new_cols = torch.as_tensor(sorted(set(cols)), dtype=torch.long)
                new_cols = new_cols[~gone_cols[new_cols]]
                if new_cols.numel():
                    row_live -= pairs[:, new_cols].sum(dim=1, dtype=torch.int32)
                    gone_cols[new_cols] = True
            after_in, after_out = self.zero_slices(module)
            if bool((after_in & ~before_in & ~gone_cols).any()) or bool((after_out & ~before_out & ~gone_rows).any()):
                new_dead.add(key)
        self._pending.clear()
        return new_dead


def members_of(dg, group, names: dict) -> tuple[list[_Member], str | None, bool]:
    """The group's members with roles; why the group is unsupported (or None); whether it reaches
    the model's output (then its channels are part of the function's signature and stay)."""
    members, why, to_output = [], None, False
    for item in group.items:
        role, reason = _role(dg, item.dep)
        module = item.dep.target.module
        name = names.get(module, str(module))
        if role == UNSUPPORTED and why is None:
            why = reason
        to_output |= role == OUTPUT
        root_list = [-1 if r is None else r for r in item.root_idxs]
        roots = torch.as_tensor(root_list, dtype=torch.long)
        members.append(_Member(role, module, name, torch.as_tensor(item.idxs, dtype=torch.long), roots))
        if why is None and root_list and min(root_list) < 0:
            why = "index mapping without root indices"
    return members, why, to_output


@dataclass
class _Request:
    """A live consumer reading a channel that may be a constant; it needs the measured value."""

    module: nn.Module
    idx: int
    root: int


def analyse(group, members: list[_Member], nonzero: NonzeroMap, mode: str = "exact",
            gone: torch.Tensor | None = None) -> tuple[GroupPlan, list[_Request], torch.Tensor]:
    """Classify every root channel of ``group``; returns the plan for unread channels, the constant
    candidates' requests and the candidate mask. ``mode="dnnshifter"`` reproduces DNNShifter's rule
    instead (benchmarks only): drop every channel whose filters are all zero, fold nothing."""
    n = len(group[0].idxs)
    live_read = torch.zeros(n, dtype=torch.long)
    has_consumer = torch.zeros(n, dtype=torch.bool)
    live_write = torch.zeros(n, dtype=torch.long)
    has_producer = torch.zeros(n, dtype=torch.bool)
    for m in members:
        if m.role not in (CONSUMER, PRODUCER, DEPTHWISE):
            continue
        zero_in, zero_out = nonzero.zero_slices(m.module)
        live = (~(zero_in if m.role == CONSUMER else zero_out)[m.idxs]).long()
        if m.role in (CONSUMER, DEPTHWISE):
            live_read.index_add_(0, m.roots, live)
            has_consumer[m.roots] = True
        if m.role in (PRODUCER, DEPTHWISE):
            live_write.index_add_(0, m.roots, live)
            has_producer[m.roots] = True
    plan = GroupPlan(group, members)
    if gone is not None:  # channels an earlier round already removed
        has_consumer &= ~gone
    if mode == "dnnshifter":
        for r in torch.nonzero(has_consumer & has_producer & (live_write == 0)).flatten().tolist():
            plan.remove[r] = ZERO_FILTER_DROPPED
        return plan, [], torch.zeros(n, dtype=torch.bool)
    for r in torch.nonzero(has_consumer & (live_read == 0)).flatten().tolist():
        plan.remove[r] = UNREAD
    candidates = has_consumer & (live_read > 0) & has_producer & (live_write == 0)
    requests: list[_Request] = []
    if int(candidates.sum()):
        for m in members:
            if m.role != CONSUMER:  # a depthwise conv with a zero filter is also a zero producer: fine
                continue
            wanted = candidates[m.roots] & ~nonzero.zero_slices(m.module)[0][m.idxs]
            for idx, root in zip(m.idxs[wanted].tolist(), m.roots[wanted].tolist()):
                requests.append(_Request(m.module, idx, root))
    return plan, requests, candidates


def measure_inputs(model: nn.Module, run: Callable[[nn.Module], Any], modules: Sequence[nn.Module], *,
                   counts: Counter | None = None, names: dict | None = None) -> dict:
    """Per-channel (min, max) of the input of each module over the example inputs (channel dim 1
    for convs, last dim for Linear). ``run``'s return value is stored under ``"result"``; ``counts``
    (if given) counts calls per module name."""
    stats: dict[Any, Any] = {}

    def hook(module, args):
        if counts is not None and names is not None:
            counts.update([names[module]])
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).reshape(x.shape[1], -1).T
        lo, hi = torch.aminmax(flat, dim=0)
        if id(module) in stats:
            plo, phi = stats[id(module)]
            lo, hi = torch.minimum(lo, plo), torch.maximum(hi, phi)
        stats[id(module)] = (lo, hi)

    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        stats["result"] = run(model)
    finally:
        for h in handles:
            h.remove()
    return stats


def _absorbs_exactly(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    padding = module.padding
    return padding != "same" and all(p == 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


def decide_constants(plan: GroupPlan, requests: list[_Request], candidates: torch.Tensor, stats: dict,
                     approximate: bool) -> list[tuple[nn.Module, int, float, int]]:
    """Adds constant channels that can go to ``plan.remove``; returns the bias folds they need."""
    by_root: dict[int, list[_Request]] = defaultdict(list)
    for req in requests:
        by_root[req.root].append(req)
    folds: list[tuple[nn.Module, int, float, int]] = []
    for root in torch.nonzero(candidates).flatten().tolist():
        reason, pending = ZERO_CONSTANT, []
        for req in by_root.get(root, []):
            if id(req.module) not in stats:
                reason = None  # no measurement for this input: keep the channel
                break
            lo, hi = _as_lists(stats, id(req.module))
            lo, hi = lo[req.idx], hi[req.idx]  # nothing is sliced before the end: trace-time indices
            if lo == hi == 0.0:
                continue
            if hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):
                reason = None  # not the same value everywhere (e.g. padding borders upstream)
                break
            if _absorbs_exactly(req.module):
                reason = FOLDED if reason != FOLDED_APPROX else reason
            elif approximate:
                reason = FOLDED_APPROX
            else:
                reason = None
                break
            pending.append((req.module, req.idx, 0.5 * (lo + hi), root))
        if reason is not None:
            plan.remove[root] = reason
            folds.extend(pending)
    return folds


def _as_lists(stats: dict, key: int) -> tuple[list[float], list[float]]:
    """Per-channel (min, max) as Python lists (indexing a tensor element by element is slow)."""
    entry = stats[key]
    if isinstance(entry[0], torch.Tensor):
        entry = stats[key] = (entry[0].tolist(), entry[1].tolist())
    return entry


def apply_folds(folds: list[tuple[nn.Module, int, float, int]]) -> None:
    """Adds ``value * (weights reading idx)`` to each consumer's bias (before that input is sliced)."""
    by_module: dict[int, tuple[nn.Module, list[int], list[float]]] = {}
    for module, idx, value, _ in folds:
        entry = by_module.setdefault(id(module), (module, [], []))
        entry[1].append(idx)
        entry[2].append(value)
    with torch.no_grad():
        for module, idxs, values in by_module.values():
            w = module.weight[:, idxs]  # (out, k, ...) for the k folded inputs
            v = torch.tensor(values, dtype=torch.float64)
            delta = (w.double().reshape(w.shape[0], len(idxs), -1).sum(dim=2) @ v).to(w.dtype)
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            module.bias.add_(delta)


def _mark_removed(plan: GroupPlan, new: dict[int, str], nonzero: NonzeroMap) -> None:
    gone = torch.zeros(len(plan.group[0].idxs), dtype=torch.bool)
    gone[list(new)] = True
    for m in plan.members:
        if m.role in (PRODUCER, DEPTHWISE, CONSUMER):
            nonzero.record(m.module, 1 if m.role == CONSUMER else 0, m.idxs[gone[m.roots]].tolist())
    plan.remove.update(new)


def _slice(dg, plan: GroupPlan, log: SurgeryLog) -> None:
    """Slices the group's removed channels out of every member (Torch-Pruning), once."""
    for m in plan.members:
        if m.role in (PRODUCER, DEPTHWISE):
            for root in m.roots.tolist():
                if root in plan.remove:
                    log.removed_reasons[m.name][plan.remove[root]] += 1
    root_dep = plan.group[0].dep
    dg.get_pruning_group(root_dep.target.module, root_dep.handler, sorted(plan.remove)).prune(record_history=False)
    log.approx_folds += sum(1 for r in plan.remove.values() if r in (FOLDED_APPROX, ZERO_FILTER_DROPPED))


def remove_dead_channels(dg, model: nn.Module, names: dict, reused: set,
                         stats: dict, mode: str = "exact", max_rounds: int = 10) -> SurgeryLog:
    """Removes dead channels, group by group, until none is left.

    A removal can kill more channels: a filter whose only nonzero weights read removed inputs, say.
    Rounds of analysis therefore repeat on the virtual state in :class:`NonzeroMap`, re-analysing
    only groups that touch a layer where a channel newly died. Constants are folded as they are
    found. Each group is sliced once at the end. ``stats`` are the per-channel input (min, max) of
    every conv/Linear measured while tracing. The values of the channels that stay never change,
    so they stay valid. ``mode`` is ``"exact"``, ``"approximate"`` or ``"dnnshifter"`` (see :func:`analyse`).
    """
    approximate = mode == "approximate"
    if mode == "dnnshifter":
        max_rounds = 1
    log, nonzero = SurgeryLog(), NonzeroMap()
    t = time.perf_counter()
    plans: list[GroupPlan] = []
    for group in dg.get_all_groups():
        members, why, to_output = members_of(dg, group, names)
        shared = sorted({m.name for m in members if m.name in reused})
        if shared and why is None:
            why = f"layer {shared[0]} is called more than once"
        if why is not None:
            for m in members:
                if m.role in (PRODUCER, DEPTHWISE):
                    log.unsupported.setdefault(m.name, why)
        elif not to_output:
            plans.append(GroupPlan(group, members))
    t = log.lap("groups", t)
    todo = plans
    for _ in range(max_rounds):
        removed_now, folds = 0, []
        for plan in todo:
            n = len(plan.group[0].idxs)
            gone = torch.zeros(n, dtype=torch.bool)
            gone[list(plan.remove)] = True
            found, requests, candidates = analyse(plan.group, plan.members, nonzero, mode, gone)
            new_folds = decide_constants(found, requests, candidates, stats, approximate)
            new = found.remove
            if len(plan.remove) + len(new) >= n and new:  # never empty a layer: keep one channel
                kept = min(new)
                del new[kept]
                new_folds = [f for f in new_folds if f[3] != kept]
            if new:
                _mark_removed(plan, new, nonzero)
                folds.extend(new_folds)
                removed_now += len(new)
        t = log.lap("analyse", t)
        apply_folds(folds)
        t = log.lap("fold", t)
        log.passes.append(removed_now)
        affected = nonzero.commit()
        t = log.lap("commit", t)
        if removed_now == 0 or not affected:
            break
        todo = [p for p in plans if any(id(m.module) in affected for m in p.members)]
    for plan in plans:
        if plan.remove:
            _slice(dg, plan, log)
    log.lap("slice", t)
    return log
