"""PortfolioRuntime: every variant of a portfolio at hand, one inflated, switched in milliseconds.

At start the runtime verifies the sha256 of every file, loads each variant once, and splits it into
a *skeleton* (the variant's graph interpreter with ``meta`` tensors: no weight memory) and its weights,
packed into one flat, aligned byte buffer that is kept zstd-compressed in memory, in frames of 1 MiB.
A switch then costs what the paper's floor is, decompressing that variant's weight bytes: straight
into a fresh buffer, frames in parallel, whose slices become the skeleton's parameters as views. No
graph is parsed on a switch.

Safety:

* a request grabs the active variant under a lock and finishes on it; the switch swaps the
  reference only after the new variant is fully inflated, and an old variant's weights are released
  only when its last request is done;
* a failed inflate (e.g. a corrupt in-memory blob; every zstd frame carries a checksum) leaves the
  previous variant active, logs why, records it in ``switch_log`` and raises :class:`SwitchError`;
* a corrupt or tampered portfolio is refused at start with a :class:`PortfolioError` naming the file.

Memory: compressed blobs + the active variant + an optional LRU cache of recently used inflated
variants, kept under ``memory_budget_mb`` (the budget bounds the total), + at most one variant
inflated for pins (the *pin slot*). See :meth:`resident_bytes`.

Pins: :meth:`infer` with a ``variant_id`` that is not inflated inflates it, outside the switch
lock, at most once per ``pin_inflate_interval_s`` over all variants. The variant then stays in the
pin slot (or the LRU cache, if it fits the budget) until another pin inflate replaces it, so
repeated pins to it cost nothing. A pin that would need a second inflate within the interval raises
:class:`PinThrottled` (the TorchServe handler answers 429 with ``Retry-After``), so no client can
make the server inflate per batch.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dnnshifter_lightning.demo.models import DigitsCNN
    >>> from dnnshifter_lightning.portfolio import save_variant, write_manifest
    >>> from dnnshifter_lightning.serve.runtime import PortfolioRuntime
    >>> d = Path(tempfile.mkdtemp())
    >>> variants = []
    >>> for i, width in enumerate((16, 8)):
    ...     info = save_variant(DigitsCNN(width=width).eval(), torch.zeros(2, 1, 8, 8), d / f"w{width}.safetensors.zst")
    ...     variants.append({"id": f"w{width}", "level": i, "sparsity": 0.0, "params": 0, "nonzero_params": 0,
    ...         "macs": 0, "latency_ms": {"1": 1.0, "8": 2.0}, "accuracy": None, "sparse_accuracy": None,
    ...         "max_abs_diff": None, **info})
    >>> _ = write_manifest(d, {"format_version": 2, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
    ...                        "variants": variants})
    >>> rt = PortfolioRuntime(d, profile_batch_sizes=None)
    >>> rt.active_id, rt(torch.zeros(3, 1, 8, 8)).shape
    ('w16', torch.Size([3, 10]))
    >>> rt.switch_to("w8").to_id
    'w8'
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import statistics
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import zstandard
from torch import nn

from dnnshifter_lightning._timing import forward_seconds
from dnnshifter_lightning.portfolio import (
    PortfolioError, load_variant, random_batch, variant_state, verify_portfolio,
)

__all__ = ["PortfolioRuntime", "SwitchRecord", "VariantMemory", "SwitchError", "PinThrottled", "PortfolioError",
           "profiles_from_manifest"]

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def profiles_from_manifest(manifest: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Latency profiles (seconds) from a portfolio manifest's ``latency_ms`` (measured at build time)."""
    return {v["id"]: {int(b): float(ms) / 1000.0 for b, ms in v["latency_ms"].items()} for v in manifest["variants"]}


def _sync_for(batch: torch.Tensor) -> Callable[[], None] | None:
    """On CUDA, wait for the kernels (they run asynchronously) so that each timed call is complete."""
    if batch.device.type == "cuda":
        return lambda: torch.cuda.synchronize(batch.device)
    return None


_ALIGN = 64  # byte alignment of every tensor in the flat buffer (dtype views need it; SIMD likes it)


