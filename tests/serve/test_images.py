"""Request images: PNG and JPEG only, and a pixel cap checked on the header before any decoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnnshifter_lightning.serve.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from serve_fixtures import bomb_png, small_image


def _status(raw: bytes, **kw) -> int:
    with pytest.raises(ImageRejected) as info:
        decode_image(raw, size=(8, 8), mode="L", **kw)
    return info.value.status


def test_png_and_jpeg_decode_to_the_model_input():
    for fmt in ("PNG", "JPEG"):
        x = decode_image(small_image(fmt, (20, 12)), size=(8, 8), mode="L")
        assert x.shape == (1, 8, 8) and torch.allclose(x, torch.full_like(x, 128 / 255), atol=2 / 255)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO"])
def test_other_formats_are_refused_before_pillow_decodes_them(fmt, monkeypatch):
    from PIL import Image

    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    assert _status(small_image(fmt)) == 415 and not opened


def test_a_huge_image_is_refused_from_its_header_without_decoding(monkeypatch):
    from PIL import ImageFile

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = bomb_png(8_000, 8_000)  # 64 Mpx: under Pillow's own limit (89 Mpx warns, 179 Mpx refuses)
    assert len(bomb) < 200_000
    assert _status(bomb) == 413
    assert _status(small_image("PNG", (100, 100)), max_pixels=9_999) == 413
    assert 4096 * 4096 == DEFAULT_MAX_PIXELS


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_refusing_a_huge_image_allocates_almost_nothing(tmp_path):
    # in a fresh process whose address space may grow by only 32 MB: refusing a 64 Mpx PNG (64 MB
    # decoded, ~60 KB on the wire) must not need that memory; decoding it would raise MemoryError
    (tmp_path / "bomb.png").write_bytes(bomb_png(8_000, 8_000))
    (tmp_path / "small.png").write_bytes(small_image("PNG"))
    script = f"""
import resource
from dnnshifter_lightning.serve.images import ImageRejected, decode_image
raw = open({str(tmp_path / "bomb.png")!r}, "rb").read()
decode_image(open({str(tmp_path / "small.png")!r}, "rb").read(), size=(8, 8), mode="L")  # warm the code path
vm = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmSize:"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 32 * 2**20, resource.RLIM_INFINITY))
try:
    decode_image(raw, size=(8, 8), mode="L")
    print("decoded")
except ImageRejected as exc:
    print(exc.status)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["413"], out.stdout + out.stderr[-2000:]


def test_broken_images_are_400_not_a_crash():
    png = small_image("PNG", (16, 16))
    assert _status(png[:40]) in (400, 415)
    jpeg = small_image("JPEG", (16, 16))
    assert _status(jpeg[: len(jpeg) // 2]) == 400
    assert _status(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64) in (400, 415)


def test_decode_image_scales_down_and_names_the_pixel_limit():
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(buf, format="JPEG")
    x = decode_image(buf.getvalue(), size=(32, 32), mode="RGB")  # decoded at 1/4 scale, then resized
    assert x.shape == (3, 32, 32) and x[0].min() > 0.9 and x[1:].max() < 0.1
    with pytest.raises(ImageRejected, match=r"^image is 300x200 = 60,000 pixels; the limit is 50,000$") as info:
        decode_image(buf.getvalue(), size=(32, 32), mode="RGB", max_pixels=50_000)
    assert info.value.status == 413


def test_bomb_guard_lowers_pillows_limit_and_sniffing_knows_png_only_by_magic(monkeypatch):
    from PIL import Image

    from dnnshifter_lightning.serve.images import install_bomb_guard, looks_like_image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    install_bomb_guard(10_000_000)
    assert Image.MAX_IMAGE_PIXELS <= 10_000_000
    assert looks_like_image(b"\x89PNG\r\n\x1a\n...") and not looks_like_image(b"GIF89a...")
