"""Load-adaptive variant choice: the most accurate variant that keeps up with the current load.

The policy is pure Python (no torch) with an injected clock, so it is unit-tested with simulated
arrivals. The serving handler feeds it one observation per served batch and asks it which variant
to use for the next batch.

The signals
-----------
Each observation is ``(batch_size, service_seconds, queue_delay_seconds)`` plus the variant that
served it. Over sliding windows the policy derives:

* **occupancy**: the fraction of wall time the worker was busy. Busy time is the batches' service
  time plus every gap between two batches shorter than ``backlog_gap_ms``: a batch that starts
  right after the previous one ended was already waiting, so that gap is framework overhead under a
  backlog, not idle time. When the server holds a batch open for at most ``backlog_gap_ms``
  (``max_batch_delay_ms``, TorchServe's ``maxBatchDelay``), the gap before a *full* batch
  (``max_batch_size`` > 1 requests) also counts, up to that batch's service time: so many requests
  could not have gathered in so short a window unless they were queued, and on a small machine the
  frontend and the clients take the CPU between batches, so those gaps grow past
  ``backlog_gap_ms`` exactly when the worker is saturated. With a longer batch delay the server
  itself waits to fill batches, and a full batch says nothing about a backlog. A saturated worker
  reads about 1.0 even when the model is only part of the per-batch cost. A server that reports
  when each batch's first request arrived (LitServe, through ``observe(first_arrival=...)``) needs
  none of this: the part of a gap in which that request was waiting is busy, the rest idle.
* **batch fill**: mean batch size over the largest batch the server forms (``max_batch_size``).
  A batching server near its capacity forms full batches; one that keeps up forms small ones even
  when it is busy most of the time.
* **load factor of every variant**: the requests served in the window priced at that variant's
  full-batch cost (its latency profile, measured on the serving machine, at ``max_batch_size``,
  scaled by a calibration factor: an EWMA of observed over profiled service time), plus the time
  the choice cannot change (backlog gaps, batches of pinned requests), over the window. 1.0 means
  the variant would need all of its capacity.
* optionally the **queueing delay** the handler observed, and a percentile of the active
  variant's **service time** per batch for an SLO.

The rules
---------
* **Step down** when the active variant is *saturated* (occupancy since the last switch, over at
  most ``short_window_s``, is at least ``high_utilisation`` and batch fill at least
  ``saturation_fill``), when the median queue delay exceeds ``queue_delay_high_ms``, or when its
  ``slo_percentile`` service time exceeds ``slo_ms``. Not while the queue delay is falling: the
  variant is then draining a backlog, not falling behind. It moves to the most accurate cheaper
  variant whose load factor is at most ``target_utilisation`` (and that meets the SLO), else the
  cheapest. At most one switch per ``min_dwell_s``.
* **Step up** to the most accurate variant whose load factor over the last ``long_window_s`` is at
  most ``low_utilisation`` (and whose predicted service time is within ``slo_headroom * slo_ms``),
  once ``up_dwell_s`` have passed since the last switch.

The band between ``low_utilisation`` and ``high_utilisation``, the longer window for climbing and the
dwell times are the hysteresis that stops flapping. With the defaults, a burst that saturates the
active variant is answered in ``min_dwell_s`` to ``short_window_s`` (well under 2 s), and the policy
is back on the most accurate variant about ``long_window_s`` after load turns light.

Example::

    >>> from dnnshifter_lightning.serve.policy import LoadPolicy, PolicyConfig
    >>> now = [0.0]
    >>> profiles = {"big": {1: 0.004, 8: 0.020}, "small": {1: 0.001, 8: 0.004}}
    >>> policy = LoadPolicy(["big", "small"], profiles, clock=lambda: now[0], max_batch_size=8)
    >>> for i in range(50):             # back-to-back full batches for a second: 'big' is saturated
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

__all__ = ["PolicyConfig", "LoadPolicy", "Decision", "LatencyProfile"]

AUTO_QUEUE_DELAY_MARGIN_MS = 20.0  #: the default queue-delay threshold is the batch delay plus this


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
    saturation_fill: float = 0.75  #: ... and batches at least this full (of max_batch_size)
    backlog_gap_ms: float = 5.0  #: a gap between batches shorter than this counts as busy
    queue_delay_high_ms: float | None = None  #: step down when the recent median queue delay exceeds this (None: auto)
    queue_window_s: float = 0.25  #: window of the queue-delay signal (recent batches only: it reacts fast)
    slo_ms: float | None = None  #: objective for the service time of one batch (queueing: queue_delay_high_ms)
    slo_percentile: float = 95.0  #: which percentile of latency the SLO bounds
    slo_headroom: float = 0.8  #: step up only to a variant predicted within this fraction of the SLO
    calibration_alpha: float = 0.1  #: EWMA weight of each batch in the observed/profiled ratio
    decision_interval_s: float = 0.05  #: re-evaluate at most this often (cheap choose() per batch)
    fixed_variant: str | None = None  #: operator override: always this variant

    def __post_init__(self) -> None:
        problems = []
        for name in ("short_window_s", "long_window_s", "backlog_gap_ms", "decision_interval_s", "queue_window_s"):
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
        if not 0 < self.saturation_fill <= 1:
            problems.append(f"saturation_fill must be in (0, 1] (got {self.saturation_fill!r})")
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


@dataclass
class _Summary:
    span: float
    busy: float
    requests: int  # unpinned requests
    batches: int
    fill: int  # requests in all batches, pinned ones included
    extra: float  # time the variant choice does not change: backlog gaps, pinned batches
    own: list[int]  # sizes of unpinned batches
    delays: list[float]  # queue delays, oldest first


@dataclass
class _Batch:
    end: float
    size: int  # the whole batch the server formed
    busy: float  # its service time + the backlog gap before it
    own_size: int  # requests the policy's choice served (not pinned)
    own_service: float
    queue_delay: float | None
    variant: str


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
        max_batch_delay_ms: how long the server holds a batch open to fill it (TorchServe
            ``maxBatchDelay``); ``None`` if unknown. See *occupancy* above.
        max_batch_size: the largest batch the server forms (TorchServe ``batchSize``); default: the
            largest batch observed so far.

    Example::

        >>> policy = LoadPolicy(["a", "b"], {"a": {1: 0.01}, "b": {1: 0.001}}, clock=lambda: 0.0)
        >>> policy.choose()
        Decision(variant_id='a', reason='initial', switched=False)
    """

    def __init__(self, variant_ids: Sequence[str], profiles: Mapping[str, Mapping[Any, float]], *,
                 clock: Callable[[], float] = time.monotonic, config: PolicyConfig | None = None,
                 initial: str | None = None, max_batch_size: int | None = None,
                 max_batch_delay_ms: float | None = None) -> None:
        self.variant_ids = list(variant_ids)
        if not self.variant_ids or len(set(self.variant_ids)) != len(self.variant_ids):
            raise ValueError(f"variant_ids must be non-empty and unique, got {self.variant_ids}")
        missing = [v for v in self.variant_ids if v not in profiles]
        if missing:
            raise ValueError(f"no latency profile for variant(s) {missing}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_delay_ms is not None and not max_batch_delay_ms >= 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0 or None, got {max_batch_delay_ms}")
        self.profiles = {v: LatencyProfile(profiles[v]) for v in self.variant_ids}
        self.config = config or PolicyConfig()
        for name, vid in (("fixed_variant", self.config.fixed_variant), ("initial", initial)):
            if vid is not None and vid not in self.variant_ids:
                raise ValueError(f"{name} {vid!r} is not a variant of this portfolio {self.variant_ids}")
        self.clock = clock
        self.max_batch_size = max_batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        # the server does not hold batches open long: a full batch after a short gap was queued
        self._full_batches_mean_backlog = (max_batch_delay_ms is not None
                                           and max_batch_delay_ms <= self.config.backlog_gap_ms)
        self._largest_seen = 1
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
                variant_id: str | None = None, pinned_requests: int = 0, pinned_seconds: float = 0.0,
                first_arrival: float | None = None) -> None:
        """Record one batch the server formed. Call it when the batch finishes (the clock is read now).

        ``service_seconds`` is the worker time for the whole batch (preprocess to postprocess);
        ``queue_delay_seconds`` the mean time its requests waited before it started, if known.
        ``variant_id`` (default: the policy's active variant) served the requests that did not pin
        one. Of the batch, ``pinned_requests`` pinned a variant and took ``pinned_seconds`` to serve:
        they count as load, but not as evidence about the chosen variant.

        ``first_arrival`` (on the policy's clock) is when the batch's earliest request reached the
        server, if the server says (LitServe does, TorchServe does not). Then the part of the gap
        since the previous batch during which that request was already waiting counts as busy, less
        the ``max_batch_delay_ms`` the server held a batch that did not fill; the rest of the gap
        was idle. Without it, gaps are judged by ``backlog_gap_ms`` and full batches (see the module
        docstring), which cannot tell synchronised clients from a backlog.
        """
        if batch_size < 1 or not service_seconds >= 0 or not 0 <= pinned_requests <= batch_size \
                or not 0 <= pinned_seconds <= service_seconds + 1e-9:
            raise ValueError(f"bad observation: batch_size={batch_size}, service_seconds={service_seconds}, "
                             f"pinned_requests={pinned_requests}, pinned_seconds={pinned_seconds}")
        now = self.clock()
        vid = self.active_id if variant_id is None else variant_id
        if vid not in self.profiles:
            raise ValueError(f"unknown variant {vid!r}")
        own_size = int(batch_size) - int(pinned_requests)
        own_service = max(0.0, service_seconds - pinned_seconds) if own_size else 0.0
        self._largest_seen = max(self._largest_seen, int(batch_size))
        busy = service_seconds
        if self._last_end is not None:
            started = now - service_seconds
            gap = started - self._last_end
            if first_arrival is not None:  # the server says when work was waiting: no guessing
                waited = started - max(self._last_end, first_arrival)
                if batch_size < self.batch_limit and self.max_batch_delay_ms:
                    waited -= self.max_batch_delay_ms / 1000.0  # the server held this batch open on purpose
                busy += min(max(0.0, waited), max(0.0, gap))
            else:
                # a gap before such a full batch that is no longer than its own service is framework time
                # under a backlog, not idle time
                full = self._full_batches_mean_backlog and self.batch_limit > 1 and batch_size >= self.batch_limit
                if 0 < gap and (gap < self.config.backlog_gap_ms / 1000.0 or (full and gap <= service_seconds)):
                    busy += gap
        self._last_end = now
        self._batches.append(_Batch(now, int(batch_size), busy, own_size, own_service, queue_delay_seconds, vid))
        if own_size:
            ratio = min(max(own_service / self.profiles[vid].seconds(own_size), 0.05), 20.0)
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
    @property
    def batch_limit(self) -> int:
        return self.max_batch_size or self._largest_seen

    def _summary(self, since: float, span: float) -> _Summary:
        out = _Summary(span, 0.0, 0, 0, 0, 0.0, [], [])
        for b in self._batches:
            if b.end <= since:
                continue
            out.busy += b.busy
            out.batches += 1
            out.fill += b.size
            out.extra += b.busy - b.own_service
            if b.queue_delay is not None:
                out.delays.append(b.queue_delay)
            if b.own_size:
                out.requests += b.own_size
                out.own.append(b.own_size)
        return out

    def load_factor(self, vid: str, summary: _Summary) -> float:
        """Share of ``vid``'s capacity (at full batches) the load in ``summary`` would need."""
        limit = self.batch_limit
        per_request = self.calibration * self.profiles[vid].seconds(limit) / limit
        return (summary.requests * per_request + summary.extra) / summary.span

    def _meets_slo(self, vid: str, summary: _Summary | None, headroom: float) -> bool:
        slo = self.config.slo_ms
        if slo is None:
            return True
        profile = self.profiles[vid]
        sizes = summary.own if summary is not None and summary.own else [1]
        predicted = _percentile([self.calibration * profile.seconds(size) for size in sizes],
                                self.config.slo_percentile)
        return predicted * 1000.0 <= slo * headroom

    def _short(self, now: float) -> _Summary:
        since = max(now - self.config.short_window_s, self._last_switch)
        return self._summary(since, max(now - since, 1e-9))

    def signals(self) -> dict[str, float]:
        """The current load signals (for logs and metrics)."""
        now = self.clock()
        short = self._short(now)
        longw = self._summary(now - self.config.long_window_s, self.config.long_window_s)
        out = {
            "occupancy": short.busy / short.span,
            "batch_fill": (short.fill / short.batches / self.batch_limit) if short.batches else 0.0,
            "arrival_rate": longw.requests / longw.span,
            "load_factor": self.load_factor(self.active_id, longw),
            "calibration": self.calibration,
        }
        recent = [b.queue_delay for b in self._batches if b.queue_delay is not None
                  and b.end > max(now - self.config.queue_window_s, self._last_switch)]
        if recent:
            out["queue_delay_ms"] = 1000.0 * _percentile(recent, 50)
            out["queue_delay_high_ms"] = self.queue_delay_high_ms
        if short.delays:
            half = len(short.delays) // 2
            if half >= 3:
                first, second = short.delays[:half], short.delays[half:]
                out["draining"] = float(sum(second) / len(second) < 0.95 * sum(first) / len(first))
        own = [b.own_service for b in self._batches
               if b.end > now - short.span and b.variant == self.active_id and b.own_size]
        if own:
            out["service_ms_p"] = 1000.0 * _percentile(own, self.config.slo_percentile)
        return out

    @property
    def queue_delay_high_ms(self) -> float:
        """The queue-delay threshold: ``queue_delay_high_ms``, or by default the server's batch delay
        (``max_batch_delay_ms``, 0 if unknown) plus 20 ms: a request that waited longer than the
        server holds batches open, by 20 ms, waited behind a backlog."""
        if self.config.queue_delay_high_ms is not None:
            return self.config.queue_delay_high_ms
        return (self.max_batch_delay_ms or 0.0) + AUTO_QUEUE_DELAY_MARGIN_MS

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

    def _pressure(self, sig: dict[str, float]) -> str | None:
        cfg = self.config
        if cfg.slo_ms is not None and sig.get("service_ms_p", 0.0) > cfg.slo_ms:
            return f"SLO: p{cfg.slo_percentile:g} service time {sig['service_ms_p']:.1f} ms > {cfg.slo_ms:g} ms"
        if sig.get("draining"):
            return None
        if "queue_delay_ms" in sig:
            # the server reports how long requests waited: that is the direct signal. A busy worker
            # whose requests do not wait keeps up, whatever its occupancy reads.
            if sig["queue_delay_ms"] > sig["queue_delay_high_ms"]:
                return f"queue delay {sig['queue_delay_ms']:.1f} ms > {sig['queue_delay_high_ms']:g} ms"
            return None
        fill_ok = self.batch_limit == 1 or sig["batch_fill"] >= cfg.saturation_fill
        if sig["occupancy"] >= cfg.high_utilisation and fill_ok:
            return (f"saturated: occupancy {sig['occupancy']:.2f} >= {cfg.high_utilisation:g}, "
                    f"batch fill {sig['batch_fill']:.2f}")
        return None

    def _evaluate(self, now: float) -> Decision:
        cfg = self.config
        sig = self.signals()
        since_switch = now - self._last_switch
        active_idx = self.variant_ids.index(self.active_id)

        pressure = None
        if since_switch >= max(cfg.min_dwell_s, 0.2 * cfg.short_window_s):
            pressure = self._pressure(sig)
        if pressure is not None:
            short = self._short(now)
            cheaper = self.variant_ids[active_idx + 1:]
            lf = {v: self.load_factor(v, short) for v in [self.active_id, *cheaper]}
            fits = [v for v in cheaper if lf[v] <= cfg.target_utilisation and self._meets_slo(v, short, 1.0)]
            if fits:
                return self._decide(fits[0], f"{pressure}; {fits[0]} load factor {lf[fits[0]]:.2f}", sig)
            if cheaper:
                fastest = min(cheaper, key=lf.__getitem__)
                if lf[fastest] < lf[self.active_id]:
                    return self._decide(fastest, f"{pressure}; no variant fits, cheapest", sig)
            return self._decide(self.active_id, pressure + "; already cheapest", sig, keep=True)

        if active_idx > 0 and since_switch >= max(cfg.up_dwell_s, cfg.min_dwell_s):
            delay_ok = sig.get("queue_delay_ms", 0.0) <= self.queue_delay_high_ms
            if delay_ok:
                longw = self._summary(now - cfg.long_window_s, cfg.long_window_s)
                for vid in self.variant_ids[:active_idx]:
                    lf_up = self.load_factor(vid, longw)
                    if lf_up <= cfg.low_utilisation and self._meets_slo(vid, longw, cfg.slo_headroom):
                        return self._decide(vid, f"light load: {vid} load factor {lf_up:.2f} <= "
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
