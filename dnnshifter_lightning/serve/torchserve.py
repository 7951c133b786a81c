"""TorchServe outside the worker: build a ``.mar`` from a portfolio, run TorchServe on loopback, talk to it.

* :func:`build_archive`: the handler (:mod:`dnnshifter_lightning.serve.handler`, the worker code),
  the portfolio and a ``model-config.yaml`` (:mod:`dnnshifter_lightning.serve.defaults`) into a ``.mar``;
* :class:`TorchServeServer`: the server process (Java, see :func:`check_java`) with its own ports,
  working dir and TMPDIR, and its HTTP client;
* :func:`read_switches` / :func:`read_log_events`: what the handler logged.

Everything here talks to ``127.0.0.1`` only and prints nothing: ``dnnshifter archive`` and
``dnnshifter serve`` (:mod:`dnnshifter_lightning.cli`) and the demo's serving run
(:mod:`dnnshifter_lightning.demo.serving`) are built on it.

Example::

    >>> import json
    >>> from pathlib import Path
    >>> from dnnshifter_lightning.serve.torchserve import build_archive, TorchServeServer
    >>> mar = build_archive(Path("portfolio"), "digits", Path("store"))        # doctest: +SKIP
    >>> with TorchServeServer(Path("store"), {"digits": "digits.mar"}) as ts:  # doctest: +SKIP
    ...     status, body = ts.predict("digits", json.dumps({"data": [[[0.0] * 8] * 8]}).encode())
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dnnshifter_lightning.loadgen import LOOPBACK
from dnnshifter_lightning.serve.defaults import MAX_REQUEST_BYTES, default_model_config

__all__ = [
    "JavaMissingError", "ServingError", "check_java", "free_port", "port_is_free", "build_archive",
    "TorchServeServer", "HANDLER_FILE", "read_switches", "read_log_events", "json_bodies",
]

#: The TorchServe worker code that ``build_archive`` packs into the ``.mar``, found by import (the file of
#: ``dnnshifter_lightning.serve.handler``, without importing it: it imports ``ts``).
HANDLER_FILE = Path(importlib.util.find_spec("dnnshifter_lightning.serve.handler").origin)
#: Largest response (``max_response_size``): ours are a label and one score per class.
MAX_RESPONSE_BYTES = 2**20

JAVA_HELP = (
    "TorchServe 0.12 needs Java 17 (a JRE is enough). Install it with one of:\n"
    "  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless\n"
    "  Fedora/RHEL:    sudo dnf install -y java-17-openjdk-headless\n"
    "  macOS:          brew install openjdk@17\n"
    "  any OS:         Eclipse Temurin 17 from https://adoptium.net\n"
    "then make sure `java -version` says 17 (or set JAVA_HOME to the JDK/JRE directory)."
)

class ServingError(RuntimeError):
    """TorchServe failed to build, start, become healthy or stop; the message says why."""


class JavaMissingError(ServingError):
    """``java`` (17+) is not available; the message says how to install it."""


def check_java(env: Mapping[str, str] | None = None) -> str:
    """Return the path of a usable ``java`` (17+) or raise :class:`JavaMissingError` with install help.

    ``JAVA_HOME``, else ``java`` on ``PATH``, looked up in ``env`` (default: ``os.environ``).
    """
    env = os.environ if env is None else env
    java_home = env.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java", path=env.get("PATH", os.defpath))
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


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def build_archive(portfolio: Path, model_name: str, export_path: Path, config: Path | Mapping | None = None,
                  force: bool = False, variants: str | Sequence[str] | None = None) -> Path:
    """Build ``export_path/model_name.mar``: the handler, the portfolio (under ``portfolio/``) and a
    ``model-config.yaml`` (defaults merged with ``config``, a YAML file or a dict).

    ``variants`` (``"front"``, ``"all"``, ``"ID,ID"`` or a list of ids) sets the served set,
    ``handler.variants`` in the config (default: the accuracy/latency front above the accuracy
    floor, see :mod:`dnnshifter_lightning.serve.served`). The portfolio's manifest is read first and the
    served set resolved, so a directory that is not a portfolio, an unknown id or a floor that leaves
    nothing to serve fails here, not inside TorchServe.
    """
    import yaml

    portfolio, export_path = Path(portfolio), Path(export_path)
    if not (portfolio / "manifest.json").is_file():
        raise ServingError(f"{portfolio} is not a portfolio: {portfolio / 'manifest.json'} is missing")
    from dnnshifter_lightning.portfolio import PortfolioError, read_manifest  # imports torch: only here

    from dnnshifter_lightning.serve.served import resolve_served_set

    try:
        manifest = read_manifest(portfolio)  # fail early on a broken manifest
    except PortfolioError as exc:
        raise ServingError(str(exc)) from exc
    overrides = yaml.safe_load(Path(config).read_text()) if isinstance(config, (str, Path)) else config
    overrides = dict(overrides or {})
    if variants is not None:
        overrides["handler"] = {**(overrides.get("handler") or {}),
                                "variants": variants if isinstance(variants, str) else list(variants)}
    handler = default_model_config(overrides)["handler"]
    fixed = handler.get("fixed_variant") or (handler.get("policy") or {}).get("fixed_variant")
    try:  # the handler resolves the same set at start; an archive it would refuse is refused here
        resolve_served_set(manifest["variants"], handler.get("variants"), handler.get("min_accuracy"), fixed)
    except ValueError as exc:
        raise ServingError(f"{portfolio}: {exc}") from exc
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
        raise ServingError(f"model name {model_name!r}: use letters, digits, '_', '.', '-'")
    mar = export_path / f"{model_name}.mar"
    if mar.exists() and not force:
        raise ServingError(f"{mar} exists; pass force=True (--force) to overwrite it")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dnnshifter-mar-") as tmp:
        stage = Path(tmp) / "extra"
        shutil.copytree(portfolio, stage / "portfolio")
        cfg = Path(tmp) / "model-config.yaml"
        cfg.write_text(yaml.safe_dump(default_model_config(overrides), sort_keys=False))
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
    meaning ``NAME.mar``). Secure by default:

    * token authorization is on (``no_auth=False``); the keys are read from ``key_file.json`` in
      ``workdir`` and :meth:`predict` and :meth:`management` send them;
    * the management API cannot register models (``enable_model_api=False``); with
      ``enable_model_api=True`` it can, but only ``.mar`` files directly inside ``store``
      (``allowed_urls`` is a regex anchored on the store's path), since a ``.mar`` is code;
    * request and response sizes are capped (``max_request_size`` / ``max_response_size``).

    Example::

        with TorchServeServer(store, {"digits": "digits.mar"}, workdir=tmp) as ts:
            status, body = ts.predict("digits", json.dumps({"data": x.tolist()}).encode())
            print(ts.inference_url, ts.model_status("digits"))

    Stable API (also used by ``benchmarks/_torchserve_versions.py``): ``start()``, ``stop()``,
    ``wait_ready(timeout)``, ``predict(model, body, headers=None, version=None)``,
    ``management(method, path, body=None)``, ``model_status(model)``, ``log_text()``, ``ports``,
    ``inference_url``/``management_url``/``metrics_url``, ``inference_headers()``,
    ``management_headers()``, ``key_file``, ``workdir``, ``allowed_urls()``, ``state()``,
    ``attach(state)``, ``verify_ours(state)``.
    """

    def __init__(self, store: Path, models: Mapping[str, str] | Sequence[str] | None = None, *, no_auth: bool = False,
                 enable_model_api: bool = False, max_request_size: int = MAX_REQUEST_BYTES,
                 workdir: Path | None = None, ports: Mapping[str, int] | None = None,
                 extra_config: Mapping[str, Any] | None = None, startup_timeout: float = 180.0) -> None:
        self.store = Path(store).resolve()
        if "," in str(self.store):  # allowed_urls is a comma-separated list of regexes
            raise ServingError(f"model store {self.store}: a path with ',' cannot be anchored in allowed_urls")
        self.enable_model_api = enable_model_api
        self.max_request_size = int(max_request_size)
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
        if self.no_auth or not self.key_file.is_file():  # no keys before TorchServe writes them
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
    def allowed_urls(self) -> str:
        """The only model URLs TorchServe may load: a ``.mar`` directly inside the model store."""
        return "^file://" + re.escape(str(self.store)) + r"/[A-Za-z0-9_][A-Za-z0-9_.-]*\.mar$"

    def config_properties(self) -> str:
        """The generated ``config.properties``: loopback only, token auth, no model registration
        unless asked for, bounded sizes, fixed worker count, nothing fetched."""
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
            # a .mar is code: registering one over the management API is opt-in, and only from the store
            "enable_model_api": "true" if self.enable_model_api else "false",
            "allowed_urls": self.allowed_urls(),
            "max_request_size": self.max_request_size,
            "max_response_size": MAX_RESPONSE_BYTES,
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
            refused = self._refusal()
            if refused:
                raise ServingError(f"a model was refused at initialize:\n{refused}")
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

    def _refusal(self) -> str | None:
        log = self.log_dir / "model_log.log"
        if not log.is_file():
            return None
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "DNNSHIFTER_REFUSED" in ln]
        return lines[-1] if lines else None

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
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

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

    # ---------------------------------------------------------------- detached servers (CLI)
    def state(self) -> dict[str, Any]:
        """What :meth:`attach` needs to stop this server from another process. ``pid_create_time``
        identifies the frontend process, so a recycled pid is never mistaken for it."""
        return {"pid": self.pid, "pgid": self._launcher_pgid, "pid_create_time": _create_time(self.pid),
                "tmpdir": str(self.tmpdir), "workdir": str(self.workdir), "store": str(self.store),
                "models": self.models, "no_auth": self.no_auth, "ports": vars(self.ports), "started": time.time()}

    def verify_ours(self, state: Mapping[str, Any]) -> str | None:
        """``None`` if the process ``state`` names is still the TorchServe it describes, else why not.

        It must be alive, have the recorded start time (so the pid was not recycled), run
        TorchServe's frontend (``org.pytorch.serve.ModelServer``) with this server's TMPDIR and
        model store on its command line, and lead or belong to the recorded process group.
        """
        import psutil

        pid, pgid, created = state.get("pid"), state.get("pgid"), state.get("pid_create_time")
        if not isinstance(pid, int) or not isinstance(pgid, int) or not isinstance(created, (int, float)):
            return "the state file lacks the pid, process group or start time of the server"
        try:
            proc = psutil.Process(pid)
            cmdline, started, status = proc.cmdline(), proc.create_time(), proc.status()
        except (psutil.Error, OSError) as exc:
            return f"process {pid} is gone ({type(exc).__name__})"
        if status == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited"
        if abs(started - created) > 0.05:
            return f"process {pid} started at {started:.2f}, not {created:.2f}: the pid was reused"
        if "org.pytorch.serve.ModelServer" not in cmdline:
            return f"process {pid} is not a TorchServe frontend: {' '.join(cmdline)[:200]}"
        if f"-Djava.io.tmpdir={self.tmpdir}" not in cmdline or str(self.store) not in cmdline:
            return f"process {pid} is a TorchServe, but not the one started with {self.tmpdir} and {self.store}"
        try:
            if os.getpgid(pid) != pgid:
                return f"process {pid} is not in the recorded process group {pgid}"
        except OSError as exc:
            return f"process {pid}: {exc}"
        return None

    @classmethod
    def attach(cls, state: Mapping[str, Any]) -> "TorchServeServer":
        """A handle on a running server described by :meth:`state` (e.g. to :meth:`stop` it)."""
        server = cls(Path(state["store"]), state["models"], no_auth=state["no_auth"], workdir=Path(state["workdir"]),
                     ports=state["ports"])
        shutil.rmtree(server.tmpdir, ignore_errors=True)
        server.tmpdir = Path(state["tmpdir"])
        server._own_workdir = False
        server.pid, server._launcher_pgid = state["pid"], state["pgid"]
        return server


def _create_time(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil or no process: the state then cannot be verified
        return None


def read_switches(server: TorchServeServer) -> list[dict[str, Any]]:
    """Every ``DNNSHIFTER_SWITCH`` the handler logged (from, to, reason, switch_ms, time), oldest first."""
    return [e for e in read_log_events(server, "DNNSHIFTER_SWITCH") if e.get("from") != e.get("to")]


def read_log_events(server: TorchServeServer, tag: str) -> list[dict[str, Any]]:
    """Every ``TAG {json}`` line the handler wrote to the model log (``DNNSHIFTER_SWITCH``,
    ``DNNSHIFTER_MEMORY``, ...), oldest first; lines whose JSON does not parse are skipped.
    """
    log = server.log_dir / "model_log.log"
    out = []
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if f"{tag} {{" in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line.split(f"{tag} ", 1)[1]))
    return out


def json_bodies(x: Any) -> list[bytes]:
    """One ``{"data": ...}`` request body per input of a batch tensor ``x``.
    """
    return [json.dumps({"data": row.tolist()}).encode() for row in x]
