"""Load the user's training checkpoints: ``weights_only=True`` first, the full unpickler only with a warning.

A Lightning checkpoint is a pickle. ``torch.load(weights_only=True)`` reads tensors, containers
and a short allow-list of types, and runs no code; that covers what Lightning and
:class:`~dnnshifter_lightning.IterativeMagnitudePruning` write. A checkpoint that needs more (an
``argparse.Namespace`` of hyperparameters, a custom class) is loaded with ``weights_only=False``,
which can run any code pickled into it, and :class:`CheckpointTrustWarning` names the file. That
is the trust model: checkpoints are your own code, like the LightningModule that loads them; a
portfolio, by contrast, is data that anyone may send you and never goes through pickle.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "level_00.ckpt"
    >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    >>> load_checkpoint(path)["state_dict"]["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["CHECKPOINT_KEY", "CheckpointTrustWarning", "load_checkpoint", "load_module_checkpoint", "module_loader"]

#: Key under which every level checkpoint carries its metadata:
#: ``{"format": 1, "level", "levels", "prune_fraction", "sparsity", "target_sparsity", "surviving",
#: "prunable", "masks": {param_name: bool tensor}, "mask_sha256", "metrics": {name: float},
#: "epoch", "global_step"}``.
CHECKPOINT_KEY = "dnnshifter"


class CheckpointTrustWarning(UserWarning):
    """A checkpoint was loaded with ``weights_only=False`` (the full unpickler): trusted as your own code.

    Example::

        >>> import argparse, tempfile, torch, warnings
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "old.ckpt"
        >>> torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     ckpt = load_checkpoint(path)
        >>> ckpt["hyper_parameters"].lr, caught[0].category.__name__, str(path) in str(caught[0].message)
        (0.1, 'CheckpointTrustWarning', True)
    """


def _warn(path: Path, exc: Exception) -> None:
    reason = str(exc).strip().splitlines()
    detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
    warnings.warn(f"{path}: cannot be loaded with weights_only=True ({detail[:200]}); loading it with "
                  "weights_only=False, which runs whatever code is pickled into it. That is only safe for "
                  "checkpoints you wrote yourself: a checkpoint is trusted like your own code.",
                  CheckpointTrustWarning, stacklevel=3)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` a checkpoint: ``weights_only=True``, else ``False`` with a :class:`CheckpointTrustWarning`.

    Only a refusal by the restricted unpickler falls back; a missing or corrupt file raises as usual.

    >>> load_checkpoint("no/such.ckpt")
    Traceback (most recent call last):
        ...
    FileNotFoundError: ...
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        _warn(path, exc)
    return torch.load(path, map_location=map_location, weights_only=False)


def load_module_checkpoint(module_cls: Any, path: str | Path, **kwargs: Any) -> Any:
    """``module_cls.load_from_checkpoint(path, weights_only=True, **kwargs)``, falling back like
    :func:`load_checkpoint` (Lightning 2.4+ take ``weights_only``; older ones use torch's default).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dnnshifter_lightning.demo.digits import DigitsClassifier
    >>> path = Path(tempfile.mkdtemp()) / "level_00.ckpt"
    >>> model = DigitsClassifier(width=4)
    >>> torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
    ...             "pytorch-lightning_version": "2.4.0"}, path)
    >>> type(load_module_checkpoint(DigitsClassifier, path, map_location="cpu")).__name__
    'DigitsClassifier'
    """
    path = Path(path)
    load = module_cls.load_from_checkpoint
    if "weights_only" not in inspect.signature(load).parameters:
        return load(path, **kwargs)
    try:
        return load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        _warn(path, exc)
    return load(path, weights_only=False, **kwargs)


def module_loader(loader: type | Callable[[Path], nn.Module]) -> Callable[[Path], nn.Module]:
    """``path -> module`` from a LightningModule class (its ``load_from_checkpoint(path, strict=True)``
    on the CPU, through :func:`load_module_checkpoint`) or from any ``callable(path) -> nn.Module``,
    returned as it is. Lightning itself is never imported here: the class brings it.
    """
    if getattr(loader, "load_from_checkpoint", None) is not None:
        return lambda p: load_module_checkpoint(loader, p, map_location="cpu", strict=True)
    return loader  # type: ignore[return-value]
