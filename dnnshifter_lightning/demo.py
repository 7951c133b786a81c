"""``dnnshifter demo``: the whole DNNShifter pipeline on scikit-learn's real 8x8 digits.

1. Train :class:`~dnnshifter_lightning.digits.DigitsClassifier` with
   :class:`~dnnshifter_lightning.imp.IterativeMagnitudePruning` (one sparse checkpoint per level).
2. The post-fit :class:`~dnnshifter_lightning.builder.PortfolioBuilder` prunes each checkpoint
   structurally into a portfolio of dense variants, measures them and draws ``portfolio.png``.
3. Serve the portfolio with real TorchServe, drive a burst then light load, and print the switches.

Example::

    from dnnshifter_lightning.demo import run_demo
    run_demo("demo_out", levels=4, epochs_per_level=1, serve=False)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console

from .digits import DigitsClassifier, DigitsDataModule
from .imp import IterativeMagnitudePruning

__all__ = ["run_demo", "DEMO_DEFAULTS"]

#: 16 levels at 30% reach 1 - 0.7**16 = 99.7% sparsity, past the point where digits accuracy starts to drop,
#: so the portfolio holds a real accuracy/speed trade-off to switch along. The paper prunes 20% per level; the demo
#: takes bigger steps so the whole run fits in a few minutes on two CPU cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "levels": 16,
    "prune_fraction": 0.3,
    "epochs_per_level": 3,
    "rewind_to": "1ep",
    "width": 128,
    "seed": 0,
}


def run_demo(out: str | os.PathLike[str], *, levels: int = DEMO_DEFAULTS["levels"],
             prune_fraction: float = DEMO_DEFAULTS["prune_fraction"],
             epochs_per_level: int = DEMO_DEFAULTS["epochs_per_level"], rewind_to: str | int = DEMO_DEFAULTS["rewind_to"],
             width: int = DEMO_DEFAULTS["width"], seed: int = DEMO_DEFAULTS["seed"], build: bool = True,
             serve: bool = True, fresh: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` and return a summary (also written to ``out/summary.json``).

    The defaults are :data:`DEMO_DEFAULTS`; ``build=False`` stops after training, ``serve=False``
    after the portfolio. It refuses to overwrite the level checkpoints of an earlier run unless
    ``fresh`` (which deletes ``out`` first).

    Example::

        >>> DEMO_DEFAULTS["levels"], DEMO_DEFAULTS["prune_fraction"], DEMO_DEFAULTS["width"]
        (16, 0.3, 128)
        >>> summary = run_demo("demo_out", levels=4, epochs_per_level=1, serve=False)  # doctest: +SKIP
        >>> summary["variants"]  # doctest: +SKIP
        5
        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "imp").mkdir()
        >>> _ = (out / "imp" / "level_00.ckpt").write_bytes(b"")       # an earlier run's checkpoint
        >>> run_demo(out)
        Traceback (most recent call last):
            ...
        FileExistsError: .../imp already holds level checkpoints: pass --fresh or another --out
    """
    console = console or Console()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    ckpt_dir = out / "imp"
    if ckpt_dir.exists() and any(ckpt_dir.glob("level_*.ckpt")):
        raise FileExistsError(f"{ckpt_dir} already holds level checkpoints: pass --fresh or another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out": str(out)}
    started = time.perf_counter()

    console.rule("[bold]1. Iterative Magnitude Pruning with rewinding on real 8x8 digits")
    target = 1 - (1 - prune_fraction) ** levels
    console.print(f"DigitsCNN(width={width}), {levels} levels x {epochs_per_level} epochs at {prune_fraction:.0%} per "
                  f"level (final sparsity {target:.1%}), rewind to {rewind_to}")
    L.seed_everything(seed, verbose=False)
    imp = IterativeMagnitudePruning(levels=levels, epochs_per_level=epochs_per_level, prune_fraction=prune_fraction,
                                    rewind_to=rewind_to, checkpoint_dir=ckpt_dir)
    callbacks: list[L.Callback] = [imp]
    if build:
        from .builder import PortfolioBuilder

        callbacks.append(PortfolioBuilder(out_dir=out / "portfolio"))
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[*callbacks, RichProgressBar(leave=False)],
                        logger=CSVLogger(str(out), name="logs"), enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(out))
    trainer.fit(DigitsClassifier(width=width), datamodule=DigitsDataModule())
    summary["imp"] = [{k: v for k, v in row.items() if k != "path"} for row in imp.history]
    summary["train_seconds"] = time.perf_counter() - started

    if build:
        from .portfolio import read_manifest

        summary["portfolio"] = str(out / "portfolio")
        summary["variants"] = len(read_manifest(out / "portfolio")["variants"])
        console.print(f"Portfolio: {out / 'portfolio'} (manifest.json, variants, portfolio.png)")

    if build and serve:
        console.rule("[bold]3. Serving the portfolio with TorchServe, switching as load changes")
        from .serving import JavaMissingError, run_demo_serving

        try:  # a local demo on 127.0.0.1: token auth off, explicitly, and run_demo_serving prints that
            summary["serving"] = run_demo_serving(out / "portfolio", out / "serve", console, no_auth=True)
        except JavaMissingError as exc:
            console.print(f"[yellow]Skipping the serving step: {exc}")
            summary["serving"] = {"skipped": str(exc)}
    summary["total_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"Done in {summary['total_seconds']:.0f} s. Summary: {out / 'summary.json'}")
    return summary
