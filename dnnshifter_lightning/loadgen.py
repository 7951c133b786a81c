"""A bounded HTTP load generator for the serving demo, tests and benchmarks (loopback only).

:func:`run_schedule` replays an open-loop trace of piecewise-constant rates (each request has its
own due time; latency counts from it). :func:`run_load` sends JSON bodies to ``http://127.0.0.1:PORT/PATH`` closed loop (a saturating burst
of back-to-back clients) or open loop (requests due at a fixed rate, latency counted from when each
was due), always bounded by a duration and a request count. :func:`summarize` turns the results
into latency percentiles, throughput, accuracy and *effective accuracy* (answered correctly
within a deadline from when due, over requests offered; :func:`effective_accuracy`,
:func:`per_second`). Nothing here knows about TorchServe.

Example::

    >>> results = [LoadResult(0.0, 0.012, 200, index=0, variant="level_14", label=3)]
    >>> summarize(results, labels=[3], span_s=1.0)["accuracy"]
    1.0
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["LoadResult", "run_load", "run_schedule", "summarize", "effective_accuracy", "per_second", "LOOPBACK",
           "DEFAULT_DEADLINE_S"]

#: Default deadline of effective accuracy: a request counts if answered correctly within this long
#: from when it was due (Model-Switching, HotCloud'20; INFaaS).
DEFAULT_DEADLINE_S = 0.1

LOOPBACK = "127.0.0.1"


@dataclass
class LoadResult:
    """One request sent by :func:`run_load`. Times are seconds on ``time.monotonic``."""

    scheduled: float  #: when it was due (open loop) or sent (closed loop)
    latency: float  #: from ``scheduled`` to the full response (so queueing in the client counts)
    status: int  #: HTTP status, or 0 when the connection failed
    index: int  #: which body of ``bodies`` was sent
    variant: str | None = None
    label: int | None = None
    phase: str = ""


def _parse_reply(body: bytes) -> tuple[str | None, int | None]:
    try:
        reply = json.loads(body)
        return reply.get("variant"), reply.get("label")
    except (ValueError, AttributeError):
        return None, None


def _stamped(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` plus ``X-Request-Start: t=<epoch microseconds>``, stamped as the request is sent
    (the convention of nginx and APM agents), so that the server can tell how long it queued."""
    return {**headers, "X-Request-Start": f"t={time.time_ns() // 1000}"}


