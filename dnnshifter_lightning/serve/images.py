"""Decode a request's image bytes with bounded work: PNG and JPEG only, pixels capped before decoding.

Any server adapter (the TorchServe handler, a LitServe API) calls :func:`decode_image`; it imports
no server library. What it checks, in order:

1. the magic bytes say PNG or JPEG (everything else, GIF, BMP, TIFF, WebP..., is refused before
   Pillow picks a decoder for it);
2. Pillow opens it restricted to those two formats, which reads only the header;
3. width x height from the header is at most ``max_pixels``, before a single pixel is decoded
   (a 16 KB PNG can claim 10,000 x 10,000 pixels and inflate to 100 MB per request);
4. only then is it decoded (a JPEG straight at a reduced scale when it is much larger than the
   model's input), converted and resized.

Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on as a second line;
:func:`install_bomb_guard` lowers it to the same cap.

Example::

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("L", (16, 16), 255).save(buf, format="PNG")
    >>> decode_image(buf.getvalue(), size=(8, 8), mode="L").shape
    torch.Size([1, 8, 8])
    >>> buf = io.BytesIO()
    >>> Image.new("L", (4, 4)).save(buf, format="GIF")
    >>> try:
    ...     decode_image(buf.getvalue(), size=(8, 8), mode="L")
    ... except ImageRejected as exc:
    ...     print(exc.status, exc)
    415 not a PNG or JPEG image (GIF, BMP, TIFF and others are not accepted)
"""

from __future__ import annotations

import io
import warnings

import torch

__all__ = ["ImageRejected", "decode_image", "looks_like_image", "install_bomb_guard", "DEFAULT_MAX_PIXELS"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
#: Default cap on width x height: 16.8 Mpx, a large phone photo; 50 MB as RGB before resizing.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageRejected(ValueError):
    """An image request that is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def looks_like_image(raw: bytes) -> bool:
    """True if ``raw`` starts with a PNG or JPEG signature."""
    return raw[:8] == PNG_MAGIC or raw[:3] == JPEG_MAGIC


def install_bomb_guard(max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Lower Pillow's process-wide decompression-bomb limit to ``max_pixels`` (never raise it).

    Pillow warns above the limit and refuses above twice the limit when it opens an image; the
    cap in :func:`decode_image` refuses anything above ``max_pixels`` itself.
    """
    from PIL import Image

    current = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels if current is None else min(current, max_pixels)


def decode_image(raw: bytes, *, size: tuple[int, int], mode: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode PNG/JPEG bytes into a ``(channels, height, width)`` float tensor in [0, 1].

    Args:
        raw: the request body.
        size: ``(width, height)`` to resize to (the model's input).
        mode: Pillow mode to convert to (``"L"``, ``"RGB"``...).
        max_pixels: the largest ``width * height`` accepted, checked on the header before decoding.

    Raises:
        ImageRejected: 415 for anything but PNG/JPEG, 413 above ``max_pixels``, 400 for a broken file.
    """
    from PIL import Image, UnidentifiedImageError

    if not looks_like_image(raw):
        raise ImageRejected(415, "not a PNG or JPEG image (GIF, BMP, TIFF and others are not accepted)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above Pillow's limit: refuse
            img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))  # reads the header only
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(413, f"image is {width}x{height} = {width * height:,} pixels; "
                                         f"the limit is {max_pixels:,}")
            if img.format not in ("PNG", "JPEG"):  # pragma: no cover - formats= already restricts it
                raise ImageRejected(415, f"image format {img.format} not accepted; send PNG or JPEG")
            if img.format == "JPEG":
                img.draft(mode, size)  # decode at 1/2, 1/4 or 1/8 scale when that still covers `size`
            img = img.convert(mode)
            if img.size != tuple(size):
                img = img.resize(tuple(size), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(415, f"not a readable PNG or JPEG image ({exc.__class__.__name__})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(400, f"cannot decode image: {exc.__class__.__name__}: {exc}") from exc
    return pixels.view(size[1], size[0], -1).permute(2, 0, 1).float() / 255.0
