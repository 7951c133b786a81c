"""Whole-fit time: plain training vs IterativeMagnitudePruning vs Lightning's ModelPruning.

All three run the same schedule on the same model and data: ``(levels + 1) * epochs_per_level``
epochs of DigitsCNN (the demo model) on the real digits, pruning 20% at the end of every level.
``ModelPruning`` is configured as Lightning documents lottery tickets: global L1 unstructured,
``use_lottery_ticket_hypothesis=True`` (reset to the initialisation), pruning at the same epochs.

The contenders run interleaved, in a rotating order, ``--rounds`` times; the table reports median
whole-fit seconds and the ratio to plain training. Goal: IMP <= 1.03x plain, and below ModelPruning.

    python benchmarks/bench_training.py            # full run, writes JSON
    python benchmarks/bench_training.py --readme   # also replaces the README table
    python benchmarks/bench_training.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, markdown_table, median, update_readme, write_json  # noqa: E402

from dnnshifter_lightning import IterativeMagnitudePruning  # noqa: E402
from dnnshifter_lightning.demo.digits import DigitsClassifier, DigitsDataModule  # noqa: E402


def _trainer(epochs: int, callbacks: list, root: str) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     accelerator="cpu", devices=1, default_root_dir=root)


def contenders(levels: int, epochs_per_level: int, fraction: float) -> dict[str, Callable[[str], list]]:
    total = (levels + 1) * epochs_per_level

    def imp(root: str) -> list:
        return [IterativeMagnitudePruning(levels=levels, epochs_per_level=epochs_per_level, prune_fraction=fraction,
                                          rewind_to=0, checkpoint_dir=Path(root) / "imp", verbose=False)]

    def model_pruning(root: str) -> list:
        return [ModelPruning("l1_unstructured", amount=fraction, use_global_unstructured=True,
                             apply_pruning=lambda epoch: (epoch + 1) % epochs_per_level == 0 and epoch + 1 < total,
                             use_lottery_ticket_hypothesis=True, make_pruning_permanent=True, verbose=0)]

    return {"plain": lambda root: [], "IterativeMagnitudePruning": imp, "ModelPruning (lottery ticket)": model_pruning}


def fit_once(name: str, make_callbacks: Callable[[str], list], epochs: int, width: int, train_limit: int | None) -> float:
    with tempfile.TemporaryDirectory() as root:
        L.seed_everything(0, verbose=False)
        trainer = _trainer(epochs, make_callbacks(root), root)
        model = DigitsClassifier(width=width)
        data = DigitsDataModule(train_limit=train_limit)
        data.setup()  # load the data outside the timed region
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = (args.levels + 1) * args.epochs_per_level
    fits = contenders(args.levels, args.epochs_per_level, args.prune_fraction)
    names = list(fits)
    times: dict[str, list[float]] = {n: [] for n in names}
    console = Console()
    for name in names:  # warm-up: first fits pay for imports, allocator growth and thread pools
        fit_once(name, fits[name], epochs, args.width, args.train_limit)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            t = fit_once(name, fits[name], epochs, args.width, args.train_limit)
            times[name].append(t)
            console.print(f"round {r + 1}/{args.rounds}  {name:<32} {t:6.2f} s")
    base = median(times["plain"])
    rows = [{"contender": n, "median_s": median(times[n]), "ratio_to_plain": median(times[n]) / base,
             "runs_s": times[n]} for n in names]
    return {
        "benchmark": "training",
        "machine": machine(),
        "config": {"model": f"DigitsCNN(width={args.width})", "levels": args.levels,
                   "epochs_per_level": args.epochs_per_level, "prune_fraction": args.prune_fraction,
                   "epochs": epochs, "rounds": args.rounds, "train_limit": args.train_limit},
        "results": rows,
        "goal": "IterativeMagnitudePruning <= 1.03x plain and below ModelPruning",
    }


def report(result: dict[str, Any], readme: bool, block: str = "training") -> None:
    table = Table(title=f"Whole-fit time, {result['config']['epochs']} epochs ({machine_line(result['machine'])})")
    for col in ("contender", "median s", "x plain"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for row in result["results"]:
        table.add_row(row["contender"], f"{row['median_s']:.2f}", f"{row['ratio_to_plain']:.3f}")
    Console().print(table)
    md = markdown_table(
        ["contender", "median whole fit (s)", "x plain"],
        [[r["contender"], f"{r['median_s']:.2f}", f"{r['ratio_to_plain']:.3f}"] for r in result["results"]],
    )
    cfg = result["config"]
    md = (f"{cfg['model']} on digits, {cfg['levels'] + 1} levels x {cfg['epochs_per_level']} epochs at "
          f"{cfg['prune_fraction']:.0%}, median of {cfg['rounds']} interleaved rounds. "
          f"Machine: {machine_line(result['machine'])}.\n\n" + md)
    if readme and not update_readme(block, md):
        Console().print(f"[yellow]README has no <!-- bench:{block} --> block; table not written")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--epochs-per-level", type=int, default=2)
    p.add_argument("--prune-fraction", type=float, default=0.2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 level, tiny model")
    p.add_argument("--long", action="store_true",
                   help="longer levels (3 levels x 8 epochs, 3 rounds): how the per-level costs amortise; "
                        "writes bench_training_long.json and the README block training_long")
    p.add_argument("--readme", action="store_true", help="replace the README table")
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.epochs_per_level, args.rounds, args.width, args.train_limit = 1, 1, 1, 8, 128
    elif args.long:
        args.levels, args.epochs_per_level, args.rounds = 2, 8, 3
    torch.set_float32_matmul_precision("highest")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result = run(args)
    name = "bench_training" + ("_quick" if args.quick else "_long" if args.long else "")
    path = write_json(name, result)
    report(result, args.readme and not args.quick, block="training_long" if args.long else "training")
    Console().print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
