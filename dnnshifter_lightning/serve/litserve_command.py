"""``dnnshifter litserve PORTFOLIO``: serve a portfolio with LitServe, locked down by default.

* It binds 127.0.0.1 unless ``--host`` says otherwise. ``0.0.0.0`` (or ``::``) listens on every
  interface, and is refused unless ``--api-key KEY`` gives the key that clients elsewhere will send.
* Auth is on: without ``--api-key`` it generates a key and writes it, readable by you only (0600),
  to ``$DNNSHIFTER_HOME/litserve/api_key`` (see :func:`~dnnshifter_lightning.serve.defaults.state_dir`).
  Clients send it as ``X-API-Key``. ``--no-auth`` turns auth off, on loopback only.
* ``--config my.yaml`` takes the TorchServe handler's options (policy settings, ``slo_ms``,
  ``fixed_variant``, ``memory_budget_mb``, ``min_accuracy``, ``variants``, ...) and LitServe's
  ``max_batch_size`` / ``batch_timeout``, checked by :mod:`dnnshifter_lightning.serve.core`
  before anything starts.
* Workers: ``--workers-per-device N`` on ``accelerator="auto"`` (the GPUs if there are any, else the
  CPU); each worker holds its own runtime and policy.
* Once ``/health`` answers 200 it prints the URLs; Ctrl-C stops the server and its workers.

Example::

    >>> from pathlib import Path
    >>> litserve_command(Path("portfolio"))               # doctest: +SKIP
    >>> litserve_command(Path("portfolio"), host="0.0.0.0")
    Traceback (most recent call last):
        ...
    ValueError: --host 0.0.0.0 listens on every network interface: pass --api-key KEY ...
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import litserve

from dnnshifter_lightning._atomic import atomic_write

__all__ = ["litserve_command", "write_api_key", "check_bind", "LitServeServer", "group_alive", "read_events",
           "read_switches", "default_sigint"]

#: what LitServe's ``run`` can bind; only the first is loopback
_HOSTS = {"127.0.0.1": True, "localhost": True, "0.0.0.0": False, "::": False}
MIN_KEY_CHARS = 16


def check_bind(host: str, api_key: str | None, no_auth: bool) -> str:
    """The host LitServe binds, after the checks; ``ValueError`` saying what to pass otherwise."""
    if api_key is not None and no_auth:
        raise ValueError("--api-key and --no-auth contradict each other: pass one of them")
    if api_key is not None and len(api_key) < MIN_KEY_CHARS:
        raise ValueError(f"--api-key is {len(api_key)} characters; use a secret of at least {MIN_KEY_CHARS} "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if host not in _HOSTS:
        raise ValueError(f"--host {host}: LitServe binds 127.0.0.1 (loopback, the default), 0.0.0.0 or ::")
    if not _HOSTS[host] and api_key is None:
        raise ValueError(f"--host {host} listens on every network interface: pass --api-key KEY (a secret of at "
                         f"least {MIN_KEY_CHARS} characters that your clients send as X-API-Key); a generated key "
                         "and --no-auth are for 127.0.0.1 only")
    return "127.0.0.1" if _HOSTS[host] else host


def write_api_key(path: Path) -> str:
    """Generate a key and write it to ``path``, readable and writable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = secrets.token_urlsafe(32)
    atomic_write(path, key)  # its temp file is created 0600: never readable by others, not even briefly
    return key


