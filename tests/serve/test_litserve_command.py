"""`dnnshifter litserve` as a user runs it: a real subprocess on a free loopback port, 2 workers per
device, auth on, Prometheus metrics, stopped with Ctrl-C (SIGINT to its process group, as a terminal
sends it). One server for the module; the Ctrl-C test runs last and stops it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dnnshifter_lightning.cli import app
from dnnshifter_lightning.serve.torchserve import _http, port_is_free, free_port

from serve_fixtures import burst_concurrency, digits_samples, json_body

pytest.importorskip("litserve")
pytestmark = pytest.mark.litserve

REPO = Path(__file__).resolve().parents[2]
CONFIG = "max_batch_size: 8\nbatch_timeout: 0.02\nprofile_batch_sizes: [1]\ntorch_threads: 1\n"


class _Cli:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _readme_block() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "dnnshifter litserve portfolio" in b)
    return [line.split("   #")[0].strip() for line in block.strip().splitlines()]


@pytest.fixture(scope="module")
def cli(portfolio, tmp_path_factory):
    """The README's `dnnshifter litserve` line, as written plus a free --port, in a directory holding
    `portfolio` and `my.yaml`, with HOME there (so the key lands in its ~/.cache/dnnshifter)."""
    work = tmp_path_factory.mktemp("litserve_cli")
    (work / "my.yaml").write_text(CONFIG)
    (work / "portfolio").symlink_to(portfolio)
    port = free_port()
    log = work / "out.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DNNSHIFTER_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(work), COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = shlex.split(_readme_block()[0])
    assert command[:3] == ["dnnshifter", "litserve", "portfolio"]
    with log.open("wb") as out:
        # SIGINT at its default, as under a terminal: a shell without job control (a CI script's
        # background job) starts its children with SIGINT ignored, and Ctrl-C would then do nothing
        proc = subprocess.Popen([*command, "--port", str(port)], cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = _Cli(proc, port, log)
    server.work, server.env = work, env
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops it" not in server.output():
            assert proc.poll() is None, server.output()[-4000:]
            assert time.monotonic() < deadline, "never healthy:\n" + server.output()[-4000:]
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_readme_curl_commands_run_as_written(cli):
    from PIL import Image
    from sklearn.datasets import load_digits

    Image.fromarray((load_digits().images[0] * 255 / 16).astype("uint8")).save(cli.work / "digit.png")
    for line in _readme_block()[1:]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line.replace(":8000/", f":{cli.port}/")],
                              cwd=cli.work, env=cli.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (line, proc.stderr)
        if "/predict" in line:
            assert json.loads(proc.stdout)["variant"], proc.stdout
        else:
            assert 'dnnshifter_active_variant_index{api="/predict",worker="0"}' in proc.stdout, proc.stdout


def _key(cli: _Cli) -> str:
    match = re.search(r"generated, in (\S+) \(mode 0600\)", cli.output())
    assert match, cli.output()
    return Path(match.group(1)).read_text()


def _metrics(cli: _Cli) -> str:
    status, raw = _http("GET", cli.port, "/metrics/")
    assert status == 200
    return raw.decode()


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))), float(m.group(2))))
    return out


def test_prints_the_urls_and_keeps_the_generated_key_private(cli, portfolio):
    out = cli.output()
    for path in ("/predict", "/health", "/metrics/", "/info"):
        assert f"http://127.0.0.1:{cli.port}{path}" in out
    key_file = Path(re.search(r"generated, in (\S+) \(mode 0600\)", out).group(1))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    x, _ = digits_samples(1)
    assert _http("POST", cli.port, "/predict", json_body(x[0]))[0] == 401  # no key
    assert _http("POST", cli.port, "/predict", json_body(x[0]), {"X-API-Key": "wrong" * 8})[0] == 401
    status, raw = _http("POST", cli.port, "/predict", json_body(x[0]), {"X-API-Key": _key(cli)})
    assert status == 200 and json.loads(raw)["variant"], raw


def test_two_workers_both_serve(cli):
    from dnnshifter_lightning.loadgen import run_load

    x, _ = digits_samples(16)
    bodies = [json_body(x[i]) for i in range(16)]
    workers = _samples(_metrics(cli), "dnnshifter_worker_info")
    assert sorted(labels["worker"] for labels, _ in workers) == ["0", "1"]
    assert len({labels["worker_pid"] for labels, _ in workers}) == 2  # two processes, each its own runtime
    deadline = time.monotonic() + 30
    while True:
        res = run_load(cli.port, "/predict", bodies, concurrency=8, duration_s=1.0, max_requests=400,
                       headers={"X-API-Key": _key(cli)})
        assert res and all(r.status == 200 for r in res)
        served = {labels["worker"] for labels, n in _samples(_metrics(cli), "dnnshifter_requests_total") if n > 0}
        if served == {"0", "1"}:
            return
        assert time.monotonic() < deadline, f"only workers {served} answered"


def test_metrics_show_the_switches_after_a_burst(cli):
    from dnnshifter_lightning.loadgen import run_load

    x, _ = digits_samples(64)
    bodies = [json_body(x[i]) for i in range(64)]
    headers = {"X-API-Key": _key(cli)}
    stepped_down = None
    for i in range(15):  # a sustained burst in 1 s slices, until a cheaper variant answers
        res = run_load(cli.port, "/predict", bodies, concurrency=burst_concurrency(i, 48), duration_s=1.0, max_requests=5000,
                       headers=headers)
        assert res and all(r.status == 200 for r in res)
        stepped_down = next((r.variant for r in res if r.variant != "level_00"), None)
        if stepped_down:
            break
    assert stepped_down, "the burst never made a worker step down"
    text = _metrics(cli)
    downs = sum(n for labels, n in _samples(text, "dnnshifter_switches_total") if labels["direction"] == "down")
    assert downs >= 1, text
    assert sum(n for _, n in _samples(text, "dnnshifter_switch_seconds_count")) >= downs
    per_variant = {labels["variant"] for labels, n in _samples(text, "dnnshifter_requests_total") if n > 0}
    assert {"level_00", stepped_down} <= per_variant


def test_ctrl_c_stops_the_server_and_its_workers(cli):  # last: it stops the module's server
    os.killpg(cli.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
    assert cli.proc.wait(30) == 0, cli.output()[-3000:]
    out = cli.output()
    assert "LitServe stopped" in out and "Process inference-worker" not in out, out[-3000:]
    deadline = time.monotonic() + 10
    while True:
        ps = subprocess.run(["ps", "-o", "stat=", "-g", str(cli.proc.pid)], capture_output=True, text=True).stdout
        alive = [s for s in ps.split() if not s.startswith("Z")]
        if not alive and port_is_free(cli.port):
            break
        assert time.monotonic() < deadline, f"still running after Ctrl-C: {ps}"
        time.sleep(0.2)


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "pass --api-key KEY"),
    (["--host", "0.0.0.0", "--no-auth"], "pass --api-key KEY"),
    (["--api-key", "k" * 20, "--no-auth"], "contradict"),
    (["--api-key", "short"], "at least 16"),
    (["--host", "10.1.2.3"], "LitServe binds 127.0.0.1"),
])
def test_refuses_unsafe_or_contradictory_flags_before_starting(portfolio, args, message):
    result = CliRunner().invoke(app, ["litserve", str(portfolio), *args])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output


def test_config_errors_name_the_file_and_what_to_change(portfolio, tmp_path):
    for text, message in [("slo: 50\n", "unknown option 'slo'"),
                          ("policy:\n  high_utilisaton: 0.9\n", "high_utilisaton"),
                          ("fixed_variant: level_99\n", "level_99"),
                          ("memory_budget_mb: -5\n", "memory_budget_mb must be")]:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        result = CliRunner().invoke(app, ["litserve", str(portfolio), "--config", str(cfg), "--port",
                                          str(free_port())])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and message in output, output
        if "level_99" not in text:
            assert "bad.yaml" in output


def test_bad_arguments_fail_before_anything_starts(tmp_path):
    from dnnshifter_lightning.serve.litserve_command import litserve_command
    with pytest.raises(ValueError, match=r"^--workers-per-device must be >= 1, got 0$"):
        litserve_command(tmp_path / "portfolio", workers_per_device=0)
    with pytest.raises(ValueError, match=r"^--host 0.0.0.0 listens on every network interface: pass --api-key KEY"):
        litserve_command(tmp_path / "portfolio", host="0.0.0.0")


def test_metrics_logger_refuses_a_directory_of_an_earlier_run(tmp_path):
    from dnnshifter_lightning.serve.litserve_metrics import PortfolioMetricsLogger
    assert PortfolioMetricsLogger(str(tmp_path), mount=False).scrape() == ""  # nothing reported yet
    (tmp_path / "counter_123.db").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds files of an earlier run \(counter_123.db, .*give an empty or new directory"):
        PortfolioMetricsLogger(str(tmp_path))
