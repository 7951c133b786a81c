"""PortfolioRuntime on a small real portfolio: exact outputs, compressed storage, safe switching."""

from __future__ import annotations

import logging
import shutil
import threading

import pytest
import torch

from dnnshifter_lightning.demo.models import DigitsCNN
from dnnshifter_lightning.portfolio import PortfolioError, load_variant, save_variant, write_manifest
from dnnshifter_lightning.serve.runtime import PortfolioRuntime, SwitchError

# (id, width, sparsity of the conv weights), most -> least accurate: the shape of a pruned portfolio
# (structurally pruned variants are narrower and still sparse inside). Built directly, so these tests
# depend on the portfolio format only.
SPECS = [("dense", 16, 0.0), ("l1", 16, 0.6), ("l2", 10, 0.8), ("l3", 6, 0.9)]


def _imp_like(width: int, sparsity: float, seed: int) -> torch.nn.Module:
    """DigitsCNN with scattered zeros in its conv weights and BN shifts of both signs."""
    g = torch.Generator().manual_seed(seed)
    model = DigitsCNN(width=width).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_((torch.rand(mod.weight.shape, generator=g) >= sparsity).float())
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1, generator=g)
                mod.running_var.uniform_(0.5, 2, generator=g)
                mod.bias.uniform_(-1, 1, generator=g)
    return model


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory):
    d = tmp_path_factory.mktemp("portfolio")
    example = torch.randn(8, 1, 8, 8)
    variants = []
    for level, (vid, width, unstructured) in enumerate(SPECS):
        model = _imp_like(width, unstructured, seed=level)
        info = save_variant(model, example, d / f"{vid}.safetensors.zst")
        params = sum(p.numel() for p in model.parameters())
        variants.append({"id": vid, "level": level, "sparsity": unstructured, "params": params,
                         "nonzero_params": params, "macs": 0, "latency_ms": {"1": 1.0, "8": 2.0},
                         "accuracy": 0.9 - 0.1 * level, "sparse_accuracy": None, "max_abs_diff": 0.0, **info})
    write_manifest(d, {"format_version": 2, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
                       "variants": variants})
    return d


@pytest.fixture(scope="module")
def references(portfolio):
    """Each variant loaded on its own, the way the portfolio format serves it."""
    return {vid: load_variant(portfolio / f"{vid}.safetensors.zst") for vid, *_ in SPECS}


@pytest.fixture
def x():
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def _ref(references, vid, x):
    with torch.inference_mode():
        return references[vid](x)


def _raw_bytes(references):
    return {vid: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for vid, m in references.items()}


def test_outputs_equal_each_variant_after_switching_back_and_forth(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    assert rt.variant_ids == [s[0] for s in SPECS] and rt.active_id == "dense"
    outputs = {}
    for vid in ["dense", "l2", "l1", "dense", "l3", "l2", "l3", "dense"]:
        rt.switch_to(vid, reason="test")
        assert rt.active_id == vid
        out = rt(x)
        torch.testing.assert_close(out, _ref(references, vid, x), rtol=0, atol=1e-6)
        outputs.setdefault(vid, out)
        assert torch.equal(out, outputs[vid])  # bit-identical every time it comes back
    assert len({tuple(o[0].tolist()) for o in outputs.values()}) == len(SPECS)  # they really differ
    log = [r for r in rt.switch_log if r.ok]
    assert [(r.from_id, r.to_id) for r in log][:2] == [("dense", "l2"), ("l2", "l1")]
    assert all(r.seconds > 0 and r.reason == "test" for r in log)


def test_inactive_variants_stay_compressed(portfolio, references):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None, initial="l3")
    raw = _raw_bytes(references)
    b = rt.resident_breakdown()
    blobs = {vid: rt.variant_memory(vid).compressed_bytes for vid in rt.variant_ids}
    assert b["compressed"] == sum(blobs.values()) and b["cache"] == b["in_flight"] == 0
    assert raw["l3"] <= b["active"] < raw["l3"] + 64 * 40  # aligned flat buffer of the active weights
    assert b["total"] == rt.resident_bytes() == b["compressed"] + b["active"]
    for vid, _, unstructured in SPECS:  # sparse variants shrink with their sparsity
        assert blobs[vid] < raw[vid] * (1.0 - 0.5 * unstructured), vid
    assert rt.resident_bytes() < 0.75 * sum(raw.values())  # all inflated would be >= 1.0
    # released skeletons hold no weight memory
    assert not rt.variant_memory("dense").inflated
    assert all(p.device.type == "meta" for p in rt.variant_module("dense").parameters())


