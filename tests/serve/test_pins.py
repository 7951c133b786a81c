"""Pins to inactive variants: at most one inflate per ``pin_inflate_interval_s``, never per batch."""

from __future__ import annotations

import threading

import pytest
import torch

from dnnshifter_lightning.serve import runtime as runtime_mod
from dnnshifter_lightning.serve.runtime import PinThrottled, PortfolioRuntime
from serve_fixtures import build_test_portfolio


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory):
    path = tmp_path_factory.mktemp("pins")
    build_test_portfolio(path, widths=(16, 8, 4))
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts every inflate of every variant (switches and pins alike)."""
    calls: list[str] = []
    original = runtime_mod._Variant.inflate

    def inflate(self, codec, *args):
        calls.append(self.id)
        return original(self, codec, *args)

    monkeypatch.setattr(runtime_mod._Variant, "inflate", inflate)
    return calls


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _runtime(portfolio, **kw) -> tuple[PortfolioRuntime, _Clock]:
    clock = _Clock()
    return PortfolioRuntime(portfolio, profile_batch_sizes=None, clock=clock, **kw), clock


def test_repeated_pins_to_an_inactive_variant_inflate_it_once(portfolio, counted):
    rt, _ = _runtime(portfolio)
    x = torch.randn(4, 1, 8, 8)
    a, b, c = rt.variant_ids
    expected, _ = rt.infer(x, b)  # (tests/test_runtime.py checks pinned outputs against references)
    for _ in range(20):  # twenty more batches pinned to b: no inflate, the pin slot serves them
        logits, served = rt.infer(x, b)
        assert served == b and torch.equal(logits, expected)
    assert counted == [b] and rt.pin_inflates == 1 and rt.pinned_id() == b and rt.active_id == a
    assert rt.resident_breakdown()["pinned"] > 0


def test_a_second_inflate_within_the_interval_is_refused_not_done(portfolio, counted):
    rt, clock = _runtime(portfolio, pin_inflate_interval_s=2.0)
    x = torch.randn(2, 1, 8, 8)
    a, b, c = rt.variant_ids
    rt.infer(x, b)
    with pytest.raises(PinThrottled) as info:
        rt.infer(x, c)
    assert info.value.variant_id == c and 0 < info.value.retry_after_s <= 2.0
    assert counted == [b]
    assert rt.infer(x, b)[1] == b and rt.infer(x)[1] == a  # the slot and the active variant still serve
    clock.now += 2.0
    assert rt.infer(x, c)[1] == c  # the next interval's inflate: c replaces b in the pin slot
    assert counted == [b, c] and rt.pinned_id() == c
    with pytest.raises(PinThrottled):  # b was released from the slot: pinning it again must wait
        rt.infer(x, b)
    assert counted == [b, c]


def test_concurrent_pins_cannot_force_more_than_one_inflate_per_interval(portfolio, counted):
    rt, _ = _runtime(portfolio, pin_inflate_interval_s=60.0)
    x = torch.randn(2, 1, 8, 8)
    _, b, c = rt.variant_ids
    outcomes: list[str] = []

    def client(k: int) -> None:
        for n in range(25):
            try:
                outcomes.append(rt.infer(x, (b, c)[(k + n) % 2])[1])
            except PinThrottled:
                outcomes.append("429")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 200 and len(counted) == 1, counted
    assert set(outcomes) == {counted[0], "429"}


def test_a_switch_to_the_pinned_variant_reuses_its_inflate(portfolio, counted):
    rt, _ = _runtime(portfolio)
    _, b, _ = rt.variant_ids
    rt.infer(torch.randn(1, 1, 8, 8), b)
    record = rt.switch_to(b, "burst")
    assert record.cached and counted == [b] and rt.pinned_id() is None and rt.active_id == b


def test_profiling_is_not_throttled_and_leaves_no_pin(portfolio):
    rt, _ = _runtime(portfolio, pin_inflate_interval_s=3600.0)
    profiles = rt.measure_profiles(batch_sizes=(1,), warmup=0, repeats=1)
    assert sorted(profiles) == sorted(rt.variant_ids)
    assert rt.pinned_id() is None and rt.pin_inflates == 0
    with pytest.raises(ValueError, match="pin_inflate_interval_s"):
        PortfolioRuntime(rt.path, profile_batch_sizes=None, pin_inflate_interval_s=float("nan"))


def test_pin_throttled_says_when_to_retry():
    exc = PinThrottled("level_03", 0.4, 1.0)
    assert (exc.variant_id, exc.retry_after_s) == ("level_03", 0.4)
    assert str(exc).split(";")[1].strip() == "retry in 0.40 s or send the request without a pin"
