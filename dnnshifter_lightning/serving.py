"""TorchServe glue: build a ``.mar`` from a portfolio, run TorchServe on loopback, drive load at it.

Everything here talks to ``127.0.0.1`` only. The plain functions ``archive_command``,
``serve_command`` and ``serve_stop_command`` back ``dnnshifter archive`` / ``dnnshifter serve``;
:class:`TorchServeServer` is the Python API used by tests, benchmarks and the demo.

Example::

    >>> from pathlib import Path
    >>> from dnnshifter_lightning.serving import build_archive, TorchServeServer
    >>> mar = build_archive(Path("portfolio"), "digits", Path("store"))        # doctest: +SKIP
    >>> with TorchServeServer(Path("store"), {"digits": "digits.mar"}) as ts:  # doctest: +SKIP
    ...     status, body = ts.predict("digits", b'{"data": [[[0.0]*8]*8]}')
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "JavaMissingError", "ServingError", "check_java", "free_port", "default_model_config",
    "build_archive", "TorchServeServer", "LoadResult", "run_load",
    "archive_command", "serve_command", "serve_stop_command", "PIN_HEADER", "HANDLER_FILE",
]

PIN_HEADER = "X-DNNShifter-Variant"
HANDLER_FILE = Path(__file__).resolve().parent.parent / "serve_handlers" / "portfolio_handler.py"
LOOPBACK = "127.0.0.1"

JAVA_HELP = (
    "TorchServe 0.12 needs Java 17 (a JRE is enough). Install it with one of:\n"
    "  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless\n"
    "  Fedora/RHEL:    sudo dnf install -y java-17-openjdk-headless\n"
    "  macOS:          brew install openjdk@17\n"
    "  any OS:         Eclipse Temurin 17 from https://adoptium.net\n"
    "then make sure `java -version` says 17 (or set JAVA_HOME to the JDK/JRE directory)."
)

# Defaults written into every archive's model-config.yaml, so that a plain
# `torchserve --start --model-store STORE --models NAME=NAME.mar` batches and switches.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 5,
    "responseTimeout": 60,
    "handler": {
        "portfolio_dir": "portfolio",
        "memory_budget_mb": None,
        "fixed_variant": None,
        "slo_ms": None,
        "pin_header": PIN_HEADER,
        "profile_batch_sizes": [1, 8],
        "policy": {},
    },
}


class ServingError(RuntimeError):
    """TorchServe failed to build, start, become healthy or stop; the message says why."""


class JavaMissingError(ServingError):
    """``java`` (17+) is not available; the message says how to install it."""


def check_java() -> str:
    """Return the path of a usable ``java`` (17+) or raise :class:`JavaMissingError` with install help.

    >>> check_java()  # doctest: +SKIP
    '/usr/bin/java'
    """
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "`java` is not on PATH"
        raise JavaMissingError(f"{where}.\n{JAVA_HELP}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaMissingError(f"`{java} -version` failed: {exc}\n{JAVA_HELP}") from exc
    match = re.search(r'version "(\d+)', out.stderr + out.stdout)
    if match is None or int(match.group(1)) < 17:
        found = match.group(1) if match else "unknown"
        raise JavaMissingError(f"{java} is Java {found}; TorchServe 0.12 needs 17 or newer.\n{JAVA_HELP}")
    return java


def _venv_tool(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ServingError(f"`{name}` not found: pip install 'dnnshifter-lightning[serve]'")
    return found


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, Mapping) else value
    return out


def default_model_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The archive's ``model-config.yaml`` content: built-in defaults deep-merged with ``overrides``.

    >>> default_model_config({"batchSize": 4, "handler": {"slo_ms": 20}})["handler"]["slo_ms"]
    20
    """
    return _merge(DEFAULT_MODEL_CONFIG, overrides or {})