def test_unknown_variant_is_a_clear_error(portfolio):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    with pytest.raises(ValueError, match=r"unknown variant 'nope'.*'dense', 'l1'"):
        rt.switch_to("nope")
    with pytest.raises(ValueError, match="unknown variant"):
        rt.infer(torch.zeros(1, 1, 8, 8), variant_id="nope")
    with pytest.raises(ValueError, match="not in this portfolio"):
        PortfolioRuntime(portfolio, initial="nope", profile_batch_sizes=None)


def test_failed_inflate_keeps_previous_variant(portfolio, references, x, caplog):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    # fault injection reaches inside on purpose: no public API corrupts weights held in memory
    blob = bytearray(rt._variants["l2"].blob)
    blob[len(blob) // 2] ^= 0xFF  # corrupt the in-memory compressed weights
    rt._variants["l2"].blob = bytes(blob)
    with caplog.at_level(logging.ERROR, logger="dnnshifter_lightning.serve.runtime"):
        with pytest.raises(SwitchError, match="'dense' stays active"):
            rt.switch_to("l2")
    assert rt.active_id == "dense"
    assert "switch dense -> l2 failed" in caplog.text
    record = rt.switch_log[-1]
    assert not record.ok and record.to_id == "l2" and record.error
    torch.testing.assert_close(rt(x), _ref(references, "dense", x), rtol=0, atol=1e-6)
    rt.switch_to("l1")  # the others still work
    torch.testing.assert_close(rt(x), _ref(references, "l1", x), rtol=0, atol=1e-6)


def test_request_in_flight_finishes_on_its_variant(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        assert release.wait(10)

    handle = rt.variant_module("dense").register_forward_pre_hook(hold)
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("out", "vid"), rt.infer(x))))
    worker.start()
    try:
        assert entered.wait(10)
        handle.remove()
        rt.switch_to("l3")  # swaps the reference; dense's weights must stay until the request ends
        assert rt.active_id == "l3"
        assert rt.resident_breakdown()["in_flight"] == rt.variant_memory("dense").inflated_bytes
        torch.testing.assert_close(rt(x), _ref(references, "l3", x), rtol=0, atol=1e-6)
    finally:
        release.set()
        worker.join(10)
    assert result["vid"] == "dense"
    torch.testing.assert_close(result["out"], _ref(references, "dense", x), rtol=0, atol=1e-6)
    assert rt.resident_breakdown()["in_flight"] == 0 and not rt.variant_memory("dense").inflated  # released once done


def test_concurrent_requests_and_switches_stay_consistent(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    expected = {vid: _ref(references, vid, x) for vid in rt.variant_ids}
    stop, errors, served = threading.Event(), [], []

    def client():
        while not stop.is_set():
            out, vid = rt.infer(x)
            served.append(vid)
            if not torch.allclose(out, expected[vid], rtol=0, atol=1e-6):
                errors.append(vid)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(60):
            rt.switch_to(rt.variant_ids[(i * 3 + 1) % 4])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors and len(set(served)) >= 2
    assert rt.resident_breakdown()["in_flight"] == 0


def test_corrupt_file_refused_at_start_naming_it(portfolio, tmp_path):
    copy = tmp_path / "p"
    shutil.copytree(portfolio, copy)
    path = copy / "l1.safetensors.zst"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PortfolioError, match=r"l1\.safetensors\.zst.*sha256 mismatch"):
        PortfolioRuntime(copy, profile_batch_sizes=None)
    path.unlink()
    with pytest.raises(PortfolioError, match=r"l1\.safetensors\.zst"):
        PortfolioRuntime(copy, profile_batch_sizes=None)


