"""Every docstring example runs, and the user-facing entry points (:data:`ENTRY_POINTS`) have one.

The examples are plain doctests (``>>>`` lines, Lightning style ``Example::`` blocks); lines that
cannot run here (starting TorchServe, long training) carry ``# doctest: +SKIP`` but are still
written as correct code. Other names are checked by the tests, not by doctests.
"""

from __future__ import annotations

import doctest
import importlib
import tempfile

import pytest

MODULES = [
    "dnnshifter_lightning",
    *(f"dnnshifter_lightning.{name}" for name in (
        "train.masks", "train.imp", "train.checkpoints",
        "shrink.structured", "shrink.measure", "shrink.build", "shrink.callback", "shrink.report", "shrink.plot",
        "portfolio", "graph", "loadgen",
        "serve.runtime", "serve.policy", "serve.served", "serve.images", "serve.core", "serve.defaults",
        "serve.litserve", "serve.torchserve", "serve.litserve_metrics", "serve.litserve_command",
        "demo.run", "demo.serving", "demo.digits", "demo.models",
    )),
]

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


#: The user-facing entry points, as "module:name": each must show a runnable example.
ENTRY_POINTS = (
    "dnnshifter_lightning.shrink.structured:prune_structurally",
    "dnnshifter_lightning.shrink.build:build_portfolio",
    "dnnshifter_lightning.shrink.callback:PortfolioBuilder",
    "dnnshifter_lightning.train.imp:IterativeMagnitudePruning",
    "dnnshifter_lightning.train.masks:MaskEnforcer",
    "dnnshifter_lightning.portfolio:read_manifest",
    "dnnshifter_lightning.portfolio:verify_portfolio",
    "dnnshifter_lightning.serve.runtime:PortfolioRuntime",
    "dnnshifter_lightning.serve.policy:LoadPolicy",
    "dnnshifter_lightning.serve.policy:PolicyConfig",
    "dnnshifter_lightning.serve.litserve:PortfolioLitAPI",
    "dnnshifter_lightning.loadgen:run_load",
    "dnnshifter_lightning.demo.run:run_demo",
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    module = importlib.import_module(module_name)
    # Examples use tempfile.mkdtemp(): keep what they write under pytest's tmp_path, and keep
    # anything written to the working directory (e.g. by a Trainer) out of the repository.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module, optionflags=OPTIONFLAGS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {module_name}"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_entry_points_have_examples(entry_point):
    module_name, _, name = entry_point.partition(":")
    module = importlib.import_module(module_name)
    assert module_name in MODULES, f"{module_name} is not in MODULES, so its examples would not run"
    assert name in getattr(module, "__all__", ()), f"{entry_point} is not public"
    doc = getattr(module, name).__doc__ or ""
    runnable = [line for line in doc.splitlines() if line.strip().startswith(">>>") and "+SKIP" not in line]
    assert runnable, f"{entry_point}: a user-facing entry point needs a runnable '>>>' example in its docstring"
