"""Exact structural pruning: physically remove the channels that a sparse model's zeros made dead.

:func:`prune_structurally` takes a sparse model (for example an IMP checkpoint) and returns a new,
smaller dense ``nn.Module`` that computes the same function in eval mode, without fine-tuning. It
follows the rules in ``docs/design-notes/structured.md``:

* a channel goes when no consumer reads it (all consumer weights reading it are zero);
* a channel whose producers' filters are all zero is a constant; it goes when that constant is zero
  (e.g. ReLU of a negative BN shift) or when every consumer can absorb it exactly into its bias (a
  Linear, a conv without padding, a layer after global pooling). A padded conv cannot (its borders
  see zero padding, not the constant), so such channels stay unless ``approximate=True``;
* coupled channels (residual adds, concat, BN, depthwise convs) go only when dead in every member of
  their group (Torch-Pruning's ``DependencyGraph`` finds the groups and slices them);
* BN layers that follow a conv or Linear are fused into it (``torch.nn.utils.fusion``);
* the result is checked against the sparse model on ``example_inputs`` and a difference beyond
  ``rtol * max|y_sparse|`` raises :class:`StructuralPruningError`.

Example::

    >>> import torch
    >>> from dnnshifter_lightning.models import DigitsCNN
    >>> from dnnshifter_lightning.structured import prune_structurally
    >>> model = DigitsCNN(width=8).eval()
    >>> with torch.no_grad():
    ...     model.features[3].weight[:4] = 0          # four dead filters in the second conv
    >>> result = prune_structurally(model, torch.randn(4, 1, 8, 8))
    >>> result.params_after < result.params_before
    True
    >>> result.max_abs_diff < 1e-4
    True
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils._pytree import tree_flatten

__all__ = ["prune_structurally", "PruneResult", "StructuralPruningError"]

class StructuralPruningError(RuntimeError):
    """The model could not be pruned exactly: it could not be analysed, or the pruned model's outputs
    differ from the sparse model's beyond the tolerance.

    Example::

        >>> import torch
        >>> import lightning as L
        >>> from torch import nn
        >>> class Branchy(L.LightningModule):            # torch.fx cannot trace data-dependent control flow
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.fc(x) if x.sum() > 0 else -self.fc(x)
        >>> prune_structurally(Branchy(), torch.ones(2, 4))
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.structured.StructuralPruningError: could not trace Branchy.forward with torch.fx ...
        >>> prune_structurally(Branchy().fc, torch.ones(2, 4)).params_after    # the inner module is fine
        10
    """


@dataclass
class PruneResult:
    """Outcome of :func:`prune_structurally`.

    ``removed`` maps each conv/Linear layer whose output channels were examined to
    ``{"before": int, "after": int, "reasons": {reason: count}}`` with reasons ``unread`` (no
    consumer reads it), ``zero_constant`` (constant zero after the activation), ``folded`` (constant
    folded exactly into the consumers' biases) and ``folded_approx`` (folded into a padded conv,
    ``approximate=True`` only). ``kept_unsupported`` names layers whose channels were kept because
    the analysis could not prove removal safe (and why).

    Example::

        >>> import torch
        >>> from dnnshifter_lightning.models import DigitsCNN
        >>> model = DigitsCNN(width=4).eval()
        >>> with torch.no_grad():
        ...     model.features[0].weight[:2] = 0          # 2 of the first conv's 4 filters are dead
        >>> result = prune_structurally(model, torch.randn(4, 1, 8, 8))
        >>> result.removed["features.0"]
        {'before': 4, 'after': 2, 'reasons': {'zero_constant': 2}}
        >>> result.channels_removed, result.reason_counts, result.kept_unsupported
        (2, {'zero_constant': 2}, {})
        >>> result.params_before, result.params_after         # the BNs were fused into the convs, too
        (4782, 4634)
        >>> result.model.features[0], result.max_abs_diff <= result.tolerance
        (Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), True)
    """

    model: nn.Module
    params_before: int
    params_after: int
    removed: dict[str, dict[str, Any]]
    seconds: float
    max_abs_diff: float
    approx_error: float | None = None
    tolerance: float = 0.0
    output_scale: float = 0.0
    kept_unsupported: dict[str, str] = field(default_factory=dict)
    passes: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def channels_removed(self) -> int:
        return sum(v["before"] - v["after"] for v in self.removed.values())

    @property
    def reason_counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for v in self.removed.values():
            total.update(v["reasons"])
        return dict(total)


def prune_structurally(model: nn.Module, example_inputs: Any, *, approximate: bool = False, fuse_bn: bool = True,
                       rtol: float = 1e-4) -> PruneResult:
    """Return a smaller dense copy of ``model`` that computes the same function (eval mode).

    Args:
        model: a sparse ``nn.Module`` (left untouched). A LightningModule whose ``forward`` only calls
            submodules is traced with ``torch.fx`` and the result is a plain ``GraphModule``.
        example_inputs: a tensor, or a tuple/list of positional tensors, used to trace the model, to
            measure constant channels and to verify the result. A few real samples are best.
        approximate: also fold constant channels into padded convs (inexact at the borders); the
            error this introduces is reported as ``approx_error`` instead of raising.
        fuse_bn: fuse each BN that follows a conv/Linear into it, so variants run without BN.
        rtol: verification tolerance: raise if ``max|y_pruned - y_sparse| > rtol * max(max|y_sparse|, 1e-6)``.

    Raises:
        StructuralPruningError: when the model cannot be traced or the check fails.

    Example::

        >>> import torch
        >>> from dnnshifter_lightning.models import cifar_resnet
        >>> net = cifar_resnet(20).eval()
        >>> with torch.no_grad():
        ...     net.layers[0].conv1.weight[:8] = 0   # half the filters of a block's first conv
        >>> res = prune_structurally(net, torch.randn(2, 3, 32, 32))
        >>> res.removed["layers.0.conv1"]["after"]
        8
    """
    return _prune(model, example_inputs, mode="approximate" if approximate else "exact", fuse_bn=fuse_bn, rtol=rtol)


def _prune(model: nn.Module, example_inputs: Any, *, mode: str, fuse_bn: bool, rtol: float) -> PruneResult:
    """:func:`prune_structurally` with ``mode`` ``"exact"``, ``"approximate"`` or ``"dnnshifter"``
    (DNNShifter's rule, which may change the function: for the benchmark's comparison only)."""
    from . import _surgery as surgery  # imports torch_pruning lazily: only needed here

    start = time.perf_counter()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)

    def run(net: nn.Module) -> Any:
        return net(*inputs)

    timings: dict[str, float] = {}
    mark = start

    def lap(stage: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - mark
        mark = now

    work = _working_copy(model)
    lap("copy")
    params_before = _count_params(work)
    names = {m: n for n, m in work.named_modules()}
    shapes_before = _out_channels(work)

    # One traced forward pass gives Torch-Pruning its graph, us the reference output, how often each
    # layer runs (a shared layer cannot be sliced for one use only) and every layer's input statistics.
    captured: dict[str, Any] = {}
    counts: Counter = Counter()

    def traced_forward(net: nn.Module, x: tuple) -> Any:
        captured["out"] = net(*x)
        return captured["out"]

    for p in work.parameters():
        p.requires_grad_(True)  # Torch-Pruning traces autograd
    layers = [m for m in work.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    counter = [m.register_forward_pre_hook(lambda mod, args: counts.update([names[mod]]))
               for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.enable_grad():
            stats = surgery.measure_inputs(work, lambda net: surgery.tp.DependencyGraph().build_dependency(
                net, example_inputs=inputs, forward_fn=traced_forward, verbose=False), layers, counts=counts, names=names)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means we cannot analyse the model
        raise StructuralPruningError(f"could not build the dependency graph of {type(model).__name__}: {exc!r}") from exc
    finally:
        for h in counter:
            h.remove()
    dg = stats.pop("result")
    ref_leaves = [t.detach() for t in _tensor_leaves(captured["out"], "sparse model")]
    reused = {n for n, c in counts.items() if c > 1}
    lap("trace")

    try:
        log = surgery.remove_dead_channels(dg, work, names, reused, stats, mode)
        lap("surgery")
        if fuse_bn:
            _fuse_batchnorms(dg, work)
        _positive_zeros_(work)
        lap("fuse")
    except StructuralPruningError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StructuralPruningError(f"channel surgery failed on {type(model).__name__}: {exc!r}") from exc

    if log.unsupported:
        warnings.warn(
            "prune_structurally kept the channels of layers it cannot analyse safely: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(log.unsupported.items())[:8])
            + (" ..." if len(log.unsupported) > 8 else ""), stacklevel=2)

    work.eval()
    try:
        with torch.no_grad():
            out_leaves = _tensor_leaves(run(work), "pruned model")
    except StructuralPruningError:
        raise
    except Exception as exc:  # noqa: BLE001 - a pruned model that cannot even run is a failed surgery
        raise StructuralPruningError(f"pruned {type(model).__name__} fails on the example inputs: {exc!r}") from exc
    diff, scale = _compare(ref_leaves, out_leaves)
    lap("verify")
    tolerance = rtol * max(scale, 1e-6)
    approx_error = None
    if mode != "exact" and log.approx_folds:
        approx_error = diff
    elif diff > tolerance:
        raise StructuralPruningError(
            f"pruned {type(model).__name__} differs from the sparse model: max|diff| = {diff:.3g} > "
            f"rtol * max|y| = {rtol:g} * {scale:.3g}; refusing to return a different function")

    shapes_after = _out_channels(work)
    removed = {}
    for name, before in shapes_before.items():
        after = shapes_after.get(name, before)
        removed[name] = {"before": before, "after": after, "reasons": dict(log.removed_reasons.get(name, {}))}
    return PruneResult(
        model=work, params_before=params_before, params_after=_count_params(work), removed=removed,
        seconds=time.perf_counter() - start, max_abs_diff=diff, approx_error=approx_error,
        tolerance=tolerance, output_scale=scale, kept_unsupported=dict(log.unsupported),
        passes=list(log.passes), timings={**timings, **{f"surgery.{k}": v for k, v in log.timings.items()}})


def _is_lightning(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] in ("lightning", "pytorch_lightning") for c in type(model).__mro__)


def _working_copy(model: nn.Module) -> nn.Module:
    """An independent eval-mode copy. A LightningModule is traced with torch.fx first so the copy is a
    plain module holding only what ``forward`` uses (no trainer, metrics or Lightning properties)."""
    if _is_lightning(model):
        try:
            traced: nn.Module = torch.fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001
            raise StructuralPruningError(
                f"could not trace {type(model).__name__}.forward with torch.fx ({exc!r}); "
                "pass the inner nn.Module (e.g. module.model) instead") from exc
        work = copy.deepcopy(traced)
    else:
        work = copy.deepcopy(model)
    return work.eval()


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _out_channels(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def _tensor_leaves(output: Any, what: str) -> list[torch.Tensor]:
    leaves = [x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor)]
    if not leaves:
        raise StructuralPruningError(f"the {what} returned no tensors; cannot verify it")
    return leaves


def _compare(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, float]:
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        raise StructuralPruningError(
            f"pruned model's outputs have shapes {[tuple(b.shape) for b in out]}, "
            f"sparse model's {[tuple(a.shape) for a in ref]}")
    diff = max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(ref, out))
    scale = max(float(a.double().abs().max()) if a.numel() else 0.0 for a in ref)
    if diff != diff or scale != scale:
        raise StructuralPruningError("non-finite outputs; cannot verify the pruned model")
    return diff, scale


@torch.no_grad()
def _positive_zeros_(model: nn.Module) -> None:
    """Turns every -0.0 in the floating weights into +0.0 (``x + 0.0``; nothing else changes).

    IMP's masks leave a pruned negative weight at -0.0, whose bit pattern (the sign bit) is not
    zero: in the demo's variants over a third of all weight words were -0.0, and zstd compressed
    them 4x worse and inflated them 4x slower than the same variants with +0.0. The values are equal,
    so the function is the same; verification below checks it as always.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.add_(0.0)


def _fuse_batchnorms(dg, model: nn.Module) -> int:
    """Folds every BN that directly follows a conv or Linear (and is its only reader) into it."""
    from . import _surgery as surgery

    names = {m: n for n, m in model.named_modules()}
    fused = 0
    for module, node in list(dg.module2node.items()):
        if node.type != surgery.OPTYPE.BN or len(node.inputs) != 1 or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        src = node.inputs[0]
        layer = src.module
        if src.type not in (surgery.OPTYPE.CONV, surgery.OPTYPE.DEPTHWISE_CONV, surgery.OPTYPE.LINEAR) or len(src.outputs) != 1:
            continue
        if module not in names or layer not in names or not module.track_running_stats or module.running_mean is None:
            continue
        if isinstance(layer, _ConvNd) and layer.transposed:
            continue
        new_layer = fuse_linear_bn_eval(layer, module) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, module)
        _set_submodule(model, names[layer], new_layer)
        _set_submodule(model, names[module], nn.Identity())
        fused += 1
    return fused


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
