"""The portfolio format (save/load/verify/manifest), and shrink/measure.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zstandard
from torch import nn

from dnnshifter_lightning import _atomic
from dnnshifter_lightning import portfolio as pf
from dnnshifter_lightning._atomic import atomic_write
from dnnshifter_lightning.demo.models import DigitsCNN
from dnnshifter_lightning.portfolio import PortfolioError
from dnnshifter_lightning.shrink.measure import (
    count_macs, count_nonzero, count_params, measure_accuracy, measure_latency_ms,
)


class UserNet(nn.Module):
    """A user-defined model with a custom forward (residual add, concat, functional ops).

    It exists only in this test module, so a process that never imports it proves that a variant
    loads without the user's class.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.bn = nn.BatchNorm2d(10)
        self.head = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.a(h))
        h = torch.cat([h, self.b(h)], dim=1)
        h = torch.nn.functional.hardtanh(self.bn(h)).mean(dim=(2, 3))
        return self.head(h) * 0.5


def _sparse_digits_cnn(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN(width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)  # BN shifts of both signs
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) > 0.6)  # 60% zeros
        model.features[3].weight[:2] = 0.0  # whole filters zeroed
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict]:
    model = _sparse_digits_cnn()
    path = tmp_path_factory.mktemp("variant") / "v.safetensors.zst"
    info = pf.save_variant(model, torch.randn(2, 1, 8, 8), path)
    return model, path, info


