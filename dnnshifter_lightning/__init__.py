"""DNNShifter for PyTorch Lightning, TorchServe and LitServe.

* :class:`IterativeMagnitudePruning`: a Lightning callback running IMP with rewinding during ``fit``.
* :class:`PortfolioBuilder` / :func:`prune_structurally`: exact structural pruning of the sparse
  checkpoints into a portfolio of smaller dense variants, with no fine-tuning.
* :class:`PortfolioRuntime`: hosts the portfolio compressed and switches the active variant.
* :class:`PortfolioLitAPI`: a ``litserve.LitAPI`` serving the portfolio with the load-adaptive policy.

Names are imported lazily so that ``import dnnshifter_lightning`` stays cheap and the plain-torch
core never pulls in Lightning, TorchServe or LitServe.

Example::

    >>> import dnnshifter_lightning as dnnshifter
    >>> dnnshifter.__version__
    '0.1.0'
    >>> dir(dnnshifter)
    ['IterativeMagnitudePruning', 'PortfolioBuilder', 'PortfolioLitAPI', 'PortfolioRuntime', '__version__',
     'prune_structurally']
    >>> imp = dnnshifter.IterativeMagnitudePruning(levels=4, epochs_per_level=2)   # imported on first use
    >>> imp.total_epochs
    10
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IterativeMagnitudePruning": "dnnshifter_lightning.train.imp",
    "PortfolioBuilder": "dnnshifter_lightning.shrink.callback",
    "prune_structurally": "dnnshifter_lightning.shrink.structured",
    "PortfolioRuntime": "dnnshifter_lightning.serve.runtime",
    "PortfolioLitAPI": "dnnshifter_lightning.serve.litserve",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dnnshifter_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
