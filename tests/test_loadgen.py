"""The load generator against a stand-in server, and its summaries."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from dnnshifter_lightning.loadgen import LoadResult, effective_accuracy, per_second, run_load, run_schedule, summarize


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers like the portfolio handler: a variant and a label."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"variant": "a", "label": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_run_load_closed_loop_stops_at_max_requests(port):
    results = run_load(port, "/p", [b"{}"], concurrency=2, max_requests=6)
    assert len(results) == 6 and {(r.status, r.variant, r.label, r.phase) for r in results} == {(200, "a", 1, "")}


def test_run_schedule_plays_its_steps_in_order(port):
    res = run_schedule(port, "/p", [b"{}"], [(20.0, 0.5, "low"), (40.0, 0.5, "high")], concurrency=4)
    assert [sum(r.phase == p for r in res) for p in ("low", "high")] == [10, 20] and {r.status for r in res} == {200}
    assert round(res[10].scheduled - res[0].scheduled, 6) == 0.5  # the second step starts at 0.5 s


def test_effective_accuracy_counts_late_wrong_and_dropped_requests_as_misses():
    res = [LoadResult(0.0, 0.02, 200, 0, "a", 3), LoadResult(0.1, 0.5, 200, 1, "a", 4),  # late
           LoadResult(0.2, 0.03, 200, 1, "a", 0), LoadResult(0.3, 1.0, 0, 0)]  # wrong, dropped
    assert effective_accuracy(res, labels=[3, 4]) == 0.25
    assert effective_accuracy([], labels=[3]) is None


def test_per_second_buckets_by_due_time():
    res = [LoadResult(10.2, 0.02, 200, 0, "a", 3), LoadResult(11.5, 0.3, 200, 0, "b", 3)]
    assert [(b["offered"], b["effective_accuracy"], b["variant"]) for b in per_second(res, [3], 10.0, 2)] == [
        (1, 1.0, "a"), (1, 0.0, "b")]


def test_summarize():
    results = [LoadResult(0.0, 0.010, 200, index=0, variant="a", label=3),
               LoadResult(0.5, 0.020, 200, index=1, variant="b", label=5),
               LoadResult(0.9, 0.030, 503, index=0)]
    s = summarize(results, labels=[3, 4], span_s=1.0)
    assert (s["requests"], s["ok"], s["errors"], s["p50_ms"], s["p99_ms"], s["throughput_rps"]) == (3, 2, 1, 10.0, 20.0, 2.0)
    assert (s["accuracy"], s["variants"]) == (0.5, {"a": 1, "b": 1})
