"""Checkpoints load with weights_only=True first; the full unpickler only with a warning naming the file."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from dnnshifter_lightning.shrink.build import build_portfolio
from dnnshifter_lightning.train.checkpoints import CheckpointTrustWarning, load_checkpoint, load_module_checkpoint
from dnnshifter_lightning.demo.digits import DigitsClassifier
from dnnshifter_lightning.demo.models import DigitsCNN


def _save(path, model, extra=None):
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0", **(extra or {})}, path)


def test_plain_checkpoints_load_without_the_full_unpickler(tmp_path, monkeypatch):
    path = tmp_path / "level_00.ckpt"
    _save(path, DigitsClassifier(width=4))
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointTrustWarning)
        assert "state_dict" in load_checkpoint(path)
        assert isinstance(load_module_checkpoint(DigitsClassifier, path, map_location="cpu"), DigitsClassifier)
    assert seen and all(w is True for w in seen), seen


def test_a_checkpoint_needing_pickle_warns_with_its_name_and_still_loads(tmp_path):
    # an argparse.Namespace of hyperparameters (what older Lightning code saved): harmless, but a
    # global that weights_only=True refuses
    path = tmp_path / "level_00.ckpt"
    _save(path, DigitsClassifier(width=4), {"args": argparse.Namespace(lr=0.1)})
    with pytest.warns(CheckpointTrustWarning, match="level_00.ckpt.*weights_only=False.*you wrote yourself"):
        assert load_checkpoint(path)["args"].lr == 0.1
    with pytest.warns(CheckpointTrustWarning, match="level_00.ckpt"):
        assert isinstance(load_module_checkpoint(DigitsClassifier, path, map_location="cpu"), DigitsClassifier)


def test_build_portfolio_reads_checkpoints_through_the_safe_loader(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    net = DigitsCNN(width=4).eval()
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(width=4)}, ckpts / "level_00.ckpt")

    def load(path):
        model = DigitsCNN(width=4)
        model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])  # the user's own loader
        return model

    with pytest.warns(CheckpointTrustWarning, match="level_00.ckpt"):
        manifest = build_portfolio(ckpts, load, tmp_path / "out", None, {"shape": [1, 8, 8]}, latency_warmup=1,
                                   latency_repeats=1, plot=False)
    assert [v["id"] for v in manifest["variants"]] == ["level_00"]