class _LeaveCtrlCToTheServer(litserve.Callback):
    """Inference workers ignore Ctrl-C; LitServe's main process gets it and stops them in order.

    A terminal sends Ctrl-C to every process of the server; left alone, each worker would die of it
    on its own, with a traceback, while the main process shuts them down anyway."""

    def on_before_setup(self, *args, **kwargs):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _healthy(port: int, key: str | None) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health", headers={"X-API-Key": key} if key else {})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def litserve_command(portfolio: Path, *, host: str = "127.0.0.1", port: int = 8000, workers_per_device: int = 1,
                     api_key: str | None = None, no_auth: bool = False, config: Path | None = None,
                     accelerator: str = "auto", events_log: Path | None = None,
                     report: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Serve ``portfolio`` with LitServe in the foreground until Ctrl-C (see the module docstring).

    Every check runs before a worker starts, and raises ``ValueError`` saying what to change. It prints
    nothing: ``report(event, info)`` hears ``"starting"`` (``bind``, ``port``), ``"serving"`` once
    ``/health`` answers (``portfolio``, ``base``, ``bind``, ``workers_per_device``, ``key_file``: the
    generated key's file or ``None``, ``api_key``: whether a key is on) and ``"stopped"``; the CLI
    prints them.
    """
    from dnnshifter_lightning.serve.core import LITSERVE_BATCHING, read_options_file
    from dnnshifter_lightning.serve.defaults import state_dir

    def tell(event: str, **info: Any) -> None:
        if report is not None:
            report(event, info)

    bind = check_bind(host, api_key, no_auth)
    if not 1024 <= port <= 65535:
        raise ValueError(f"--port {port}: LitServe takes a port from 1024 to 65535")
    if workers_per_device < 1:
        raise ValueError(f"--workers-per-device must be >= 1, got {workers_per_device}")
    options = read_options_file(config) if config is not None else {}
    batching = {k: options.pop(k, v) for k, v in LITSERVE_BATCHING.items()}

    import litserve.server

    from dnnshifter_lightning.serve.litserve import PortfolioLitAPI
    from dnnshifter_lightning.serve.litserve_metrics import PortfolioMetricsLogger

    api = PortfolioLitAPI(portfolio, **batching, **options)  # checks the options against the portfolio
    if _port_taken(bind, port):
        raise ValueError(f"port {port} is in use on {bind}: pass --port N with a free one")
    key_file = None
    if not no_auth and api_key is None:
        key_file = state_dir() / "litserve" / "api_key"
        api_key = write_api_key(key_file)
    # LitServe reads the key from LIT_SERVER_API_KEY when it is imported, and checks it per request
    if api_key:
        os.environ["LIT_SERVER_API_KEY"] = api_key
    else:
        os.environ.pop("LIT_SERVER_API_KEY", None)
    litserve.server.LIT_SERVER_API_KEY = api_key or None
    metrics_dir = tempfile.mkdtemp(prefix="dnnshifter-litserve-metrics-")
    server = litserve.LitServer(api, accelerator=accelerator, workers_per_device=workers_per_device,
                                loggers=PortfolioMetricsLogger(metrics_dir, events_log=events_log,
                                                                                quiet_ctrl_c=True),
                                callbacks=[_LeaveCtrlCToTheServer()], timeout=60)
    shown = "127.0.0.1" if bind in ("127.0.0.1", "0.0.0.0") else "[::1]"
    base = f"http://{shown}:{port}"
    stop = threading.Event()

    def announce() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            if _healthy(port, api_key):
                break
            stop.wait(0.2)
        else:  # stopped, or never healthy: LitServe has logged why
            return
        tell("serving", portfolio=str(portfolio), base=base, bind=bind, workers_per_device=workers_per_device,
             key_file=str(key_file) if key_file else None, api_key=bool(api_key))

    watcher = threading.Thread(target=announce, name="dnnshifter-health", daemon=True)
    watcher.start()
    tell("starting", bind=bind, port=port)
    try:
        server.run(host=bind, port=port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:  # Ctrl-C before the workers were up: LitServe's own shutdown did not run
        pass
    finally:
        stop.set()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    tell("stopped")


class LitServeServer:
    """``dnnshifter litserve PORTFOLIO`` in a subprocess on a free 127.0.0.1 port; always stopped.

    The server runs in its own process group with its own ``DNNSHIFTER_HOME`` (in ``workdir``), so
    its generated API key (0600) and its logs stay there; :meth:`headers` sends the key. ``options``
    are what ``--config`` takes (the handler's options and LitServe's ``max_batch_size`` /
    ``batch_timeout``). :meth:`start` returns once ``/health`` answers 200 (every worker is set up);
    :meth:`stop` sends SIGINT to the group, as Ctrl-C, then SIGKILL after ``timeout``.

    Args:
        portfolio: the portfolio directory, served as it is.
        options: the ``--config`` content (``None``: the defaults).
        no_auth: pass ``--no-auth`` (loopback only) instead of using a generated key.
        workdir: where the config, the key, the log and the events log go (default: a temporary
            directory, removed on :meth:`stop`).
        startup_timeout: seconds to wait for ``/health``.

    Raises:
        RuntimeError: from :meth:`start`, when the server exits or is not healthy in time (with the
            tail of its log).

    Example::

        with LitServeServer(Path("portfolio"), {"fixed_variant": "level_00"}) as ls:
            status, reply = ls.predict(body)
            print(ls.url, ls.switches())

    """

    def __init__(self, portfolio: Path, options: Mapping[str, Any] | None = None, *, no_auth: bool = False,
                 workdir: Path | None = None, startup_timeout: float = 180.0) -> None:
        self.portfolio = Path(portfolio)
        self.options = dict(options or {})
        self.no_auth = no_auth
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dnnshifter-ls-")).resolve()
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "litserve.log"

    @property
    def events_path(self) -> Path:
        return self.workdir / "litserve_events.jsonl"

    def headers(self) -> dict[str, str]:
        """The headers every request needs: ``X-API-Key`` unless auth is off."""
        return {"X-API-Key": self._key} if self._key else {}

    def start(self) -> "LitServeServer":
        """Start the server and wait until ``/health`` answers 200; stops it on failure."""
        import yaml

        from dnnshifter_lightning.serve.torchserve import free_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "litserve.yaml"
        config.write_text(yaml.safe_dump(self.options))
        self.events_path.unlink(missing_ok=True)
        home = self.workdir / "home"
        self.port = free_port()
        args = [sys.executable, "-m", "dnnshifter_lightning.cli", "litserve", str(self.portfolio), "--port",
                str(self.port), "--config", str(config), "--events-log", str(self.events_path),
                *(["--no-auth"] if self.no_auth else [])]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, DNNSHIFTER_HOME=str(home), COLUMNS="200"),
                                         preexec_fn=default_sigint)
        try:
            deadline = time.monotonic() + self.startup_timeout
            key_file = home / "litserve" / "api_key"
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"LitServe exited ({self.proc.returncode}) during startup:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"LitServe not healthy after {self.startup_timeout:.0f} s:\n{self.log_text()}")
                if not self.no_auth and self._key is None and key_file.is_file():
                    self._key = key_file.read_text() or None
                if (self.no_auth or self._key) and _healthy(self.port, self._key):
                    return self
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT to the server's process group (LitServe stops its workers), SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the main process
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            deadline = time.monotonic() + 10
            while group_alive(proc.pid) and time.monotonic() < deadline:  # SIGKILL is delivered, not yet done
                time.sleep(0.05)
        self._key = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LitServeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def predict(self, body: bytes, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
        """``POST /predict`` with the key; the status and the body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/predict", body=body, headers={**self.headers(), **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def events(self) -> list[dict[str, Any]]:
        """Every event in the events log (each worker's ``setup``, every ``switch``), oldest first."""
        return read_events(self.events_path)

    def switches(self) -> list[dict[str, Any]]:
        """Every switch so far, as :func:`~dnnshifter_lightning.serve.torchserve.read_switches` gives
        TorchServe's: ``time`` (epoch seconds), ``from``, ``to``, ``reason``, ``switch_ms``."""
        return read_switches(self.events_path)

    def log_text(self, tail: int = 8000) -> str:
        """The tail of the server's output."""
        if not self.log_path.is_file():
            return ""
        return f"--- {self.log_path}\n{self.log_path.read_text(errors='replace')[-tail:]}"


def default_sigint() -> None:
    """For ``preexec_fn``: SIGINT at its default in a server we stop with SIGINT (as Ctrl-C). A shell
    without job control starts background jobs with SIGINT ignored, and children inherit that; the
    server would then ignore the stop and wait for the SIGKILL fallback."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, dead but not yet reaped, do not count).
    """
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: signal 0 tells whether the group exists at all
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an ``--events-log``, oldest first; a line that does not parse is skipped.
    """
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def read_switches(path: Path) -> list[dict[str, Any]]:
    """The switches in an ``--events-log``: ``time``, ``from``, ``to``, ``reason``, ``switch_ms``.
    """
    return [{"time": e["time"], "from": e["from"], "to": e["to"], "reason": e["reason"],
             "switch_ms": round(1000.0 * e["seconds"], 3)}
            for e in read_events(path) if e.get("event") == "switch" and e.get("from") != e.get("to")]
