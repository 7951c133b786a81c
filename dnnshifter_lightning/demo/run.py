"""``dnnshifter demo``: the whole DNNShifter pipeline on scikit-learn's real 8x8 digits.

1. Train :class:`~dnnshifter_lightning.demo.digits.DigitsClassifier` with
   :class:`~dnnshifter_lightning.train.imp.IterativeMagnitudePruning` (one sparse checkpoint per level).
2. The post-fit :class:`~dnnshifter_lightning.shrink.callback.PortfolioBuilder` prunes each checkpoint
   structurally into a portfolio of dense variants, measures them and draws ``portfolio.png``;
   :func:`ladder_report` then checks that the front (validation accuracy against batch-8 latency) is
   a ladder worth switching along.
3. Serve the portfolio with real TorchServe or LitServe (``engine``), drive a burst then light load,
   and report the switches.

What it finds goes to a ``report(event, info)`` callback; ``dnnshifter demo`` prints it with
:class:`~dnnshifter_lightning.cli.DemoPrinter`.

Example::

    from dnnshifter_lightning.demo.run import run_demo
    run_demo("demo_out", levels=4, epochs_per_level=1, serve=False)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule
from dnnshifter_lightning.shrink.measure import count_macs
from dnnshifter_lightning.train.imp import IterativeMagnitudePruning

if TYPE_CHECKING:
    from dnnshifter_lightning.demo.serving import Report

__all__ = ["run_demo", "DEMO_DEFAULTS", "LadderReport", "ladder_report", "LADDER_CRITERIA"]

#: What the demo's portfolio must show to be a ladder worth switching along (issue 9): on the front of
#: validation accuracy against batch-8 latency, at least ``members`` variants, at least ``points``
#: accuracy points and ``samples`` validation samples between the most and least accurate, and at
#: least ``latency_ratio`` between the slowest and the fastest.
LADDER_CRITERIA: dict[str, float] = {"members": 4, "points": 3.0, "samples": 10, "latency_ratio": 3.0}


@dataclass(frozen=True)
class LadderReport:
    """How a portfolio's front measures against :data:`LADDER_CRITERIA`; ``problems`` is empty when it passes."""

    front: list[str]
    accuracy_points: float | None
    accuracy_samples: int | None
    latency_ratio: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per criterion, for the demo's output."""
        pts = "?" if self.accuracy_points is None else f"{self.accuracy_points:.1f}"
        smp = "?" if self.accuracy_samples is None else str(self.accuracy_samples)
        lat = "?" if self.latency_ratio is None else f"{self.latency_ratio:.1f}x"
        return [f"front: {len(self.front)} variants ({', '.join(self.front)})",
                f"accuracy spread: {pts} points, {smp} validation samples",
                f"batch-8 latency spread: {lat}",
                *(f"NOT MET: {p}" for p in self.problems)]


def ladder_report(manifest: dict[str, Any], val_samples: int | None,
                  criteria: dict[str, float] | None = None) -> LadderReport:
    """Check a portfolio manifest's front (:func:`~dnnshifter_lightning.serve.served.pareto_front`) against the ladder criteria.

    ``val_samples`` is the size of the validation set the accuracies were measured on (the manifest
    does not record it); with ``None`` the sample criterion cannot be checked and is reported unmet.
    """
    from dnnshifter_lightning.serve.served import pareto_front

    want = {**LADDER_CRITERIA, **(criteria or {})}
    variants = manifest["variants"]
    front_ids = pareto_front(variants)
    front = [v for v in variants if v["id"] in set(front_ids)]
    problems: list[str] = []
    if len(front) < want["members"]:
        problems.append(f"front has {len(front)} variants < {want['members']:g}")
    accs = [v["accuracy"] for v in front if v.get("accuracy") is not None]
    lats = [v["latency_ms"]["8"] for v in front if (v.get("latency_ms") or {}).get("8")]
    points = samples = ratio = None
    if len(accs) < len(front):
        problems.append("accuracy not measured for every front variant (build with validation data)")
    elif accs:
        points = 100.0 * (max(accs) - min(accs))
        if points < want["points"]:
            problems.append(f"accuracy spread {points:.1f} points < {want['points']:g}")
    if val_samples is None:
        problems.append("validation sample count unknown")
    elif points is not None:
        samples = int(round(points / 100.0 * val_samples))
        if samples < want["samples"]:
            problems.append(f"accuracy spread {samples} validation samples < {want['samples']:g}")
    if len(lats) < len(front):
        problems.append("batch-8 latency not measured for every front variant")
    elif lats:
        ratio = max(lats) / min(lats)
        if ratio < want["latency_ratio"]:
            problems.append(f"latency spread {ratio:.1f}x < {want['latency_ratio']:g}x")
    return LadderReport(front_ids, points, samples, ratio, problems)

#: 7 levels at 70% reach 1 - 0.3**7 = 99.98% sparsity. DigitsCNN(width=208) costs about 100 M MACs per sample
#: dense, heavy enough that one TorchServe worker is the bottleneck of the serving step on 2 cores. Its channels
#: only start to die, and so its latency only starts to fall, beyond about 99% sparsity: the last levels are where
#: the variants get faster and where digits accuracy starts to drop, so the front is a ladder (:func:`ladder_report`
#: checks it and the demo reports the result; docs/design-notes/demo-workload.md has the measurements). The paper
#: prunes 20% per level; the demo takes far bigger steps so that 16 epochs of a 100 M-MAC model fit in a few minutes
#: on two CPU cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "levels": 7,
    "prune_fraction": 0.7,
    "epochs_per_level": 2,
    "rewind_to": "1ep",
    "width": 208,
    "seed": 0,
}


