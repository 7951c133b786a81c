"""``portfolio.png``: accuracy against size and against latency, variants beside their sparse sources.

matplotlib is the optional ``plot`` extra (``pip install 'dnnshifter-lightning[plot]'``); without it
:func:`plot_portfolio` warns and returns ``None``.

Example::

    from dnnshifter_lightning.portfolio import read_manifest
    from dnnshifter_lightning.plot import plot_portfolio
    plot_portfolio(read_manifest("portfolio"), "portfolio/portfolio.png")
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["plot_portfolio"]


def plot_portfolio(manifest: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write a two-panel PNG: accuracy vs stored parameters, and accuracy vs batch-1 latency.

    One circle per variant and one cross per sparse checkpoint it came from, labelled by level and
    joined by a grey line. Variants without a measured accuracy are plotted at accuracy 0 in a
    note-marked figure. Returns the path written, or ``None`` when matplotlib is missing.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> def variant(level, params, ms, acc):
        ...     return {"level": level, "params": params, "latency_ms": {"1": ms, "8": 4 * ms},
        ...             "accuracy": acc, "sparse_accuracy": acc,
        ...             "sparse": {"params": 20000, "latency_ms": {"1": 0.5, "8": 2.0}}}
        >>> manifest = {"variants": [variant(0, 20000, 0.5, 0.97), variant(4, 9000, 0.3, 0.96)],
        ...             "build": {"latency_threads": 1, "torch_version": "2.x"}}
        >>> png = plot_portfolio(manifest, Path(tempfile.mkdtemp()) / "portfolio.png")
        >>> png.name, png.read_bytes()[:4]
        ('portfolio.png', b'\\x89PNG')
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
    measured = all(v["accuracy"] is not None for v in variants)

    def pct(x: float | None) -> float:
        return 0.0 if x is None else 100.0 * x

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = [("parameters stored", lambda v: v["params"], lambda s: s.get("params")),
              ("latency, batch 1 (ms)", lambda v: v["latency_ms"]["1"], lambda s: (s.get("latency_ms") or {}).get("1"))]
    for ax, (xlabel, vx, sx) in zip(axes, panels):
        for i, v in enumerate(variants):
            sparse = v.get("sparse") or {}
            x_var, y_var = vx(v), pct(v["accuracy"])
            x_sp, y_sp = sx(sparse), pct(v["sparse_accuracy"])
            if x_sp is not None:
                ax.plot([x_sp, x_var], [y_sp, y_var], color="0.8", lw=1, zorder=1)
                ax.scatter([x_sp], [y_sp], marker="x", color="tab:red", s=40, zorder=2,
                           label="sparse checkpoint" if i == 0 else None)
            ax.scatter([x_var], [y_var], marker="o", color="tab:blue", s=40, zorder=3,
                       label="pruned variant" if i == 0 else None)
            ax.annotate(f"L{v['level']}", (x_var, y_var), textcoords="offset points", xytext=(5, 4), fontsize=8)
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
    axes[1].set_title("accuracy vs latency")
    build = manifest.get("build", {})
    note = "" if measured else "  (accuracy not measured: plotted at 0)"
    fig.suptitle(f"DNNShifter portfolio: {len(variants)} variants, {build.get('latency_threads', '?')} thread(s), "
                 f"torch {build.get('torch_version', '?')}{note}", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
