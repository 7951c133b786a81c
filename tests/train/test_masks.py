"""Magnitude pruning masks (train/masks.py): which layers, which weights, and their bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnnshifter_lightning.train.masks import count_surviving, find_prunable, mask_digest, prune_step, sparsity, survivors_after


def test_find_prunable_and_exclude():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    assert {name: tuple(w.shape) for name, w in find_prunable(net).items()} == {
        "0.weight": (4, 1, 3, 3), "3.weight": (10, 144)}
    assert list(find_prunable(net, exclude=["3"])) == ["0.weight"]  # leave the classifier dense
    with pytest.raises(ValueError, match=r"^exclude=\['classifier'\] matches no prunable layer. "
                                         r"Prunable layers are: \['0', '3'\]$"):  # a typo is an error, not a no-op
        find_prunable(net, exclude=["classifier"])


def test_prune_step_removes_the_smallest_survivors_and_honours_layer_fractions():
    weights = {"w": torch.tensor([[0.5, -0.1], [2.0, 0.3]])}
    level1 = prune_step(weights, {}, fraction=0.5)  # the 2 smallest of 4 go
    assert torch.equal(level1["w"], torch.tensor([[True, False], [True, False]]))
    assert torch.equal(prune_step(weights, level1, fraction=0.5)["w"],  # half of the 2 survivors go
                       torch.tensor([[False, False], [True, False]]))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    masks = prune_step(find_prunable(net), {}, 0.2, layer_fractions={"3": 0.1})
    assert {name: round(1 - m.float().mean().item(), 3) for name, m in masks.items()} == {
        "0.weight": 0.194, "3.weight": 0.1}


def test_mask_bookkeeping():
    assert sparsity({"a": torch.tensor([True, False, False, True])}) == 0.5 and sparsity({}) == 0.0
    assert count_surviving({"a": torch.tensor([True, False]), "b": torch.ones(2, 3, dtype=torch.bool)}) == (7, 8)
    assert survivors_after(1000, 0.2, levels=3) == 512  # 1000 -> 800 -> 640 -> 512
    a = {"x": torch.tensor([True, False]), "y": torch.tensor([True])}
    b = {"y": torch.tensor([True]), "x": torch.tensor([True, False])}
    assert mask_digest(a) == mask_digest(b) and len(mask_digest(a)) == 64  # key order does not matter
    assert mask_digest(a) != mask_digest({**a, "y": torch.tensor([False])})