def run_demo(out: str | os.PathLike[str], *, levels: int = DEMO_DEFAULTS["levels"],
             prune_fraction: float = DEMO_DEFAULTS["prune_fraction"],
             epochs_per_level: int = DEMO_DEFAULTS["epochs_per_level"], rewind_to: str | int = DEMO_DEFAULTS["rewind_to"],
             width: int = DEMO_DEFAULTS["width"], seed: int = DEMO_DEFAULTS["seed"], build: bool = True,
             serve: bool = True, fresh: bool = False, engine: str | None = None,
             report: Report | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` and return a summary (also written to ``out/summary.json``).

    The defaults are :data:`DEMO_DEFAULTS`; ``build=False`` stops after training, ``serve=False``
    after the portfolio. It refuses to overwrite the level checkpoints of an earlier run unless
    ``fresh`` (which deletes ``out`` first). ``engine`` serves with ``"torchserve"`` or
    ``"litserve"``; by default TorchServe while Java 17 is present, else LitServe, and the demo says
    why (:func:`~dnnshifter_lightning.demo.serving.choose_engine`, checked before training).

    ``report(event, info)`` hears ``"imp"`` (the model and the IMP schedule: ``width``, ``macs``,
    ``levels``, ``epochs_per_level``, ``prune_fraction``, ``final_sparsity``, ``rewind_to``) before
    training, ``"portfolio"`` (``path``) and ``"ladder"`` (``report``: a :class:`LadderReport`) after
    the build, ``"serving"`` (``engine``, ``why``) and then the events of
    :func:`~dnnshifter_lightning.demo.serving.run_demo_serving`, and last ``"done"`` (``seconds``,
    ``summary``: the path of ``summary.json``). ``None`` shows nothing but Lightning's progress bar
    and the callbacks' tables; :class:`~dnnshifter_lightning.cli.DemoPrinter` prints what
    ``dnnshifter demo`` prints.

    Example::

        >>> DEMO_DEFAULTS["levels"], DEMO_DEFAULTS["prune_fraction"], DEMO_DEFAULTS["width"]
        (7, 0.7, 208)
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
    report = report or (lambda event, info: None)
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    ckpt_dir = out / "imp"
    if ckpt_dir.exists() and any(ckpt_dir.glob("level_*.ckpt")):
        raise FileExistsError(f"{ckpt_dir} already holds level checkpoints: pass --fresh or another --out")
    engine_why = None
    if build and serve:  # before training: an engine asked for that cannot run is an error now
        from dnnshifter_lightning.demo.serving import choose_engine

        engine, engine_why = choose_engine(engine)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out": str(out)}
    started = time.perf_counter()

    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier(width=width)
    macs = count_macs(model.model, torch.zeros(1, *DigitsDataModule.input_spec["shape"]))
    report("imp", {"width": width, "macs": macs, "levels": levels, "epochs_per_level": epochs_per_level,
                   "prune_fraction": prune_fraction, "final_sparsity": 1 - (1 - prune_fraction) ** levels,
                   "rewind_to": rewind_to})
    # The classifier is pruned at half the rate, ranked on its own, as the LTH papers prune the output layer:
    # global ranking would take its small-magnitude weights first and cut the network off at high sparsity.
    imp = IterativeMagnitudePruning(levels=levels, epochs_per_level=epochs_per_level, prune_fraction=prune_fraction,
                                    rewind_to=rewind_to, checkpoint_dir=ckpt_dir,
                                    layer_prune_fractions={"model.classifier": prune_fraction / 2})
    callbacks: list[L.Callback] = [imp]
    if build:
        from dnnshifter_lightning.shrink.callback import PortfolioBuilder

        callbacks.append(PortfolioBuilder(out_dir=out / "portfolio"))
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_epochs=imp.total_epochs, callbacks=[*callbacks, RichProgressBar(leave=False)],
                        logger=CSVLogger(str(out), name="logs"), enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(out))
    datamodule = DigitsDataModule()
    trainer.fit(model, datamodule=datamodule)
    summary["imp"] = [{k: v for k, v in row.items() if k != "path"} for row in imp.history]
    summary["train_seconds"] = time.perf_counter() - started

    if build:
        from dnnshifter_lightning.portfolio import read_manifest

        manifest = read_manifest(out / "portfolio")
        summary["portfolio"] = str(out / "portfolio")
        summary["variants"] = len(manifest["variants"])
        report("portfolio", {"path": out / "portfolio"})
        ladder = ladder_report(manifest, val_samples=len(datamodule.val_dataloader().dataset))
        summary["ladder"] = asdict(ladder) | {"ok": ladder.ok}
        report("ladder", {"report": ladder})

    if build and serve:
        report("serving", {"engine": engine, "why": engine_why})
        from dnnshifter_lightning.demo.serving import run_demo_serving

        # a local demo on 127.0.0.1: TorchServe's token auth off, explicitly, and run_demo_serving reports
        # that; LitServe keeps its API key on (the demo reads it from its own work dir)
        summary["serving"] = run_demo_serving(out / "portfolio", out / "serve", report, engine=engine,
                                              no_auth=engine == "torchserve")
        summary["serving"]["engine_why"] = engine_why
    summary["total_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report("done", {"seconds": summary["total_seconds"], "summary": out / "summary.json"})
    return summary
