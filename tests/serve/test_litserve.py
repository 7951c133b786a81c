"""PortfolioLitAPI against a real LitServe server on a free loopback port (one server, always stopped).

The server runs two APIs on the same portfolio: ``/predict`` (adaptive) and ``/fixed``
(``fixed_variant`` set to the cheapest variant).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dnnshifter_lightning.serve.runtime import PortfolioRuntime
from dnnshifter_lightning.serve.defaults import PIN_HEADER
from dnnshifter_lightning.serve.torchserve import _http, free_port

from serve_fixtures import assert_matches_local, burst_concurrency, digits_samples, json_body, png_body, small_image

pytest.importorskip("litserve")
pytestmark = pytest.mark.litserve

REPO = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent("""
    import sys
    import litserve
    from dnnshifter_lightning import PortfolioLitAPI

    portfolio, port, fixed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    apis = [PortfolioLitAPI(portfolio, max_batch_size=8, batch_timeout=0.02, profile_batch_sizes=[1],
                            torch_threads=1),
            PortfolioLitAPI(portfolio, max_batch_size=8, batch_timeout=0.02, api_path="/fixed",
                            fixed_variant=fixed, profile_batch_sizes=[1], torch_threads=1)]
    litserve.LitServer(apis, accelerator="cpu", timeout=60).run(host="127.0.0.1", port=port,
                                                                   generate_client_file=False, log_level="warning")
