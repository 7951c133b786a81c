"""Integration tests against a real TorchServe (Java 17) on loopback ports with its own TMPDIR.

One server (token auth on, as by default; the model-registration API opted in, for the tests that
register archives) is shared by the module; it is always stopped by the fixture's finalizer.
Everything is bounded: request counts, load durations and polling loops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dnnshifter_lightning import cli
from dnnshifter_lightning.loadgen import run_load
from dnnshifter_lightning.portfolio import VARIANT_SUFFIX
from dnnshifter_lightning.serve import torchserve as serving
from dnnshifter_lightning.serve.defaults import MAX_REQUEST_BYTES, PIN_HEADER
from dnnshifter_lightning.serve.runtime import PortfolioRuntime
from dnnshifter_lightning.serve.torchserve import (
    JavaMissingError, ServingError, TorchServeServer, build_archive, read_switches,
)
from serve_fixtures import (
    assert_matches_local, bomb_png, burst_concurrency, digits_samples, json_body, png_body, small_image,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "digits"


@pytest.fixture(scope="module")
def store(portfolio, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    build_archive(portfolio, MODEL, store)
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = TorchServeServer(store, [MODEL], enable_model_api=True, workdir=tmp_path_factory.mktemp("ts"))
    try:
        ts.start()
        yield ts
    finally:
        ts.stop()
    assert not ts._alive()


@pytest.fixture(scope="module")
def local(portfolio) -> PortfolioRuntime:
    return PortfolioRuntime(portfolio, profile_batch_sizes=None)


def _reply(status_body):
    status, body = status_body
    assert status == 200, body
    return json.loads(body)


def test_predictions_equal_local_inference_with_the_serving_variant(server, local):
    x, _ = digits_samples(12)
    for i in range(len(x)):
        reply = _reply(server.predict(MODEL, json_body(x[i]), {"Content-Type": "application/json"}))
        assert reply["variant"] in local.variant_ids
        assert len(reply["scores"]) == 10
        assert_matches_local(local, x[i], reply)


def test_png_request(server, local):
    x, _ = digits_samples(3)
    for i in range(3):
        png, decoded = png_body(x[i])
        assert png[:4] == b"\x89PNG"
        reply = _reply(server.predict(MODEL, png, {"Content-Type": "image/png"}))
        assert_matches_local(local, decoded, reply)


def _pinned(server, body, vid):
    """Predict with a pin; a 429 (the pin-inflate budget is spent) is retried after its Retry-After."""
    for _ in range(10):
        status, reply = server.predict(MODEL, body, {PIN_HEADER: vid})
        if status != 429:
            return status, reply
        assert "retry in" in json.loads(reply)["error"]
        time.sleep(1.0)  # Retry-After is whole seconds; the budget is one inflate per 1 s
    raise AssertionError(f"pin to {vid} throttled 10 times in a row")


def test_pin_header_serves_the_pinned_variant(server, local):
    x, _ = digits_samples(2)
    for vid in local.variant_ids:
        reply = _reply(_pinned(server, json_body(x[1]), vid))
        assert reply["variant"] == vid
        assert_matches_local(local, x[1], reply)
    status, body = server.predict(MODEL, json_body(x[1]), {PIN_HEADER: "no_such_variant"})
    assert status == 400 and "no_such_variant" in json.loads(body)["error"]


def test_pins_beyond_the_inflate_budget_get_429_and_never_a_wrong_variant(server, local):
    # two inactive variants pinned back to back: the first may inflate, then at most one more
    # inflate per second, so alternating pins must get some 429s with Retry-After, and every
    # 200 must come from the variant asked for
    x, _ = digits_samples(1)
    body = json_body(x[0])
    active = _reply(server.predict(MODEL, body))["variant"]  # an unpinned request names the active one
    others = [v for v in local.variant_ids if v != active]
    statuses = []
    for i in range(12):
        vid = others[i % len(others)]
        status, reply = serving._http("POST", server.ports.inference, f"/predictions/{MODEL}", body,
                                      {**server.inference_headers(), PIN_HEADER: vid})
        statuses.append(status)
        if status == 200:
            assert json.loads(reply)["variant"] == vid
        else:
            assert status == 429 and "retry in" in json.loads(reply)["error"], (status, reply[:200])
    assert 429 in statuses and 200 in statuses, statuses
    assert server.predict(MODEL, body)[0] == 200  # unpinned requests are not throttled


def test_token_auth_is_enforced(server):
    x, _ = digits_samples(1)
    status, _ = serving._http("POST", server.ports.inference, f"/predictions/{MODEL}", json_body(x[0]))
    assert status in (400, 401, 403)
    status, _ = serving._http("POST", server.ports.inference, f"/predictions/{MODEL}", json_body(x[0]),
                              {"Authorization": "Bearer wrong"})
    assert status in (400, 401, 403)
    assert server.predict(MODEL, json_body(x[0]))[0] == 200


BAD_BODIES = {
    "empty body": b"",
    "malformed json": b'{"data": [[1, 2,',
    "json without data": b'{"pixels": [1, 2, 3]}',
    "wrong tensor shape": json.dumps({"data": [[0.0] * 8] * 8}).encode(),
    "ragged list": json.dumps({"data": [[[0.0] * 8] * 7 + [[0.0] * 3]]}).encode(),
    "non-numbers": json.dumps({"data": [[["a"] * 8] * 8]}).encode(),
    "nan": b'{"data": [[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8) + b"]]}",
    "not an image": b"this is plain text, not a digit",
    "truncated png": None,  # filled in the test from a real PNG
    "multi-MB noise": os.urandom(3 * 1024 * 1024),
}


def test_images_are_png_or_jpeg_and_pixels_are_capped_before_decoding(server, local):
    # a 10,000 x 10,000 blank PNG is ~100 KB on the wire and 100 MB decoded: refused from its header
    bomb = bomb_png(10_000, 10_000)
    assert len(bomb) < 200_000
    status, reply = server.predict(MODEL, bomb, {"Content-Type": "image/png"})
    assert status == 413 and "pixels" in json.loads(reply)["error"], (status, reply[:300])
    for fmt in ("GIF", "BMP", "TIFF", "WEBP"):
        status, reply = server.predict(MODEL, small_image(fmt))
        assert status == 415 and "PNG or JPEG" in json.loads(reply)["error"], (fmt, status, reply[:300])
    status, reply = server.predict(MODEL, small_image("JPEG"))
    assert status == 200 and json.loads(reply)["variant"] in local.variant_ids


def test_bodies_over_max_request_size_are_refused(server):
    status, _ = server.predict(MODEL, b"{" + b" " * MAX_REQUEST_BYTES + b"}")
    assert status == 413
    assert "max_request_size=8388608" in (server.workdir / "config.properties").read_text()
    assert server.predict(MODEL, json_body(digits_samples(1)[0][0]))[0] == 200


def test_each_bad_input_gets_an_error_and_the_server_keeps_serving(server, local):
    x, _ = digits_samples(4)
    bodies = dict(BAD_BODIES, **{"truncated png": png_body(x[0])[0][:30]})
    for name, body in bodies.items():
        status, reply = server.predict(MODEL, body)
        assert 400 <= status < 500, (name, status, reply[:200])
        assert "error" in json.loads(reply), name
    # bad and good requests sent together (TorchServe batches them): only the bad ones fail
    results: dict[int, tuple[int, bytes]] = {}

    def send(i: int) -> None:
        body = json_body(x[i % 4]) if i % 2 == 0 else list(bodies.values())[i % len(bodies)]
        results[i] = server.predict(MODEL, body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (status, body) in results.items():
        if i % 2 == 0:
            assert_matches_local(local, x[i % 4], _reply((status, body)))
        else:
            assert 400 <= status < 500, body[:200]
    assert len(results) == 16
    status, body = serving._http("GET", server.ports.inference, "/ping", headers=server.inference_headers())
    assert status == 200 and b"Healthy" in body
    assert server.model_status(MODEL) == "READY"


def _burst_then_light_load(server, local):
    """A sustained burst until a cheaper variant answers, then light load until the most accurate
    one answers again; returns the switches the handler logged."""
    x, y = digits_samples(64)
    bodies = [json_body(x[i]) for i in range(len(x))]
    path, top = f"/predictions/{MODEL}", local.variant_ids[0]
    headers = server.inference_headers()
    # the server starts on the most accurate variant (or returns to it within the idle window)
    deadline = time.monotonic() + 30
    while _reply(server.predict(MODEL, bodies[0]))["variant"] != top:
        assert time.monotonic() < deadline, "never on the most accurate variant while idle"
        time.sleep(0.5)
    # sustained concurrent burst, in 1 s slices, until a cheaper variant answers (at most 12 s)
    seen_down = False
    for i in range(12):
        res = run_load(server.ports.inference, path, bodies, concurrency=burst_concurrency(i, 16), duration_s=1.0, max_requests=5000,
                       headers=headers, phase="burst")
        assert res and all(r.status == 200 for r in res), {r.status for r in res}
        if any(r.variant != top for r in res):
            seen_down = True
            break
    assert seen_down, "the burst never made the handler step down"
    # light load (3 requests/s) until the most accurate variant answers again (at most 30 s)
    back = False
    for _ in range(30):
        res = run_load(server.ports.inference, path, bodies, concurrency=2, duration_s=1.0, rate=3.0,
                       headers=headers, phase="idle")
        if res and res[-1].variant == top:
            back = True
            break
    assert back, "the handler never climbed back to the most accurate variant"
    return read_switches(server)


def test_burst_switches_down_and_light_load_climbs_back(server, local):
    switches = _burst_then_light_load(server, local)
    order = local.variant_ids
    downs = [s for s in switches if order.index(s["to"]) > order.index(s["from"])]
    ups = [s for s in switches if order.index(s["to"]) < order.index(s["from"])]
    assert downs and ups and downs[0]["time"] < ups[-1]["time"]
    assert all(s["reason"] and s["switch_ms"] >= 0 for s in switches)
    # the load generator stamps X-Request-Start: the handler read the queue delay from it
    assert "queue delay" in downs[0]["reason"], downs[0]
    # the custom metrics reach TorchServe's metrics endpoint
    status, text = serving._http("GET", server.ports.metrics, "/metrics")
    metrics = text.decode()
    assert status == 200 and "DNNShifterRequests" in metrics and "DNNShifterSwitches" in metrics


def test_corrupt_portfolio_is_refused_with_a_clear_log_line(server, portfolio, store, tmp_path):
    bad = tmp_path / "bad_portfolio"
    shutil.copytree(portfolio, bad)
    victim = bad / "variants" / f"level_01{VARIANT_SUFFIX}"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    build_archive(bad, "corrupt", store, force=True)
    status, _ = server.management("POST", "/models?url=corrupt.mar&initial_workers=1&synchronous=true")
    assert status >= 400
    deadline = time.monotonic() + 60
    while server._refusal() is None:
        assert time.monotonic() < deadline, server.log_text("model_log.log")
        time.sleep(0.2)
    line = server._refusal()
    assert f"level_01{VARIANT_SUFFIX}" in line and "sha256" in line
    server.management("DELETE", "/models/corrupt")
    assert server.model_status("corrupt") is None
    x, _ = digits_samples(1)
    assert server.predict(MODEL, json_body(x[0]))[0] == 200  # the good model is unaffected


def test_model_api_registers_archives_only_from_the_model_store(server, portfolio, store, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    build_archive(portfolio, "intruder", elsewhere)
    for url in (f"file://{elsewhere}/intruder.mar", os.path.relpath(elsewhere / "intruder.mar", store)):
        status, body = server.management("POST", f"/models?url={url}&initial_workers=1&synchronous=true")
        assert status == 404 and (b"allowed URL" in body or b"Relative path" in body), (url, status, body[:300])
    assert server.model_status("intruder") is None


def test_fixed_variant_from_archive_config(server, portfolio, store, local):
    build_archive(portfolio, "fixed", store, config={"handler": {"fixed_variant": local.variant_ids[-1]}}, force=True)
    status, body = server.management("POST", "/models?url=fixed.mar&initial_workers=1&synchronous=true")
    assert status == 200, body
    try:
        x, _ = digits_samples(4)
        for i in range(4):
            reply = _reply(server.predict("fixed", json_body(x[i])))
            assert reply["variant"] == local.variant_ids[-1]
            assert_matches_local(local, x[i], reply)
    finally:
        server.management("DELETE", "/models/fixed")


def test_archive_refuses_bad_inputs(portfolio, store, tmp_path):
    with pytest.raises(ServingError, match="manifest.json"):
        build_archive(tmp_path, "x", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ServingError, match="manifest.json: not valid JSON"):
        build_archive(broken, "x", tmp_path / "out")
    (broken / "manifest.json").write_text('{"format_version": 1}')  # valid JSON, not a manifest
    with pytest.raises(ServingError, match="manifest.json"):
        build_archive(broken, "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ServingError, match="exists"):
        build_archive(portfolio, MODEL, store)
    with pytest.raises(ServingError, match="model name"):
        build_archive(portfolio, "bad name!", tmp_path / "out")


def test_missing_java_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(JavaMissingError, match="openjdk-17-jre-headless"):
        serving.check_java()


def test_serve_command_starts_with_auth_and_stop_command_stops(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DNNSHIFTER_HOME", str(tmp_path / "home"))
    ports = {k: serving.free_port() for k in ("inference_port", "management_port", "metrics_port")}
    info = cli.serve_command(store, MODEL, **ports)
    try:
        keys = json.loads(Path(info["key_file"]).read_text())
        x, _ = digits_samples(1)
        status, body = serving._http("POST", ports["inference_port"], f"/predictions/{MODEL}", json_body(x[0]),
                                     {"Authorization": f"Bearer {keys['inference']['key']}"})
        assert status == 200 and "variant" in json.loads(body)
        # by default the management API registers nothing, not even an archive from the store
        mgmt = {"Authorization": f"Bearer {keys['management']['key']}"}
        elsewhere = tmp_path / "elsewhere.mar"
        shutil.copy(store / f"{MODEL}.mar", elsewhere)
        for url in (f"{MODEL}.mar", f"file://{store.resolve()}/{MODEL}.mar", f"file://{elsewhere}"):
            status, body = serving._http("POST", ports["management_port"], f"/models?url={url}&model_name=again",
                                         headers=mgmt)
            assert status == 405, (url, status, body[:300])
        with pytest.raises(SystemExit):  # a second server is refused while one runs
            cli.serve_command(store, MODEL)
    finally:
        assert cli.serve_stop_command() is True
    assert not (tmp_path / "home" / "serve.json").exists()
    deadline = time.monotonic() + 30
    while True:
        try:
            serving._http("GET", ports["inference_port"], "/ping", timeout=2)
        except OSError:
            break
        assert time.monotonic() < deadline, "server still answering after stop"
        time.sleep(0.2)


def test_stop_never_signals_a_process_it_cannot_verify_as_its_torchserve(tmp_path, monkeypatch):
    # a stale state file (a crashed server, a recycled pid, or an edited file) names an unrelated
    # process group: --stop must leave it alone, say why, and remove the stale state
    home = tmp_path / "home"
    monkeypatch.setenv("DNNSHIFTER_HOME", str(home))
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        state = TorchServeServer(tmp_path, ["digits"], workdir=tmp_path / "ts").state()
        import psutil

        created = psutil.Process(bystander.pid).create_time()
        state.update(pid=bystander.pid, pgid=bystander.pid, pid_create_time=created)
        home.mkdir()
        (home / "serve.json").write_text(json.dumps(state))
        from rich.console import Console

        console = Console(record=True, width=300)
        assert cli.serve_stop_command(console) is False
        text = console.export_text()
        assert "not stopping anything" in text and "not a TorchServe frontend" in text, text
        assert bystander.poll() is None, "the unrelated process was signalled"
        assert not (home / "serve.json").exists()
        # nor is one with the right pid but another start time (a recycled pid)
        state["pid_create_time"] -= 10
        (home / "serve.json").write_text(json.dumps(state))
        assert cli.serve_stop_command(Console(record=True, width=300)) is False
        assert bystander.poll() is None
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait(10)


def _worker_pids(server) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(server.pid).children(recursive=True)
            if any("model_service_worker" in part for part in c.cmdline())]


def test_killed_worker_recovers_during_a_burst_and_every_request_is_answered(server, local):
    """SIGKILL the Python worker (not the frontend) mid-burst: TorchServe restarts it by itself,
    every request gets an HTTP answer (an error counts), and 200s come back within a bound."""
    x, _ = digits_samples(16)
    bodies = [json_body(x[i]) for i in range(len(x))]
    old = _worker_pids(server)
    assert len(old) == 1, old
    log: list[tuple[float, float, int | str]] = []  # (sent, done, status or exception name)
    stop = threading.Event()
    t_kill = [0.0]

    def client(k: int) -> None:
        for n in range(400):  # bounded: 8 clients x 400 requests at most
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                status, _ = server.predict(MODEL, bodies[(k + n) % len(bodies)], timeout=60)
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                status = type(exc).__name__
            log.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while sum(1 for entry in log if entry[2] == 200) < 20:  # the burst is under way
            assert time.monotonic() < deadline, log[-5:]
            time.sleep(0.05)
        t_kill[0] = time.monotonic()
        os.kill(old[0], signal.SIGKILL)
        deadline = t_kill[0] + 45
        while not any(status == 200 and sent > t_kill[0] for sent, _, status in log):
            assert time.monotonic() < deadline, f"no 200 within 45 s of the kill: {log[-5:]}"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    recovered = min(done for sent, done, status in log if status == 200 and sent > t_kill[0]) - t_kill[0]
    errors = sorted({status for _, _, status in log if status != 200}, key=str)
    print(f"worker killed mid-burst: {len(log)} requests, errors {errors}, first 200 after {recovered:.2f} s")
    assert all(isinstance(status, int) for _, _, status in log), errors  # an HTTP answer for every request
    assert recovered < 40.0  # measured 12.3 and 18.6 s on a loaded 2-core VM (worker start, portfolio load, profiling)
    new = _worker_pids(server)
    assert len(new) == 1 and new != old
    assert server.model_status(MODEL) == "READY"
    assert server.predict(MODEL, bodies[0])[0] == 200


class _BareTorchServe(TorchServeServer):
    """``torchserve --start --model-store STORE --models digits=digits.mar`` with nothing else set:
    TorchServe's defaults (token auth on, default worker count, log metrics, queue size...) apart
    from the addresses, which must be free loopback ports in a test."""

    def config_properties(self) -> str:
        props = {"inference_address": self.inference_url, "management_address": self.management_url,
                 "metrics_address": self.metrics_url, "grpc_inference_port": self.ports.grpc_inference,
                 "grpc_management_port": self.ports.grpc_management,
                 "load_models": ",".join(f"{n}={m}" for n, m in self.models.items())}
        return "".join(f"{k}={v}\n" for k, v in props.items())


def test_plain_torchserve_start_serves_and_switches_with_the_archives_defaults(store, local, tmp_path):
    ts = _BareTorchServe(store, [MODEL], no_auth=False, workdir=tmp_path / "bare")
    try:
        ts.start()
        assert "disable_token_authorization" not in (tmp_path / "bare" / "config.properties").read_text()
        assert ts.key_file.is_file()  # token auth is on by default
        status, body = serving._http("POST", ts.ports.inference, f"/predictions/{MODEL}",
                                     json_body(digits_samples(1)[0][0]))
        assert status in (400, 401, 403) and b"label" not in body  # no token, no prediction (0.12 answers 400)
        switches = _burst_then_light_load(ts, local)
        assert switches, "no DNNSHIFTER_SWITCH line in the model log"
    finally:
        ts.stop()
    assert not ts._alive()


def _demo_serving(portfolio_dir: Path, workdir: Path, **kw) -> tuple[dict, str]:
    from rich.console import Console

    from dnnshifter_lightning.cli import DemoPrinter
    from dnnshifter_lightning.demo.serving import run_demo_serving

    console = Console(record=True, width=200)
    with DemoPrinter(console) as printer:  # what `dnnshifter demo` prints
        report = run_demo_serving(portfolio_dir, workdir, printer, engine="torchserve", **kw)
    return report, console.export_text()


def test_demo_serving_steps_down_under_the_burst_and_climbs_back(portfolio, local, tmp_path):
    report, text = _demo_serving(portfolio, tmp_path / "demo", burst_s=4.0, idle_s=15.0)
    assert report["front"] == local.variant_ids  # a ladder: every variant is on the front
    assert sorted(report["phases"]) == ["burst", "light", "recovery"]
    assert report["burst_rate"] == pytest.approx(2.5 * report["capacity_rps"])  # sized from the measured capacity
    for name, phase in report["phases"].items():
        assert phase["requests"] > 0, (name, phase)
    order = local.variant_ids
    downs = [s for s in report["switches"] if s["direction"] == "down"]
    ups = [s for s in report["switches"] if s["direction"] == "up"]
    assert downs and ups and downs[0]["time"] < ups[-1]["time"], report["switches"]
    assert ups[-1]["to"] == order[0]  # the climb ends on the most accurate variant
    assert "variant switches seen by the handler" in text and downs[0]["to"] in text
    assert report["phases"]["recovery"]["variants"].get(order[0]), "never back on the most accurate variant"
    assert 0 < report["effective_accuracy"] <= 1 and "effective accuracy of the run" in text
    assert report["memory"]["total_bytes"] < report["memory"]["served_all_inflated_bytes"] + \
        report["memory"]["compressed_bytes"] and "resident for the 3 served variants" in " ".join(text.split())


def test_demo_serving_says_when_the_config_fixes_the_variant(portfolio, local, tmp_path):
    fixed = local.variant_ids[-1]
    report, text = _demo_serving(portfolio, tmp_path / "demo", burst_s=2.0, idle_s=5.0, no_auth=True,
                                 config={"handler": {"fixed_variant": fixed}})
    assert "token auth is OFF for this demo" in text  # the opt-out `dnnshifter demo` makes, said out loud
    assert report["switches"] == []
    assert f"the archive's config fixes the variant to {fixed}" in " ".join(text.split())
    assert all(set(phase["variants"]) == {fixed} for phase in report["phases"].values())


def test_demo_serving_says_why_a_one_variant_front_never_switches(portfolio, tmp_path):
    # the cheapest variant is also the most accurate (what a small validation split can give):
    # it dominates the others, so the policy stays on it under any load, and the demo says so
    one = tmp_path / "one_front"
    shutil.copytree(portfolio, one)
    manifest = json.loads((one / "manifest.json").read_text())
    variants = manifest["variants"][::-1]
    for i, v in enumerate(variants):
        v["accuracy"], v["macs"] = 0.99 - 0.01 * i, 1000 * (i + 1)
    manifest["variants"] = variants
    serving_ids = [v["id"] for v in variants]
    from dnnshifter_lightning.portfolio import write_manifest

    write_manifest(one, manifest)
    report, text = _demo_serving(one, tmp_path / "demo", burst_s=2.0, idle_s=5.0)
    assert report["front"] == serving_ids[:1] and report["switches"] == []
    assert f"{serving_ids[0]} is the only served variant" in " ".join(text.split())
    assert "both the most accurate and the cheapest" in " ".join(text.split())
    assert set(report["phases"]["burst"]["variants"]) == {serving_ids[0]}
