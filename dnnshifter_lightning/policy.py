"""Load-adaptive variant choice: the most accurate variant that keeps up with the current load.

The policy is pure Python (no torch) with an injected clock, so it is unit-tested with simulated
arrivals. The serving handler feeds it one observation per served batch and asks it which variant
to use for the next batch.

The signal
----------
Each observation is ``(batch_size, service_seconds, queue_delay_seconds)`` plus the variant that
served it. From these the policy keeps, over sliding windows:

* **occupancy**: the fraction of wall time the worker was busy. Busy time is the batches' service
  time, plus every gap between two batches shorter than ``backlog_gap_ms``: a batch that starts
  right after the previous one ended was already waiting, so that gap is framework overhead under
  a backlog, not idle time. A saturated worker reads close to 1.0 even when the model itself is
  only part of the per-batch cost.
* **predicted occupancy of every variant**: the same batches priced with each variant's latency
  profile (measured on the serving machine, interpolated over batch size), scaled by a calibration
  factor (EWMA of observed / profiled service time, so the profile may come from a quiet start).
  Batches of pinned requests are priced at their observed cost: the choice cannot change them.
* optionally the queueing delay the handler observed, and the latency percentile for an SLO.

The rules
---------
* **Step down** when the active variant is saturated (occupancy since the last switch, over at
  most ``short_window_s``, reaches ``high_utilisation``), the median queue delay exceeds
  ``queue_delay_high_ms``, or its ``slo_percentile`` latency exceeds ``slo_ms``. It goes to the most
  accurate cheaper variant whose predicted occupancy is at most ``target_utilisation`` (and meets
  the SLO), or the cheapest one. At most one switch per ``min_dwell_s``.
* **Step up** to the most accurate variant whose predicted occupancy over the last
  ``long_window_s`` is at most ``low_utilisation`` (and whose predicted latency is within
  ``slo_headroom * slo_ms``), once ``up_dwell_s`` have passed since the last switch.

The gap between ``low_utilisation`` and ``high_utilisation``, the longer window for climbing and the
dwell times are the hysteresis that stops flapping. With the defaults, a burst that saturates the
active variant is answered within about ``min_dwell_s`` to ``short_window_s`` (well under 2 s), and
the policy is back on the most accurate variant about ``long_window_s`` after load turns light.

Example::

    >>> from dnnshifter_lightning.policy import LoadPolicy, PolicyConfig
    >>> now = [0.0]
    >>> profiles = {"big": {1: 0.004, 8: 0.020}, "small": {1: 0.001, 8: 0.004}}
    >>> policy = LoadPolicy(["big", "small"], profiles, clock=lambda: now[0])
    >>> for i in range(50):             # back-to-back batches of 8 for a second: 'big' is saturated
    ...     now[0] = 0.02 * (i + 1)
    ...     policy.observe(8, 0.020)
    >>> policy.choose().variant_id
    'small'
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = ["PolicyConfig", "LoadPolicy", "Decision", "LatencyProfile", "profiles_from_manifest"]


@dataclass(frozen=True)
class PolicyConfig:
    """Thresholds of :class:`LoadPolicy`. Read from ``model-config.yaml`` with :meth:`from_dict`.

    Example::

        >>> PolicyConfig.from_dict({"slo_ms": 50, "high_utilisation": 0.9}).slo_ms
        50.0
    """

    short_window_s: float = 1.0  #: window of the step-down signal
    long_window_s: float = 3.0  #: window of the step-up signal
    high_utilisation: float = 0.85  #: step down when the active variant is this busy
    target_utilisation: float = 0.7  #: step down to a variant predicted to be at most this busy
    low_utilisation: float = 0.5  #: step up to a variant predicted to be at most this busy
    min_dwell_s: float = 0.5  #: no switch at all within this time of the previous one
    up_dwell_s: float = 2.0  #: no step up within this time of the previous switch
    backlog_gap_ms: float = 5.0  #: a gap between batches shorter than this counts as busy
    queue_delay_high_ms: float | None = None  #: step down when the median queue delay exceeds this
    slo_ms: float | None = None  #: latency objective for one batch (service + queue delay)
    slo_percentile: float = 95.0  #: which percentile of latency the SLO bounds
    slo_headroom: float = 0.8  #: step up only to a variant predicted within this fraction of the SLO
    calibration_alpha: float = 0.1  #: EWMA weight of each batch in the observed/profiled ratio
    decision_interval_s: float = 0.05  #: re-evaluate at most this often (cheap choose() per batch)
    fixed_variant: str | None = None  #: operator override: always this variant

    def __post_init__(self) -> None:
        problems = []
        for name in ("short_window_s", "long_window_s", "backlog_gap_ms", "decision_interval_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)!r})")
        for name in ("min_dwell_s", "up_dwell_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)!r})")
        if not 0 < self.low_utilisation < self.target_utilisation < self.high_utilisation <= 1.5:
            problems.append(
                "need 0 < low_utilisation < target_utilisation < high_utilisation <= 1.5 (got "
                f"{self.low_utilisation}, {self.target_utilisation}, {self.high_utilisation})")
        for name in ("queue_delay_high_ms", "slo_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0 or null (got {value!r})")
        if not 0 < self.slo_percentile <= 100:
            problems.append(f"slo_percentile must be in (0, 100] (got {self.slo_percentile!r})")
        if not 0 < self.slo_headroom <= 1:
            problems.append(f"slo_headroom must be in (0, 1] (got {self.slo_headroom!r})")
        if not 0 < self.calibration_alpha <= 1:
            problems.append(f"calibration_alpha must be in (0, 1] (got {self.calibration_alpha!r})")
        if self.fixed_variant is not None and (not isinstance(self.fixed_variant, str) or not self.fixed_variant):
            problems.append(f"fixed_variant must be a variant id or null (got {self.fixed_variant!r})")
        if problems:
            raise ValueError("invalid policy config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "PolicyConfig":
        """Validate a plain mapping (e.g. from YAML); unknown keys and bad values raise ``ValueError``."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ValueError(f"policy config must be a mapping, got {type(options).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"unknown policy option(s) {unknown}; known options: {sorted(fields)}")
        values: dict[str, Any] = {}
        for key, raw in options.items():
            if key == "fixed_variant":
                if raw is not None and not isinstance(raw, str):
                    raise ValueError(f"policy option fixed_variant must be a string or null, got {raw!r}")
                values[key] = raw
                continue
            optional = key in ("queue_delay_high_ms", "slo_ms")
            if raw is None and optional:
                values[key] = None
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise ValueError(f"policy option {key} must be a finite number{' or null' if optional else ''}, "
                                 f"got {raw!r}")
            values[key] = float(raw)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    """What :meth:`LoadPolicy.choose` returns: the variant for the next batch and why."""

    variant_id: str
    reason: str
    switched: bool = False  #: True when this differs from the previous choice
    signals: dict[str, float] = field(default_factory=dict, compare=False, repr=False)