def test_save_reports_file_info(saved: tuple[nn.Module, Path, dict]) -> None:
    _, path, info = saved
    import hashlib

    data = path.read_bytes()
    assert info["file"] == path.name
    assert info["bytes_compressed"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["bytes_raw"] == len(zstandard.ZstdDecompressor().decompress(data))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_loaded_variant_matches_module_at_any_batch(saved: tuple[nn.Module, Path, dict], batch: int) -> None:
    model, path, info = saved
    loaded = pf.load_variant(path, sha256=info["sha256"])
    assert not loaded.training
    x = torch.randn(batch, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_loaded_variant_rejects_wrong_input_shape(saved: tuple[nn.Module, Path, dict]) -> None:
    loaded = pf.load_variant(saved[1])
    with pytest.raises(Exception, match="size|shape|Guard"):
        loaded(torch.randn(2, 3, 8, 8))


def test_variant_loads_in_a_process_without_the_user_class(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = UserNet().eval()
    x = torch.randn(5, 1, 8, 8)
    info = pf.save_variant(model, x[:2], tmp_path / "user.safetensors.zst")
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from dnnshifter_lightning.portfolio import load_variant
        m = load_variant({str(tmp_path / 'user.safetensors.zst')!r}, sha256={info['sha256']!r})
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(m(io["x"]), io["y"], rtol=0, atol=1e-6)
            assert m(io["x"][:1]).shape == (1, 10)
        leaked = [n for n in ("test_portfolio", "tests.test_portfolio") if n in sys.modules]
        assert not leaked, leaked
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_sha256_mismatch_names_the_file(saved: tuple[nn.Module, Path, dict]) -> None:
    _, path, _ = saved
    with pytest.raises(PortfolioError, match=f"{path}.*sha256 mismatch"):
        pf.load_variant(path, sha256="0" * 64)


def _copy_with(path: Path, dest: Path, mutate) -> Path:
    data = bytearray(path.read_bytes())
    dest.write_bytes(bytes(mutate(data)))
    return dest


def test_truncated_file_names_the_file(saved: tuple[nn.Module, Path, dict], tmp_path: Path) -> None:
    bad = _copy_with(saved[1], tmp_path / "truncated.safetensors.zst", lambda d: d[: len(d) // 2])
    with pytest.raises(PortfolioError, match=str(bad)):
        pf.load_variant(bad)
    with pytest.raises(PortfolioError, match=f"{bad}.*sha256"):
        pf.load_variant(bad, sha256=saved[2]["sha256"])


def test_flipped_byte_names_the_file(saved: tuple[nn.Module, Path, dict], tmp_path: Path) -> None:
    def flip(d: bytearray) -> bytearray:
        d[len(d) // 2] ^= 0xFF
        return d

    bad = _copy_with(saved[1], tmp_path / "flipped.safetensors.zst", flip)
    with pytest.raises(PortfolioError, match=str(bad)):  # zstd's content checksum catches it
        pf.load_variant(bad)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PortfolioError, match="nope.safetensors.zst"):
        pf.load_variant(tmp_path / "nope.safetensors.zst")


# ----------------------------------------------------------------------------------- manifest

def _variant(vid: str, acc: float | None, level: int = 0, size: int = 100, lat: float = 1.0) -> dict:
    return {"id": vid, "level": level, "sparsity": 0.5, "params": 10, "nonzero_params": 9,
            "file": f"variants/{vid}.safetensors.zst", "bytes_raw": 200, "bytes_compressed": size, "sha256": "a" * 64,
            "macs": 100, "latency_ms": {"1": lat, "8": 4 * lat}, "accuracy": acc, "sparse_accuracy": acc,
            "max_abs_diff": 0.0}


def _manifest(*variants: dict) -> dict:
    return {"format_version": 2, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"}, "variants": list(variants)}


def test_manifest_roundtrip(tmp_path: Path) -> None:
    m = _manifest(_variant("a", 0.9), _variant("b", 0.8))
    pf.write_manifest(tmp_path, m)
    assert pf.read_manifest(tmp_path) == m


@pytest.mark.parametrize("breakage, message", [
    (lambda m: m.update(format_version=3), "format_version"),
    (lambda m: m.update(format_version=1), "format_version 1 .*dnnshifter portfolio build"),
    (lambda m: m.pop("input_spec"), "input_spec"),
    (lambda m: m["input_spec"].update(shape=[0, 8]), "input_spec.shape"),
    (lambda m: m["variants"][0].pop("sha256"), "missing field 'sha256'"),
    (lambda m: m["variants"][0].update(params="10"), r"params must be a non-negative int, got str"),
    (lambda m: m["variants"][0].update(file="../../etc/passwd"), "relative path inside"),
    (lambda m: m["variants"][0].update(sha256="xyz"), "sha256 must be"),
    (lambda m: m["variants"][1].update(id="a"), "duplicate"),
    (lambda m: m["variants"][0]["latency_ms"].pop("8"), "latency_ms"),
    (lambda m: m["variants"].reverse(), "most to least accurate"),
    (lambda m: m.update(variants=[]), "non-empty"),
])
def test_manifest_schema_errors_say_what_is_wrong(tmp_path: Path, breakage, message: str) -> None:
    m = _manifest(_variant("a", 0.9), _variant("b", 0.8))
    breakage(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PortfolioError, match=message) as err:
        pf.read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value)
    with pytest.raises(PortfolioError, match=message):
        pf.write_manifest(tmp_path / "out", m)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format_version": 2, ')
    with pytest.raises(PortfolioError, match="not valid JSON"):
        pf.read_manifest(tmp_path)


def test_interrupted_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = atomic_write(tmp_path / "sub" / "f.txt", "old é")  # str is written as UTF-8; parents are made
    assert path.read_bytes() == "old é".encode()

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_atomic.os, "fsync", interrupted)  # after the new bytes are in the temp file
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new")
    assert path.read_bytes() == "old é".encode()
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_failed_manifest_write_leaves_old_manifest_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    old = _manifest(_variant("a", 0.9))
    pf.write_manifest(tmp_path, old)
    before = (tmp_path / "manifest.json").read_bytes()

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(_atomic.os, "fsync", boom)  # fails after the bytes are written to the temp file
    with pytest.raises(OSError, match="disk full"):
        pf.write_manifest(tmp_path, _manifest(_variant("b", 0.5)))
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_failed_variant_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        pf.save_variant(nn.Linear(3, 2), torch.zeros(2, 3), tmp_path / "v.safetensors.zst")
    assert list(tmp_path.iterdir()) == []


def test_sort_variants_by_accuracy_then_size_then_latency() -> None:
    vs = [_variant("slow", 0.9, size=50, lat=2.0), _variant("low", 0.5), _variant("big", 0.9, size=80),
          _variant("fast", 0.9, size=50, lat=1.0), _variant("best", 0.95, size=999)]
    assert [v["id"] for v in pf.sort_variants(vs)] == ["best", "fast", "slow", "big", "low"]
    unmeasured = [_variant("l3", None, level=3), _variant("l0", None, level=0), _variant("m", 0.1)]
    assert [v["id"] for v in pf.sort_variants(unmeasured)] == ["m", "l0", "l3"]


def test_verify_portfolio_catches_tampering(saved: tuple[nn.Module, Path, dict], tmp_path: Path) -> None:
    (tmp_path / "variants").mkdir()
    target = tmp_path / "variants" / "a.safetensors.zst"
    target.write_bytes(saved[1].read_bytes())
    v = _variant("a", 0.9)
    v["sha256"], v["bytes_compressed"] = saved[2]["sha256"], saved[2]["bytes_compressed"]
    pf.write_manifest(tmp_path, _manifest(v))
    assert pf.verify_portfolio(tmp_path)["variants"][0]["id"] == "a"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(PortfolioError, match=f"{target}.*sha256 mismatch.*'a'"):
        pf.verify_portfolio(tmp_path)
    target.unlink()
    with pytest.raises(PortfolioError, match=str(target)):
        pf.verify_portfolio(tmp_path)


# ------------------------------------------------------------------------------------ profile

def test_counts_and_macs() -> None:
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, :2] = 1.0
    assert count_params(lin) == 15
    assert count_nonzero(lin) == 2 + int(torch.count_nonzero(lin.bias))
    assert count_macs(lin, torch.zeros(1, 4)) == 12
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    assert count_macs(conv, torch.zeros(1, 2, 8, 8)) == 5 * 2 * 9 * 64


def test_measure_accuracy_and_latency() -> None:
    x = torch.randn(50, 4)
    y = x.argmax(dim=1)
    perfect = nn.Identity()
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    assert measure_accuracy(perfect, loader, num_classes=4) == 1.0
    wrong = [(x, (y + 1) % 4)]
    assert measure_accuracy(perfect, wrong, num_classes=4) == 0.0
    assert measure_latency_ms(nn.Linear(4, 4), x, warmup=1, repeats=3) > 0
    with pytest.raises(ValueError):
        measure_accuracy(perfect, [], num_classes=4)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


def test_multi_output_variant_keeps_its_structure_and_allows_eval(tmp_path: Path) -> None:
    model = TwoHeads().eval()
    pf.save_variant(model, torch.randn(2, 4), tmp_path / "two.safetensors.zst")
    loaded = pf.load_variant(tmp_path / "two.safetensors.zst")
    loaded.train()
    loaded.eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        for got, want in zip(loaded(x), model(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_single_output_variant_is_the_graph_interpreter(saved: tuple[nn.Module, Path, dict]) -> None:
    from dnnshifter_lightning.graph import GraphVariant

    model, path, _ = saved
    loaded = pf.load_variant(path)
    assert type(loaded) is GraphVariant
    assert isinstance(loaded(torch.randn(1, 1, 8, 8)), torch.Tensor)
    assert set(pf.variant_state(loaded)) == set(model.state_dict())


def test_random_batch_follows_the_input_spec() -> None:
    spec = {"shape": [1, 8, 8], "dtype": "float16"}
    x = pf.random_batch(spec, 5, generator=torch.Generator().manual_seed(0))
    assert (x.shape, x.dtype, x.device.type) == ((5, 1, 8, 8), torch.float16, "cpu")
    # float32 draws, then the cast: the same values as torch.randn with the same generator
    assert torch.equal(x, torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)).half())
    assert pf.random_batch({"shape": [3]}, 2, dtype=torch.float64).dtype == torch.float64