def build_archive(portfolio: Path, model_name: str, export_path: Path, config: Path | Mapping | None = None,
                  force: bool = False) -> Path:
    """Build ``export_path/model_name.mar``: the handler, the portfolio (under ``portfolio/``) and a
    ``model-config.yaml`` (defaults merged with ``config``, a YAML file or a dict).

    The portfolio's manifest is read first, so a directory that is not a portfolio fails here, not
    inside TorchServe.
    """
    import yaml

    portfolio, export_path = Path(portfolio), Path(export_path)
    if not (portfolio / "manifest.json").is_file():
        raise ServingError(f"{portfolio} is not a portfolio: {portfolio / 'manifest.json'} is missing")
    json.loads((portfolio / "manifest.json").read_text())  # fail early on a broken manifest
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
        raise ServingError(f"model name {model_name!r}: use letters, digits, '_', '.', '-'")
    mar = export_path / f"{model_name}.mar"
    if mar.exists() and not force:
        raise ServingError(f"{mar} exists; pass force=True (--force) to overwrite it")
    overrides = yaml.safe_load(Path(config).read_text()) if isinstance(config, (str, Path)) else config
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dnnshifter-mar-") as tmp:
        stage = Path(tmp) / "extra"
        shutil.copytree(portfolio, stage / "portfolio")
        cfg = Path(tmp) / "model-config.yaml"
        cfg.write_text(yaml.safe_dump(default_model_config(overrides or {}), sort_keys=False))
        cmd = [_venv_tool("torch-model-archiver"), "--model-name", model_name, "--version", "1.0",
               "--handler", str(HANDLER_FILE), "--extra-files", str(stage), "--config-file", str(cfg),
               "--export-path", str(export_path)]
        if force:
            cmd.append("--force")
        # the archiver stages files in $TMPDIR/<model_name>: keep that private
        env = dict(os.environ, TMPDIR=str(Path(tmp)))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 or not mar.is_file():
        raise ServingError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return mar


