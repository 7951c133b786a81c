"""Regenerate tests/data/golden_portfolio (run by hand, only when the format version changes).

    /work/wt/py tests/data/make_golden_portfolio.py

Two tiny DigitsCNN variants (width 2, two seeds: seeded random weights with non-trivial BN statistics),
the manifest, and ``expected.json``: a fixed input batch and each variant's output on it, computed
by the original modules. tests/test_golden_portfolio.py loads the checked-in files with whatever
torch is installed and compares, which is what proves that a portfolio written by one torch
release loads on later ones.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from dnnshifter_lightning.demo.models import DigitsCNN
from dnnshifter_lightning.portfolio import FORMAT_VERSION, VARIANT_SUFFIX, Variant, save_variant, write_manifest

OUT = Path(__file__).resolve().parent / "golden_portfolio"


def golden_input() -> torch.Tensor:
    """The fixed batch (5, 1, 8, 8): a deterministic formula, no RNG (so no torch-version drift)."""
    i = torch.arange(5 * 64, dtype=torch.float64).reshape(5, 1, 8, 8)
    return (torch.sin(i * 0.37) * 0.9).to(torch.float32)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    x = golden_input()
    variants, expected = [], {"input": "golden_input() in tests/data/make_golden_portfolio.py", "outputs": {}}
    for level, width in enumerate((2, 2)):
        torch.manual_seed(level)
        model = DigitsCNN(width=width)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
                    m.weight.uniform_(1.0, 3.0)  # so the outputs depend clearly on the input
        model.eval()
        vid = f"w{width}_seed{level}"
        rel = f"variants/{vid}{VARIANT_SUFFIX}"
        info = save_variant(model, x[:2], OUT / rel)
        with torch.no_grad():
            expected["outputs"][vid] = model(x).tolist()
        variants.append(Variant(id=vid, level=level, sparsity=0.0, params=0, nonzero_params=0, macs=0,
                                latency_ms={"1": 1.0, "8": 2.0}, accuracy=round(0.9 - 0.1 * level, 3),
                                sparse_accuracy=None, max_abs_diff=0.0, **{**info, "file": rel}).to_dict())
    write_manifest(OUT, {"format_version": FORMAT_VERSION,
                         "input_spec": {"shape": [1, 8, 8], "dtype": "float32", "mean": [0.5], "std": [0.5]},
                         "variants": variants, "build": {"torch_version": torch.__version__}})
    (OUT / "expected.json").write_text(json.dumps(expected) + "\n")
    print(f"wrote {OUT}: {sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