def run_load(port: int, path: str, bodies: Sequence[bytes], *, concurrency: int = 8, duration_s: float = 5.0,
             max_requests: int = 10_000, rate: float | None = None, headers: Mapping[str, str] | None = None,
             phase: str = "", timeout: float = 30.0) -> list[LoadResult]:
    """Send requests to ``http://127.0.0.1:PORT/PATH`` for at most ``duration_s`` and ``max_requests``.

    Closed loop (``rate=None``): ``concurrency`` clients send back to back, a saturating burst.
    Open loop (``rate`` per second): requests are due at fixed intervals and sent by at most
    ``concurrency`` clients; latency counts from when a request was due, so a server that falls
    behind shows it (no coordinated omission); requests still unsent ``max(1, duration_s/2)`` s
    after the end are dropped and recorded with status 0. Bodies are used round robin. Loopback only.

    >>> res = run_load(8080, "/predictions/digits", [b'{"data": ...}'], rate=2, duration_s=3)  # doctest: +SKIP

    Against a stand-in server that answers like the portfolio handler::

        >>> import http.server, json, threading
        >>> class Handler(http.server.BaseHTTPRequestHandler):
        ...     protocol_version = "HTTP/1.1"
        ...     def do_POST(self):
        ...         self.rfile.read(int(self.headers["Content-Length"]))
        ...         body = json.dumps({"variant": "level_00", "label": 7}).encode()
        ...         self.send_response(200)
        ...         self.send_header("Content-Length", str(len(body)))
        ...         self.end_headers()
        ...         self.wfile.write(body)
        ...     def log_message(self, *args):
        ...         pass
        >>> server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        >>> threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        >>> results = run_load(server.server_port, "/predictions/digits", [b"{}"], concurrency=2, max_requests=6)
        >>> server.shutdown(); server.server_close()
        >>> len(results), {(r.status, r.variant, r.label) for r in results}
        (6, {(200, 'level_00', 7)})
    """
    if not (1 <= concurrency <= 256 and 0 < duration_s <= 600 and 1 <= max_requests <= 1_000_000 and bodies):
        raise ValueError("run_load: need 1..256 clients, 0..600 s, 1..1e6 requests and at least one body")
    if rate is not None and not 0 < rate <= 10_000:
        raise ValueError("run_load: rate must be in (0, 10000] requests per second")
    start = time.monotonic()
    deadline = start + duration_s
    hard_deadline = deadline + max(1.0, 0.5 * duration_s)
    results: list[LoadResult] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    hdrs = dict(headers or {})
    hdrs.setdefault("Content-Type", "application/json")

    def client() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                due = start + i / rate if rate else time.monotonic()
                if due >= deadline:
                    return
                if time.monotonic() > hard_deadline:  # too far behind: the rest is dropped, not sent late
                    with lock:
                        results.append(LoadResult(due, hard_deadline - due, 0, i % len(bodies), phase=phase))
                    continue
                if rate:
                    time.sleep(max(0.0, due - time.monotonic()))
                body = bodies[i % len(bodies)]
                try:
                    conn.request("POST", path, body=body, headers=_stamped(hdrs))
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
                    status, data = 0, b""
                variant, label = _parse_reply(data) if status == 200 else (None, None)
                res = LoadResult(due, time.monotonic() - due, status, i % len(bodies), variant, label, phase)
                with lock:
                    results.append(res)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + timeout + 5)
    return sorted(results, key=lambda r: r.scheduled)


def run_schedule(port: int, path: str, bodies: Sequence[bytes], steps: Sequence[tuple[float, float, str]], *,
                 concurrency: int = 64, drop_late_s: float | None = 1.0, headers: Mapping[str, str] | None = None,
                 timeout: float = 30.0, start_index: int = 0) -> list[LoadResult]:
    """Open loop over ``steps`` = ``[(rate per s, seconds, phase), ...]``, one after the other.

    Request *k* of a step is due at ``step start + k / rate``, and its latency counts from then, so
    a server that falls behind pays for its queue. At most ``concurrency`` requests are in flight.
    A request still unsent ``drop_late_s`` after it was due is not sent (a client that gave up):
    it is recorded with status 0, counts as offered and never as answered, and it does not queue
    up work that nobody waits for (``None``: send everything, however late). Bounded: at most
    600 s and 1,000,000 requests in all. Bodies go round robin from ``start_index``.

    >>> steps = [(30.0, 15.0, "0.3x"), (80.0, 15.0, "0.8x")]
    >>> res = run_schedule(8080, "/predictions/digits", [b'{"data": ...}'], steps)  # doctest: +SKIP
    """
    if not (1 <= concurrency <= 256 and bodies and steps):
        raise ValueError("run_schedule: need 1..256 clients, at least one body and one step")
    due_offsets: list[tuple[float, str]] = []
    t = 0.0
    for rate, seconds, phase in steps:
        if not (0 < rate <= 10_000 and 0 < seconds <= 600):
            raise ValueError(f"run_schedule: step ({rate}, {seconds}, {phase!r}): rate in (0, 10000], seconds in (0, 600]")
        n = int(round(rate * seconds))
        due_offsets += [(t + k / rate, phase) for k in range(n)]
        t += seconds
    if t > 600 or len(due_offsets) > 1_000_000:
        raise ValueError(f"run_schedule: {t:g} s and {len(due_offsets)} requests; at most 600 s and 1e6 requests")
    hdrs = dict(headers or {})
    hdrs.setdefault("Content-Type", "application/json")
    lock = threading.Lock()
    counter = iter(range(len(due_offsets)))
    results: list[LoadResult] = []
    start = time.monotonic() + 0.05

    def client() -> None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                offset, phase = due_offsets[i]
                due = start + offset
                idx = (start_index + i) % len(bodies)
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                elif drop_late_s is not None and -wait > drop_late_s:
                    with lock:
                        results.append(LoadResult(due, -wait, 0, idx, phase=phase))
                    continue
                try:
                    conn.request("POST", path, body=bodies[idx], headers=_stamped(hdrs))
                    resp = conn.getresponse()
                    data, status = resp.read(), resp.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
                    status, data = 0, b""
                variant, label = _parse_reply(data) if status == 200 else (None, None)
                res = LoadResult(due, time.monotonic() - due, status, idx, variant, label, phase)
                with lock:
                    results.append(res)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(t + timeout + 10)
    return sorted(results, key=lambda r: r.scheduled)


