"""The portfolio on the console: its table, and a progress bar for :func:`~dnnshifter_lightning.shrink.build.build_portfolio`.

The only shrink module that imports rich. :class:`~dnnshifter_lightning.shrink.callback.PortfolioBuilder`
and the ``dnnshifter portfolio`` commands show a build through it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dnnshifter_lightning.serve.served import pareto_front
from dnnshifter_lightning.shrink.build import BuildEvent

__all__ = ["portfolio_table", "BuildProgress", "build_console"]


def build_console() -> Console:
    """A console for build output: the terminal's width, or 160 columns in pipes and logs (the full table)."""
    return Console(width=None if Console().is_terminal else 160)


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def portfolio_table(manifest: dict[str, Any], title: str = "portfolio") -> Table:
    """A rich table of the variants, most accurate first, with the sparse source alongside.

    The ``front`` column marks the accuracy/latency front (:func:`~dnnshifter_lightning.serve.served.pareto_front`,
    validation accuracy against batch-8 latency) with ``*``; dominated variants are dimmed, and the
    caption says how many variants are on the front.
    """
    front = set(pareto_front(manifest["variants"]))
    table = Table(title=title, caption=f"front (*): {len(front)} of {len(manifest['variants'])} variants "
                                       "(validation accuracy vs batch-8 latency)")
    for col, just in [("variant", "left"), ("front", "center"), ("sparsity", "right"), ("accuracy", "right"), ("sparse acc", "right"),
                      ("params", "right"), ("x smaller", "right"), ("MACs", "right"), ("file KiB", "right"),
                      ("ms @1", "right"), ("ms @8", "right"), ("x faster @1", "right"), ("max |diff|", "right")]:
        table.add_column(col, justify=just, no_wrap=col == "variant")  # type: ignore[arg-type]
    for v in manifest["variants"]:
        sp = v.get("sparse") or {}
        ratio = f"{sp['params'] / v['params']:.2f}" if sp.get("params") and v["params"] else "-"
        speed = (f"{sp['latency_ms']['1'] / v['latency_ms']['1']:.2f}"
                 if sp.get("latency_ms") and v["latency_ms"]["1"] else "-")
        on_front = v["id"] in front
        table.add_row(v["id"], "*" if on_front else "", f"{100 * v['sparsity']:.1f}%", _fmt_pct(v["accuracy"]),
                      _fmt_pct(v["sparse_accuracy"]), _fmt_int(v["params"]), ratio, _fmt_int(v["macs"]),
                      f"{v['bytes_compressed'] / 1024:.1f}", f"{v['latency_ms']['1']:.3f}", f"{v['latency_ms']['8']:.3f}",
                      speed, "-" if v["max_abs_diff"] is None else f"{v['max_abs_diff']:.2e}",
                      style=None if on_front else "dim")
    return table


class BuildProgress:
    """A rich progress bar fed by :class:`~dnnshifter_lightning.shrink.build.BuildEvent`: pass it as
    ``build_portfolio(..., progress=bar)`` inside ``with BuildProgress(console) as bar:``.
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(TextColumn("[bold]building portfolio"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=console or build_console(), transient=False)
        self._task: Any = None

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, event: BuildEvent) -> None:
        if event.stage == "start":
            self._task = self._progress.add_task("", total=event.total)
        elif self._task is None:
            return
        elif event.stage == "checkpoint":
            self._progress.update(self._task, description=event.checkpoint or "")
        elif event.stage == "variant":
            self._progress.update(self._task, completed=event.done)