class LatencyProfile:
    """Latency of one variant as a function of batch size, from a few measured points (seconds).

    Piecewise linear between points, flat below the smallest, extrapolated with the last slope above.

    Example::

        >>> LatencyProfile({1: 0.002, 8: 0.009}).seconds(4)
        0.005
    """

    def __init__(self, points: Mapping[Any, float]) -> None:
        parsed = sorted((int(b), float(s)) for b, s in points.items())
        if not parsed or any(b < 1 or not (s > 0 and math.isfinite(s)) for b, s in parsed):
            raise ValueError(f"a latency profile needs positive batch sizes and latencies, got {dict(points)!r}")
        self.batch_sizes = [b for b, _ in parsed]
        self.latencies = [s for _, s in parsed]

    def seconds(self, batch_size: float) -> float:
        bs, ls = self.batch_sizes, self.latencies
        if batch_size <= bs[0]:
            return ls[0]
        if batch_size >= bs[-1]:
            slope = (ls[-1] - ls[-2]) / (bs[-1] - bs[-2]) if len(bs) > 1 else 0.0
            if slope <= 0:
                slope = ls[-1] / bs[-1]
            return round(ls[-1] + slope * (batch_size - bs[-1]), 12)
        i = bisect.bisect_right(bs, batch_size)
        frac = (batch_size - bs[i - 1]) / (bs[i] - bs[i - 1])
        return round(ls[i - 1] + frac * (ls[i] - ls[i - 1]), 12)