def effective_accuracy(results: Sequence[LoadResult], labels: Sequence[int],
                       deadline_s: float = DEFAULT_DEADLINE_S) -> float | None:
    """Requests answered correctly within ``deadline_s`` of when they were due, over requests offered."""
    if not results:
        return None
    good = sum(1 for r in results if r.status == 200 and r.latency <= deadline_s and r.label == labels[r.index])
    return good / len(results)


def per_second(results: Sequence[LoadResult], labels: Sequence[int], t0: float, seconds: int,
               deadline_s: float = DEFAULT_DEADLINE_S) -> list[dict[str, Any]]:
    """Per 1-s bucket of due time since ``t0``: requests offered, effective accuracy, on-time share,
    p99 latency (ms, answered requests) and the variant that answered most of them.
    """
    buckets: list[list[LoadResult]] = [[] for _ in range(seconds)]
    for r in results:
        k = int(r.scheduled - t0)
        if 0 <= k < seconds:
            buckets[k].append(r)
    out = []
    for k, rs in enumerate(buckets):
        lat = sorted(r.latency for r in rs if r.status == 200)
        mix: dict[str, int] = {}
        for r in rs:
            if r.status == 200 and r.variant:
                mix[r.variant] = mix.get(r.variant, 0) + 1
        on_time = sum(1 for r in rs if r.status == 200 and r.latency <= deadline_s)
        out.append({"t": k, "offered": len(rs), "effective_accuracy": effective_accuracy(rs, labels, deadline_s),
                    "on_time": on_time / len(rs) if rs else None,
                    "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
                    "variant": max(mix, key=mix.__getitem__) if mix else None})
    return out


def summarize(results: Sequence[LoadResult], labels: Sequence[int] | None = None,
              span_s: float | None = None, deadline_s: float = DEFAULT_DEADLINE_S) -> dict[str, Any]:
    """Latency percentiles (ms), throughput, error count, accuracy, effective accuracy (correct within
    ``deadline_s`` of due, over offered), on-time share (answered within the deadline, over offered)
    and variant mix of some requests.

    ``labels[r.index]`` is the true label of the body a result sent; ``span_s`` defaults to the time
    from the first request due to the last response.
    """
    ok = [r for r in results if r.status == 200]
    lat = sorted(r.latency * 1000.0 for r in ok)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, max(0, int(round(q / 100.0 * len(lat))) - 1))], 3) if lat else None

    if span_s is None:
        span_s = (max(r.scheduled + r.latency for r in results) - min(r.scheduled for r in results)) if results else 0
    correct = sum(1 for r in ok if labels is not None and r.label == labels[r.index])
    variants: dict[str, int] = {}
    for r in ok:
        variants[r.variant or "?"] = variants.get(r.variant or "?", 0) + 1
    return {
        "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
        "throughput_rps": round(len(ok) / span_s, 2) if span_s else None,
        "accuracy": round(correct / len(ok), 4) if ok and labels is not None else None,
        "correct_per_s": round(correct / span_s, 2) if span_s and labels is not None else None,
        "effective_accuracy": (round(effective_accuracy(results, labels, deadline_s), 4)
                               if results and labels is not None else None),
        "on_time": round(sum(r.latency <= deadline_s for r in ok) / len(results), 4) if results else None,
        "deadline_ms": round(deadline_s * 1000, 3),
        "variants": variants, "span_s": round(span_s, 3),
    }
