"""``LitServeServer``: ``dnnshifter litserve`` as a subprocess from Python (the benchmark starts one
per contender): a free loopback port, the generated key in its own home, healthy before it returns,
and always stopped, also when it fails to start."""

from __future__ import annotations

import json

import pytest

from dnnshifter_lightning.serve.defaults import INITIAL_SWITCH_REASON
from dnnshifter_lightning.serve.torchserve import port_is_free

from serve_fixtures import digits_samples, json_body

pytest.importorskip("litserve")
pytestmark = pytest.mark.litserve

from dnnshifter_lightning.serve.litserve_command import LitServeServer, group_alive  # noqa: E402


def test_serves_with_its_key_and_is_stopped(portfolio, tmp_path):
    x, _ = digits_samples(1)
    options = {"max_batch_size": 8, "batch_timeout": 0.005, "fixed_variant": "level_01", "profile_batch_sizes": [1],
               "torch_threads": 1}
    server = LitServeServer(portfolio, options, workdir=tmp_path / "ls")
    with server as ls:
        pgid, port = ls.proc.pid, ls.port
        assert set(ls.headers()) == {"X-API-Key"}
        assert (tmp_path / "ls" / "home" / "litserve" / "api_key").read_text() == ls.headers()["X-API-Key"]
        status, reply = ls.predict(json_body(x[0]))
        assert status == 200, reply
        assert json.loads(reply)["variant"] == "level_01"
        status, _ = ls.predict(json_body(x[0]), headers={"X-API-Key": "wrong-key-of-enough-length"})
        assert status == 401
        # fixed: at most the initial move to level_01, from the events log, with the switch time in ms
        switches = ls.switches()
        assert [(s["to"], s["reason"]) for s in switches] in ([], [("level_01", INITIAL_SWITCH_REASON)])
        assert all(s["switch_ms"] >= 0 and s["time"] > 1.6e9 for s in switches)
        assert [e["event"] for e in ls.events()].count("setup") == 1
    assert server.proc is None and server.headers() == {}
    assert not group_alive(pgid), "a LitServe process outlived stop()"
    assert port_is_free(port)


def test_a_server_that_cannot_start_raises_with_its_log_and_is_gone(portfolio, tmp_path):
    server = LitServeServer(portfolio, {"fixed_variant": "no_such_variant"}, workdir=tmp_path / "ls")
    with pytest.raises(RuntimeError, match="no_such_variant"):
        server.start()
    assert server.proc is None


def test_stop_without_start_is_harmless(tmp_path):
    server = LitServeServer(tmp_path, workdir=tmp_path / "ls")
    server.stop()
    assert server.proc is None


def test_events_log_readers_skip_broken_lines_and_keep_real_switches(tmp_path):
    from dnnshifter_lightning.serve.litserve_command import read_events, read_switches

    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "setup"}\n{broken\n'
                   '{"event": "switch", "from": "a", "to": "b", "reason": "burst", "seconds": 0.002, "time": 1700000000.0}\n'
                   '{"event": "switch", "from": "b", "to": "b", "reason": "noop", "seconds": 0.0, "time": 1700000001.0}\n')
    assert [e["event"] for e in read_events(log)] == ["setup", "switch", "switch"]
    assert read_switches(log) == [{"time": 1700000000.0, "from": "a", "to": "b", "reason": "burst", "switch_ms": 2.0}]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_group_alive_and_unstarted_server_headers(tmp_path):
    import os

    from dnnshifter_lightning.serve.litserve_command import LitServeServer, group_alive

    assert group_alive(os.getpgid(0)) is True
    assert group_alive(2**22 + 1) is False
    assert LitServeServer(tmp_path, workdir=tmp_path / "w").headers() == {}  # not started: no key yet


def test_a_server_started_with_sigint_ignored_still_stops_on_sigint(portfolio, tmp_path):
    """A shell without job control starts background jobs with SIGINT ignored; the server must still
    take stop()'s SIGINT, not wait for the SIGKILL fallback."""
    import signal
    import time

    from dnnshifter_lightning.serve.litserve_command import LitServeServer

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the server would inherit
    try:
        server = LitServeServer(portfolio, {"profile_batch_sizes": [1]}, workdir=tmp_path / "w").start()
    finally:
        signal.signal(signal.SIGINT, previous)
    started = time.monotonic()
    server.stop(timeout=60)
    assert time.monotonic() - started < 20, "the server ignored SIGINT and waited for SIGKILL"
