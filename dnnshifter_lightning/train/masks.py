"""Global magnitude pruning and mask bookkeeping, in plain torch (no Lightning).

The IMP callback (:mod:`dnnshifter_lightning.train.imp`) is a thin adapter over these functions:

* :func:`find_prunable` picks the weights to prune (by default every Conv1d/2d/3d and Linear weight).
* :func:`prune_step` removes a fraction of the *surviving* weights by global magnitude, as OpenLTH's
  ``sparse_global`` strategy does, with optional per-layer fractions (the LTH papers prune the output
  layer at a lower rate).
* :class:`MaskEnforcer` keeps pruned entries at exactly 0.0 through every optimizer step with two
  ``torch.optim`` step hooks: gradients are masked before the step and weights after it. With masked
  gradients, momentum, weight decay and Adam moments of a pruned weight stay at zero, so the weight does
  not regrow; the post-step multiply guards against optimizers that update parameters with zero
  gradient anyway.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from dnnshifter_lightning.train.masks import find_prunable, prune_step, sparsity
    >>> net = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    >>> weights = find_prunable(net)
    >>> masks = prune_step(weights, {}, fraction=0.2)
    >>> round(sparsity(masks), 3)
    0.2
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "DEFAULT_PRUNABLE_TYPES",
    "find_prunable",
    "prune_step",
    "fraction_for",
    "sparsity",
    "count_surviving",
    "survivors_after",
    "mask_digest",
    "MaskEnforcer",
]

DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if name == pattern or fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + "."):
            return pattern
    return None


def find_prunable(
    module: nn.Module,
    *,
    types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    exclude: Sequence[str] = (),
    include: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Parameter]:
    """The prunable weights of ``module``, keyed by their ``state_dict`` name.

    Args:
        types: module types whose ``weight`` is prunable.
        exclude: module names (exact, a parent's name, or fnmatch patterns such as ``"*.classifier"``)
            to leave dense. A pattern that matches no prunable module is an error: it is almost always
            a typo, and silently pruning the layer the user meant to protect would lose accuracy.
        include: optional ``(module_name, module) -> bool`` filter applied after ``types``.
    """
    found: dict[str, nn.Parameter] = {}
    used: set[str] = set()
    candidates = []
    for mod_name, mod in module.named_modules():
        if not isinstance(mod, tuple(types)) or getattr(mod, "weight", None) is None:
            continue
        if include is not None and not include(mod_name, mod):
            continue
        candidates.append(mod_name)
        hit = _matches(mod_name, exclude)
        if hit is not None:
            used.add(hit)
            continue
        found[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    unused = [p for p in exclude if p not in used]
    if unused:
        raise ValueError(
            f"exclude={list(unused)} matches no prunable layer. Prunable layers are: {candidates}"
        )
    return found


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def fraction_for(param_name: str, fractions: Mapping[str, float], default: float) -> float:
    """The prune fraction of parameter ``param_name``: that of the first key of ``fractions`` that
    names its layer (exact name, fnmatch pattern or a parent module), else ``default``."""
    hit = _matches(_layer_of(param_name), fractions)
    return default if hit is None else float(fractions[hit])


def _prune_group(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fraction: float,
                 out: dict[str, torch.Tensor]) -> None:
    """Prune ``fraction`` of the surviving entries of ``weights`` by one global magnitude ranking."""
    names = list(weights)
    if not names:
        return
    flat_w, flat_m = [], []
    for n in names:
        w = weights[n].detach()
        m = masks.get(n)
        m = torch.ones_like(w, dtype=torch.bool) if m is None else m.to(device=w.device, dtype=torch.bool)
        flat_w.append(w.reshape(-1).abs().float())
        flat_m.append(m.reshape(-1))
    w_all = torch.cat(flat_w)
    m_all = torch.cat(flat_m)
    alive_idx = m_all.nonzero().squeeze(1)
    k = int(round(fraction * alive_idx.numel()))
    if k > 0:
        # topk on the surviving magnitudes: exactly k removals, deterministic for identical weights
        # (so every DDP rank computes the same masks).
        drop = alive_idx[torch.topk(w_all[alive_idx], k, largest=False, sorted=False).indices]
        m_all = m_all.clone()
        m_all[drop] = False
    offset = 0
    for n, w in zip(names, flat_w):
        size = w.numel()
        out[n] = m_all[offset:offset + size].reshape(weights[n].shape).clone()
        offset += size


def prune_step(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    fraction: float,
    layer_fractions: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """New boolean masks after pruning ``fraction`` of the surviving weights by global magnitude.

    Entries already pruned stay pruned, so masks are nested from level to level. Weights whose layer
    name matches a key of ``layer_fractions`` (exact name or fnmatch pattern) are ranked on their own
    and pruned at that layer's fraction instead.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    layer_fractions = dict(layer_fractions or {})
    groups: dict[float, dict[str, torch.Tensor]] = {}
    for name, w in weights.items():
        groups.setdefault(fraction_for(name, layer_fractions, fraction), {})[name] = w
    out: dict[str, torch.Tensor] = {}
    for frac, group in groups.items():
        if frac > 0:
            _prune_group(group, masks, frac, out)
        else:
            for n, w in group.items():
                m = masks.get(n)
                out[n] = torch.ones_like(w, dtype=torch.bool) if m is None else m.to(torch.bool).clone()
    return {n: out[n] for n in weights}


def count_surviving(masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """``(surviving, total)`` entries over all masks."""
    alive = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return alive, total


def sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all masks (0.0 when there are none)."""
    alive, total = count_surviving(masks)
    return 0.0 if total == 0 else 1.0 - alive / total


def survivors_after(n: int, fraction: float, levels: int) -> int:
    """How many of ``n`` weights survive ``levels`` rounds of pruning ``fraction`` of the survivors."""
    for _ in range(levels):
        n -= int(round(fraction * n))
    return n


def mask_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """A sha256 over all masks (name order fixed), to compare masks across ranks and runs."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.bool).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: Optimizers whose update of a weight with zero gradient and zero state is exactly zero.
_ZERO_STAYS_ZERO = frozenset({torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                              torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam})


class MaskEnforcer:
    """Keeps pruned weights at exactly 0.0 through optimizer steps.

    * Gradients: a ``register_post_accumulate_grad_hook`` on every masked weight zeroes the gradient of
      pruned entries as soon as backward accumulates it. (A ``step`` pre-hook would be too early under
      Lightning, which runs backward inside ``optimizer.step(closure)``.) With zero gradients, weight
      decay, momentum and Adam moments of a pruned weight stay at zero, so nothing regrows.
    * Weights: a ``register_step_post_hook`` multiplies the weights by their masks after every step
      (one fused ``torch._foreach_mul_``), which covers optimizers that move parameters whose
      gradient is zero. torch's own SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam and RAdam
      (exactly those classes, not subclasses) provably leave a weight at 0.0 when its gradient and
      state are 0.0 (weight decay and momentum terms are then 0 too), so they skip this pass: it
      would cost as much memory traffic as the gradient masking itself. The IMP callback still
      checks every pruned weight at the end of each level.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(4, 4)
        >>> mask = torch.rand(4, 4) > 0.5
        >>> enforcer = MaskEnforcer({"weight": layer.weight}, {"weight": mask})
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> enforcer.attach([opt])
        >>> layer(torch.randn(2, 4)).sum().backward(); opt.step()
        >>> bool((layer.weight[~mask] == 0).all()), bool((layer.weight.grad[~mask] == 0).all())
        (True, True)
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        self._weights = dict(weights)
        self._handles: list = []
        self._attached: list[int] = []
        self._grad_masks: dict[int, torch.Tensor] = {}
        for w in self._weights.values():
            self._handles.append(w.register_post_accumulate_grad_hook(self._mask_grad))
        self.set_masks(masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Use new masks; weights are zeroed accordingly."""
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._grad_masks = {}
        for name, w in self._weights.items():
            m = masks.get(name)
            if m is not None and not bool(m.all()):
                m = m.to(device=w.device, dtype=w.dtype)
                self._pairs.append((w, m))
                self._grad_masks[id(w)] = m
        self.zero_weights()

    @torch.no_grad()
    def _mask_grad(self, param: torch.Tensor) -> None:
        m = self._grad_masks.get(id(param))
        if m is not None and param.grad is not None:
            param.grad.mul_(m)

    @torch.no_grad()
    def zero_weights(self) -> None:
        if self._pairs:
            torch._foreach_mul_([w for w, _ in self._pairs], [m for _, m in self._pairs])

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the per-weight state (momentum buffers, Adam moments) of pruned entries."""
        for w, m in self._pairs:
            for value in optimizer.state.get(w, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == w.shape:
                    value.mul_(m.to(value.dtype))

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Install the post-step hook on each optimizer that needs it (idempotent)."""
        for opt in optimizers:
            if id(opt) in self._attached:
                continue
            if type(opt) not in _ZERO_STAYS_ZERO:
                self._handles.append(opt.register_step_post_hook(lambda *_: self.zero_weights()))
            self._attached.append(id(opt))

    def detach(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attached.clear()