def profiles_from_manifest(manifest: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Latency profiles (seconds) from a portfolio manifest's ``latency_ms`` (measured at build time)."""
    return {v["id"]: {int(b): float(ms) / 1000.0 for b, ms in v["latency_ms"].items()} for v in manifest["variants"]}


@dataclass
class _Summary:
    span: float
    n: int
    busy: float
    sizes: dict[int, int]  # batch size -> count, unpinned batches
    extra: float  # time the variant choice does not change: backlog gaps, pinned batches
    own: list[tuple[int, float]]  # (size, queue delay) of unpinned batches


@dataclass
class _Batch:
    end: float
    size: int
    service: float
    busy: float  # service + backlog gap before it
    queue_delay: float | None
    variant: str
    pinned: bool


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


class LoadPolicy:
    """Chooses the most accurate variant that keeps up with the observed load. Not thread-safe:
    the handler calls it from its one worker thread (wrap it in a lock otherwise).

    Args:
        variant_ids: ordered from most to least accurate.
        profiles: ``{variant_id: {batch_size: seconds}}`` measured on the serving machine.
        clock: returns seconds (monotonic); injected for tests.
        config: thresholds, see :class:`PolicyConfig`.
        initial: the variant active at start (default: the most accurate one that meets the SLO).

    Example::

        >>> policy = LoadPolicy(["a", "b"], {"a": {1: 0.01}, "b": {1: 0.001}}, clock=lambda: 0.0)
        >>> policy.choose()
        Decision(variant_id='a', reason='initial', switched=False)
    """

    def __init__(self, variant_ids: Sequence[str], profiles: Mapping[str, Mapping[Any, float]], *,
                 clock: Callable[[], float] = time.monotonic, config: PolicyConfig | None = None,
                 initial: str | None = None) -> None:
        self.variant_ids = list(variant_ids)
        if not self.variant_ids or len(set(self.variant_ids)) != len(self.variant_ids):
            raise ValueError(f"variant_ids must be non-empty and unique, got {self.variant_ids}")
        missing = [v for v in self.variant_ids if v not in profiles]
        if missing:
            raise ValueError(f"no latency profile for variant(s) {missing}")
        self.profiles = {v: LatencyProfile(profiles[v]) for v in self.variant_ids}
        self.config = config or PolicyConfig()
        for name, vid in (("fixed_variant", self.config.fixed_variant), ("initial", initial)):
            if vid is not None and vid not in self.variant_ids:
                raise ValueError(f"{name} {vid!r} is not a variant of this portfolio {self.variant_ids}")
        self.clock = clock
        self._batches: deque[_Batch] = deque()
        self._last_end: float | None = None
        self.calibration = 1.0
        self._start = self.clock()
        self._last_switch = self._start
        if self.config.fixed_variant is not None:
            self.active_id = self.config.fixed_variant
        elif initial is not None:
            self.active_id = initial
        else:
            self.active_id = next((v for v in self.variant_ids if self._meets_slo(v, None, headroom=1.0)),
                                  self.variant_ids[-1])
        self.history: list[tuple[float, str, str, str]] = []  #: (time, from, to, reason) per switch
        self._last_reason = "initial"
        self._cached: Decision | None = None
        self._next_eval = -math.inf

    # -- inputs ---------------------------------------------------------------------------------
    def observe(self, batch_size: int, service_seconds: float, queue_delay_seconds: float | None = None, *,
                variant_id: str | None = None, pinned: bool = False) -> None:
        """Record one served batch. Call it when the batch finishes (the clock is read now).

        ``service_seconds`` is the worker time for the batch (preprocess to postprocess).
        ``variant_id`` defaults to the policy's active variant. Batches of requests that pinned a
        variant pass ``pinned=True``: they count as load, but not as evidence about the active variant.
        """
        if batch_size < 1 or not service_seconds >= 0:
            raise ValueError(f"bad observation: batch_size={batch_size}, service_seconds={service_seconds}")
        now = self.clock()
        vid = self.active_id if variant_id is None else variant_id
        if vid not in self.profiles:
            raise ValueError(f"unknown variant {vid!r}")
        busy = service_seconds
        if self._last_end is not None:
            gap = now - service_seconds - self._last_end
            if 0 < gap < self.config.backlog_gap_ms / 1000.0:
                busy += gap
        self._last_end = now
        self._batches.append(_Batch(now, int(batch_size), float(service_seconds), busy, queue_delay_seconds,
                                    vid, pinned))
        predicted = self.profiles[vid].seconds(batch_size)
        ratio = min(max(service_seconds / predicted, 0.05), 20.0)
        a = self.config.calibration_alpha
        self.calibration = (1 - a) * self.calibration + a * ratio
        horizon = now - max(self.config.long_window_s, self.config.short_window_s)
        while self._batches and self._batches[0].end < horizon:
            self._batches.popleft()

    def sync(self, active_id: str) -> None:
        """Tell the policy which variant is really active (e.g. after a switch failed)."""
        if active_id not in self.profiles:
            raise ValueError(f"unknown variant {active_id!r}")
        self.active_id = active_id
        self._cached = None

    # -- signals --------------------------------------------------------------------------------
    def _summary(self, since: float, span: float) -> _Summary:
        sizes: dict[int, int] = {}
        own: list[tuple[int, float]] = []
        extra = busy = 0.0
        n = 0
        for b in reversed(self._batches):
            if b.end <= since:
                break
            n += 1
            busy += b.busy
            if b.pinned:
                extra += b.busy
            else:
                extra += b.busy - b.service
                sizes[b.size] = sizes.get(b.size, 0) + 1
                own.append((b.size, b.queue_delay or 0.0))
        return _Summary(span, n, busy, sizes, extra, own)

    def predicted_occupancy(self, vid: str, summary: _Summary) -> float:
        """Fraction of the window the worker would have been busy had ``vid`` served its batches."""
        profile = self.profiles[vid]
        model = sum(count * profile.seconds(size) for size, count in summary.sizes.items())
        return (self.calibration * model + summary.extra) / summary.span

    def _meets_slo(self, vid: str, summary: _Summary | None, headroom: float) -> bool:
        slo = self.config.slo_ms
        if slo is None:
            return True
        profile = self.profiles[vid]
        if summary is not None and summary.own:
            lat = [self.calibration * profile.seconds(size) + delay for size, delay in summary.own]
            predicted = _percentile(lat, self.config.slo_percentile)
        else:
            predicted = self.calibration * profile.seconds(1)
        return predicted * 1000.0 <= slo * headroom

    def _short_since(self, now: float) -> float:
        return max(now - self.config.short_window_s, self._last_switch)

    def signals(self) -> dict[str, float]:
        """The current load signals (for logs and metrics)."""
        now = self.clock()
        since = self._short_since(now)
        short = self._summary(since, max(now - since, 1e-9))
        longw = self._summary(now - self.config.long_window_s, self.config.long_window_s)
        requests = sum(size * count for size, count in longw.sizes.items())
        out = {
            "occupancy": short.busy / short.span,
            "arrival_rate": requests / longw.span,
            "mean_batch": requests / max(1, len(longw.own)),
            "calibration": self.calibration,
        }
        delays = [b.queue_delay for b in self._batches if b.end > since and b.queue_delay is not None]
        if delays:
            out["queue_delay_ms"] = 1000.0 * _percentile(delays, 50)
        own = [b.service + (b.queue_delay or 0.0) for b in self._batches
               if b.end > since and b.variant == self.active_id and not b.pinned]
        if own:
            out["latency_ms_p"] = 1000.0 * _percentile(own, self.config.slo_percentile)
        return out

    # -- decision -------------------------------------------------------------------------------
    def choose(self) -> Decision:
        """The variant for the next batch. Call it before each batch; it switches at most once per dwell."""
        cfg = self.config
        if cfg.fixed_variant is not None:
            return self._decide(cfg.fixed_variant, "fixed by operator config", {}, keep=True)
        now = self.clock()
        if self._cached is not None and now < self._next_eval:
            return self._cached
        self._next_eval = now + cfg.decision_interval_s
        decision = self._evaluate(now)
        self._cached = dataclasses.replace(decision, switched=False)
        return decision

    def _evaluate(self, now: float) -> Decision:
        cfg = self.config
        sig = self.signals()
        since_switch = now - self._last_switch
        active_idx = self.variant_ids.index(self.active_id)

        pressure = None
        if since_switch >= max(cfg.min_dwell_s, 0.2 * cfg.short_window_s):
            if sig["occupancy"] >= cfg.high_utilisation:
                pressure = f"saturated: occupancy {sig['occupancy']:.2f} >= {cfg.high_utilisation:g}"
            elif cfg.queue_delay_high_ms is not None and sig.get("queue_delay_ms", 0.0) > cfg.queue_delay_high_ms:
                pressure = f"queue delay {sig['queue_delay_ms']:.1f} ms > {cfg.queue_delay_high_ms:g} ms"
            elif cfg.slo_ms is not None and sig.get("latency_ms_p", 0.0) > cfg.slo_ms:
                pressure = (f"SLO: p{cfg.slo_percentile:g} latency {sig['latency_ms_p']:.1f} ms "
                            f"> {cfg.slo_ms:g} ms")
        if pressure is not None:
            since = self._short_since(now)
            short = self._summary(since, max(now - since, 1e-9))
            cheaper = self.variant_ids[active_idx + 1:]
            occ = {v: self.predicted_occupancy(v, short) for v in [self.active_id, *cheaper]}
            fits = [v for v in cheaper if occ[v] <= cfg.target_utilisation and self._meets_slo(v, short, 1.0)]
            if fits:
                return self._decide(fits[0], f"{pressure}; {fits[0]} predicted {occ[fits[0]]:.2f}", sig)
            if cheaper:
                fastest = min(cheaper, key=occ.__getitem__)
                if occ[fastest] < occ[self.active_id]:
                    return self._decide(fastest, f"{pressure}; no variant fits, cheapest", sig)
            return self._decide(self.active_id, pressure + "; already cheapest", sig, keep=True)

        if active_idx > 0 and since_switch >= max(cfg.up_dwell_s, cfg.min_dwell_s):
            delay_ok = cfg.queue_delay_high_ms is None or sig.get("queue_delay_ms", 0.0) <= cfg.queue_delay_high_ms
            if delay_ok:
                longw = self._summary(now - cfg.long_window_s, cfg.long_window_s)
                for vid in self.variant_ids[:active_idx]:
                    occ_up = self.predicted_occupancy(vid, longw)
                    if occ_up <= cfg.low_utilisation and self._meets_slo(vid, longw, cfg.slo_headroom):
                        return self._decide(vid, f"light load: {vid} predicted occupancy {occ_up:.2f} <= "
                                                 f"{cfg.low_utilisation:g}", sig)
        return self._decide(self.active_id, self._last_reason, sig, keep=True)

    def _decide(self, vid: str, reason: str, sig: dict[str, float], keep: bool = False) -> Decision:
        if vid == self.active_id:
            return Decision(vid, reason if keep else self._last_reason, False, sig)
        now = self.clock()
        self.history.append((now, self.active_id, vid, reason))
        self.active_id = vid
        self._last_switch = now
        self._last_reason = reason
        self._cached = None
        return Decision(vid, reason, True, sig)
