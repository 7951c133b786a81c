"""``portfolio.png``: accuracy against size and against batch-8 latency, with the front highlighted.

The front is :func:`~dnnshifter_lightning.serve.served.pareto_front` (validation accuracy against
batch-8 latency on the build machine), the set the server switches along: its members are joined by
a line and labelled, dominated variants are greyed. Each variant's sparse source is a cross.

matplotlib is the optional ``plot`` extra (``pip install 'dnnshifter-lightning[plot]'``); without it
:func:`plot_portfolio` warns and returns ``None``.

Example::

    from dnnshifter_lightning.portfolio import read_manifest
    from dnnshifter_lightning.shrink.plot import plot_portfolio
    plot_portfolio(read_manifest("portfolio"), "portfolio/portfolio.png")
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from dnnshifter_lightning._atomic import atomic_write
from dnnshifter_lightning.serve.served import pareto_front

__all__ = ["plot_portfolio", "plot_points"]


def plot_points(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """What :func:`plot_portfolio` draws, one dict per variant in level order (pure Python).

    ``front`` says whether the variant is on :func:`~dnnshifter_lightning.serve.served.pareto_front`
    (drawn in colour, joined and labelled) or dominated (drawn grey). Accuracy is in percent, 0 when
    not measured.
    """
    variants = sorted(manifest["variants"], key=lambda v: v["level"])
    front = set(pareto_front(variants))
    return [{"id": v["id"], "level": v["level"], "front": v["id"] in front,
             "accuracy_pct": 0.0 if v["accuracy"] is None else 100.0 * v["accuracy"],
             "params": v["params"], "latency_ms_8": v["latency_ms"]["8"]} for v in variants]


def plot_portfolio(manifest: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write a two-panel PNG: accuracy vs stored parameters, and accuracy vs batch-8 latency.

    Front members (:func:`plot_points`) are blue circles joined by a line and labelled by level;
    dominated variants are grey. One cross per sparse checkpoint a variant came from, joined to it
    by a faint line. Variants without a measured accuracy are plotted at accuracy 0 in a note-marked
    figure. Returns the path written, or ``None`` when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except ImportError:
        warnings.warn("matplotlib is not installed, skipping portfolio.png "
                      "(pip install 'dnnshifter-lightning[plot]')", stacklevel=2)
        return None

    variants = sorted(manifest["variants"], key=lambda v: v["level"])
    points = {p["id"]: p for p in plot_points(manifest)}
    measured = all(v["accuracy"] is not None for v in variants)

    def pct(x: float | None) -> float:
        return 0.0 if x is None else 100.0 * x

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = [("parameters stored", lambda v: v["params"], lambda s: s.get("params")),
              ("latency, batch 8 (ms)", lambda v: v["latency_ms"]["8"], lambda s: (s.get("latency_ms") or {}).get("8"))]
    labelled: set[str] = set()

    def label(name: str) -> str | None:  # each legend entry once per panel
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for ax, (xlabel, vx, sx) in zip(axes, panels):
        labelled.clear()
        for v in variants:
            on_front = points[v["id"]]["front"]
            sparse = v.get("sparse") or {}
            x_var, y_var = vx(v), pct(v["accuracy"])
            x_sp, y_sp = sx(sparse), pct(v["sparse_accuracy"])
            if x_sp is not None:
                ax.plot([x_sp, x_var], [y_sp, y_var], color="0.88", lw=0.8, zorder=1)
                ax.scatter([x_sp], [y_sp], marker="x", color="tab:red", alpha=0.45, s=30, zorder=2,
                           label=label("sparse checkpoint"))
            if on_front:
                ax.scatter([x_var], [y_var], marker="o", color="tab:blue", s=50, zorder=4,
                           label=label("variant on the front"))
                ax.annotate(f"L{v['level']}", (x_var, y_var), textcoords="offset points", xytext=(5, 4),
                            fontsize=8, fontweight="bold", color="tab:blue")
            else:
                ax.scatter([x_var], [y_var], marker="o", color="0.7", s=30, zorder=3,
                           label=label("dominated variant"))
                ax.annotate(f"L{v['level']}", (x_var, y_var), textcoords="offset points", xytext=(5, -9),
                            fontsize=7, color="0.6")
        front = sorted((v for v in variants if points[v["id"]]["front"]), key=vx)
        ax.plot([vx(v) for v in front], [pct(v["accuracy"]) for v in front], color="tab:blue", lw=1.2,
                zorder=3, label=label("front (accuracy vs batch-8 latency)"))
        xs = [x for v in variants for x in (vx(v), sx(v.get("sparse") or {})) if x]
        if xs and max(xs) / min(xs) > 20:  # log only where it spans orders of magnitude
            ax.set_xscale("log")
            xlabel += " (log scale)"
        if ax is axes[0]:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 250k, 1.2M
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.08, y=0.12)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title("accuracy vs size")
    axes[1].set_title("accuracy vs batch-8 latency (the front is drawn here)")
    build = manifest.get("build", {})
    note = "" if measured else "  (accuracy not measured: plotted at 0)"
    n_front = sum(p["front"] for p in points.values())
    fig.suptitle(f"DNNShifter portfolio: {len(variants)} variants, {n_front} on the front; latency on "
                 f"{build.get('latency_threads', '?')} thread(s), "
                 f"torch {build.get('torch_version', '?')}{note}", fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, png.getvalue())
