"""Prometheus metrics for :class:`~dnnshifter_lightning.serve.litserve.PortfolioLitAPI`, through LitServe's loggers.

Each inference worker reports what it did with ``LitAPI.log("dnnshifter", event)`` (LitServe puts
it on a queue, off the request path); :class:`PortfolioMetricsLogger`, a ``litserve.Logger``, turns
the events into ``prometheus_client`` metrics in LitServe's logger process and mounts
``/metrics`` on the server. The logger process and the HTTP processes are different processes, so
the metrics live in ``prometheus_client``'s multiprocess mode: the logger process writes them to a
directory of its own, and ``/metrics`` reads that directory on every scrape.

Metrics (labels ``api`` = the API path, ``worker`` = LitServe's worker id; each worker has its own
runtime and policy, so each has its own active variant):

* ``dnnshifter_active_variant_index``: the active variant's rank in the served set, 0 = most accurate;
* ``dnnshifter_active_variant{variant}``: 1 for the active variant, 0 for the others;
* ``dnnshifter_switches_total{direction}``: load-driven switches, ``down`` (cheaper) or ``up``;
* ``dnnshifter_switch_seconds``: a histogram of switch times; ``dnnshifter_last_switch_ms`` the last one;
* ``dnnshifter_requests_total{variant}``: answered requests per variant that served them (pins included);
* ``dnnshifter_worker_info{worker_pid, device}``: 1 per worker process that finished its setup.

Example::

    import litserve
    from dnnshifter_lightning.serve.litserve import PortfolioLitAPI
    from dnnshifter_lightning.serve.litserve_metrics import PortfolioMetricsLogger

    server = litserve.LitServer(PortfolioLitAPI("portfolio"), loggers=PortfolioMetricsLogger())
    server.run(host="127.0.0.1", port=8000)    # then: curl http://127.0.0.1:8000/metrics

The events are plain dicts (``{"event": "setup" | "switch" | "batch", "api", "worker", ...}``);
``process`` switches this process's ``prometheus_client`` into multiprocess mode, so it belongs in
LitServe's logger process, not in yours.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import litserve as ls

__all__ = ["PortfolioMetricsLogger", "METRICS_KEY"]

#: the ``LitAPI.log`` key of every event PortfolioLitAPI reports
METRICS_KEY = "dnnshifter"

logger = logging.getLogger(__name__)

_LABELS = ("api", "worker")


class PortfolioMetricsLogger(ls.Logger):
    """A ``litserve.Logger`` that serves PortfolioLitAPI's switching metrics on ``path`` (``/metrics``).

    Args:
        directory: where ``prometheus_client`` keeps the metrics of the logger process (its
            multiprocess mode); default: a fresh temporary directory. It must be empty or new: old
            files would add an earlier run's counts.
        path: where the metrics are mounted on the LitServer. Like TorchServe's metrics API, it is
            not behind the server's API key: it shows counts and variant ids, no request data.
        mount: ``False`` skips mounting (to use the logger without a server).
        events_log: a file to append every ``setup`` and ``switch`` event to, one JSON line each
            (time, from, to, reason, seconds; the served set and memory at setup), as the TorchServe
            handler's ``DNNSHIFTER_SWITCH`` log lines. ``dnnshifter demo`` reads it.
        quiet_ctrl_c: the logger process ignores SIGINT (``dnnshifter litserve`` sets it: LitServe's
            main process handles Ctrl-C; otherwise the logger process dies of it with a traceback).

    A directory with an earlier run's files is refused, since their counts would be added:
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, path: str = "/metrics", mount: bool = True,
                 events_log: str | os.PathLike | None = None, quiet_ctrl_c: bool = False):
        super().__init__()
        self.quiet_ctrl_c = quiet_ctrl_c
        self.events_log = None if events_log is None else str(events_log)
        self.directory = str(directory) if directory is not None else tempfile.mkdtemp(prefix="dnnshifter-metrics-")
        os.makedirs(self.directory, exist_ok=True)
        stale = [f for f in os.listdir(self.directory) if f.endswith(".db")]
        if stale:
            raise ValueError(f"metrics directory {self.directory} holds files of an earlier run ({stale[0]}, ...): "
                             "give an empty or new directory")
        self.path = path
        self._metrics: dict[str, Any] | None = None
        self._variants: dict[tuple[str, str], list[str]] = {}
        if mount:
            self.mount(path, self.asgi_app())

    # LitServe pickles the logger into its logger process: only the settings travel, not the ASGI app
    def __getstate__(self) -> dict:
        return {"directory": self.directory, "path": self.path, "quiet_ctrl_c": self.quiet_ctrl_c,
                "events_log": self.events_log, "_config": {},
                "_metrics": None, "_variants": {}}

    def registry(self):
        """A registry that reads every process's metrics from :attr:`directory` at each scrape."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        return registry

    def asgi_app(self):
        from prometheus_client import make_asgi_app

        return make_asgi_app(registry=self.registry())

    def scrape(self) -> str:
        """The metrics as Prometheus text (what ``GET /metrics`` answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry()).decode()

    def _create(self) -> dict[str, Any]:
        # this process writes its metrics as files under the directory (prometheus_client multiprocess mode)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        values.ValueClass = values.get_value_class()  # in case prometheus_client was imported before the env was set
        registry = CollectorRegistry()  # own registry: the metrics are read back through the directory
        return {
            "index": Gauge("dnnshifter_active_variant_index", "Rank of the active variant in the served set "
                           "(0 = most accurate)", _LABELS, registry=registry, multiprocess_mode="mostrecent"),
            "active": Gauge("dnnshifter_active_variant", "1 for the variant this worker serves with, else 0",
                            (*_LABELS, "variant"), registry=registry, multiprocess_mode="mostrecent"),
            "switches": Counter("dnnshifter_switches", "Load-driven variant switches", (*_LABELS, "direction"),
                                registry=registry),
            "switch_seconds": Histogram("dnnshifter_switch_seconds", "Time one switch took (inflate + swap)", _LABELS,
                                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                                        registry=registry),
            "last_switch_ms": Gauge("dnnshifter_last_switch_ms", "Duration of the last switch", _LABELS,
                                    registry=registry, multiprocess_mode="mostrecent"),
            "requests": Counter("dnnshifter_requests", "Answered requests per variant that served them",
                                (*_LABELS, "variant"), registry=registry),
            "worker": Gauge("dnnshifter_worker_info", "1 per inference worker that finished its setup",
                            (*_LABELS, "worker_pid", "device"), registry=registry, multiprocess_mode="mostrecent"),
        }

    def process(self, key: str, value: Any) -> None:
        if key != METRICS_KEY or not isinstance(value, dict):
            return
        if self._metrics is None:
            if self.quiet_ctrl_c:
                import signal

                signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._metrics = self._create()
        m, event = self._metrics, value.get("event")
        labels = {"api": str(value.get("api")), "worker": str(value.get("worker"))}
        if self.events_log is not None and event in ("setup", "switch"):
            with open(self.events_log, "a") as f:  # one short line per event: appends stay whole
                f.write(json.dumps(value) + "\n")
        slot = (labels["api"], labels["worker"])
        if event == "setup":
            self._variants[slot] = list(value["variants"])
            m["worker"].labels(**labels, worker_pid=str(value.get("pid")), device=str(value.get("device"))).set(1)
            self._set_active(labels, value["active"])
        elif event == "switch":
            order = self._variants.get(slot, [])
            src, dst = value["from"], value["to"]
            direction = ("down" if order.index(dst) > order.index(src) else "up") \
                if src in order and dst in order else "unknown"
            m["switches"].labels(**labels, direction=direction).inc()
            m["switch_seconds"].labels(**labels).observe(float(value["seconds"]))
            m["last_switch_ms"].labels(**labels).set(1000.0 * float(value["seconds"]))
            self._set_active(labels, dst)
        elif event == "batch":
            for vid, n in value.get("served", {}).items():
                m["requests"].labels(**labels, variant=str(vid)).inc(int(n))

    def _set_active(self, labels: dict[str, str], vid: str) -> None:
        m = self._metrics
        order = self._variants.get((labels["api"], labels["worker"]), [])
        for other in order:
            m["active"].labels(**labels, variant=other).set(1.0 if other == vid else 0.0)
        if vid in order:
            m["index"].labels(**labels).set(order.index(vid))
