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

import http.client
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import litserve

from dnnshifter_lightning._atomic import atomic_write

__all__ = ["litserve_command", "write_api_key", "check_bind"]

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
                     accelerator: str = "auto", events_log: Path | None = None, console: Any = None) -> None:
    """Serve ``portfolio`` with LitServe in the foreground until Ctrl-C (see the module docstring).

    Every check runs before a worker starts, and raises ``ValueError`` saying what to change.
    """
    from dnnshifter_lightning.serve.core import LITSERVE_BATCHING, read_options_file
    from dnnshifter_lightning.serve.defaults import state_dir

    if console is None:
        from rich.console import Console

        console = Console()
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
        auth = f' -H "X-API-Key: $(cat {key_file})"' if key_file else (' -H "X-API-Key: $KEY"' if api_key else "")
        where = "every interface" if bind != "127.0.0.1" else "127.0.0.1 only"
        console.print(f"[bold green]LitServe is serving {portfolio}[/] ({where}, {workers_per_device} worker(s) "
                      f"per device)\n"
                      f"  predict  POST {base}/predict\n"
                      f"  health   {base}/health\n"
                      f"  metrics  {base}/metrics/   (Prometheus; not behind the API key, as TorchServe's)\n"
                      f"  info     {base}/info", highlight=False, soft_wrap=True)
        if key_file:
            console.print(f"  API key ON: generated, in {key_file} (mode 0600); send it as X-API-Key", highlight=False,
                          soft_wrap=True)
        elif api_key:
            console.print("  API key ON: the one given with --api-key; send it as X-API-Key")
        else:
            console.print("  [yellow]API key OFF (--no-auth):[/] any local user can call it")
        console.print(f"try:  curl{auth} -X POST {base}/predict --data-binary @digit.png\n"
                      "Ctrl-C stops it", highlight=False, soft_wrap=True)

    watcher = threading.Thread(target=announce, name="dnnshifter-health", daemon=True)
    watcher.start()
    console.print(f"starting LitServe on {bind}:{port} (loading and profiling the portfolio in each worker)...",
                  highlight=False, soft_wrap=True)
    try:
        server.run(host=bind, port=port, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:  # Ctrl-C before the workers were up: LitServe's own shutdown did not run
        pass
    finally:
        stop.set()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    console.print("LitServe stopped")
