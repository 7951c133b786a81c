"""The portfolio format: a directory with ``manifest.json`` and one zstd-compressed file per variant.

Each variant is a ``torch.export`` program (the ``.pt2`` archive of :func:`torch.export.save`)
compressed with zstandard, so it loads **without the user's Python class**. The batch dimension is
exported as dynamic (``Dim("batch", min=1)``), so a loaded variant accepts any batch size >= 1.

Loading never unpickles arbitrary objects. Before :func:`torch.export.load` sees an archive, it is
checked to hold only the graph (JSON), raw weight bytes and tensor-only sample inputs: no pickled
tensor subclasses, no custom or opaque objects, no compiled (AOTI) libraries. Anything else is a
:class:`PortfolioError` naming the file.

Every write is atomic: a temp file in the same directory, then :func:`os.replace`. The builder writes
the manifest last, so a crash mid-build never leaves a manifest pointing at missing files.

For cheap switching (see :class:`~dnnshifter_lightning.runtime.PortfolioRuntime`), a loaded variant
splits into a skeleton and its weights: :func:`variant_state`, :func:`release_state`,
:func:`assign_state`, and a pickle-free byte form :func:`pack_state` / :func:`unpack_state`.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dnnshifter_lightning.models import DigitsCNN
    >>> from dnnshifter_lightning.portfolio import save_variant, load_variant
    >>> d = Path(tempfile.mkdtemp())
    >>> info = save_variant(DigitsCNN(width=8).eval(), torch.zeros(2, 1, 8, 8), d / "v.pt2.zst")
    >>> load_variant(d / "v.pt2.zst", sha256=info["sha256"])(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import zstandard
from torch import nn

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "VARIANT_SUFFIX", "PortfolioError",
    "save_variant", "load_variant", "write_manifest", "read_manifest", "verify_portfolio",
    "sort_variants", "variant_state", "release_state", "assign_state", "pack_state", "unpack_state",
    "atomic_write_bytes", "pareto_front",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VARIANT_SUFFIX = ".pt2.zst"
ZSTD_LEVEL = 3  # decompression speed is nearly level-independent; higher levels mostly cost build time

_VARIANT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "level": (int,), "sparsity": (int, float), "params": (int,), "nonzero_params": (int,),
    "file": (str,), "bytes_raw": (int,), "bytes_compressed": (int,), "sha256": (str,), "macs": (int,),
    "latency_ms": (dict,), "accuracy": (int, float, type(None)), "sparse_accuracy": (int, float, type(None)),
    "max_abs_diff": (int, float, type(None)),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PortfolioError(ValueError):
    """A portfolio file is missing, corrupt, truncated, unsafe or malformed. The message names the file.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "broken.pt2.zst"
        >>> _ = path.write_bytes(b"not a variant")
        >>> load_variant(path)
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: .../broken.pt2.zst: corrupt or truncated zstd data (...)
        >>> issubclass(PortfolioError, ValueError)
        True
    """


# ----------------------------------------------------------------------------------------- writing

def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``.

    Missing parent directories are created. Readers see the old file or the new one, never a part.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "sub" / "blob.bin"
        >>> atomic_write_bytes(path, b"hello")
        >>> path.read_bytes(), [p.name for p in path.parent.iterdir()]   # no temp file left behind
        (b'hello', ['blob.bin'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_variant(module: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """Export ``module`` (put in eval mode) with a dynamic batch dimension (min 1).

    Use an example batch of 2 or more: export specialises sizes 0 and 1.
    """
    if example_input.dim() == 0:
        raise PortfolioError("example_input needs a batch dimension")
    if example_input.shape[0] < 2:
        example_input = example_input[:1].repeat(2, *([1] * (example_input.dim() - 1)))
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(module, (example_input,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reason
        raise PortfolioError(f"cannot export {type(module).__name__} with a dynamic batch dimension: {exc}") from exc


def save_variant(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Export ``module`` and write it zstd-compressed to ``path`` atomically.

    Returns ``{"file": path.name, "bytes_raw", "bytes_compressed", "sha256"}`` (sha256 of the
    compressed file as stored). The builder rewrites ``file`` relative to the portfolio directory.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant
        >>> p = Path(tempfile.mkdtemp()) / "tiny.pt2.zst"
        >>> sorted(save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), p))
        ['bytes_compressed', 'bytes_raw', 'file', 'sha256']
    """
    program = export_variant(module, example_input)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    raw = buf.getvalue()
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True).compress(raw)
    atomic_write_bytes(path, data)
    return {"file": Path(path).name, "bytes_raw": len(raw), "bytes_compressed": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------------------- loading

# The pt2 archive entries a plain exported nn.Module produces. Anything else (pickled tensor
# subclasses, torchbind/opaque objects, AOTInductor shared libraries, extra files) is refused.
_SAFE_ENTRY = re.compile(
    r"^[^/]+/(archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|data/sample_inputs/model\.pt)$"
)


def _check_archive_is_data_only(raw: bytes, name: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        names = archive.namelist()
        bad = [n for n in names if not n.endswith("/") and not _SAFE_ENTRY.match(n)]
        if bad:
            raise PortfolioError(f"{name}: refusing to load, unexpected archive entries {bad[:5]}")
        for n in names:
            if n.endswith(("model_weights_config.json", "model_constants_config.json")):
                config = json.loads(archive.read(n)).get("config", {})
                pickled = [k for k, meta in config.items() if meta.get("use_pickle", True)]
                if pickled:
                    raise PortfolioError(f"{name}: refusing to load, pickled entries {pickled[:5]}")
            elif n.endswith("sample_inputs/model.pt") and archive.getinfo(n).file_size:
                torch.load(io.BytesIO(archive.read(n)), weights_only=True)  # tensors and containers only
    except PortfolioError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt zip, bad json, non-tensor sample inputs
        raise PortfolioError(f"{name}: not a valid variant archive ({exc})") from exc


def load_variant(path: str | os.PathLike[str], sha256: str | None = None) -> nn.Module:
    """Load a variant written by :func:`save_variant` as an ``nn.Module`` in eval mode.

    It needs no user class: the module is a ``torch.fx.GraphModule`` rebuilt from the exported graph.
    It accepts any batch size >= 1 and checks the other input dimensions. When ``sha256`` is given,
    the file's digest must match. Every failure is a :class:`PortfolioError` naming the file.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from dnnshifter_lightning.portfolio import save_variant, load_variant
        >>> p = Path(tempfile.mkdtemp()) / "tiny.pt2.zst"
        >>> _ = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), p)
        >>> load_variant(p)(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PortfolioError(f"{path}: cannot read variant file ({exc})") from exc
    return load_variant_bytes(data, name=str(path), sha256=sha256)


def load_variant_bytes(data: bytes, *, name: str = "<bytes>", sha256: str | None = None) -> nn.Module:
    """:func:`load_variant` from the compressed bytes of a variant file; ``name`` is used in errors."""
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise PortfolioError(f"{name}: sha256 mismatch (expected {sha256}, file has {digest})")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise PortfolioError(f"{name}: corrupt or truncated zstd data ({exc})") from exc
    _check_archive_is_data_only(raw, name)
    try:
        module = torch.export.load(io.BytesIO(raw)).module()
    except Exception as exc:  # noqa: BLE001
        raise PortfolioError(f"{name}: cannot load exported program ({exc})") from exc
    return _lean_module(module).eval()


def _lean_module(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rebuild ExportedProgram.module() as a plain ``forward(x) -> Tensor`` GraphModule.

    The unlifted module flattens inputs and unflattens outputs with pytree on every call, which
    costs about 0.1 ms: a third of a batch-1 digits forward. With one tensor in and one tensor out
    that adds nothing, so we swap its codegen for the plain one. The input guards (``_guards_fn``:
    every non-batch dimension must match) stay. The rebuild also drops the train()/eval() overrides
    that raise on the unlifted module; the graph was exported in eval mode (BN and dropout frozen),
    so the mode flag changes nothing and callers may use ``.eval()`` freely.
    """
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    if len(placeholders) != 1 or not isinstance(outs, (tuple, list)) or len(outs) != 1:
        for method in ("train", "eval"):  # keep pytree handling; just allow .eval()
            module.__dict__.pop(method, None)
        return module
    output.args = (outs[0],)
    graph._codegen = torch.fx.graph.CodeGen()
    return torch.fx.GraphModule(module, graph, class_name="PortfolioVariant")


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


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(name)


def release_state(module: nn.Module) -> nn.Module:
    """Replace every parameter and buffer with a ``meta`` tensor of the same shape and dtype.

    The module becomes a skeleton that holds no weight memory; :func:`assign_state` refills it.

    Example::

        >>> from torch import nn
        >>> layer = release_state(nn.Linear(3, 2))
        >>> layer.weight.is_meta, tuple(layer.weight.shape)
        (True, (2, 3))
    """
    for name, t in variant_state(module).items():
        _set_tensor(module, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
    return module


def assign_state(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Point ``module``'s parameters and buffers at ``tensors`` (no copy).

    The names, shapes and dtypes must match the skeleton's exactly; otherwise ``ValueError`` and
    the module is left unchanged.

    Example::

        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> weights = {name: t.clone() for name, t in variant_state(layer).items()}
        >>> skeleton = release_state(layer)
        >>> assign_state(skeleton, weights)(torch.zeros(1, 3)).shape
        torch.Size([1, 2])
        >>> skeleton.weight.data_ptr() == weights["weight"].data_ptr()    # no copy
        True
        >>> assign_state(skeleton, {"weight": weights["weight"]})
        Traceback (most recent call last):
            ...
        ValueError: state does not match the skeleton: missing ['bias'], unexpected []
    """
    current = variant_state(module)
    if set(current) != set(tensors):
        missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        raise ValueError(f"state does not match the skeleton: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in current.items():
        new = tensors[name]
        if new.shape != t.shape or new.dtype != t.dtype:
            raise ValueError(f"{name}: expected {tuple(t.shape)} {t.dtype}, got {tuple(new.shape)} {new.dtype}")
    for name, new in tensors.items():
        _set_tensor(module, name, new)
    return module


def pack_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize weights to bytes that :func:`unpack_state` reads back with ``weights_only=True``.

    Example::

        >>> import torch
        >>> data = pack_state({"w": torch.ones(2, 2), "b": torch.zeros(2)})
        >>> isinstance(data, bytes), sorted(unpack_state(data))
        (True, ['b', 'w'])
    """
    buf = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def unpack_state(data: bytes) -> dict[str, torch.Tensor]:
    """Read :func:`pack_state` bytes; the restricted unpickler admits tensors and containers only.

    Example::

        >>> import io, torch
        >>> unpack_state(pack_state({"w": torch.ones(2, 2)}))["w"].sum().item()
        4.0
        >>> buf = io.BytesIO()
        >>> torch.save({"w": [1, 2]}, buf)                # a dict, but not of tensors
        >>> unpack_state(buf.getvalue())
        Traceback (most recent call last):
            ...
        ValueError: packed state is not a dict of tensors
    """
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("packed state is not a dict of tensors")
    return state


# ---------------------------------------------------------------------------------------- manifest

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


def _b8_latency(v: Mapping[str, Any]) -> float | None:
    lat = (v.get("latency_ms") or {}).get("8")
    return float(lat) if isinstance(lat, (int, float)) and not isinstance(lat, bool) else None


def pareto_front(variants: Sequence[Mapping[str, Any]], keep: Sequence[str] = ()) -> list[str]:
    """Ids of the variants on the accuracy/latency front, in the given order (most to least accurate).

    A variant is dominated when another one is at least as accurate and at most as slow at batch 8
    (``latency_ms["8"]``, measured when the portfolio was built), and strictly better in one of the
    two. A dominated variant buys no speed for the accuracy it loses, so it is never worth serving:
    the archive, the handler and the policy serve the front by default, and the plot and
    ``dnnshifter portfolio show`` mark it. Variants without a measured accuracy or batch-8 latency are
    all kept (nothing says they are dominated), as are the ids in ``keep``.

    Example::

        >>> pareto_front([{"id": "a", "accuracy": 0.99, "latency_ms": {"8": 10.0}},
        ...               {"id": "b", "accuracy": 0.98, "latency_ms": {"8": 12.0}},
        ...               {"id": "c", "accuracy": 0.95, "latency_ms": {"8": 4.0}}])
        ['a', 'c']
    """
    def measured(v: Mapping[str, Any]) -> bool:
        return v.get("accuracy") is not None and _b8_latency(v) is not None

    def dominated(v: Mapping[str, Any]) -> bool:
        if not measured(v):
            return False
        acc, lat = v["accuracy"], _b8_latency(v)
        for o in variants:
            if o is v or not measured(o):
                continue
            o_acc, o_lat = o["accuracy"], _b8_latency(o)
            if o_acc >= acc and o_lat <= lat and (o_acc > acc or o_lat < lat):
                return True
        return False

    return [v["id"] for v in variants if v["id"] in keep or not dominated(v)]


def _fail(directory: Path, why: str) -> PortfolioError:
    return PortfolioError(f"{directory / MANIFEST_NAME}: {why}")


def validate_manifest(manifest: Any, directory: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """Check the manifest schema; returns it unchanged or raises :class:`PortfolioError` saying what is wrong."""
    d = Path(directory)
    if not isinstance(manifest, dict):
        raise _fail(d, "manifest must be a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(d, f"format_version must be {FORMAT_VERSION}, got {manifest.get('format_version')!r}")
    spec = manifest.get("input_spec")
    if not isinstance(spec, dict):
        raise _fail(d, "input_spec must be an object")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise _fail(d, f"input_spec.shape must be a list of positive ints (no batch dim), got {shape!r}")
    if not isinstance(spec.get("dtype"), str):
        raise _fail(d, "input_spec.dtype must be a string such as 'float32'")
    for opt in ("mean", "std", "class_names"):
        if opt in spec and spec[opt] is not None and not isinstance(spec[opt], list):
            raise _fail(d, f"input_spec.{opt} must be a list")
    variants = manifest.get("variants")
    if not isinstance(variants, list) or not variants:
        raise _fail(d, "variants must be a non-empty list")
    seen: set[str] = set()
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            raise _fail(d, f"{where} must be an object")
        for field, types in _VARIANT_FIELDS.items():
            if field not in v:
                raise _fail(d, f"{where} ({v.get('id', '?')}) is missing field {field!r}")
            if not isinstance(v[field], types) or isinstance(v[field], bool):
                raise _fail(d, f"{where}.{field} has type {type(v[field]).__name__}")
        where = f"variant {v['id']!r}"
        if v["id"] in seen:
            raise _fail(d, f"duplicate {where}")
        seen.add(v["id"])
        f = v["file"]
        if Path(f).is_absolute() or ".." in Path(f).parts or "\\" in f:
            raise _fail(d, f"{where}: file must be a relative path inside the portfolio, got {f!r}")
        if not _SHA256.match(v["sha256"]):
            raise _fail(d, f"{where}: sha256 must be 64 lowercase hex digits")
        lat = v["latency_ms"]
        if not all(k in lat and isinstance(lat[k], (int, float)) for k in ("1", "8")):
            raise _fail(d, f"{where}: latency_ms needs numbers for batch '1' and '8'")
    accs = [v["accuracy"] for v in variants if v["accuracy"] is not None]
    if any(a < b - 1e-12 for a, b in zip(accs, accs[1:])):
        raise _fail(d, "variants must be ordered from most to least accurate")
    return manifest


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Validate and atomically write ``directory/manifest.json``; returns its path.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "variants" / "v0.pt2.zst")
        >>> variant = {"id": "v0", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8, "macs": 6,
        ...            "latency_ms": {"1": 0.01, "8": 0.02}, "accuracy": None, "sparse_accuracy": None,
        ...            "max_abs_diff": None, **info, "file": "variants/v0.pt2.zst"}
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
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
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
    try:
        text = (d / MANIFEST_NAME).read_text()
    except OSError as exc:
        raise _fail(d, f"cannot read ({exc.strerror or exc})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(d, f"not valid JSON ({exc})") from exc
    return validate_manifest(manifest, d)


def verify_portfolio(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest and check the sha256 of every variant file. Returns the manifest.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> info = save_variant(torch.nn.Linear(3, 2), torch.zeros(2, 3), d / "v0.pt2.zst")
        >>> _ = write_manifest(d, {"format_version": 1, "input_spec": {"shape": [3], "dtype": "float32"},
        ...     "variants": [{"id": "v0", "level": 0, "sparsity": 0.0, "params": 8, "nonzero_params": 8,
        ...                   "macs": 6, "latency_ms": {"1": 0.01, "8": 0.02}, "accuracy": None,
        ...                   "sparse_accuracy": None, "max_abs_diff": None, **info}]})
        >>> verify_portfolio(d)["variants"][0]["file"]
        'v0.pt2.zst'
        >>> _ = (d / "v0.pt2.zst").write_bytes(b"tampered")
        >>> verify_portfolio(d)
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.portfolio.PortfolioError: .../v0.pt2.zst: sha256 mismatch for variant 'v0' ...
    """
    d = Path(directory)
    manifest = read_manifest(d)
    for v in manifest["variants"]:
        path = d / v["file"]
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise PortfolioError(f"{path}: cannot read variant {v['id']!r} ({exc.strerror or exc})") from exc
        if h.hexdigest() != v["sha256"]:
            raise PortfolioError(f"{path}: sha256 mismatch for variant {v['id']!r} "
                                 f"(manifest {v['sha256']}, file {h.hexdigest()})")
    return manifest
