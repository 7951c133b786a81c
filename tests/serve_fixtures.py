"""Helpers for the TorchServe integration tests: a small real portfolio built in a few seconds.

The variants are DigitsCNNs of decreasing width (random but seeded weights, BN statistics set to
non-trivial values), exported with ``portfolio.save_variant``. The widest is heavy enough that the
one worker, not the loopback client or TorchServe's frontend, is the bottleneck of a burst even on
a quiet 2-core machine (at width 64 it is not, and the policy then rightly keeps it). Their costs
differ by an order of magnitude; their predictions are whatever they compute, which is what the
equivalence test compares against local inference.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import torch

from dnnshifter_lightning.demo.digits import DIGITS_INPUT_SPEC, load_digits_tensors
from dnnshifter_lightning.demo.models import DigitsCNN
from dnnshifter_lightning.portfolio import FORMAT_VERSION, VARIANT_SUFFIX, Variant, save_variant, sort_variants, write_manifest
from dnnshifter_lightning.shrink.measure import count_params, measure_latency_ms

WIDTHS = (128, 32, 8)


def _model(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN(width=width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


#: Manifest accuracies that make WIDTHS a ladder (the widest is the most accurate). They are set,
#: not measured: the variants' weights are random. Tests that need measured ones train a model.
LADDER_ACCURACIES = (0.97, 0.95, 0.92)


def build_test_portfolio(out: Path, widths: tuple[int, ...] = WIDTHS,
                         accuracies: tuple[float | None, ...] | None = None) -> dict:
    """Write a portfolio of DigitsCNN variants (widest first) to ``out``; returns the manifest.

    ``accuracies`` (one per width) go into the manifest (default: none, as a portfolio built
    without validation data)."""
    out.mkdir(parents=True, exist_ok=True)
    example = torch.randn(8, 1, 8, 8)
    variants = []
    for level, width in enumerate(widths):
        model = _model(width, seed=level)
        vid = f"level_{level:02d}"
        rel = f"variants/{vid}{VARIANT_SUFFIX}"
        info = save_variant(model, example[:2], out / rel)
        n = count_params(model)
        variants.append(Variant(
            id=vid, level=level, sparsity=1.0 - n / count_params(_model(widths[0], 0)),
            params=n, nonzero_params=n, file=rel, bytes_raw=info["bytes_raw"],
            bytes_compressed=info["bytes_compressed"], sha256=info["sha256"], macs=0,
            latency_ms={str(b): measure_latency_ms(model, example[:b], 2, 5) for b in (1, 8)},
            accuracy=None if accuracies is None else accuracies[level], sparse_accuracy=None,
            max_abs_diff=0.0,
        ).to_dict())
    if accuracies is not None:
        for v, width in zip(variants, widths):  # the front must not depend on a noisy timing on a busy box
            v["latency_ms"] = {"1": width / 32, "8": width / 4}  # ~ what one core measures, quiet
        variants = sort_variants(variants)  # a manifest lists its variants most accurate first
    manifest = {"format_version": FORMAT_VERSION, "input_spec": dict(DIGITS_INPUT_SPEC), "variants": variants}
    write_manifest(out, manifest)
    return manifest


def digits_samples(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real digits (normalised, ``(n, 1, 8, 8)``) and their labels."""
    x, y = load_digits_tensors()
    return x[:n], y[:n]


def json_body(x: torch.Tensor) -> bytes:
    """One input (no batch dim) as the handler's JSON body."""
    return json.dumps({"data": x.tolist()}).encode()


def png_body(x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """Encode one normalised digit as an 8-bit grayscale PNG; also returns the tensor the PNG decodes to."""
    from PIL import Image

    pixels = ((x[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="L").save(buf, format="PNG")
    decoded = (pixels.float() / 255.0 - 0.5) / 0.5
    return buf.getvalue(), decoded.unsqueeze(0)


@functools.lru_cache(maxsize=4)
def bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width x height`` zeros: tiny on the wire (zlib squeezes the rows
    ~1000:1), ``width * height`` bytes once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    blank_row = b"\x00" * (width + 1)  # filter byte 0 + one zero byte per pixel
    block = blank_row * 100
    idat = b"".join(rows.compress(block) for _ in range(height // 100))
    idat += rows.compress(blank_row * (height % 100)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_image(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    """A small grey image in any format Pillow writes (PNG, JPEG, GIF, BMP, TIFF, WEBP...)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format=fmt)
    return buf.getvalue()



def assert_matches_local(local, x, reply):
    """A server's ``reply`` to input ``x`` equals local inference with the variant it names."""
    logits, vid = local.infer(x.unsqueeze(0), reply["variant"])
    assert vid == reply["variant"]
    expected = torch.softmax(logits[0].float(), dim=0)
    assert reply["label"] == int(expected.argmax())
    assert torch.allclose(torch.tensor(reply["scores"]), expected, atol=1e-4)


def burst_concurrency(slice_index: int, start: int) -> int:
    """Closed-loop clients for slice ``slice_index`` of a burst: ``start``, doubling every two slices,
    at most 192. How many clients make requests queue past the policy's threshold depends on
    the machine (a faster CPU drains a batch of the widest test variant sooner), so a burst grows
    until it overloads the server instead of assuming one machine's speed."""
    return min(start * 2 ** (slice_index // 2), max(start, 192))