def test_memory_budget_cache_is_respected(portfolio, references, x):
    plain = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    raw = {vid: plain.variant_memory(vid).inflated_bytes for vid in plain.variant_ids}
    floor = plain.resident_breakdown()["compressed"]
    # room for the compressed blobs, the biggest active variant and l2 + l3 inflated, not dense
    budget = floor + raw["dense"] + raw["l2"] + raw["l3"] + 1024
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None, memory_budget_mb=budget / 2**20)
    cached = []
    for vid in ["l3", "l2", "l3", "l2", "l1", "l3"]:
        cached.append(rt.switch_to(vid).cached)
        assert rt.resident_bytes() <= budget
        torch.testing.assert_close(rt(x), _ref(references, vid, x), rtol=0, atol=1e-6)
        if vid == "l2":
            assert rt.cached_ids()[-1] == "l3"  # most recently used last
    assert cached == [False, False, True, True, False, True]
    # making l1 active evicted the least recently used (dense), not the hot l2/l3
    assert "dense" not in rt.cached_ids() and set(rt.cached_ids()) == {"l1", "l2"}
    assert rt.resident_breakdown()["cache"] == raw["l1"] + raw["l2"]
    # without a budget nothing is cached
    for vid in ["l3", "l2", "l3"]:
        plain.switch_to(vid)
    assert plain.cached_ids() == [] and not plain.switch_log[-1].cached
    assert plain.resident_breakdown()["cache"] == 0


def test_pinned_request_does_not_change_active(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    out, vid = rt.infer(x, variant_id="l2")
    assert vid == "l2" and rt.active_id == "dense"
    torch.testing.assert_close(out, _ref(references, "l2", x), rtol=0, atol=1e-6)
    # no cache configured: kept in the one-variant pin slot, so the next pin does not inflate again
    assert rt.variant_memory("l2").inflated and rt.pinned_id() == "l2"
    assert rt.resident_breakdown()["in_flight"] == 0 and rt.resident_breakdown()["pinned"] > 0


def test_measure_profiles_on_this_machine(portfolio):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=(1, 4))
    assert set(rt.profiles) == set(rt.variant_ids)
    assert all(set(p) == {1, 4} and all(s > 0 for s in p.values()) for p in rt.profiles.values())
    assert rt.active_id == "dense" and rt.resident_breakdown()["cache"] == 0
    assert not rt.variant_memory("l3").inflated  # measured, then released again
    fallback = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    assert fallback.profiles["l1"] == {1: 0.001, 8: 0.002}  # the manifest's build-time figures