class SwitchError(RuntimeError):
    """A switch failed; the previous variant is still active."""


class PinThrottled(RuntimeError):
    """A pinned variant is not inflated and this interval's pin inflate is already spent.

    ``retry_after_s`` says when the next pin inflate is allowed. Nothing was inflated.
    """

    def __init__(self, variant_id: str, retry_after_s: float, interval_s: float) -> None:
        super().__init__(f"variant {variant_id!r} is not inflated and pins may inflate one variant per "
                         f"{interval_s:g} s; retry in {retry_after_s:.2f} s or send the request without a pin")
        self.variant_id = variant_id
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class SwitchRecord:
    """One entry of :attr:`PortfolioRuntime.switch_log`."""

    from_id: str
    to_id: str
    time: float  #: wall clock (``time.time()``) when the switch finished
    seconds: float  #: how long the switch took (inflate + swap)
    reason: str
    ok: bool = True
    error: str | None = None
    cached: bool = False  #: the target was already inflated (cache hit)


@dataclasses.dataclass(frozen=True)
class VariantMemory:
    """What :meth:`PortfolioRuntime.variant_memory` reports for one served variant (a snapshot)."""

    compressed_bytes: int  #: the zstd-compressed weights, always held
    inflated_bytes: int  #: the flat weight buffer while inflated (tensors aligned to 64 bytes)
    frames: tuple[int, ...]  #: compressed size of each independently decoded frame
    inflated: bool  #: weights are live now (active, cached, pinned or finishing a request)


@dataclasses.dataclass(frozen=True)
class _Spec:
    owner: nn.Module
    attr: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


#: Raw bytes per independently compressed frame: frames inflate in parallel, each into its own
#: slice of the variant's buffer (zstd and zlib release the GIL while they work).
FRAME_BYTES = 1 << 20


def _default_inflate_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class _Codec:
    """zstd (default) or zlib/DEFLATE (the paper's choice, kept for comparison), in frames of
    :data:`FRAME_BYTES` raw bytes that inflate on ``threads`` threads."""

    def __init__(self, name: str, level: int | None, threads: int | None = None) -> None:
        if name not in ("zstd", "zlib"):
            raise ValueError(f"codec must be 'zstd' or 'zlib', got {name!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"inflate_threads must be >= 1 or None, got {threads!r}")
        self.name = name
        self.level = level if level is not None else (3 if name == "zstd" else 6)
        self.threads = threads or _default_inflate_threads()
        self._pool: ThreadPoolExecutor | None = None

    def _compress_frame(self, data: memoryview) -> bytes:
        if self.name == "zlib":
            return zlib.compress(data, self.level)
        return zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True).compress(data)

    def compress(self, data: memoryview) -> tuple[bytes, list[int]]:
        """The compressed frames, concatenated, and the size of each."""
        frames = [self._compress_frame(data[i:i + FRAME_BYTES]) for i in range(0, len(data), FRAME_BYTES)]
        frames = frames or [self._compress_frame(data)]
        return b"".join(frames), [len(f) for f in frames]

    def _inflate_frame(self, src: memoryview, dst: memoryview) -> None:
        size = len(dst)
        if self.name == "zlib":
            data = zlib.decompress(src, bufsize=max(size, 1))
            if len(data) != size:
                raise ValueError(f"inflated {len(data)} bytes, expected {size}")
            dst[:] = data
            return
        filled = 0
        with zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=False) as reader:
            while filled < size:
                n = reader.readinto(dst[filled:])
                if n == 0:
                    break
                filled += n
            if filled != size or reader.read(1):
                raise ValueError(f"inflated {filled}+ bytes, expected exactly {size}")

    def decompress_into(self, blob: bytes, frame_sizes: Sequence[int], out: torch.Tensor) -> None:
        """Inflates every frame into its slice of ``out``; raises if any frame is corrupt."""
        if sum(frame_sizes) != len(blob):
            raise ValueError(f"compressed weights are {len(blob)} bytes, their frames add up to {sum(frame_sizes)}")
        view, src = memoryview(out.numpy()), memoryview(blob)
        jobs, pos = [], 0
        for i, n in enumerate(frame_sizes):
            jobs.append((src[pos:pos + n], view[i * FRAME_BYTES:min(len(view), (i + 1) * FRAME_BYTES)]))
            pos += n
        if len(jobs) == 1 or self.threads == 1:
            for s, d in jobs:
                self._inflate_frame(s, d)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dnnshifter-inflate")
        futures = [self._pool.submit(self._inflate_frame, s, d) for s, d in jobs]
        wait(futures)  # every frame is done with ``out`` before this returns or raises
        for f in futures:
            f.result()


