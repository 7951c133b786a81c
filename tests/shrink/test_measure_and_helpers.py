"""What the shrink helpers' docstring examples used to show, as tests: measurement, the batch reader,
the timing loop, PruneResult's fields, the table, the plot's points, the input resolution."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from dnnshifter_lightning.demo.models import DigitsCNN
from dnnshifter_lightning.shrink.measure import (
    batch_unpacker, count_macs, count_nonzero, count_params, forward_seconds, measure_accuracy, measure_latency_ms,
    state_bytes, unpack_batch,
)


def test_sizes_and_macs():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert count_params(net) == 21  # 4*3 + 3, then 3 + 3
    assert state_bytes(net) == 108  # 21 float32 parameters + BN's running mean and variance; not the int64 counter
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0] = 0.0
    assert (count_params(layer), count_nonzero(layer)) == (15, 11)
    assert count_macs(nn.Linear(4, 3), torch.zeros(2, 4)) == 24  # 2 rows x 4 x 3
    assert count_macs(nn.Conv2d(1, 4, 3), torch.zeros(1, 1, 8, 8)) == 1296  # 6x6 outputs x 4 filters x 9
    assert count_params(DigitsCNN(width=8)) == 18482


def test_unpack_batch_reads_tuples_dicts_and_bare_tensors_and_names_what_it_cannot_read():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert unpack_batch((x, y))[1].tolist() == [0, 1]
    assert unpack_batch([x, y, "extra"])[0] is x
    assert unpack_batch((x,)) == (x, None)
    assert unpack_batch(x) == (x, None)
    assert unpack_batch({"image": x, "label": y})[1].tolist() == [0, 1]
    assert unpack_batch({"pixels": x, "digit": y}, input_key="pixels", target_key="digit")[1].tolist() == [0, 1]
    assert unpack_batch({"x": x}) == (x, None)
    with pytest.raises(ValueError, match=r"keys \['pixels'\] has none of the input keys .*input_key="):
        unpack_batch({"pixels": x})
    with pytest.raises(ValueError, match="no target_key='digit'"):
        unpack_batch({"image": x}, target_key="digit")
    with pytest.raises(ValueError, match="cannot read inputs from a batch of type int"):
        unpack_batch(3)
    with pytest.raises(ValueError, match="of type tuple"):
        unpack_batch(())


def test_batch_unpacker_picks_the_function():
    x, y = torch.zeros(2, 3), torch.tensor([4, 2])
    assert batch_unpacker() is unpack_batch
    mine = lambda batch: (batch["a"], batch["b"])  # noqa: E731
    assert batch_unpacker("ignored", None, mine) is mine
    named = batch_unpacker(input_key="pixels", target_key="digit")
    assert isinstance(named, functools.partial)
    got_x, got_y = named({"pixels": x, "digit": y})
    assert got_x is x and got_y.tolist() == [4, 2]


def test_forward_seconds_times_each_call_after_the_warmup_and_syncs_inside():
    calls, syncs = [], []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(torch.is_inference_mode_enabled())
            return x

    times = forward_seconds(Counting(), torch.zeros(1), warmup=2, repeats=3, sync=lambda: syncs.append(1))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == [True] * 5 and len(syncs) == 3
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        forward_seconds(Counting(), torch.zeros(1), repeats=0)
    assert measure_latency_ms(nn.Linear(16, 4), torch.zeros(8, 16), warmup=1, repeats=3) > 0


def test_measure_accuracy_on_tuple_and_dict_batches():
    x = torch.tensor([[-1.0], [2.0], [-3.0], [4.0]])
    y = torch.tensor([0, 1, 0, 0])
    sign = nn.Linear(1, 2)  # class 1 iff x > 0
    with torch.no_grad():
        sign.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        sign.bias.zero_()
    assert measure_accuracy(sign, [(x, y)], num_classes=2) == 0.75
    assert measure_accuracy(sign, [{"image": x[:2], "label": y[:2]}], num_classes=2) == 1.0
    with pytest.raises(ValueError, match="has no targets"):
        measure_accuracy(sign, [x], num_classes=2)


def test_prune_result_fields_on_a_dead_first_conv():
    from dnnshifter_lightning.shrink.structured import prune_structurally

    model = DigitsCNN(width=4).eval()
    with torch.no_grad():
        model.features[0].weight[:2] = 0  # 2 of the first conv's 4 filters are dead
    result = prune_structurally(model, torch.randn(4, 1, 8, 8))
    assert result.removed["features.0"] == {"before": 4, "after": 2, "reasons": {"zero_constant": 2}}
    assert (result.channels_removed, result.reason_counts, result.kept_unsupported) == (2, {"zero_constant": 2}, {})
    assert (result.params_before, result.params_after) == (4782, 4634)  # the BNs were fused into the convs, too
    assert repr(result.model.features[0]) == "Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
    assert result.max_abs_diff <= result.tolerance and result.approx_error is None
    assert list(result.timings)[:5] == ["trace", "forward", "analyse", "slice", "verify"]
    assert result.seconds >= sum(result.timings[k] for k in ("trace", "forward", "analyse", "slice", "verify"))


def test_a_lightning_module_with_data_dependent_control_flow_is_refused_by_name():
    import lightning as L

    from dnnshifter_lightning.shrink.structured import StructuralPruningError, prune_structurally

    class Branchy(L.LightningModule):  # torch.fx cannot trace data-dependent control flow
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(StructuralPruningError, match="could not trace Branchy.forward with torch.fx"):
        prune_structurally(Branchy(), torch.ones(2, 4))
    assert prune_structurally(Branchy().fc, torch.ones(2, 4)).params_after == 10  # the inner module is fine


def _variant(vid, acc, ms8, level=0):
    return {"id": vid, "level": level, "sparsity": 0.488, "accuracy": acc, "sparse_accuracy": acc, "params": 9000,
            "macs": 120000, "bytes_compressed": 40960, "max_abs_diff": 1e-7, "latency_ms": {"1": 0.2, "8": ms8},
            "sparse": {"params": 18000, "latency_ms": {"1": 0.4, "8": 1.0}}}


def test_portfolio_table_marks_the_front_and_dims_the_rest():
    from dnnshifter_lightning.shrink.report import portfolio_table

    table = portfolio_table({"variants": [_variant("level_03", 0.97, 0.5), _variant("level_01", 0.96, 0.9)]},
                            title="my portfolio")
    assert (table.title, table.row_count) == ("my portfolio", 2)
    assert [c.header for c in table.columns][:5] == ["variant", "front", "sparsity", "accuracy", "sparse acc"]
    assert list(table.columns[1].cells) == ["*", ""]  # level_01 is slower and less accurate
    assert table.caption == "front (*): 1 of 2 variants (validation accuracy vs batch-8 latency)"
    assert [r.style for r in table.rows] == [None, "dim"]
    assert list(table.columns[6].cells) == ["2.00", "2.00"] and list(table.columns[11].cells) == ["2.00", "2.00"]


def test_plot_points_follow_the_front():
    from dnnshifter_lightning.shrink.plot import plot_points

    points = plot_points({"variants": [_variant("a", 0.95, 9.0, 0), _variant("b", 0.97, 8.0, 1),
                                       _variant("c", 0.90, 3.0, 2)]})
    assert [(p["id"], p["front"]) for p in points] == [("a", False), ("b", True), ("c", True)]  # a: slower, less accurate


def test_resolve_input_from_example_input_array_or_validation_batches():
    from dnnshifter_lightning.shrink.build import resolve_input

    x, spec = resolve_input(example_input_array=torch.zeros(1, 3, 4, 4), n=2)
    assert tuple(x.shape) == (2, 3, 4, 4) and spec == {"shape": [3, 4, 4], "dtype": "float32"}
    val = [(torch.ones(5, 2), torch.zeros(5, dtype=torch.long))]
    x, spec = resolve_input({"class_names": ["a", "b"]}, val_loader=val, n=8)
    assert tuple(x.shape) == (8, 2) and float(x.sum()) == 16.0  # 5 real inputs, repeated to 8
    assert spec == {"class_names": ["a", "b"], "shape": [2], "dtype": "float32"}
    with pytest.raises(ValueError, match="no input shape for the portfolio: set `example_input_array`"):
        resolve_input()
    with pytest.raises(ValueError, match=r"validation inputs have shape \[2\] but input_spec\['shape'\] gives \[3\]"):
        resolve_input({"shape": [3]}, val_loader=val)


def test_unwrap_compiled_replaces_inner_wrappers():
    from dnnshifter_lightning.shrink.build import unwrap_compiled

    inner = nn.Linear(2, 2)
    outer = nn.Sequential(torch.compile(inner, backend="eager"))
    assert unwrap_compiled(outer)[0] is inner
    assert unwrap_compiled(torch.compile(inner, backend="eager")) is inner


def test_first_loader_warns_naming_how_many():
    from dnnshifter_lightning.shrink.callback import first_loader

    with pytest.warns(UserWarning, match="2 validation dataloaders given; accuracy is measured on the first of them"):
        assert first_loader([["a batch"], ["another"]]) == ["a batch"]
    with pytest.warns(UserWarning, match="first, 'a'"):
        assert first_loader({"a": 1, "b": 2}) == 1
    assert first_loader("one") == "one" and first_loader([]) is None


def test_import_object_and_parse_input_shape():
    from dnnshifter_lightning.cli import import_object, parse_input_shape

    assert import_object("dnnshifter_lightning.demo.models:DigitsCNN") is DigitsCNN
    assert import_object("dnnshifter_lightning.demo.models:DigitsCNN.forward") is DigitsCNN.forward
    with pytest.raises(ValueError, match="expected 'package.module:Class', got 'dnnshifter_lightning.demo.models"):
        import_object("dnnshifter_lightning.demo.models.DigitsCNN")
    assert parse_input_shape("1, 8,8") == [1, 8, 8]
    for bad in ("3x32x32", "", "3,0,2"):
        with pytest.raises(ValueError, match="--input-shape must be comma-separated positive ints"):
            parse_input_shape(bad)
