"""The JSON graph half of the variant format (graph.py): export, validation, meta build, interpretation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnnshifter_lightning.graph import (
    GRAPH_FORMAT, GRAPH_VERSION, GraphError, GraphVariant, build_variant, graph_from_module, validate_graph,
)


def _linear_graph(name: str) -> dict:
    return {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "inputs": [{"shape": [None, 3], "dtype": "float32"}],
            "tensors": [{"name": name, "kind": "parameter"}],
            "nodes": [{"op": "aten.linear.default", "args": [{"ref": 0}, {"ref": 1}]}], "outputs": [{"ref": 2}]}


def test_graph_from_module_records_aten_ops_and_a_dynamic_batch():
    graph, tensors = graph_from_module(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.zeros(2, 3))
    assert [n["op"] for n in graph["nodes"]] == ["aten.linear.default", "aten.relu.default"]
    assert sorted(tensors) == ["0.bias", "0.weight"] and graph["inputs"][0]["shape"] == [None, 3]


def test_validate_graph_names_unexpected_and_missing_keys():
    with pytest.raises(GraphError, match=r"^graph: unexpected keys \['guards_code'\], "
                                         r"missing \['inputs', 'nodes', 'outputs', 'tensors'\]$"):
        validate_graph({"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "guards_code": "..."}, {})


def test_build_variant_is_meta_and_refuses_shapes_that_disagree():
    assert build_variant(_linear_graph("w"), {"w": (torch.float32, (2, 3))}).w.is_meta
    with pytest.raises(GraphError, match=r"^graph.nodes\[0\] fails on a batch of 1: RuntimeError: "):
        build_variant(_linear_graph("w"), {"w": (torch.float32, (2, 4))})


def test_graph_variant_runs_and_checks_its_input_shape():
    m = GraphVariant(_linear_graph("fc.weight"), {"fc.weight": torch.eye(3)})
    assert m(torch.ones(4, 3)).shape == (4, 3) and [name for name, _ in m.named_parameters()] == ["fc.weight"]
    with pytest.raises(ValueError, match=r"^expected an input of shape \(batch, 3\), got \(4, 5\)$"):
        m(torch.ones(4, 5))