class _Variant:
    """One portfolio entry: its skeleton, weight layout, compressed weights and inflate state."""

    def __init__(self, info: dict[str, Any], module: nn.Module, codec: _Codec) -> None:
        self.id: str = info["id"]
        self.info = info
        self.module = module
        specs, offset = [], 0
        state = variant_state(module)
        for name, tensor in state.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            nbytes = tensor.numel() * tensor.element_size()
            specs.append(_Spec(owner, attr, attr in owner._parameters, tuple(tensor.shape), tensor.dtype, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.specs = specs
        self.nbytes = offset
        flat = torch.zeros(max(offset, 1), dtype=torch.uint8)[:offset]
        for spec, tensor in zip(specs, state.values()):
            t = tensor.detach().contiguous().reshape(-1)
            if t.is_floating_point():
                t = t + 0.0  # -0.0 -> +0.0 (equal values; compresses and inflates far better), see structured.py
            flat[spec.offset:spec.offset + spec.nbytes].copy_(t.view(torch.uint8))
        self.blob, self.frame_sizes = codec.compress(memoryview(flat.numpy()))
        self.buffer: torch.Tensor | None = flat  # weights are live while a buffer is held
        self._assign(flat)
        self.users = 0
        self.release_pending = False
        self.inflate_lock = threading.Lock()  # a switch and a pin never inflate the same variant twice

    @property
    def live(self) -> bool:
        return self.buffer is not None

    def _assign(self, flat: torch.Tensor) -> None:
        for s in self.specs:
            tensor = flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
            if s.is_param:
                s.owner._parameters[s.attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                s.owner._buffers[s.attr] = tensor

    def inflate(self, codec: _Codec, device: torch.device = _CPU) -> None:
        """Inflate the weights on the host, then (for another device) copy them there in one transfer."""
        flat = torch.empty(max(self.nbytes, 1), dtype=torch.uint8)[:self.nbytes]
        codec.decompress_into(self.blob, self.frame_sizes, flat)
        if device.type != "cpu":
            flat = flat.to(device)
        self._assign(flat)
        self.buffer = flat

    def to_device_(self, device: torch.device) -> None:
        """Move live weights to ``device`` (the variant active at start, built on the host)."""
        if self.buffer is not None and self.buffer.device != device:
            flat = self.buffer.to(device)
            self._assign(flat)
            self.buffer = flat

    def release(self) -> None:
        for s in self.specs:
            meta = torch.empty(s.shape, dtype=s.dtype, device="meta")
            if s.is_param:
                s.owner._parameters[s.attr] = nn.Parameter(meta, requires_grad=False)
            else:
                s.owner._buffers[s.attr] = meta
        self.buffer = None
        self.release_pending = False


class PortfolioRuntime:
    """Serve a portfolio: one active variant inflated, the others zstd-compressed in memory.

    Args:
        path: portfolio directory (``manifest.json`` + variant files).
        memory_budget_mb: cap on :meth:`resident_bytes`; variants used recently stay inflated in an
            LRU cache while the total fits. ``None`` (default): no cache, only the active variant.
        initial: the variant active at start (default: the most accurate).
        profile_batch_sizes: batch sizes to time every variant at on this machine at start
            (:meth:`measure_profiles`); ``None`` uses the manifest's build-time ``latency_ms``.
        codec: ``"zstd"`` (default) or ``"zlib"`` (DEFLATE, for comparison with the paper).
        compression_level: codec level (zstd 3, zlib 6 by default).
        inflate_threads: threads that inflate a variant's frames in parallel on a switch (default:
            the number of cores, at most 4).
        pin_inflate_interval_s: at most one inflate per this many seconds for pins to variants
            that are not inflated (see the module docstring); ``0`` removes the limit.
        variants: the served set: only these ids are loaded and held (default: every variant;
            see :func:`~dnnshifter_lightning.serve.served.resolve_served_set`). Others stay in the
            manifest; using one raises ``ValueError``.
        device: where inflated variants live and compute (``"cpu"``, the default, or e.g.
            ``"cuda:0"``). Compressed weights always stay in host memory; a switch inflates on the
            host and copies the weights to the device in one transfer. :meth:`infer` moves each
            batch to the device and returns the logits on the batch's own device.
        clock: the monotonic clock (seconds) the pin-inflate budget is measured on; tests inject one.

    Thread-safe: requests may run concurrently with each other and with :meth:`switch_to`.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from dnnshifter_lightning.portfolio import save_variant, write_manifest
        >>> d = Path(tempfile.mkdtemp())
        >>> variants = []
        >>> for vid, hidden in (("big", 32), ("small", 4)):
        ...     net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        ...     info = save_variant(net, torch.zeros(2, 4), d / f"{vid}.safetensors.zst")
        ...     variants.append({"id": vid, "level": len(variants), "sparsity": 0.0, "params": 0,
        ...                      "nonzero_params": 0, "macs": 0, "latency_ms": {"1": 1.0, "8": 2.0},
        ...                      "accuracy": None, "sparse_accuracy": None, "max_abs_diff": None, **info})
        >>> _ = write_manifest(d, {"format_version": 2, "input_spec": {"shape": [4], "dtype": "float32"},
        ...                        "variants": variants})
        >>> rt = PortfolioRuntime(d, memory_budget_mb=1, profile_batch_sizes=None)
        >>> rt.variant_ids, rt.active_id
        (['big', 'small'], 'big')
        >>> logits, served_by = rt.infer(torch.zeros(5, 4), variant_id="small")   # pinned for this call only
        >>> logits.shape, served_by, rt.active_id
        (torch.Size([5, 3]), 'small', 'big')
        >>> record = rt.switch_to("small", reason="burst")
        >>> record.from_id, record.to_id, record.ok, rt.active_id
        ('big', 'small', True, 'small')
        >>> rt.cached_ids()                              # 'big' stays inflated: it fits the 1 MB budget
        ['big']
        >>> sorted(rt.resident_breakdown()), rt.resident_bytes() <= 2**20
        (['active', 'cache', 'compressed', 'in_flight', 'pinned', 'total'], True)
    """

    def __init__(self, path: str | Path, *, memory_budget_mb: float | None = None, initial: str | None = None,
                 profile_batch_sizes: Sequence[int] | None = (1, 8), codec: str = "zstd",
                 compression_level: int | None = None, inflate_threads: int | None = None,
                 pin_inflate_interval_s: float = 1.0, variants: Sequence[str] | None = None,
                 device: str | torch.device = "cpu",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here; use device='cpu'")
        if not pin_inflate_interval_s >= 0:  # also refuses NaN
            raise ValueError(f"pin_inflate_interval_s must be >= 0, got {pin_inflate_interval_s!r}")
        self.pin_inflate_interval_s = float(pin_inflate_interval_s)
        self._codec = _Codec(codec, compression_level, inflate_threads)
        self.manifest: dict[str, Any] = verify_portfolio(self.path)  # sha256 of every file, names the bad one
        #: every variant of the portfolio, served or not, in the manifest's order
        self.portfolio_ids: list[str] = [v["id"] for v in self.manifest["variants"]]
        if variants is not None:
            unknown = [v for v in variants if v not in self.portfolio_ids]
            if unknown or not variants:
                raise ValueError(f"variants {list(variants)}: need at least one of this portfolio's "
                                 f"{self.portfolio_ids}" + (f"; unknown: {unknown}" if unknown else ""))
        #: the served variants (only these are loaded and held), in the manifest's order
        self.variant_ids: list[str] = [v for v in self.portfolio_ids if variants is None or v in variants]
        if initial is not None and initial not in self.variant_ids:
            raise ValueError(f"initial variant {initial!r} is not in this portfolio {self.variant_ids}")
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0 or None, got {memory_budget_mb!r}")
        self.memory_budget_bytes = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
        self._variants: dict[str, _Variant] = {}
        started = time.perf_counter()
        for info in self.manifest["variants"]:
            if info["id"] not in self.variant_ids:
                continue  # not served: never loaded, holds no memory
            module = load_variant(self.path / info["file"], sha256=info["sha256"], bytes_raw=info["bytes_raw"],
                                  root=self.path)  # data only: an interpreted graph, bounded (portfolio.py)
            variant = _Variant(info, module, self._codec)
            self._variants[variant.id] = variant
            if variant.id != (initial or self.variant_ids[0]):
                variant.release()
        self._lock = threading.Lock()  # guards the active pointer, users, live state and the cache
        self._switch_lock = threading.RLock()  # one inflate at a time
        self._active = self._variants[initial or self.variant_ids[0]]
        self._active.to_device_(self.device)
        self._cache: collections.OrderedDict[str, None] = collections.OrderedDict()  # inactive, inflated
        self._pin_lock = threading.Lock()  # one pin inflate at a time, and the pin budget
        self._pinned: str | None = None  # the pin slot: last variant inflated for a pin
        self._last_pin_inflate = -float("inf")
        self._clock = clock
        self.pin_inflates = 0  #: inflates done for pins (not switches) since start
        self.switch_log: collections.deque[SwitchRecord] = collections.deque(maxlen=10_000)
        logger.info("portfolio %s: %d variants loaded in %.2fs, %s active, %.2f MB resident",
                    self.path, len(self.variant_ids), time.perf_counter() - started, self._active.id,
                    self.resident_bytes() / 2**20)
        self.profiles: dict[str, dict[int, float]] = profiles_from_manifest(self.manifest)
        if profile_batch_sizes:
            self.measure_profiles(profile_batch_sizes)

    # ------------------------------------------------------------------------------- inference
    @property
    def active_id(self) -> str:
        return self._active.id

    @contextlib.contextmanager
    def _hold(self, variant_id: str | None, budgeted: bool = True) -> Iterator[_Variant]:
        """Hold a live variant for the duration of one request (inflating a pinned one if needed).

        ``budgeted`` (requests) applies the pin-inflate budget and keeps the variant in the pin
        slot; ``False`` (profiling at start) inflates it for this call only.
        """
        if variant_id is not None and variant_id != self._active.id:
            variant = self._get(variant_id)
            with self._lock:
                held = variant.live  # active, cached, pinned, or still finishing a request
                if held:
                    variant.users += 1
            if not held and budgeted:
                self._pin_inflate(variant)
            elif not held:
                with self._switch_lock, variant.inflate_lock:
                    if not variant.live:
                        variant.inflate(self._codec, self.device)
                    with self._lock:
                        variant.users += 1
                        kept = variant.id in self._cache or variant.id == self._pinned
                        if variant is not self._active and not kept:
                            variant.release_pending = not self._cache_admit(variant)
        else:
            with self._lock:
                variant = self._active
                variant.users += 1
        try:
            yield variant
        finally:
            with self._lock:
                variant.users -= 1
                if variant.users == 0 and variant.release_pending and variant is not self._active:
                    variant.release()

    def _pin_inflate(self, variant: _Variant) -> None:
        """Inflate ``variant`` for a pin if the budget allows, hold it and keep it in the pin slot."""
        with self._pin_lock, variant.inflate_lock:  # not the switch lock: switches never wait on a pin
            with self._lock:
                if variant.live:  # a switch or another pin inflated it meanwhile
                    variant.users += 1
                    return
            now = self._clock()
            wait_s = self._last_pin_inflate + self.pin_inflate_interval_s - now
            if wait_s > 0:
                raise PinThrottled(variant.id, wait_s, self.pin_inflate_interval_s)
            self._last_pin_inflate = now
            variant.inflate(self._codec, self.device)
            self.pin_inflates += 1
            with self._lock:
                variant.users += 1
                variant.release_pending = False
                if variant is self._active or self._cache_admit(variant):
                    return
                previous, self._pinned = self._pinned, variant.id
                if previous is not None and previous != variant.id:
                    self._drop_unless_used(self._variants[previous])
            logger.info("inflated %s for a pin (the pin slot)", variant.id)

    def _drop_unless_used(self, variant: _Variant) -> None:
        """Release an inactive, uncached variant now or after its last request (caller holds the lock)."""
        if variant is self._active or variant.id in self._cache or variant.id == self._pinned or not variant.live:
            return
        if variant.users:
            variant.release_pending = True
        else:
            variant.release()

    def variant_memory(self, variant_id: str) -> VariantMemory:
        """Compressed and inflated sizes of a served variant, and whether it is inflated now."""
        v = self._get(variant_id)
        with self._lock:
            return VariantMemory(len(v.blob), v.nbytes, tuple(v.frame_sizes), v.live)

    def variant_module(self, variant_id: str) -> nn.Module:
        """The served variant's module, to inspect (its weights are ``meta`` tensors while it is
        compressed); requests go through :meth:`infer`, which holds it inflated."""
        return self._get(variant_id).module

    def pinned_id(self) -> str | None:
        """The variant held in the pin slot (inflated for a pin, outside the LRU cache), if any."""
        with self._lock:
            return self._pinned

    def infer(self, batch: torch.Tensor, variant_id: str | None = None) -> tuple[torch.Tensor, str]:
        """Logits for ``batch`` and the id of the variant that computed them.

        ``variant_id`` pins a variant for this call (a request header, say) without changing the
        active one; by default the active variant serves it. A pin to a variant that is not
        inflated inflates it at most once per ``pin_inflate_interval_s``; beyond that budget it
        raises :class:`PinThrottled` and computes nothing.
        """
        with self._hold(variant_id) as variant, torch.inference_mode():
            return variant.module(batch.to(self.device)).to(batch.device), variant.id

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for ``batch`` from the active variant."""
        return self.infer(batch)[0]

    # -------------------------------------------------------------------------------- switching
    def _get(self, variant_id: str) -> _Variant:
        try:
            return self._variants[variant_id]
        except KeyError:
            if variant_id in self.portfolio_ids:
                raise ValueError(f"variant {variant_id!r} is in the portfolio but not served (not loaded); "
                                 f"served: {self.variant_ids}") from None
            raise ValueError(f"unknown variant {variant_id!r}; this portfolio has {self.portfolio_ids}") from None

    def switch_to(self, variant_id: str, reason: str = "manual") -> SwitchRecord | None:
        """Make ``variant_id`` active. Returns the log record (``None`` if it already is active).

        Requests in flight finish on their variant. If inflating fails, the previous variant stays
        active, the failure is logged and recorded, and :class:`SwitchError` is raised.
        """
        target = self._get(variant_id)
        with self._switch_lock:
            source = self._active
            if target is source:
                return None
            started = time.perf_counter()
            with target.inflate_lock:  # a pin inflating the same variant finishes first
                with self._lock:
                    cached = target.live
                    if cached:
                        target.release_pending = False
                if not cached:
                    try:
                        target.inflate(self._codec, self.device)
                    except Exception as exc:  # noqa: BLE001 - any inflate failure keeps the old variant
                        seconds = time.perf_counter() - started
                        with contextlib.suppress(Exception):
                            target.release()
                        record = SwitchRecord(source.id, target.id, time.time(), seconds, reason, ok=False,
                                              error=f"{type(exc).__name__}: {exc}")
                        self.switch_log.append(record)
                        logger.error("switch %s -> %s failed (%s); %s stays active", source.id, target.id,
                                     record.error, source.id)
                        raise SwitchError(f"cannot inflate variant {target.id!r}: {record.error}; "
                                          f"{source.id!r} stays active") from exc
            with self._lock:
                self._active = target
                self._cache.pop(target.id, None)
                if self._pinned == target.id:
                    self._pinned = None
                if not self._cache_admit(source):
                    if source.users:
                        source.release_pending = True
                    else:
                        source.release()
                self._evict()
            seconds = time.perf_counter() - started
            record = SwitchRecord(source.id, target.id, time.time(), seconds, reason, cached=cached)
            self.switch_log.append(record)
            logger.info("switched %s -> %s in %.2f ms (%s%s)", source.id, target.id, seconds * 1e3, reason,
                        ", cached" if cached else "")
            return record

    def _cache_admit(self, variant: _Variant) -> bool:
        """Keep ``variant`` inflated in the LRU cache if the budget allows (caller holds the lock)."""
        if self.memory_budget_bytes is None:
            return False
        self._cache[variant.id] = None
        self._cache.move_to_end(variant.id)
        self._evict()
        return variant.id in self._cache

    def _evict(self) -> None:
        if self.memory_budget_bytes is None:
            return
        while self._cache and self._total_bytes() > self.memory_budget_bytes:
            oldest = self._variants[self._cache.popitem(last=False)[0]]
            if oldest.users:
                oldest.release_pending = True
            else:
                oldest.release()

    # ----------------------------------------------------------------------------------- memory
    def resident_breakdown(self) -> dict[str, int]:
        """Bytes held for model weights: ``compressed`` (all blobs), ``active``, ``cache`` (inactive
        but inflated), ``pinned`` (the pin slot), ``in_flight`` (released variants still finishing a
        request), ``total``."""
        with self._lock:
            return self._breakdown()

    def _breakdown(self) -> dict[str, int]:
        out = {"compressed": sum(len(v.blob) for v in self._variants.values()),
               "active": self._active.nbytes, "cache": 0, "pinned": 0, "in_flight": 0}
        for v in self._variants.values():
            if v.live and v is not self._active:
                kind = "cache" if v.id in self._cache else "pinned" if v.id == self._pinned else "in_flight"
                out[kind] += v.nbytes
        out["total"] = sum(out.values())
        return out

    def _total_bytes(self) -> int:
        return self._breakdown()["total"]

    def all_inflated_bytes(self) -> int:
        """Bytes the served variants' weights would take if every one were kept inflated (the
        baseline :meth:`resident_bytes` is compared against)."""
        return sum(v.nbytes for v in self._variants.values())

    def resident_bytes(self) -> int:
        """Total bytes held for model weights (see :meth:`resident_breakdown`)."""
        return self.resident_breakdown()["total"]

    def cached_ids(self) -> list[str]:
        """Inactive variants kept inflated, least recently used first."""
        with self._lock:
            return list(self._cache)

    # -------------------------------------------------------------------------------- profiling
    def example_batch(self, batch_size: int) -> torch.Tensor:
        """A random batch shaped by the manifest's ``input_spec``."""
        return random_batch(self.manifest["input_spec"], batch_size, device=self.device)

    def measure_profiles(self, batch_sizes: Sequence[int] = (1, 8), warmup: int = 3,
                         repeats: int = 10) -> dict[str, dict[int, float]]:
        """Median seconds per batch of every variant at each batch size, on this machine.

        Inactive variants are inflated one at a time for the measurement and released after it.
        Stored in :attr:`profiles` (the policy's input) and returned.
        """
        started = time.perf_counter()
        profiles: dict[str, dict[int, float]] = {}
        for vid in self.variant_ids:
            with self._hold(vid, budgeted=False) as variant:  # forward_seconds runs under inference_mode
                profiles[vid] = {}
                for b in batch_sizes:
                    batch = self.example_batch(int(b))
                    times = forward_seconds(variant.module, batch, warmup, repeats, sync=_sync_for(batch))
                    profiles[vid][int(b)] = statistics.median(times)
        self.profiles = profiles
        logger.info("measured latency profiles of %d variants in %.2fs", len(profiles), time.perf_counter() - started)
        return profiles

    def __repr__(self) -> str:
        return (f"PortfolioRuntime({str(self.path)!r}, variants={self.variant_ids}, active={self.active_id!r}, "
                f"resident={self.resident_bytes() / 2**20:.2f} MB)")
