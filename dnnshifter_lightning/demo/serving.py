"""The serving part of ``dnnshifter demo``: archive the portfolio, serve it with real TorchServe, load it, report.

Built on :mod:`dnnshifter_lightning.serve.torchserve` (archive, server, log) and
:mod:`dnnshifter_lightning.loadgen` (the open-loop trace); the worker code knows nothing of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from dnnshifter_lightning.loadgen import LoadResult, effective_accuracy, run_load, run_schedule, summarize
from dnnshifter_lightning.serve.defaults import INITIAL_SWITCH_REASON, PIN_HEADER, default_model_config
from dnnshifter_lightning.serve.torchserve import (
    JavaMissingError, TorchServeServer, build_archive, check_java, json_bodies, read_log_events, read_switches,
)

__all__ = ["run_demo_serving"]


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _mb(n: Any) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{n / 2**20:.2f} MB"


def run_demo_serving(portfolio_dir: Path, workdir: Path, console: Any = None, *, model_name: str = "digits",
                     burst_s: float = 6.0, idle_s: float = 20.0, light_factor: float = 0.3, burst_factor: float = 2.5,
                     capacity_s: float = 2.0, no_auth: bool = False, config: Mapping[str, Any] | None = None,
                     deadline_ms: float = 100.0) -> dict[str, Any]:
    """The serving part of ``dnnshifter demo``: archive, serve with real TorchServe, load it, report.

    The held-out digits go to 127.0.0.1 as JSON requests. First the closed-loop capacity ``C`` of the
    most accurate served variant is measured (16 clients pinned to it for ``capacity_s``), then an
    open-loop trace sized from it: ``light`` (``light_factor`` x C for 3 s), ``burst``
    (``burst_factor`` x C for ``burst_s``), ``recovery`` (``light_factor`` x C until the most
    accurate variant serves again, at least 5 s and at most ``idle_s``). Prints the served set and
    its memory, every switch (down under the burst, back up after: from, to, when, why), latency,
    accuracy and effective accuracy (correct within ``deadline_ms`` of when due, over offered) per
    phase, and the run's effective accuracy. Token auth stays on unless ``no_auth`` (``dnnshifter
    demo`` turns it off, on loopback, and says so). Returns them as a dict (``{"skipped": why}``
    without Java). ``config`` overrides the archive's model-config (e.g. ``{"handler": {"policy": {...}}}``).
    About 30-60 s including TorchServe's start.

    Example::

        >>> from pathlib import Path
        >>> report = run_demo_serving(Path("demo_out/portfolio"), Path("demo_out/serve"))  # doctest: +SKIP
        >>> sorted(report["phases"])  # doctest: +SKIP
        ['burst', 'light', 'recovery']
        >>> for s in report["switches"]:  # doctest: +SKIP
        ...     print(f'{s["at_s"]:6.2f} s  {s["from"]} -> {s["to"]}: {s["reason"]}')
    """
    from dnnshifter_lightning.demo.digits import DigitsDataModule
    from dnnshifter_lightning.portfolio import read_manifest
    from dnnshifter_lightning.serve.served import resolve_served_set

    console = console if console is not None else Console()
    try:
        check_java()
    except JavaMissingError as exc:
        console.print(f"[yellow]skipping the TorchServe part of the demo:[/] {exc}")
        return {"skipped": str(exc)}
    workdir = Path(workdir)
    mar = build_archive(Path(portfolio_dir), model_name, workdir / "store", config=config, force=True)
    handler_opts = default_model_config(config)["handler"]
    fixed = handler_opts.get("fixed_variant") or (handler_opts.get("policy") or {}).get("fixed_variant")
    manifest = read_manifest(portfolio_dir)
    served = resolve_served_set(manifest["variants"], handler_opts.get("variants"), handler_opts.get("min_accuracy"),
                                fixed)  # as the handler resolves it
    front = list(served.ids)
    top = fixed or front[0]  # where light load must end: the most accurate served variant
    dm = DigitsDataModule()
    dm.setup()
    xs, ys = zip(*[(x, y) for x, y in dm.val_dataloader()])
    import torch

    x, y = torch.cat(xs), torch.cat(ys)
    bodies, labels = json_bodies(x), [int(v) for v in y]
    path = f"/predictions/{model_name}"
    deadline_s = deadline_ms / 1000.0
    results: dict[str, list[LoadResult]] = {}
    console.print(f"[bold]serving {mar.name} with TorchServe[/] (127.0.0.1, {len(bodies)} held-out digits as requests)")
    if no_auth:
        console.print("[yellow]token auth is OFF for this demo[/] (127.0.0.1 only; `dnnshifter serve` keeps it on)")
    with TorchServeServer(mar.parent, {model_name: mar.name}, no_auth=no_auth, workdir=workdir / "torchserve") as ts:
        ts.predict(model_name, bodies[0])  # warm-up: the first request pays one-off costs
        memory = (read_log_events(ts, "DNNSHIFTER_MEMORY") or [{}])[-1]
        hdrs = ts.inference_headers()
        port = ts.ports.inference
        with console.status(f"measuring the capacity of {top}: 16 clients for {capacity_s:g} s"):
            probe = run_load(port, path, bodies, concurrency=16, duration_s=capacity_s, max_requests=200_000,
                             headers={**hdrs, PIN_HEADER: top}, phase="capacity")
            capacity = summarize(probe, span_s=capacity_s)["throughput_rps"] or 1.0
        light_rate, burst_rate = max(1.0, light_factor * capacity), burst_factor * capacity
        with console.status("settling: light load until the most accurate variant serves"):
            settle_end = time.monotonic() + 15.0
            while time.monotonic() < settle_end:
                chunk = run_schedule(port, path, bodies, [(light_rate, 1.0, "settle")], headers=hdrs)
                if chunk and chunk[-1].variant == top:
                    break
        wall0, mono0 = time.time(), time.monotonic()
        with console.status(f"light: {light_rate:.0f} req/s for 3 s"):
            results["light"] = run_schedule(port, path, bodies, [(light_rate, 3.0, "light")], headers=hdrs)
        with console.status(f"burst: {burst_rate:.0f} req/s ({burst_factor:g}x capacity) for {burst_s:g} s"):
            results["burst"] = run_schedule(port, path, bodies, [(burst_rate, burst_s, "burst")], headers=hdrs,
                                            start_index=len(results["light"]))
        results["recovery"] = []
        with console.status(f"recovery: {light_rate:.0f} req/s until the most accurate variant serves again"):
            start = time.monotonic()
            while time.monotonic() - start < idle_s:
                chunk = run_schedule(port, path, bodies, [(light_rate, 1.0, "recovery")], headers=hdrs,
                                     start_index=len(results["recovery"]))
                results["recovery"] += chunk
                if time.monotonic() - start >= 5.0 and chunk and chunk[-1].variant == top:
                    break
        switches = [dict(s, at_s=round(s["time"] - wall0, 3)) for s in read_switches(ts)
                    if s["time"] >= wall0 - 0.5 and s["reason"] != INITIAL_SWITCH_REASON]  # load-driven ones only
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
    console.print(f"served set ({served.selection}): {', '.join(front)}"
                  + (f"; dominated, not loaded: {', '.join(served.dominated)}" if served.dominated else "")
                  + (f"; below the accuracy floor {served.floor:.1%}: {', '.join(served.below_floor)}"
                     if served.below_floor else "")
                  + (f" (accuracy floor {served.floor:.1%}, {served.floor_rule})" if served.floor is not None else ""))
    for warning in served.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if memory:
        console.print(f"memory for model weights: {_mb(memory.get('total_bytes'))} resident for the {len(front)} "
                      f"served variants (all compressed + the active one inflated) against "
                      f"{_mb(memory.get('served_all_inflated_bytes'))} with all of them inflated")
    console.print(f"capacity of {top}: {capacity:.0f} req/s (closed loop, 16 clients); light load "
                  f"{light_rate:.0f} req/s, burst {burst_rate:.0f} req/s")
    table = Table(title="variant switches seen by the handler")
    for col in ("at (s)", "", "from", "to", "why", "switch (ms)"):
        table.add_column(col)
    for s in switches:
        table.add_row(f"{s['at_s']:.2f}", s["direction"], s["from"], s["to"], s["reason"], f"{s['switch_ms']:.2f}")
    if switches:
        console.print(table)
    elif fixed:
        console.print(f"[yellow]no switch: the archive's config fixes the variant to {fixed} (handler.fixed_variant)[/]")
    elif len(front) == 1:
        console.print(f"[yellow]no switch: {front[0]} is the only served variant (the accuracy/latency front above "
                      f"the accuracy floor has one variant: it is both the most accurate and the cheapest), so the "
                      f"policy has nothing to switch to[/]")
    else:
        console.print(f"[yellow]no switch happened: the burst did not saturate the worker on {top}[/]")
    table = Table(title=f"serving per phase (latency from when each request was due; deadline {deadline_ms:g} ms)")
    for col in ("phase", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s", "accuracy", "effective acc.",
                "served by"):
        table.add_column(col, justify="right" if col not in ("phase", "served by") else "left")
    for name, p in phases.items():
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(p["variants"].items()))
        table.add_row(name, str(p["requests"]), str(p["errors"]), _fmt(p["p50_ms"]), _fmt(p["p90_ms"]),
                      _fmt(p["p99_ms"]), _fmt(p["throughput_rps"]),
                      "-" if p["accuracy"] is None else f"{p['accuracy']:.1%}",
                      "-" if p["effective_accuracy"] is None else f"{p['effective_accuracy']:.1%}", mix)
    console.print(table)
    if run_ea is not None:
        console.print(f"effective accuracy of the run: {run_ea:.1%} of {len(everything)} requests answered correctly "
                      f"within {deadline_ms:g} ms of when they were due")
    return {"model": model_name, "archive": str(mar), "phases": phases, "switches": switches,
            "most_accurate": top, "front": front, "served": served.to_dict(), "memory": memory,
            "capacity_rps": capacity, "light_rate": light_rate, "burst_rate": burst_rate,
            "effective_accuracy": run_ea, "deadline_ms": deadline_ms}
