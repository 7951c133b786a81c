"""The core imports no framework: structural pruning, the portfolio format, the runtime and the
policy work from plain PyTorch, with Lightning, TorchServe, LitServe and rich absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("lightning", "pytorch_lightning", "ts", "litserve", "rich")
CORE = (
    "train", "train.masks", "train.checkpoints",
    "shrink", "shrink.structured", "shrink._surgery", "shrink.measure", "shrink.build",
    "portfolio", "graph", "loadgen",
    "serve", "serve.runtime", "serve.policy", "serve.served", "serve.images", "serve.core", "serve.defaults",
)


def test_the_core_imports_with_the_frameworks_blocked():
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked by the layering test: " + name)

        sys.meta_path.insert(0, Blocker())
        import dnnshifter_lightning
        import dnnshifter_lightning.serve.runtime
        assert "dnnshifter_lightning.serve.policy" not in sys.modules, "the runtime imports the policy"
        for name in {CORE!r}:
            importlib.import_module("dnnshifter_lightning." + name)
        from dnnshifter_lightning import PortfolioRuntime, prune_structurally  # the public names
        from dnnshifter_lightning.serve.policy import LoadPolicy, PolicyConfig
        from dnnshifter_lightning.portfolio import read_manifest, verify_portfolio
        from dnnshifter_lightning.serve.runtime import profiles_from_manifest
        from dnnshifter_lightning.shrink.build import build_portfolio  # the build without Lightning or rich
        import torch
        result = prune_structurally(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4))
        assert result.max_abs_diff == 0.0
        import pathlib, tempfile
        ckpts = pathlib.Path(tempfile.mkdtemp())
        torch.save({{"state_dict": torch.nn.Linear(4, 3).state_dict()}}, ckpts / "level_00.ckpt")
        def load(path):
            module = torch.nn.Linear(4, 3)
            module.load_state_dict(torch.load(path)["state_dict"])
            return module
        manifest = build_portfolio(ckpts, load, ckpts / "portfolio", None, {{"shape": [4]}}, latency_warmup=0,
                                   latency_repeats=1, plot=False)
        assert [v["id"] for v in manifest["variants"]] == ["level_00"]
        print("core ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]


# Console output outside cli.py, and why each is there: the end-of-fit tables run inside Trainer.fit,
# next to Lightning's own callbacks' output, not in a command.
PRINTS_ALLOWED = {
    "cli.py": "the commands' output",
    "shrink/report.py": "the portfolio table and the build's progress bar (rich)",
    "shrink/callback.py": "PortfolioBuilder's end-of-fit table (through shrink/report)",
    "train/imp.py": "IterativeMagnitudePruning's end-of-fit table",
}


def _console_output(source: str) -> list[str]:
    """Where a module prints: ``print(...)``, ``x.print(...)``, ``x.rule(...)``, ``x.status(text)`` (a rich
    spinner; psutil's ``status()`` takes no argument) and ``import rich``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                found.append(f"line {node.lineno}: print()")
            elif isinstance(func, ast.Attribute) and (func.attr in ("print", "rule")
                                                     or (func.attr == "status" and node.args)):
                found.append(f"line {node.lineno}: .{func.attr}()")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] == "rich" for n in names):
                found.append(f"line {node.lineno}: imports rich")
    return found


def test_console_output_lives_in_cli_py():
    from pathlib import Path

    import dnnshifter_lightning

    root = Path(dnnshifter_lightning.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        found = _console_output(path.read_text())
        if found and rel not in PRINTS_ALLOWED:
            offenders[rel] = found
    assert not offenders, f"console output outside cli.py (report events instead): {offenders}"
    assert _console_output("import rich.table\nconsole.rule('x')\nprint(1)\nproc.status()\nc.status('x')") == [
        "line 1: imports rich", "line 2: .rule()", "line 3: print()", "line 5: .status()"]