""")

BAD_BODIES = {
    "empty body": (b"", 400),
    "malformed json": (b'{"data": [[1, 2,', 400),
    "json without data": (b'{"pixels": [1, 2, 3]}', 400),
    "wrong tensor shape": (json.dumps({"data": [[0.0] * 8] * 8}).encode(), 400),
    "ragged list": (json.dumps({"data": [[[0.0] * 8] * 7 + [[0.0] * 3]]}).encode(), 400),
    "nan": (b'{"data": [[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8) + b"]]}", 400),
    "not an image": (b"this is plain text, not a digit", 415),
    "gif": (small_image("GIF"), 415),
}


@pytest.fixture(scope="module")
def local(portfolio) -> PortfolioRuntime:
    return PortfolioRuntime(portfolio, profile_batch_sizes=None)


@contextlib.contextmanager
def _litserve(args: list[str], port: int, log_dir: Path, cwd: Path | None = None):
    """Run ``python ARGS`` (a LitServe server on ``port``) until healthy; always stopped, with its workers."""
    log = (log_dir / "server.log").open("w+b")
    env = dict(os.environ, PORT=str(port),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, _tail(log)
            try:
                if _http("GET", port, "/health", timeout=2)[0] == 200:  # 200 once every worker's setup ran
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "LitServe never became healthy:\n" + _tail(log)
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def server(portfolio, local, tmp_path_factory):
    port = free_port()
    with _litserve(["-c", SERVER, str(portfolio), str(port), local.variant_ids[-1]], port,
                   tmp_path_factory.mktemp("litserve")):
        yield port


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:].decode(errors="replace")


def _post(port: int, body: bytes, headers: dict | None = None, path: str = "/predict") -> tuple[int, dict]:
    status, raw = _http("POST", port, path, body, headers)
    return status, json.loads(raw)


def _healthy(port: int) -> None:
    assert _http("GET", port, "/health")[0] == 200
    x, _ = digits_samples(1)
    status, reply = _post(port, json_body(x[0]))
    assert status == 200, reply


def test_predictions_equal_local_inference_with_the_serving_variant(server, local):
    x, _ = digits_samples(12)
    for i in range(len(x)):
        status, reply = _post(server, json_body(x[i]), {"Content-Type": "application/json"})
        assert status == 200, reply
        assert reply["variant"] in local.variant_ids and len(reply["scores"]) == 10
        assert_matches_local(local, x[i], reply)


def test_png_request(server, local):
    x, _ = digits_samples(3)
    for i in range(3):
        png, decoded = png_body(x[i])
        status, reply = _post(server, png, {"Content-Type": "image/png"})
        assert status == 200, reply
        assert_matches_local(local, decoded, reply)


def test_each_bad_input_gets_a_4xx_and_the_rest_of_the_batch_is_answered(server, local):
    for name, (body, code) in BAD_BODIES.items():
        status, reply = _post(server, body)
        assert status == code and reply["code"] == code and reply["error"], (name, status, reply)
    _healthy(server)
    # bad and good requests sent together (LitServe batches them, up to 8 within 20 ms)
    x, _ = digits_samples(4)
    bad = list(BAD_BODIES.values())
    results: dict[int, tuple[int, dict]] = {}

    def send(i: int) -> None:
        results[i] = _post(server, json_body(x[i % 4]) if i % 2 == 0 else bad[i % len(bad)][0])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16
    for i, (status, reply) in results.items():
        if i % 2 == 0:
            assert status == 200, reply
            assert_matches_local(local, x[i % 4], reply)
        else:
            assert 400 <= status < 500 and "error" in reply, (i, status, reply)
    _healthy(server)


def test_pin_header_serves_the_pinned_variant(server, local):
    x, _ = digits_samples(2)
    for vid in local.variant_ids:
        for _ in range(10):  # a pin to a compressed variant inflates it at most once per second
            status, reply = _post(server, json_body(x[1]), {PIN_HEADER: vid})
            if status != 429:
                break
            time.sleep(1.0)
        assert status == 200 and reply["variant"] == vid, reply
        assert_matches_local(local, x[1], reply)
    status, reply = _post(server, json_body(x[1]), {PIN_HEADER: "no_such_variant"})
    assert status == 400 and "no_such_variant" in reply["error"]


def test_fixed_variant_serves_only_that_variant(server, local):
    x, _ = digits_samples(6)
    for i in range(len(x)):
        status, reply = _post(server, json_body(x[i]), path="/fixed")
        assert status == 200 and reply["variant"] == local.variant_ids[-1], reply
        assert_matches_local(local, x[i], reply)


def test_options_are_checked_before_any_worker_starts(portfolio):
    from dnnshifter_lightning import PortfolioLitAPI

    with pytest.raises(ValueError):
        PortfolioLitAPI(portfolio, fixed_variant="no_such_variant")
    with pytest.raises(Exception, match="manifest"):
        PortfolioLitAPI(portfolio / "missing")


def test_readme_litserve_example_runs_as_written(portfolio, local, tmp_path):
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "PortfolioLitAPI(" in b)
    shutil.copytree(portfolio, tmp_path / "portfolio")
    port = free_port()
    with _litserve(["-c", block], port, tmp_path, cwd=tmp_path):
        x, _ = digits_samples(1)
        status, reply = _post(port, json_body(x[0]))
        assert status == 200, reply
        assert_matches_local(local, x[0], reply)


def test_burst_steps_down_and_light_load_climbs_back(server, local):
    from dnnshifter_lightning.loadgen import run_load

    x, _ = digits_samples(64)
    bodies = [json_body(x[i]) for i in range(len(x))]
    top = local.variant_ids[0]
    deadline = time.monotonic() + 30  # idle: the server is on (or returns to) the most accurate variant
    while _post(server, bodies[0])[1]["variant"] != top:
        assert time.monotonic() < deadline, "never on the most accurate variant while idle"
        time.sleep(0.5)
    seen_down = False
    # sustained concurrent burst, in 1 s slices, until a cheaper variant answers. From 48 clients: the
    # policy steps down when requests wait (LitServe reports each wait), and 16 at batch 8 barely queue
    for i in range(12):
        res = run_load(server, "/predict", bodies, concurrency=burst_concurrency(i, 48), duration_s=1.0, max_requests=5000, phase="burst")
        assert res and all(r.status == 200 for r in res), {r.status for r in res}
        if any(r.variant != top for r in res):
            seen_down = True
            break
    assert seen_down, "the burst never made the policy step down"
    for _ in range(30):  # light load (3 requests/s) until the most accurate variant answers again
        res = run_load(server, "/predict", bodies, concurrency=2, duration_s=1.0, rate=3.0, phase="idle")
        if res and res[-1].variant == top:
            return
    raise AssertionError("the policy never climbed back to the most accurate variant")


def test_setup_opens_the_runtime_on_the_workers_device(portfolio):
    # LitServe calls setup(device) in each worker ("cuda:0" under accelerator="auto" on a GPU); "meta"
    # stands in for a device this machine lacks: the active variant must be inflated there
    from dnnshifter_lightning import PortfolioLitAPI

    api = PortfolioLitAPI(portfolio, profile_batch_sizes=[1], torch_threads=None)  # leaves this process's threads
    api.setup("meta")
    active = api.runtime.variant_module(api.runtime.active_id)
    assert api.runtime.device.type == "meta" and {p.device.type for p in active.parameters()} == {"meta"}
