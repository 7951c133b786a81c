"""Every public class and function documents a runnable example, and every docstring example runs.

"Public" is what each module lists in ``__all__``. The examples are plain doctests (``>>>`` lines,
Lightning style ``Example::`` blocks); lines that cannot run here (starting TorchServe, long
training) carry ``# doctest: +SKIP`` but are still written as correct code.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import tempfile

import pytest

MODULES = [
    "dnnshifter_lightning",
    *(f"dnnshifter_lightning.{name}" for name in (
        "train.masks", "train.imp", "train.checkpoints",
        "shrink.structured", "shrink.measure", "shrink.build", "shrink.plot",
        "portfolio", "graph", "loadgen",
        "serve.runtime", "serve.policy", "serve.served", "serve.images", "serve.core", "serve.defaults",
        "serve.litserve", "serve.torchserve", "serve.litserve_metrics", "serve.litserve_command",
        "demo.run", "demo.serving", "demo.digits", "demo.models",
    )),
]

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_api(module) -> dict[str, object]:
    """The classes and functions named in ``module.__all__`` (constants are left out)."""
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    out = {}
    for name in names:
        obj = getattr(module, name)  # also resolves the package's lazy exports
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out[name] = obj
    return out


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    module = importlib.import_module(module_name)
    # Examples use tempfile.mkdtemp(): keep what they write under pytest's tmp_path, and keep
    # anything written to the working directory (e.g. by a Trainer) out of the repository.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module, optionflags=OPTIONFLAGS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {module_name}"
    if _public_api(module):
        assert result.attempted > 0, f"{module_name} has public names but no runnable example"


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_examples(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name, obj in _public_api(module).items() if ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"{module_name}: public names without a '>>>' example in their docstring: {missing}"