def _http(method: str, port: int, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
          timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class _Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int


class TorchServeServer:
    """A real TorchServe on 127.0.0.1 with its own ports, working dir and TMPDIR; always stopped.

    ``models`` maps model name to ``.mar`` file name inside ``store`` (or is a list of names,
    meaning ``NAME.mar``). With ``no_auth=False`` token authorization stays on and the keys are read
    from ``key_file.json`` in ``workdir``; :meth:`predict` and :meth:`management` send them.

    Example::

        with TorchServeServer(store, {"digits": "digits.mar"}, workdir=tmp) as ts:
            status, body = ts.predict("digits", json.dumps({"data": x.tolist()}).encode())
            print(ts.inference_url, ts.model_status("digits"))

    Stable API (also used by ``benchmarks/_torchserve_versions.py``): ``start()``, ``stop()``,
    ``wait_ready(timeout)``, ``predict(model, body, headers=None, version=None)``,
    ``management(method, path, body=None)``, ``model_status(model)``, ``log_text()``, ``ports``,
    ``inference_url``/``management_url``/``metrics_url``, ``inference_headers()``,
    ``management_headers()``, ``key_file``, ``workdir``.
    """

    def __init__(self, store: Path, models: Mapping[str, str] | Sequence[str] | None = None, *, no_auth: bool = True,
                 workdir: Path | None = None, ports: Mapping[str, int] | None = None,
                 extra_config: Mapping[str, Any] | None = None, startup_timeout: float = 180.0) -> None:
        self.store = Path(store).resolve()
        if models is None:
            models = {}
        elif not isinstance(models, Mapping):
            models = {name: f"{name}.mar" for name in models}
        self.models = dict(models)
        self.no_auth = no_auth
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dnnshifter-ts-")).resolve()
        # Java's unix-socket paths (worker sockets live in java.io.tmpdir) must stay < 108 bytes
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dnnts-", dir="/tmp" if os.path.isdir("/tmp") else None))
        p = dict(ports or {})
        self.ports = _Ports(*(p.get(k) or free_port() for k in
                              ("inference", "management", "metrics", "grpc_inference", "grpc_management")))
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self._launcher_pgid: int | None = None
        self._keys: dict[str, str] = {}

    # ---------------------------------------------------------------- urls and auth
    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def _key(self, kind: str) -> str | None:
        if self.no_auth:
            return None
        if kind not in self._keys:
            data = json.loads(self.key_file.read_text())
            self._keys = {k: v["key"] for k, v in data.items() if isinstance(v, dict) and "key" in v}
        return self._keys.get(kind)

    def inference_headers(self) -> dict[str, str]:
        key = self._key("inference")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def management_headers(self) -> dict[str, str]:
        key = self._key("management")
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ---------------------------------------------------------------- lifecycle
    def config_properties(self) -> str:
        """The generated ``config.properties``: loopback only, fixed worker count, nothing fetched."""
        props = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": LOOPBACK,
            "grpc_management_address": LOOPBACK,
            "grpc_inference_port": self.ports.grpc_inference,
            "grpc_management_port": self.ports.grpc_management,
            "model_store": self.store,
            "load_models": ",".join(f"{n}={m}" for n, m in self.models.items()) or "",
            "default_workers_per_model": 1,
            "install_py_dep_per_model": "false",
            "disable_token_authorization": "true" if self.no_auth else "false",
            "enable_model_api": "true",  # management API may register models (used by benchmarks)
            "allowed_urls": r"file://.*",  # never fetch a model over the network
            "metrics_mode": "prometheus",
            "model_metrics_auto_detect": "true",
            "disable_system_metrics": "true",
            "enable_envvars_config": "false",
            "number_of_netty_threads": 4,
            "netty_client_threads": 4,
            "job_queue_size": 1000,
            "default_response_timeout": 120,
            "initial_worker_port": free_port(),
        }
        props.update(self.extra_config)
        if not props["load_models"]:
            del props["load_models"]
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _env(self) -> dict[str, str]:
        return dict(os.environ, TMPDIR=str(self.tmpdir), TEMP=str(self.tmpdir), LOG_LOCATION=str(self.log_dir),
                    METRICS_LOCATION=str(self.log_dir), PYTHONUNBUFFERED="1")

    def start(self) -> "TorchServeServer":
        """Start TorchServe and wait until it and every model report healthy; stops it on failure."""
        check_java()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.properties"
        cfg.write_text(self.config_properties())
        cmd = [_venv_tool("torchserve"), "--start", "--ncs", "--ts-config", str(cfg), "--model-store", str(self.store)]
        if self.no_auth:
            cmd.append("--disable-token-auth")
        out = open(self.log_dir / "launcher.log", "ab")
        launcher = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # java and its workers inherit this group
        self._launcher_pgid = launcher.pid
        try:
            launcher.wait(timeout=60)
            pid_file = self.tmpdir / ".model_server.pid"
            if not pid_file.is_file():
                raise ServingError(f"TorchServe did not start:\n{self.log_text('launcher.log')}")
            self.pid = int(pid_file.read_text().strip())
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            out.close()
        return self

    def _alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:  # a zombie is dead for our purposes
            return "Z" not in Path(f"/proc/{self.pid}/stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            return True

    def wait_ready(self, timeout: float = 180.0, models: Iterable[str] | None = None) -> None:
        """Poll ``/ping`` and then each model's worker status until all are READY (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        pending = list(self.models if models is None else models)
        healthy = False
        while time.monotonic() < deadline:
            if not self._alive():
                raise ServingError(f"TorchServe exited during startup:\n{self.log_text()}")
            try:
                if not healthy and (self.no_auth or self.key_file.is_file()):  # with auth, /ping needs a key
                    status, body = _http("GET", self.ports.inference, "/ping", headers=self.inference_headers(),
                                         timeout=5)
                    healthy = status == 200 and b"Healthy" in body
                pending = [m for m in pending if self.model_status(m) != "READY"]
                if healthy and not pending:
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.25)
        raise ServingError(f"TorchServe not ready after {timeout:.0f} s (waiting for {pending or 'ping'}):\n"
                           f"{self.log_text()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop TorchServe (``torchserve --stop`` with this server's TMPDIR), then kill its process group."""
        if self.pid is not None and self._alive():
            try:
                subprocess.run([_venv_tool("torchserve"), "--stop"], cwd=self.workdir, env=self._env(),
                               capture_output=True, timeout=timeout)
            except (subprocess.TimeoutExpired, OSError):
                pass
            deadline = time.monotonic() + timeout
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        for pgid in {self._launcher_pgid, self.pid} - {None}:
            try:
                os.killpg(pgid, signal.SIGKILL)  # java's workers, whatever survived
            except OSError:
                pass
        self.pid = None
        self._launcher_pgid = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> "TorchServeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- requests
    def predict(self, model: str, body: bytes, headers: Mapping[str, str] | None = None,
                version: str | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return _http("POST", self.ports.inference, path, body, {**self.inference_headers(), **(headers or {})}, timeout)

    def management(self, method: str, path: str, body: bytes | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
        return _http(method, self.ports.management, path, body, self.management_headers(), timeout)

    def model_status(self, model: str) -> str | None:
        """``READY`` when a worker of ``model`` is ready; otherwise its worker status or ``None``."""
        status, body = self.management("GET", f"/models/{model}", timeout=5)
        if status != 200:
            return None
        workers = [w for desc in json.loads(body) for w in desc.get("workers", [])]
        states = {w.get("status") for w in workers}
        return "READY" if "READY" in states else (sorted(states)[0] if states else None)

    def log_text(self, name: str | None = None, tail: int = 8000) -> str:
        """The tail of one log (``model_log.log``, ``ts_log.log``, ``launcher.log``) or of all of them."""
        names = [name] if name else ["ts_log.log", "model_log.log"]
        if not name and not (self.log_dir / "ts_log.log").is_file():
            names.insert(0, "launcher.log")
        parts = []
        for n in names:
            path = self.log_dir / n
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
