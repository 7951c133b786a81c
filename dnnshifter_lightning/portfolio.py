"""The portfolio format: a directory with ``manifest.json`` and one zstd-compressed file per variant.

A portfolio is data anyone may send you: loading one never runs code from its files, and every
resource it takes is bounded. Each variant file (``variants/level_00.safetensors.zst``) is a zstd
frame holding one **safetensors** file: the weights are its tensors, and the computation is a JSON
graph (see :mod:`~dnnshifter_lightning.graph`) in its ``__metadata__``, interpreted against an
allow-list of ATen operators. It loads **without the user's Python class**, and with a dynamic batch
dimension (any batch size >= 1). No pickle, ``eval``, ``exec``, sympy or torch.export loader runs on
the load path.

What loading checks (every failure is a :class:`PortfolioError` naming the file):

* only regular files inside the portfolio directory are read: no symlinked files, no paths that
  resolve outside it, no devices or FIFOs; the manifest is at most :data:`MAX_MANIFEST_BYTES`;
* :func:`validate_manifest` checks every field's type and range (finite numbers, known dtypes,
  normalisation lengths that match the channels, sizes under :data:`MAX_VARIANT_BYTES`);
* a variant file's size and sha256 match the manifest, and it inflates to exactly the manifest's
  ``bytes_raw``: decompression stops there, whatever the frame header claims;
* the safetensors header (dtypes, shapes, offsets) and the graph (operators, argument types,
  references, sizes) are validated before any tensor is materialised, and the graph is dry-run on
  ``meta`` tensors, bounding its activations.

Every write is atomic (:func:`~dnnshifter_lightning._atomic.atomic_write`). The builder writes
the manifest last, so a crash mid-build never leaves a manifest pointing at missing files.

For cheap switching, :class:`~dnnshifter_lightning.serve.runtime.PortfolioRuntime` splits a loaded
variant into a skeleton and its weights (:func:`variant_state` lists them).

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dnnshifter_lightning.demo.models import DigitsCNN
    >>> from dnnshifter_lightning.portfolio import save_variant, load_variant
    >>> d = Path(tempfile.mkdtemp())
    >>> info = save_variant(DigitsCNN(width=8).eval(), torch.zeros(2, 1, 8, 8), d / "v.safetensors.zst")
    >>> load_variant(d / "v.safetensors.zst", sha256=info["sha256"])(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
import zstandard
from torch import nn

from dnnshifter_lightning import graph as _graph
from dnnshifter_lightning._atomic import atomic_write
from dnnshifter_lightning.graph import GraphError

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "VARIANT_SUFFIX", "PortfolioError",
    "Variant",
    "save_variant", "load_variant", "write_manifest", "read_manifest", "verify_portfolio",
    "validate_manifest", "sort_variants", "variant_state", "random_batch", "load_json",
    "MAX_MANIFEST_BYTES", "MAX_VARIANT_BYTES", "MAX_HEADER_BYTES", "INPUT_DTYPES",
]

#: 2: safetensors + JSON graph. 1 (torch.export ``.pt2`` archives) is refused: loading one can run code.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
VARIANT_SUFFIX = ".safetensors.zst"
VARIANT_FORMAT = "dnnshifter-variant"
ZSTD_LEVEL = 3  # decompression speed is nearly level-independent; higher levels mostly cost build time
#: Caps on what a portfolio may declare or hold. A variant file, compressed or inflated, is at most
#: 4 GiB (ResNet-50 is ~100 MB); a manifest at most 16 MiB; a safetensors header (tensor table +
#: graph) at most 64 MiB.
MAX_VARIANT_BYTES = 4 << 30
MAX_MANIFEST_BYTES = 16 << 20
MAX_HEADER_BYTES = 64 << 20
REBUILD_HINT = ("rebuild the portfolio from its level checkpoints with `dnnshifter portfolio build CKPT_DIR "
                "--model package.module:Class --out DIR` (or train again with the PortfolioBuilder callback)")
#: ``input_spec.dtype`` values a manifest may name.
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "uint8": torch.uint8, "int64": torch.int64, "int32": torch.int32,
}
_COLORS = {"L": 1, "RGB": 3, "RGBA": 4}
_MAX_ID_CHARS = 128
_MAX_PATH_CHARS = 1024
_MAX_INT = 2**62
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class PortfolioError(ValueError):
    """A portfolio file is missing, corrupt, truncated, unsafe or malformed. The message names the file.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "broken.safetensors.zst"
        >>> _ = path.write_bytes(b"not a variant")
        >>> load_variant(path)
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: .../broken.safetensors.zst: corrupt or truncated zstd data (...)
        >>> issubclass(PortfolioError, ValueError)
        True
    """


# ----------------------------------------------------------------------------------------- writing

def export_variant(module: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """Export ``module`` (put in eval mode) with a dynamic batch dimension (min 1).

    Use an example batch of 2 or more: export specialises sizes 0 and 1. Only the save side uses
    torch.export; loading never does.
    """
    try:
        return _graph._export(module, example_input)
    except GraphError as exc:
        raise PortfolioError(str(exc)) from exc


def save_variant(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``module`` as a data-only variant file (zstd of a safetensors file) to ``path`` atomically.

    The weights are the safetensors tensors; the computation is the JSON graph of
    :mod:`~dnnshifter_lightning.graph` (exported with a dynamic batch dimension, then checked to
    reproduce the module's output) in the safetensors header's ``__metadata__``. Returns
    ``{"file": path.name, "bytes_raw", "bytes_compressed", "sha256"}`` (sha256 of the compressed file
    as stored). The builder rewrites ``file`` relative to the portfolio directory.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant
        >>> p = Path(tempfile.mkdtemp()) / f"tiny{VARIANT_SUFFIX}"
        >>> sorted(save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), p))
        ['bytes_compressed', 'bytes_raw', 'file', 'sha256']
    """
    try:
        graph, tensors = _graph.graph_from_module(module, example_input)
    except GraphError as exc:
        raise PortfolioError(f"{path}: cannot save {type(module).__name__}: {exc}") from exc
    metadata = {"format": VARIANT_FORMAT, "format_version": str(FORMAT_VERSION),
                "graph": json.dumps(graph, separators=(",", ":"), allow_nan=False)}
    raw = safetensors.torch.save(tensors, metadata=metadata)
    if len(raw) > MAX_VARIANT_BYTES:
        raise PortfolioError(f"{path}: the variant is {len(raw)} bytes, more than MAX_VARIANT_BYTES={MAX_VARIANT_BYTES}")
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True).compress(raw)
    atomic_write(path, data)
    return {"file": Path(path).name, "bytes_raw": len(raw), "bytes_compressed": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------------------- loading

def _open_regular(path: Path, root: str | os.PathLike[str] | None, max_bytes: int, what: str) -> tuple[int, int]:
    """Open ``path`` for reading if it is a regular file (inside ``root`` when given) of at most
    ``max_bytes``; returns ``(fd, size)``. Symlinks as the last component, devices, FIFOs and
    sockets are refused without blocking, and so is a path that resolves outside ``root``."""
    text = os.fspath(path)
    if "\x00" in text:
        raise PortfolioError(f"{text!r}: file name contains a NUL byte")
    if root is not None:
        real_root = os.path.realpath(root)
        real = os.path.realpath(text)
        if os.path.commonpath([real_root, real]) != real_root:
            raise PortfolioError(f"{path}: {what} resolves to {real}, outside the portfolio directory {real_root}")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(text, flags)
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise PortfolioError(f"{path}: cannot read {what} ({why})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PortfolioError(f"{path}: {what} is not a regular file")
        if st.st_size > max_bytes:
            raise PortfolioError(f"{path}: {what} is {st.st_size} bytes, more than the cap of {max_bytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_regular(path: Path, root: str | os.PathLike[str] | None, max_bytes: int, what: str) -> bytes:
    fd, size = _open_regular(path, root, max_bytes, what)
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            data = f.read(size)  # fstat's size (at most max_bytes), so the buffer is never larger
            grew = f.read(1)
    except OSError as exc:
        raise PortfolioError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if len(data) != size or grew:
        raise PortfolioError(f"{path}: {what} changed size while it was read")
    return data


def _inflate(data: bytes, name: str, bytes_raw: int | None) -> bytes:
    """zstd-decompress ``data``, stopping at ``bytes_raw`` (or :data:`MAX_VARIANT_BYTES`)."""
    limit = MAX_VARIANT_BYTES if bytes_raw is None else bytes_raw
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise PortfolioError(f"{name}: corrupt or truncated zstd data ({exc})") from exc
    if declared > limit:
        raise PortfolioError(f"{name}: zstd frame claims {declared} bytes, more than the "
                             f"{'manifest' + chr(39) + 's bytes_raw' if bytes_raw is not None else 'cap'} of {limit}")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            while True:
                chunk = reader.read(min(1 << 22, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > limit:
                    raise PortfolioError(f"{name}: inflates to more than "
                                         f"{'the manifest' + chr(39) + 's bytes_raw' if bytes_raw is not None else 'the cap'} "
                                         f"of {limit} bytes")
    except zstandard.ZstdError as exc:
        raise PortfolioError(f"{name}: corrupt or truncated zstd data ({exc})") from exc
    if bytes_raw is not None and len(out) != bytes_raw:
        raise PortfolioError(f"{name}: inflates to {len(out)} bytes, the manifest says bytes_raw={bytes_raw}")
    return bytes(out)


def load_json(text: str | bytes, name: str) -> Any:
    """``json.loads`` for untrusted files: NaN, Infinity, numbers that overflow to infinity, deep
    nesting and huge integers are a :class:`PortfolioError` naming ``name``.

    Example::

        >>> load_json('{"accuracy": 0.9}', "m.json")
        {'accuracy': 0.9}
        >>> load_json('{"accuracy": NaN}', "m.json")
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: m.json: not valid JSON (NaN is not allowed)
        >>> load_json("[" * 100_000, "m.json")
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: m.json: not valid JSON (nested too deeply)
    """
    def finite(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"number {s[:20]} is not finite")
        return v

    def constant(s: str) -> Any:
        raise ValueError(f"{s} is not allowed")

    try:
        return json.loads(text, parse_float=finite, parse_constant=constant)
    except RecursionError as exc:
        raise PortfolioError(f"{name}: not valid JSON (nested too deeply)") from exc
    except (ValueError, TypeError) as exc:  # JSONDecodeError, bad UTF-8, int digits limit, NaN
        raise PortfolioError(f"{name}: not valid JSON ({str(exc)[:200]})") from exc


def _parse_header(raw: bytes, name: str) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Check a safetensors file's header ourselves (before the library reads the data): sizes,
    offsets, dtypes, shapes. Returns its ``__metadata__`` and each tensor's dtype and shape."""
    if raw[:4] == b"PK\x03\x04":
        raise PortfolioError(f"{name}: a format-1 variant (a torch.export archive), which is no longer loaded "
                             f"because loading it can run code; {REBUILD_HINT}")
    if len(raw) < 8:
        raise PortfolioError(f"{name}: not a variant file (too short for a safetensors header)")
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or n > min(len(raw) - 8, MAX_HEADER_BYTES):
        raise PortfolioError(f"{name}: safetensors header claims {n} bytes; the file has {len(raw) - 8} after the "
                             f"length, and the cap is {MAX_HEADER_BYTES}")
    header = load_json(raw[8:8 + n], f"{name} (safetensors header)")
    if not isinstance(header, dict):
        raise PortfolioError(f"{name}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise PortfolioError(f"{name}: not a dnnshifter variant (no string __metadata__ in the safetensors header)")
    if metadata.get("format") != VARIANT_FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise PortfolioError(f"{name}: not a format-{FORMAT_VERSION} dnnshifter variant "
                             f"(format {metadata.get('format')!r}, version {metadata.get('format_version')!r}); "
                             f"{REBUILD_HINT}")
    data_len = len(raw) - 8 - n
    infos, spans = {}, []
    for key, t in header.items():
        where = f"{name}: tensor {key[:100]!r}"
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise PortfolioError(f"{where}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in _graph.DTYPES:
            raise PortfolioError(f"{where}: unknown dtype {str(dtype)[:20]!r} (known: {sorted(_graph.DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= _graph.MAX_RANK
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_VARIANT_BYTES for s in shape)):
            raise PortfolioError(f"{where}: shape must be a list of at most {_graph.MAX_RANK} non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise PortfolioError(f"{where}: data_offsets must be [begin, end] within the {data_len} data bytes")
        torch_dtype = _graph.DTYPES[dtype]
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise PortfolioError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                                 f"its shape and dtype need {nbytes}")
        infos[key] = (torch_dtype, tuple(shape))
        spans.append(tuple(offsets))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise PortfolioError(f"{name}: tensor data overlaps or leaves gaps (at byte {begin}, expected {pos})")
        pos = end
    if pos != data_len:
        raise PortfolioError(f"{name}: {data_len - pos} bytes after the last tensor")
    return metadata, infos


def load_variant(path: str | os.PathLike[str], sha256: str | None = None, *, bytes_raw: int | None = None,
                 root: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a variant written by :func:`save_variant` as an ``nn.Module`` in eval mode.

    It needs no user class: the module is a :class:`~dnnshifter_lightning.graph.GraphVariant`, an
    interpreter of the file's JSON graph over an operator allow-list; nothing in the file is
    executed as code. It accepts any batch size >= 1 and checks the other input dimensions.

    Checks: the file is a regular file (inside ``root``, the portfolio directory, when given) of at
    most :data:`MAX_VARIANT_BYTES`; its sha256 matches ``sha256`` when given; it inflates to exactly
    ``bytes_raw`` bytes when given (never more: decompression stops there); the safetensors header,
    the graph, its operators, arguments and tensors are validated; a dry run on ``meta`` tensors
    proves the shapes agree. Every failure is a :class:`PortfolioError` naming the file.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant, load_variant
        >>> p = Path(tempfile.mkdtemp()) / f"tiny{VARIANT_SUFFIX}"
        >>> _ = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), p)
        >>> load_variant(p)(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
    """
    path = Path(path)
    data = _read_regular(path, root, MAX_VARIANT_BYTES, "variant file")
    return load_variant_bytes(data, name=str(path), sha256=sha256, bytes_raw=bytes_raw)


def load_variant_bytes(data: bytes, *, name: str = "<bytes>", sha256: str | None = None,
                       bytes_raw: int | None = None) -> nn.Module:
    """:func:`load_variant` from the compressed bytes of a variant file; ``name`` is used in errors."""
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise PortfolioError(f"{name}: sha256 mismatch (expected {sha256}, file has {digest})")
    raw = _inflate(data, name, bytes_raw)
    metadata, infos = _parse_header(raw, name)
    graph = load_json(metadata.get("graph", ""), f"{name} (graph)")
    try:
        module = _graph.build_variant(graph, infos)
    except GraphError as exc:
        raise PortfolioError(f"{name}: {exc}") from exc
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # noqa: BLE001 - the library's own checks of what we checked above
        raise PortfolioError(f"{name}: bad safetensors data ({type(exc).__name__}: {exc})") from exc
    try:
        module.assign_tensors(tensors)
    except GraphError as exc:  # pragma: no cover - the header check makes this unreachable
        raise PortfolioError(f"{name}: {exc}") from exc
    return module.eval()


# ------------------------------------------------------------------------------ skeleton + weights

def variant_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (detached, shared storage, no copy).

    Example::

        >>> from torch import nn
        >>> list(variant_state(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))))
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']
    """
    state = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
    state.update({n: b.detach() for n, b in module.named_buffers(remove_duplicate=False) if b is not None})
    return state


# ---------------------------------------------------------------------------------------- manifest

def random_batch(input_spec: Mapping[str, Any], n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch of ``n`` standard-normal inputs shaped by a manifest's ``input_spec``.

    The values are drawn in float32 on the CPU (from ``generator``, else the global RNG), then moved
    to ``device`` and cast to ``dtype`` (default: ``input_spec["dtype"]``, else float32).

    Args:
        input_spec: the manifest's ``input_spec`` (``shape`` without the batch dimension, ``dtype``).
        n: the batch size.
        generator: the random generator to draw from.
        device: where the batch goes (default: the CPU).
        dtype: the batch's dtype.

    Raises:
        KeyError: ``input_spec`` has no ``shape``, or names a dtype not in :data:`INPUT_DTYPES`.
    """
    dtype = dtype or INPUT_DTYPES[input_spec.get("dtype", "float32")]
    return torch.randn(n, *input_spec["shape"], generator=generator).to(device=device, dtype=dtype)


@dataclass
class Variant:
    """One variant's record in ``manifest.json`` (see :func:`validate_manifest` for the rules).

    ``accuracy``, ``sparse_accuracy`` and ``max_abs_diff`` are written even when ``None`` (null:
    not measured). ``checkpoint``, ``prune_seconds`` and ``sparse`` (the sparse source's
    measurements) are what the builder adds, written only when set; ``extra`` keeps any other key
    of a record read with :meth:`from_dict`. :meth:`to_dict` writes the keys in this order.
    """

    id: str
    level: int
    sparsity: float
    params: int
    nonzero_params: int
    file: str
    bytes_raw: int
    bytes_compressed: int
    sha256: str
    macs: int
    latency_ms: dict[str, float]
    accuracy: float | None = None
    sparse_accuracy: float | None = None
    max_abs_diff: float | None = None
    checkpoint: str | None = None
    prune_seconds: float | None = None
    sparse: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = ("checkpoint", "prune_seconds", "sparse")

    def to_dict(self) -> dict[str, Any]:
        """The manifest record: a plain JSON-ready dict."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in self._OPTIONAL and value is None):
                continue
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Variant:
        """A :class:`Variant` from a manifest record; keys it does not name go to ``extra``.

        Raises:
            TypeError: when a required field is missing.
        """
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in record.items() if k in names},
                   extra={k: v for k, v in record.items() if k not in names})


def sort_variants(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most to least accurate; ties by smaller compressed size, then lower batch-1 latency.

    Variants without an accuracy (none measured) go last, densest level first.

    Example::

        >>> variants = [
        ...     {"id": "fast", "accuracy": 0.95, "bytes_compressed": 10, "latency_ms": {"1": 0.1}},
        ...     {"id": "level_05", "accuracy": None, "level": 5},
        ...     {"id": "best", "accuracy": 0.97, "bytes_compressed": 90, "latency_ms": {"1": 0.5}},
        ...     {"id": "level_02", "accuracy": None, "level": 2},
        ...     {"id": "small", "accuracy": 0.95, "bytes_compressed": 5, "latency_ms": {"1": 0.2}},
        ... ]
        >>> [v["id"] for v in sort_variants(variants)]
        ['best', 'small', 'fast', 'level_02', 'level_05']
    """
    def key(v: dict[str, Any]) -> tuple[Any, ...]:
        acc = v.get("accuracy")
        lat = (v.get("latency_ms") or {}).get("1", math.inf)
        return (acc is None, -(acc or 0.0), v.get("level", 0) if acc is None else 0,
                v.get("bytes_compressed", 0), lat)
    return sorted(variants, key=key)


def _invalid(directory: Path, why: str) -> PortfolioError:
    """The error for an invalid manifest in ``directory`` (the caller raises it)."""
    return PortfolioError(f"{directory / MANIFEST_NAME}: {why}")


def _int(v: Any, lo: int = 0, hi: int = _MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(v: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi)


def _finite_everywhere(v: Any, depth: int = 0) -> bool:
    """No NaN or infinity anywhere in a JSON value (and no nesting deeper than 32)."""
    if depth > 32:
        return False
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _finite_everywhere(x, depth + 1) for k, x in v.items())
    if isinstance(v, list):
        return all(_finite_everywhere(x, depth + 1) for x in v)
    return v is None or isinstance(v, (str, int, bool))


def _check_input_spec(d: Path, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise _invalid(d, "input_spec must be an object")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 7 and all(_int(s, 1, 1 << 20) for s in shape)):
        raise _invalid(d, f"input_spec.shape must be a list of 1..7 positive ints (no batch dim), got {str(shape)[:80]}")
    if spec.get("dtype") not in INPUT_DTYPES:
        raise _invalid(d, f"input_spec.dtype must be one of {sorted(INPUT_DTYPES)}, got {str(spec.get('dtype'))[:40]!r}")
    for opt in ("mean", "std"):
        values = spec.get(opt)
        if values is None:
            continue
        if not (isinstance(values, list) and all(_num(x) for x in values)):
            raise _invalid(d, f"input_spec.{opt} must be a list of finite numbers")
        if len(values) != shape[0]:
            raise _invalid(d, f"input_spec.{opt} has {len(values)} values; the input has {shape[0]} channels")
        if opt == "std" and not all(x > 0 for x in values):
            raise _invalid(d, "input_spec.std values must be > 0")
    names = spec.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) <= 1_000_000
                                  and all(isinstance(n, str) and len(n) <= 256 for n in names)):
        raise _invalid(d, "input_spec.class_names must be a list of strings (at most 256 chars each)")
    color = spec.get("color")
    if color is not None and _COLORS.get(color) != shape[0]:
        raise _invalid(d, f"input_spec.color must be one of {sorted(_COLORS)} and match the {shape[0]} channels, "
                       f"got {str(color)[:20]!r}")


def _check_variant(d: Path, i: int, v: Any) -> None:
    where = f"variants[{i}]"
    if not isinstance(v, dict):
        raise _invalid(d, f"{where} must be an object")
    for key in ("id", "level", "sparsity", "params", "nonzero_params", "file", "bytes_raw", "bytes_compressed",
                  "sha256", "macs", "latency_ms", "accuracy", "sparse_accuracy", "max_abs_diff"):
        if key not in v:
            raise _invalid(d, f"{where} ({str(v.get('id', '?'))[:40]}) is missing field {key!r}")
    vid = v["id"]
    if not (isinstance(vid, str) and len(vid) <= _MAX_ID_CHARS and _ID.match(vid)):
        raise _invalid(d, f"{where}.id must be 1..{_MAX_ID_CHARS} letters, digits or '_.+-', got {str(vid)[:40]!r}")
    where = f"variant {vid!r}"
    checks = {
        "level": _int(v["level"], 0, 1 << 20),
        "sparsity": _num(v["sparsity"], 0.0, 1.0),
        "params": _int(v["params"]), "nonzero_params": _int(v["nonzero_params"]), "macs": _int(v["macs"]),
        "bytes_raw": _int(v["bytes_raw"], 0, MAX_VARIANT_BYTES),
        "bytes_compressed": _int(v["bytes_compressed"], 1, MAX_VARIANT_BYTES),
        "accuracy": v["accuracy"] is None or _num(v["accuracy"], 0.0, 1.0),
        "sparse_accuracy": v["sparse_accuracy"] is None or _num(v["sparse_accuracy"], 0.0, 1.0),
        "max_abs_diff": v["max_abs_diff"] is None or _num(v["max_abs_diff"], 0.0),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        k = bad[0]
        rule = {"sparsity": "a finite number in [0, 1]", "accuracy": "null or a finite number in [0, 1]",
                "sparse_accuracy": "null or a finite number in [0, 1]", "max_abs_diff": "null or a finite number >= 0",
                "bytes_raw": f"an int in [0, {MAX_VARIANT_BYTES}]", "bytes_compressed": f"an int in [1, {MAX_VARIANT_BYTES}]",
                }.get(k, "a non-negative int")
        raise _invalid(d, f"{where}: {k} must be {rule}, got {type(v[k]).__name__} {str(v[k])[:40]}")
    f = v["file"]
    if not isinstance(f, str):
        raise _invalid(d, f"{where}: file has type {type(f).__name__}")
    if (not f or len(f) > _MAX_PATH_CHARS or "\x00" in f or "\\" in f or Path(f).is_absolute()
            or ".." in Path(f).parts or f.startswith("~")):
        raise _invalid(d, f"{where}: file must be a relative path inside the portfolio, got {f[:80]!r}")
    if not (isinstance(v["sha256"], str) and _SHA256.match(v["sha256"])):
        raise _invalid(d, f"{where}: sha256 must be 64 lowercase hex digits")
    lat = v["latency_ms"]
    if not (isinstance(lat, dict) and len(lat) <= 64 and all(isinstance(k, str) and k.isdigit() and len(k) <= 6
                                                              and _num(x, 0.0) for k, x in lat.items())
            and "1" in lat and "8" in lat):
        raise _invalid(d, f"{where}: latency_ms needs finite numbers >= 0 for batch '1' and '8' (keys: batch sizes)")
    if not _finite_everywhere(v):
        raise _invalid(d, f"{where}: every number must be finite (and nesting at most 32 deep)")


def validate_manifest(manifest: Any, directory: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """Check the manifest schema; returns it unchanged or raises :class:`PortfolioError` saying what is wrong.

    Every field's type and range is checked: numbers are finite (no NaN or infinite accuracy or
    latency), sizes are under :data:`MAX_VARIANT_BYTES`, ``input_spec.dtype`` is one of
    :data:`INPUT_DTYPES`, ``mean``/``std`` have one value per channel, file names are relative paths
    inside the portfolio without NUL bytes.

    Example::

        >>> v = {"id": "a", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8, "macs": 6,
        ...      "file": "variants/a.safetensors.zst", "bytes_raw": 100, "bytes_compressed": 90,
        ...      "sha256": "0" * 64, "latency_ms": {"1": 0.1, "8": 0.2}, "accuracy": 0.9,
        ...      "sparse_accuracy": None, "max_abs_diff": None}
        >>> m = {"format_version": FORMAT_VERSION, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
        ...      "variants": [v]}
        >>> validate_manifest(m) is m
        True
        >>> validate_manifest({**m, "variants": [{**v, "accuracy": float("nan")}]})
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: manifest.json: variant 'a': accuracy must be null or a finite number in [0, 1], got float nan
    """
    d = Path(directory)
    if not isinstance(manifest, dict):
        raise _invalid(d, "manifest must be a JSON object")
    version = manifest.get("format_version")
    if version == 1:
        raise _invalid(d, f"format_version 1 (torch.export programs) is no longer loaded, because loading it can run "
                       f"code; {REBUILD_HINT}")
    if version != FORMAT_VERSION:
        raise _invalid(d, f"format_version must be {FORMAT_VERSION}, got {str(version)[:40]!r}")
    _check_input_spec(d, manifest.get("input_spec"))
    variants = manifest.get("variants")
    if not isinstance(variants, list) or not variants:
        raise _invalid(d, "variants must be a non-empty list")
    if len(variants) > 10_000:
        raise _invalid(d, f"{len(variants)} variants; at most 10000")
    seen: set[str] = set()
    for i, v in enumerate(variants):
        _check_variant(d, i, v)
        if v["id"] in seen:
            raise _invalid(d, f"duplicate variant {v['id']!r}")
        seen.add(v["id"])
    if not _finite_everywhere({k: x for k, x in manifest.items() if k != "variants"}):
        raise _invalid(d, "every number must be finite (and nesting at most 32 deep)")
    accs = [v["accuracy"] for v in variants if v["accuracy"] is not None]
    if any(a < b - 1e-12 for a, b in zip(accs, accs[1:])):
        raise _invalid(d, "variants must be ordered from most to least accurate")
    return manifest


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Validate and atomically write ``directory/manifest.json``; returns its path.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "variants" / "v0.safetensors.zst")
        >>> variant = {"id": "v0", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8, "macs": 6,
        ...            "latency_ms": {"1": 0.01, "8": 0.02}, "accuracy": None, "sparse_accuracy": None,
        ...            "max_abs_diff": None, **info, "file": "variants/v0.safetensors.zst"}
        >>> manifest = {"format_version": FORMAT_VERSION, "input_spec": {"shape": [3], "dtype": "float32"},
        ...             "variants": [variant]}
        >>> write_manifest(d, manifest).name
        'manifest.json'
        >>> [v["id"] for v in read_manifest(d)["variants"]]
        ['v0']
        >>> write_manifest(d, {**manifest, "variants": []})       # validated before anything is written
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: .../manifest.json: variants must be a non-empty list
    """
    d = Path(directory)
    validate_manifest(manifest, d)
    path = d / MANIFEST_NAME
    atomic_write(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``directory/manifest.json``.

    Example::

        >>> from dnnshifter_lightning.portfolio import read_manifest
        >>> read_manifest("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dnnshifter_lightning.portfolio.PortfolioError: /nonexistent/manifest.json: cannot read ...
    """
    d = Path(directory)
    data = _read_regular(d / MANIFEST_NAME, d, MAX_MANIFEST_BYTES, "manifest")
    return validate_manifest(load_json(data, str(d / MANIFEST_NAME)), d)


def verify_portfolio(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest and check the sha256 of every variant file. Returns the manifest.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "v0.safetensors.zst")
        >>> _ = write_manifest(d, {"format_version": 2, "input_spec": {"shape": [3], "dtype": "float32"},
        ...     "variants": [{"id": "v0", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8,
        ...                   "macs": 6, "latency_ms": {"1": 0.01, "8": 0.02}, "accuracy": None,
        ...                   "sparse_accuracy": None, "max_abs_diff": None, **info}]})
        >>> verify_portfolio(d)["variants"][0]["file"]
        'v0.safetensors.zst'
        >>> data = bytearray((d / "v0.safetensors.zst").read_bytes())
        >>> data[-1] ^= 1                                  # same size, one bit flipped
        >>> _ = (d / "v0.safetensors.zst").write_bytes(bytes(data))
        >>> verify_portfolio(d)
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: .../v0.safetensors.zst: sha256 mismatch for variant 'v0' ...
    """
    d = Path(directory)
    manifest = read_manifest(d)
    for v in manifest["variants"]:
        path = d / v["file"]
        fd, size = _open_regular(path, d, MAX_VARIANT_BYTES, f"variant {v['id']!r}")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                if size != v["bytes_compressed"]:
                    raise PortfolioError(f"{path}: variant {v['id']!r} is {size} bytes, the manifest says "
                                         f"bytes_compressed={v['bytes_compressed']}")
                remaining = size
                while remaining > 0:
                    chunk = f.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    h.update(chunk)
                    remaining -= len(chunk)
        except OSError as exc:
            raise PortfolioError(f"{path}: cannot read variant {v['id']!r} ({exc.strerror or exc})") from exc
        if h.hexdigest() != v["sha256"]:
            raise PortfolioError(f"{path}: sha256 mismatch for variant {v['id']!r} "
                                 f"(manifest {v['sha256']}, file {h.hexdigest()})")
    return manifest
