"""Which variants a server holds and may serve: the served set and the accuracy floor.

A portfolio lists every variant its build produced; a server should hold only those worth serving.
:func:`resolve_served_set` decides, from the manifest's variants (most to least accurate):

* **selection** ``"front"`` (default): the accuracy/latency front (:func:`pareto_front`).
  A dominated variant buys no speed for the accuracy it loses, so the runtime never loads it.
  ``"all"``: every variant. A list of ids: exactly those (unknown ids are an error listing the valid ones).
* **the accuracy floor** ``min_accuracy``: no variant below it is served, whatever the load. The
  default (``None``) is relative: :data:`DEFAULT_FLOOR_FRACTION` (0.9) of the best variant's
  accuracy, so a ladder that loses up to a tenth of its accuracy keeps every rung, while a diverged
  or over-pruned level (near chance) never answers. An absolute number in ``[0, 1]`` replaces it
  (``0`` switches the floor off).
* **a portfolio without accuracies** (built with no validation data): nothing can say which
  variant is better or garbage, so every variant (or the listed ids) is served in the manifest's
  order and the floor is off; :attr:`ServedSet.warnings` says so.

Pure Python, no torch: the handler, the archive builder and tests share it.

Example::

    >>> variants = [{"id": "dense", "accuracy": 0.98, "latency_ms": {"8": 10.0}},
    ...             {"id": "slow", "accuracy": 0.97, "latency_ms": {"8": 12.0}},     # dominated by dense
    ...             {"id": "small", "accuracy": 0.95, "latency_ms": {"8": 3.0}},
    ...             {"id": "diverged", "accuracy": 0.10, "latency_ms": {"8": 1.0}}]  # fast, but garbage
    >>> served = resolve_served_set(variants)
    >>> served.ids, served.dominated, served.below_floor, round(served.floor, 3)
    (('dense', 'small'), ('slow',), ('diverged',), 0.882)
    >>> resolve_served_set(variants, "all", min_accuracy=0.5).ids
    ('dense', 'slow', 'small')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["ServedSet", "resolve_served_set", "parse_selection", "pareto_front", "DEFAULT_FLOOR_FRACTION"]

#: The default accuracy floor, as a fraction of the best variant's validation accuracy.
DEFAULT_FLOOR_FRACTION = 0.9


@dataclass(frozen=True)
class ServedSet:
    """The variants a server holds and may serve, and why the others are not."""

    ids: tuple[str, ...]  #: served, in the manifest's order (most to least accurate)
    selection: str  #: "front", "all" or "ids"
    floor: float | None  #: the accuracy floor applied (``None``: off)
    floor_rule: str  #: how the floor was set, for logs
    measured: bool  #: the portfolio has validation accuracies
    dominated: tuple[str, ...] = ()  #: not served: off the accuracy/latency front
    below_floor: tuple[str, ...] = ()  #: not served: accuracy below the floor
    unmeasured: tuple[str, ...] = ()  #: not served: no accuracy in a portfolio where others have one
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"served": list(self.ids), "selection": self.selection, "floor": self.floor,
                "floor_rule": self.floor_rule, "measured": self.measured, "dominated": list(self.dominated),
                "below_floor": list(self.below_floor), "unmeasured": list(self.unmeasured),
                "warnings": list(self.warnings)}


def parse_selection(value: Any) -> str | list[str]:
    """``"front"``, ``"all"``, a comma-separated string of ids, or a list of ids -> a selection.
    """
    if value is None:
        return "front"
    if isinstance(value, str):
        if value.strip() in ("front", "all"):
            return value.strip()
        ids = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        ids = [v.strip() for v in value]
    else:
        ids = []
    if not ids or any(not v for v in ids):
        raise ValueError(f"variants must be 'front', 'all' or a list of variant ids, got {value!r}")
    return ids


def _check_floor(min_accuracy: Any) -> float | None:
    if min_accuracy is None:
        return None
    if isinstance(min_accuracy, bool) or not isinstance(min_accuracy, (int, float)) or not 0 <= min_accuracy <= 1:
        raise ValueError(f"min_accuracy must be an accuracy in [0, 1] or null (default: "
                         f"{DEFAULT_FLOOR_FRACTION:g} x the best variant's), got {min_accuracy!r}")
    return float(min_accuracy)


def resolve_served_set(variants: Sequence[Mapping[str, Any]], selection: Any = "front",
                       min_accuracy: float | None = None, fixed_variant: str | None = None) -> ServedSet:
    """The served set of a manifest's ``variants`` (see the module docstring).

    Raises ``ValueError`` (naming the valid ids) for unknown ids, a listed or fixed variant below the
    floor, or a floor that leaves nothing to serve.
    """
    selection = parse_selection(selection)
    floor_given = _check_floor(min_accuracy)
    order = [str(v["id"]) for v in variants]
    acc = {str(v["id"]): v.get("accuracy") for v in variants}
    if isinstance(selection, list):
        unknown = [v for v in selection if v not in acc]
        if unknown:
            raise ValueError(f"variants: no variant {unknown} in this portfolio; valid ids: {order} (or 'front', 'all')")
    if fixed_variant is not None and fixed_variant not in acc:
        raise ValueError(f"fixed_variant {fixed_variant!r} is not in this portfolio; valid ids: {order}")
    kind = "ids" if isinstance(selection, list) else selection
    listed = set(selection) if isinstance(selection, list) else None

    if all(a is None for a in acc.values()):
        ids = [v for v in order if listed is None or v in listed]
        what = f"all {len(ids)} variants" if listed is None else f"the {len(ids)} listed variants"
        warning = (f"no variant has a measured accuracy (the portfolio was built without validation data): "
                   f"serving {what} in the manifest's order with the accuracy floor off")
        if fixed_variant is not None and fixed_variant not in ids:
            raise ValueError(f"fixed_variant {fixed_variant!r} is not among the served variants {ids}")
        return ServedSet(tuple(ids), kind, None, "off: no accuracies", False, warnings=(warning,))

    best = max(a for a in acc.values() if a is not None)
    if floor_given is None:
        floor = DEFAULT_FLOOR_FRACTION * best
        rule = f"default: {DEFAULT_FLOOR_FRACTION:g} x the best accuracy {best:.1%}"
    else:
        floor, rule = floor_given, f"min_accuracy {floor_given:g}"
    if listed is not None:
        candidates = [v for v in order if v in listed]
        dominated: list[str] = []
    elif kind == "all":
        candidates, dominated = list(order), []
    else:
        front = set(pareto_front(variants, keep=[fixed_variant] if fixed_variant else []))
        candidates = [v for v in order if v in front]
        dominated = [v for v in order if v not in front]
    warnings, unmeasured, below, ids = [], [], [], []
    for vid in candidates:
        a = acc[vid]
        if a is None:
            if listed is not None or vid == fixed_variant:
                warnings.append(f"variant {vid!r} has no measured accuracy; served because it was named")
                ids.append(vid)
            else:
                unmeasured.append(vid)
        elif a < floor:
            if listed is not None or vid == fixed_variant:
                raise ValueError(f"variant {vid!r} (accuracy {a:.1%}) is below the accuracy floor {floor:.1%} "
                                 f"({rule}); lower min_accuracy to serve it")
            below.append(vid)
        else:
            ids.append(vid)
    if unmeasured:
        warnings.append(f"variants {unmeasured} have no measured accuracy, so the floor cannot vouch for them: "
                        "not served (name them in `variants` to serve them)")
    if not ids:
        raise ValueError(f"the accuracy floor {floor:.1%} ({rule}) leaves no variant to serve; the best is "
                         f"{best:.1%}; lower min_accuracy")
    if fixed_variant is not None and fixed_variant not in ids:
        raise ValueError(f"fixed_variant {fixed_variant!r} is not among the served variants {ids}; "
                         f"add it to `variants`")
    return ServedSet(tuple(ids), kind, floor, rule, True, tuple(dominated), tuple(below), tuple(unmeasured),
                     tuple(warnings))


def _b8_latency(v: Mapping[str, Any]) -> float | None:
    lat = (v.get("latency_ms") or {}).get("8")
    return float(lat) if isinstance(lat, (int, float)) and not isinstance(lat, bool) else None


def pareto_front(variants: Sequence[Mapping[str, Any]], keep: Sequence[str] = ()) -> list[str]:
    """Ids of the variants on the accuracy/latency front, in the given order (most to least accurate).

    A variant is dominated when another one is at least as accurate and at most as slow at batch 8
    (``latency_ms["8"]``, measured when the portfolio was built), and strictly better in one of the
    two. A dominated variant buys no speed for the accuracy it loses, so it is never worth serving:
    the archive, the handler and the policy serve the front by default, and the plot and
    ``dnnshifter portfolio show`` mark it. Variants without a measured accuracy or batch-8 latency are
    all kept (nothing says they are dominated), as are the ids in ``keep``.
    """
    def measured(v: Mapping[str, Any]) -> bool:
        return v.get("accuracy") is not None and _b8_latency(v) is not None

    def dominated(v: Mapping[str, Any]) -> bool:
        if not measured(v):
            return False
        acc, lat = v["accuracy"], _b8_latency(v)
        for o in variants:
            if o is v or not measured(o):
                continue
            o_acc, o_lat = o["accuracy"], _b8_latency(o)
            if o_acc >= acc and o_lat <= lat and (o_acc > acc or o_lat < lat):
                return True
        return False

    return [v["id"] for v in variants if v["id"] in keep or not dominated(v)]