def test_zlib_codec_matches(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None, codec="zlib")
    rt.switch_to("l1")
    torch.testing.assert_close(rt(x), _ref(references, "l1", x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def big_portfolio(tmp_path_factory):
    """Two variants of several 1 MiB frames each (DigitsCNN width 64 holds ~4.6 MB of weights)."""
    from dnnshifter_lightning.serve.runtime import FRAME_BYTES

    d = tmp_path_factory.mktemp("big_portfolio")
    variants = []
    for level, (vid, sparsity) in enumerate((("wide", 0.0), ("wide_sparse", 0.9))):
        model = _imp_like(64, sparsity, seed=10 + level)
        info = save_variant(model, torch.randn(2, 1, 8, 8), d / f"{vid}.safetensors.zst")
        variants.append({"id": vid, "level": level, "sparsity": sparsity, "params": 0, "nonzero_params": 0,
                         "macs": 0, "latency_ms": {"1": 1.0, "8": 2.0}, "accuracy": 0.9 - 0.1 * level,
                         "sparse_accuracy": None, "max_abs_diff": 0.0, **info})
    write_manifest(d, {"format_version": 2, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
                       "variants": variants})
    assert all(v["bytes_raw"] > 3 * FRAME_BYTES for v in variants)
    return d


@pytest.mark.parametrize("threads", [1, 2])
def test_multi_frame_variants_inflate_exactly_on_any_thread_count(big_portfolio, x, threads):
    refs = {vid: load_variant(big_portfolio / f"{vid}.safetensors.zst") for vid in ("wide", "wide_sparse")}
    rt = PortfolioRuntime(big_portfolio, profile_batch_sizes=None, inflate_threads=threads)
    assert len(rt.variant_memory("wide").frames) > 3
    for vid in ("wide_sparse", "wide", "wide_sparse"):
        rt.switch_to(vid)
        torch.testing.assert_close(rt(x), _ref(refs, vid, x), rtol=0, atol=0)


def test_corrupt_middle_frame_fails_the_switch_and_keeps_the_active_variant(big_portfolio, x):
    rt = PortfolioRuntime(big_portfolio, profile_batch_sizes=None, inflate_threads=2)
    v = rt._variants["wide_sparse"]  # fault injection reaches inside on purpose (see above)
    blob = bytearray(v.blob)
    middle = sum(v.frame_sizes[:2]) + v.frame_sizes[2] // 2  # inside the third frame
    blob[middle] ^= 0xFF
    v.blob = bytes(blob)
    before = rt(x)
    with pytest.raises(SwitchError, match="'wide' stays active"):
        rt.switch_to("wide_sparse")
    assert rt.active_id == "wide"
    torch.testing.assert_close(rt(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inflate_threads"):
        PortfolioRuntime(big_portfolio, profile_batch_sizes=None, inflate_threads=0)


def test_negative_zeros_are_stored_as_positive_zeros(portfolio, references, x):
    """Masked negative weights are -0.0 in the files; the runtime packs +0.0 (equal values)."""
    ref = references["l1"]
    assert any(bool((torch.signbit(p) & (p == 0)).any()) for p in ref.parameters())
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    rt.switch_to("l1")
    live = rt.variant_module("l1")
    assert not any(bool((torch.signbit(p) & (p == 0)).any()) for p in live.parameters())
    torch.testing.assert_close(rt(x), _ref(references, "l1", x), rtol=0, atol=0)


def _weight_devices(rt: PortfolioRuntime, vid: str) -> set[str]:
    module = rt.variant_module(vid)  # its parameters and buffers are views of the variant's flat buffer
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_device_option_puts_inflated_variants_there(portfolio):
    # "meta" stands in for an accelerator on a machine without one: every tensor that is inflated
    # must land on the runtime's device (start, switch, pin)
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None, device="meta", pin_inflate_interval_s=0)
    assert _weight_devices(rt, "dense") == {"meta"} and rt.variant_memory("dense").inflated
    rt.switch_to("l2")
    assert _weight_devices(rt, "l2") == {"meta"}
    cpu = PortfolioRuntime(portfolio, profile_batch_sizes=None)
    assert cpu.device == torch.device("cpu") and _weight_devices(cpu, "dense") == {"cpu"}  # the default
    # a pin inflates too; infer() copies its logits to the host, which meta tensors cannot, so this takes
    # the pin the way infer() does, without the forward
    with rt._hold("l3"):
        assert rt.pinned_id() == "l3" and _weight_devices(rt, "l3") == {"meta"}


def test_cpu_device_serves_exactly(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=None, device="cpu")
    rt.switch_to("l1")
    logits, vid = rt.infer(x)
    assert vid == "l1" and logits.device == x.device and torch.equal(logits, _ref(references, "l1", x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_serves_the_same_answers(portfolio, references, x):
    rt = PortfolioRuntime(portfolio, profile_batch_sizes=(1, 8), device="cuda")
    for vid in ("dense", "l2", "l3"):
        rt.switch_to(vid)
        assert _weight_devices(rt, vid) == {"cuda"}
        logits, served = rt.infer(x)
        assert served == vid and logits.device == x.device
        torch.testing.assert_close(logits, _ref(references, vid, x), rtol=1e-4, atol=1e-4)
    assert set(rt.profiles) == set(rt.variant_ids)


def test_cuda_device_is_refused_without_cuda(portfolio):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        PortfolioRuntime(portfolio, profile_batch_sizes=None, device="cuda")
