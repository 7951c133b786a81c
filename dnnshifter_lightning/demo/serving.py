"""The serving step of ``dnnshifter demo``, on TorchServe or on LitServe: serve, load, report.

Both engines serve the same portfolio with the same policy; only starting the server and reading
its switches differ (:class:`_Engine`). The trace and the report are shared: the capacity of the
most accurate served variant measured at start, light load, a burst sized from it, recovery, then
the switches, memory, latency and effective accuracy per phase. Nothing here prints: what happens
goes to a ``report(event, info)`` callback, and :class:`~dnnshifter_lightning.cli.DemoPrinter`
turns it into ``dnnshifter demo``'s console output.

Example::

    >>> choose_engine("litserve")
    ('litserve', 'LitServe, as asked (--engine litserve)')
    >>> report = run_demo_serving("demo_out/portfolio", "demo_out/serve", engine="litserve")  # doctest: +SKIP
    >>> sorted(report["phases"])  # doctest: +SKIP
    ['burst', 'light', 'recovery']
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from dnnshifter_lightning.loadgen import LoadResult, run_load, summarize
from dnnshifter_lightning.serve.defaults import ENGINES, INITIAL_SWITCH_REASON, PIN_HEADER, default_model_config
from dnnshifter_lightning.serve.torchserve import (JavaMissingError, ServingError, TorchServeServer, _http, build_archive,
                                                   check_java, read_log_events, read_switches)

__all__ = ["run_demo_serving", "choose_engine", "ENGINES", "Report"]

#: ``report(event, info)``: what the demo tells whoever shows it (the events are listed in
#: :func:`run_demo_serving` and :func:`~dnnshifter_lightning.demo.run.run_demo`).
Report = Callable[[str, dict[str, Any]], None]


def _silent(event: str, info: dict[str, Any]) -> None:
    """The default report: nothing is shown."""


@contextlib.contextmanager
def _phase(report: Report, phase: str, **info: Any) -> Iterator[None]:
    """``phase_start`` before the block and ``phase_end`` after it, even when it raises."""
    report("phase_start", {"phase": phase, **info})
    try:
        yield
    finally:
        report("phase_end", {"phase": phase})


def choose_engine(requested: str | None = None) -> tuple[str, str]:
    """The engine for the demo's serving step and why: TorchServe while Java 17 is present, else LitServe.

    An engine asked for by name is checked now, before any training: TorchServe without Java
    raises :class:`~dnnshifter_lightning.serving.JavaMissingError` (with how to install it).
    """
    if requested is not None and requested not in ENGINES:
        raise ValueError(f"--engine {requested}: choose torchserve or litserve")
    has_litserve = importlib.util.find_spec("litserve") is not None
    if requested == "litserve":
        if not has_litserve:
            raise ValueError("--engine litserve: LitServe is not installed: pip install 'dnnshifter-lightning[litserve]'")
        return "litserve", "LitServe, as asked (--engine litserve)"
    try:
        java = check_java()
    except JavaMissingError as exc:
        if requested == "torchserve":
            raise
        first = str(exc).splitlines()[0].rstrip(".")
        if not has_litserve:
            raise JavaMissingError(f"no engine for the serving step: TorchServe needs Java 17 ({first}) and LitServe "
                                   "is not installed (pip install 'dnnshifter-lightning[litserve]'), or pass --no-serve") from exc
        return "litserve", (f"LitServe (pure Python), because TorchServe needs Java 17 and {first}: "
                            "install Java 17 or pass --engine litserve to choose it yourself")
    if requested == "torchserve":
        return "torchserve", f"TorchServe, as asked (--engine torchserve; Java at {java})"
    return "torchserve", (f"TorchServe, because Java 17 is present ({java}); pass --engine litserve for "
                          "LitServe (maintained, pure Python)")


@dataclass
class _Engine:
    """A started server, as the shared trace and report need it."""

    port: int
    path: str
    headers: dict[str, str]
    memory: Callable[[], dict[str, Any]]  #: the weights held, as the server reported them at start
    switches: Callable[[], list[dict[str, Any]]]  #: every switch so far: time, from, to, reason, switch_ms
    switch_source: str  #: who saw the switches (the report's ``switch_source``)
    config_name: str  #: where a fixed variant comes from (the report's ``fixed_by``)
    fixed_key: str
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _torchserve(portfolio_dir: Path, workdir: Path, report: Report, model_name: str, no_auth: bool,
                config: Mapping[str, Any] | None) -> Iterator[_Engine]:
    mar = build_archive(Path(portfolio_dir), model_name, workdir / "store", config=config, force=True)
    report("engine", {"engine": "torchserve", "serving": mar.name, "port": None, "no_auth": no_auth})
    with TorchServeServer(mar.parent, {model_name: mar.name}, no_auth=no_auth, workdir=workdir / "torchserve") as ts:
        path = f"/predictions/{model_name}"
        yield _Engine(ts.ports.inference, path, ts.inference_headers(),
                      lambda: (read_log_events(ts, "DNNSHIFTER_MEMORY") or [{}])[-1], lambda: read_switches(ts),
                      "handler", "the archive's config", "handler.fixed_variant", {"archive": str(mar)})


@contextlib.contextmanager
def _litserve(portfolio_dir: Path, workdir: Path, report: Report, no_auth: bool,
              config: Mapping[str, Any] | None, start_timeout_s: float = 180.0) -> Iterator[_Engine]:
    """``dnnshifter litserve`` in a subprocess (:class:`~dnnshifter_lightning.serve.litserve_command.LitServeServer`:
    its own process group, always stopped), API key on unless ``no_auth``; the key and its logs stay in
    ``workdir``."""
    from dnnshifter_lightning.serve.litserve_command import LitServeServer

    options = dict((config or {}).get("handler") or {})
    options.pop("portfolio_dir", None)  # a path inside a .mar, not an option of a directory served as it is
    server = LitServeServer(portfolio_dir, options, no_auth=no_auth, workdir=workdir, startup_timeout=start_timeout_s)
    try:
        server.start()
    except RuntimeError as exc:
        raise ServingError(f"LitServe did not become healthy (see {server.log_path}):\n{exc}") from exc
    report("engine", {"engine": "litserve", "serving": str(portfolio_dir), "port": server.port, "no_auth": no_auth})
    try:
        def memory() -> dict[str, Any]:
            setups = [e for e in server.events() if e.get("event") == "setup"]
            return setups[-1].get("memory", {}) if setups else {}

        yield _Engine(server.port, "/predict", server.headers(), memory, server.switches,
                      "LitServe worker", "the config", "fixed_variant", {"log": str(server.log_path)})
    finally:
        server.stop()


def run_demo_serving(portfolio_dir: Path, workdir: Path, report: Optional[Report] = None, *,
                     engine: str = "torchserve", model_name: str = "digits", burst_s: float = 6.0,
                     idle_s: float = 20.0, light_factor: float = 0.3, burst_factor: float = 2.5,
                     capacity_s: float = 2.0, no_auth: bool = False, config: Mapping[str, Any] | None = None,
                     deadline_ms: float = 100.0) -> dict[str, Any]:
    """The serving part of ``dnnshifter demo``: serve with real TorchServe or LitServe, load it, report.

    ``engine="torchserve"`` archives the portfolio and starts TorchServe; ``"litserve"`` starts
    ``dnnshifter litserve`` (the ``handler:`` options of ``config`` go to its ``--config``, its
    switches come from its ``--events-log``). The held-out digits go to 127.0.0.1 as JSON
    requests. First the closed-loop capacity ``C`` of the most accurate served variant is measured
    (16 clients pinned to it for ``capacity_s``), then an open-loop trace sized from it: ``light``
    (``light_factor`` x C for 3 s), ``burst`` (``burst_factor`` x C for ``burst_s``), ``recovery``
    (``light_factor`` x C until the most accurate variant serves again, at least 5 s and at most
    ``idle_s``). Auth (TorchServe's token, LitServe's API key) stays on unless ``no_auth``
    (``dnnshifter demo`` turns TorchServe's off, on loopback, and says so). ``config`` overrides the
    archive's model-config (e.g. ``{"handler": {"policy": {...}}}``). About 30-60 s including the
    server's start.

    Args:
        report: ``report(event, info)`` hears, in order: ``"skipped"`` (``reason``: TorchServe without
            Java; nothing else follows), ``"requests"`` (``count``), ``"engine"`` (``engine``,
            ``serving``: what is served, ``port``, ``no_auth``), then ``"phase_start"`` and
            ``"phase_end"`` around each step (``phase``: ``capacity``, ``settle``, ``light``, ``burst``,
            ``recovery``, with its ``rate``, ``seconds``, ``variant`` where it has one), and last
            ``"result"`` with the returned dict. ``None`` shows nothing;
            :class:`~dnnshifter_lightning.cli.DemoPrinter` prints them as ``dnnshifter demo`` does.

    Returns:
        The served set and its memory, every load-driven switch (down under the burst, back up
        after: from, to, when, why), latency, accuracy and effective accuracy (correct within
        ``deadline_ms`` of when due, over offered) per phase, and the run's effective accuracy;
        ``{"skipped": why}`` for TorchServe without Java.

    Raises:
        ValueError: an unknown ``engine``.
        ServingError: the server did not start.

    >>> report = run_demo_serving(Path("demo_out/portfolio"), Path("demo_out/serve"), engine="litserve")  # doctest: +SKIP
    >>> [(s["from"], s["to"], s["direction"]) for s in report["switches"]]  # doctest: +SKIP
    [('level_00', 'level_01', 'down'), ('level_01', 'level_00', 'up')]
    >>> run_demo_serving(Path("demo_out/portfolio"), Path("demo_out/serve"), engine="triton")
    Traceback (most recent call last):
        ...
    ValueError: engine 'triton': choose torchserve or litserve
    """
    from dnnshifter_lightning.demo.digits import DigitsDataModule
    from dnnshifter_lightning.loadgen import effective_accuracy, run_schedule
    from dnnshifter_lightning.portfolio import read_manifest
    from dnnshifter_lightning.serve.served import resolve_served_set

    report = report or _silent
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose torchserve or litserve")
    if engine == "torchserve":
        try:
            check_java()
        except JavaMissingError as exc:
            report("skipped", {"reason": str(exc)})
            return {"skipped": str(exc)}
    workdir = Path(workdir)
    handler_opts = default_model_config(config)["handler"]
    fixed = handler_opts.get("fixed_variant") or (handler_opts.get("policy") or {}).get("fixed_variant")
    manifest = read_manifest(portfolio_dir)
    served = resolve_served_set(manifest["variants"], handler_opts.get("variants"), handler_opts.get("min_accuracy"),
                                fixed)  # as the server resolves it
    front = list(served.ids)
    top = fixed or front[0]  # where light load must end: the most accurate served variant
    dm = DigitsDataModule()
    dm.setup()
    xs, ys = zip(*[(x, y) for x, y in dm.val_dataloader()])
    import torch

    from dnnshifter_lightning.serve.torchserve import json_bodies

    x, y = torch.cat(xs), torch.cat(ys)
    bodies, labels = json_bodies(x), [int(v) for v in y]
    deadline_s = deadline_ms / 1000.0
    results: dict[str, list[LoadResult]] = {}
    report("requests", {"count": len(bodies)})
    start_engine = (_torchserve(Path(portfolio_dir), workdir, report, model_name, no_auth, config)
                    if engine == "torchserve" else _litserve(Path(portfolio_dir), workdir, report, no_auth, config))
    with start_engine as eng:
        hdrs, port, path = eng.headers, eng.port, eng.path
        _http("POST", port, path, bodies[0], hdrs)  # warm-up: the first request pays one-off costs
        with _phase(report, "capacity", variant=top, clients=16, seconds=capacity_s):
            probe = run_load(port, path, bodies, concurrency=16, duration_s=capacity_s, max_requests=200_000,
                             headers={**hdrs, PIN_HEADER: top}, phase="capacity")
            capacity = summarize(probe, span_s=capacity_s)["throughput_rps"] or 1.0
        light_rate, burst_rate = max(1.0, light_factor * capacity), burst_factor * capacity
        with _phase(report, "settle", variant=top, rate=light_rate):
            settle_end = time.monotonic() + 15.0
            while time.monotonic() < settle_end:
                chunk = run_schedule(port, path, bodies, [(light_rate, 1.0, "settle")], headers=hdrs)
                if chunk and chunk[-1].variant == top:
                    break
        wall0, mono0 = time.time(), time.monotonic()
        with _phase(report, "light", rate=light_rate, seconds=3.0):
            results["light"] = run_schedule(port, path, bodies, [(light_rate, 3.0, "light")], headers=hdrs)
        with _phase(report, "burst", rate=burst_rate, factor=burst_factor, seconds=burst_s):
            results["burst"] = run_schedule(port, path, bodies, [(burst_rate, burst_s, "burst")], headers=hdrs,
                                            start_index=len(results["light"]))
        results["recovery"] = []
        with _phase(report, "recovery", variant=top, rate=light_rate, seconds=idle_s):
            start = time.monotonic()
            while time.monotonic() - start < idle_s:
                chunk = run_schedule(port, path, bodies, [(light_rate, 1.0, "recovery")], headers=hdrs,
                                     start_index=len(results["recovery"]))
                results["recovery"] += chunk
                if time.monotonic() - start >= 5.0 and chunk and chunk[-1].variant == top:
                    break
        switches = [dict(s, at_s=round(s["time"] - wall0, 3)) for s in eng.switches()
                    if s["time"] >= wall0 - 0.5 and s["reason"] != INITIAL_SWITCH_REASON]  # load-driven ones only
        memory = eng.memory()
    phases = {name: summarize(res, labels, deadline_s=deadline_s) for name, res in results.items()}
    for name, res in results.items():
        if res:
            phases[name]["start_s"] = round(res[0].scheduled - mono0, 3)
    everything = [r for res in results.values() for r in res]
    run_ea = effective_accuracy(everything, labels, deadline_s)
    order = front if front else [top]

    def direction(s: dict) -> str:
        if s["from"] in order and s["to"] in order:
            return "down" if order.index(s["to"]) > order.index(s["from"]) else "up"
        return "?"

    for s in switches:
        s["direction"] = direction(s)
    result = {"engine": engine, "model": model_name, **eng.extra, "phases": phases, "switches": switches,
              "switch_source": eng.switch_source, "fixed_variant": fixed,
              "fixed_by": {"config": eng.config_name, "key": eng.fixed_key}, "most_accurate": top, "front": front,
              "served": served.to_dict(), "memory": memory, "capacity_rps": capacity, "light_rate": light_rate,
              "burst_rate": burst_rate, "effective_accuracy": run_ea, "requests": len(everything),
              "deadline_ms": deadline_ms}
    report("result", result)
    return result
