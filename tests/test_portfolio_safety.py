"""A portfolio is data: crafted hostile and malformed files give a PortfolioError naming the file,
in bounded time and memory, and nothing in them runs as code. Plus the golden portfolio and a
hypothesis fuzz of the graph loader.

Loads of crafted files run under ``_no_code_paths``: pickle, torch.load, torch.export.load,
eval, exec, compile and sympy's sympify raise (and are recorded) if anything calls them.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import io
import json
import os
import pickle
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest
import safetensors.torch
import torch
import zstandard

from dnnshifter_lightning import graph as G
from dnnshifter_lightning import portfolio as pf
from dnnshifter_lightning.portfolio import FORMAT_VERSION, VARIANT_SUFFIX, PortfolioError
from dnnshifter_lightning.serve.runtime import PortfolioRuntime

try:
    import sympy  # noqa: E402 - to trap sympify
except ImportError:  # pragma: no cover
    sympy = None

GOLDEN = Path(__file__).parent / "data" / "golden_portfolio"


@functools.cache
def _warm_up() -> None:
    v = json.loads((GOLDEN / "manifest.json").read_text())["variants"][0]
    pf.load_variant(GOLDEN / v["file"])(torch.zeros(1, 1, 8, 8))


@contextlib.contextmanager
def _no_code_paths() -> Iterator[list[str]]:
    """Record-and-refuse every way a loader could run code from a file.

    One clean load first, untrapped: torch imports some modules lazily on the first meta-tensor op
    (and sympy/mpmath build methods with exec at import time); that is library import, not file content.
    """
    _warm_up()
    called: list[str] = []

    def trap(name: str, original: Any = None):
        def refuse(*args: Any, **kwargs: Any) -> Any:
            if original is not None and sys._getframe(1).f_code.co_filename.startswith("<frozen importlib"):
                return original(*args, **kwargs)  # Python importing a module (torch imports some lazily)
            called.append(name)
            raise AssertionError(f"{name} called while loading a portfolio")
        return refuse

    with pytest.MonkeyPatch.context() as m:
        for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                          (torch.export, "load"), (builtins, "eval"), (builtins, "exec"), (builtins, "compile")]:
            original = getattr(mod, attr) if mod is builtins else None
            m.setattr(mod, attr, trap(f"{mod.__name__}.{attr}", original))
        if sympy is not None:
            m.setattr(sympy, "sympify", trap("sympy.sympify"))
        yield called
    assert not called, called


# ------------------------------------------------------------------------------------- crafting

@pytest.fixture(scope="module")
def good() -> tuple[dict, dict[str, torch.Tensor]]:
    """A real variant's graph and tensors (the golden DigitsCNN width 2, no export needed), to mutate."""
    v = json.loads((GOLDEN / "manifest.json").read_text())["variants"][0]
    raw = zstandard.ZstdDecompressor().decompress((GOLDEN / v["file"]).read_bytes())
    n = int.from_bytes(raw[:8], "little")
    graph = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["graph"])
    return graph, safetensors.torch.load(raw)


def _raw(graph: Any, tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    metadata = {"format": pf.VARIANT_FORMAT, "format_version": str(FORMAT_VERSION),
                "graph": graph if isinstance(graph, str) else json.dumps(graph), **meta}
    return safetensors.torch.save(tensors, metadata=metadata)


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(raw))
    return path


def _load_raw(tmp_path: Path, raw: bytes, name: str = "bad") -> Any:
    path = _write(tmp_path / f"{name}{VARIANT_SUFFIX}", raw)
    with _no_code_paths():
        return pf.load_variant(path)


def _refused(tmp_path: Path, raw: bytes, match: str, name: str = "bad") -> None:
    path = tmp_path / f"{name}{VARIANT_SUFFIX}"
    _write(path, raw)
    with pytest.raises(PortfolioError, match=match) as err, _no_code_paths():
        pf.load_variant(path)
    assert str(path) in str(err.value)


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    return pickle.dumps(Evil())


def _manifest_dir(tmp_path: Path, info: dict, **changes: Any) -> Path:
    d = tmp_path / "portfolio"
    d.mkdir(exist_ok=True)
    v = {"id": "a", "level": 0, "sparsity": 0.0, "params": 1, "nonzero_params": 1, "macs": 1,
         "latency_ms": {"1": 1.0, "8": 2.0}, "accuracy": 0.9, "sparse_accuracy": None, "max_abs_diff": None,
         **info, **changes}
    (d / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                 "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
                                                 "variants": [v]}))
    return d


# --------------------------------------------------------------------- what used to run code

def test_pickle_bytes_never_unpickle(tmp_path: Path, good) -> None:
    graph, tensors = good
    marker = tmp_path / "pwned"
    payload = _evil_pickle(marker)
    _refused(tmp_path, payload, "safetensors header", "pickle")  # a pickle as the whole variant
    _refused(tmp_path, _raw(payload.decode("latin-1"), tensors), "graph.*not valid JSON", "graph_pickle")
    as_metadata = safetensors.torch.save(tensors, metadata={"format": pf.VARIANT_FORMAT, "format_version": str(FORMAT_VERSION),
                                                            "graph": json.dumps(graph), "pickle": payload.hex()})
    assert isinstance(_load_raw(tmp_path, as_metadata, "extra_metadata"), G.GraphVariant)  # just a string
    assert not marker.exists()


def test_old_torch_export_archive_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as z:  # the shape of a format-1 .pt2: a zip with a pickled weight
        z.writestr("archive/data/weights/weight_0", _evil_pickle(tmp_path / "pwned"))
    _refused(tmp_path, buf.getvalue(), "format-1 .*dnnshifter portfolio build", "old")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda g: g.update(guards_code="import os; os.mkdir('pwned')"), "unexpected keys.*guards_code"),
    (lambda g: g["nodes"][0].update(code="__import__('os').system('true')"), "unexpected keys.*code"),
    (lambda g: g["inputs"][0].update(shape=["s0", 1, 8, 8]), r"inputs\[0\].shape"),
    (lambda g: g["inputs"][0].update(shape=[{"expr_str": "__import__('os').getpid()"}, 1, 8, 8]), "shape"),
    (lambda g: g["nodes"][0]["args"].__setitem__(3, ["s0 * 2", 1]), "expected an int"),
    (lambda g: g["nodes"][0]["args"].__setitem__(3, "1"), "expected a list"),
    (lambda g: g["nodes"][0]["args"].__setitem__(4, [1.5, 1]), "expected an int"),
    (lambda g: g["nodes"][0]["args"].__setitem__(4, [True, 1]), "expected an int"),
    (lambda g: g["nodes"][0].update(op="builtins.eval"), "not in the allow-list"),
    (lambda g: g["nodes"][0].update(op="aten.empty.memory_format"), "not in the allow-list"),
    (lambda g: g["nodes"][0].update(op="torch.load"), "not in the allow-list"),
    (lambda g: g["nodes"][0].update(op="__class__"), "not in the allow-list"),
    (lambda g: g["nodes"][0].update(op=["aten.relu.default"]), "not in the allow-list"),
    (lambda g: g["nodes"][1]["args"].__setitem__(5, True), "training.*must be False"),
    (lambda g: g["nodes"][0]["args"].__setitem__(0, {"ref": 10_000}), "not to an earlier value"),
    (lambda g: g["nodes"][0]["args"].__setitem__(0, {"ref": -1}), "not to an earlier value"),
    (lambda g: g["nodes"][3]["args"].__setitem__(0, {"ref": 1 + len(g["tensors"]) + 3}), "not to an earlier value"),
    (lambda g: g["nodes"][0]["args"].__setitem__(0, {"ref": 0, "eval": "x"}), "expected a reference"),
    (lambda g: g["nodes"][0]["args"].extend([[1, 1], 1, 1]), "at most 7"),
    (lambda g: g["nodes"][0].update(kwargs={"memory_format": 1}), "unknown keyword"),
    (lambda g: g["nodes"][-1]["args"].__setitem__(2, 0.5), "expected a reference"),
    (lambda g: g["outputs"].__setitem__(0, {"ref": 1}), None),  # a weight as output: allowed data, not code
    (lambda g: g["tensors"][0].update(name="__class__"), "dotted name"),
    (lambda g: g["tensors"][0].update(name="training"), "clashes"),
    (lambda g: g["tensors"][0].update(kind="code"), "kind must be"),
    (lambda g: g.update(version=99), "version"),
    (lambda g: g.update(nodes=[]), "1..100000 nodes"),
])
def test_hostile_graphs_are_refused(tmp_path: Path, good, mutate, match) -> None:
    graph, tensors = good
    g = copy.deepcopy(graph)
    mutate(g)
    if g["tensors"][0]["name"] in ("__class__", "training"):
        tensors = {g["tensors"][0]["name"] if k == graph["tensors"][0]["name"] else k: v for k, v in tensors.items()}
    if match is None:
        assert isinstance(_load_raw(tmp_path, _raw(g, tensors)), G.GraphVariant)
        return
    _refused(tmp_path, _raw(g, tensors), match)


def test_graph_whose_shapes_disagree_is_refused_at_load(tmp_path: Path, good) -> None:
    graph, tensors = good
    name = "classifier.weight"
    _refused(tmp_path, _raw(graph, {**tensors, name: torch.zeros(10, 7)}), r"fails on a batch of 1")


def test_activation_bomb_is_refused_by_the_meta_dry_run(tmp_path: Path, good) -> None:
    graph, tensors = good
    g = copy.deepcopy(graph)
    first = 1 + len(g["tensors"])
    g["nodes"] = g["nodes"][:1]  # conv: (B, 2, 8, 8); then cat([x, x]) 40 times: 2**40 times larger
    for i in range(40):
        g["nodes"].append({"op": "aten.cat.default", "args": [[{"ref": first + i}, {"ref": first + i}], 1]})
    g["outputs"] = [{"ref": first + 40}]
    started = time.monotonic()
    _refused(tmp_path, _raw(g, tensors), "intermediate values exceed")
    assert time.monotonic() - started < 5


def test_tensor_table_must_match_the_graph(tmp_path: Path, good) -> None:
    graph, tensors = good
    extra = {**tensors, "smuggled": torch.zeros(3)}
    _refused(tmp_path, _raw(graph, extra), r"unlisted \['smuggled'\]")
    fewer = {k: v for k, v in tensors.items() if k != "classifier.bias"}
    _refused(tmp_path, _raw(graph, fewer), r"missing \['classifier.bias'\]")


def _patch_header(raw: bytes, edit) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["classifier.bias"].update(data_offsets=[0, 10**12]), "data_offsets"),
    (lambda h: h["classifier.bias"].update(shape=[11]), "shape and dtype need"),
    (lambda h: h["classifier.bias"].update(dtype="F8_E4M3"), "unknown dtype"),
    (lambda h: h["classifier.bias"].update(dtype="OBJECT"), "unknown dtype"),
    (lambda h: h["classifier.bias"].update(shape="10"), "shape must be"),
    (lambda h: h["classifier.bias"].update(shape=[-1]), "shape must be"),
    (lambda h: h["classifier.bias"].update(code="x"), "exactly dtype"),
    (lambda h: h.update({"copy": dict(h["classifier.bias"])}), "overlaps"),
    (lambda h: h.pop("__metadata__"), "no string __metadata__"),
    (lambda h: h["__metadata__"].update(format_version="1"), "not a format-2"),
])
def test_lying_safetensors_headers_are_refused(tmp_path: Path, good, edit, match) -> None:
    graph, tensors = good
    _refused(tmp_path, _patch_header(_raw(graph, tensors), edit), match)


def test_header_length_lies_are_refused(tmp_path: Path, good) -> None:
    raw = _raw(*good)
    _refused(tmp_path, (2**63).to_bytes(8, "little") + raw[8:], "header claims", "huge")
    _refused(tmp_path, (len(raw)).to_bytes(8, "little") + raw[8:], "header claims", "long")
    _refused(tmp_path, raw[:5], "too short", "short")


# ------------------------------------------------------------------------ resources, bad files

def _frame_claiming(size: int, payload: bytes = b"hello") -> bytes:
    """A valid zstd frame whose header claims ``size`` content bytes (one raw block of ``payload``)."""
    magic = (0xFD2FB528).to_bytes(4, "little")
    fhd = bytes([0xC0])  # 8-byte frame content size, not single-segment, no checksum, no dictionary
    window = bytes([0x58])  # 2**21-byte window
    block = ((len(payload) << 3) | 1).to_bytes(3, "little") + payload  # last block, raw
    return magic + fhd + window + size.to_bytes(8, "little") + block


def test_frame_claiming_a_terabyte_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / f"tib{VARIANT_SUFFIX}"
    path.write_bytes(_frame_claiming(1 << 40))
    with pytest.raises(PortfolioError, match=f"{path}.*claims 1099511627776 bytes"):
        pf.load_variant(path)


@pytest.mark.parametrize("declared", [True, False])
def test_decompression_bomb_stops_at_bytes_raw(tmp_path: Path, good, declared: bool) -> None:
    """16 KB that inflate to 512 MiB: refused from the frame header when it declares its size, and
    by stopping the stream at bytes_raw when it does not; memory stays bounded either way."""
    raw = _raw(*good)
    size = len(raw) + (512 << 20) if declared else -1
    cobj = zstandard.ZstdCompressor(level=3, write_content_size=declared).compressobj(size=size)
    parts = [cobj.compress(raw)]
    zeros = bytes(1 << 20)
    for _ in range(512):  # + 512 MiB of zeros: ~16 KB on disk
        parts.append(cobj.compress(zeros))
    parts.append(cobj.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 64 << 10
    path = tmp_path / f"bomb{VARIANT_SUFFIX}"
    path.write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(PortfolioError, match=f"{path}.*more than the manifest's bytes_raw of {len(raw)}"):
            pf.load_variant(path, bytes_raw=len(raw))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # not 512 MiB


def test_bytes_raw_must_match_exactly(tmp_path: Path, good) -> None:
    raw = _raw(*good)
    path = _write(tmp_path / f"v{VARIANT_SUFFIX}", raw)
    with pytest.raises(PortfolioError, match=f"inflates to {len(raw)} bytes, the manifest says"):
        pf.load_variant(path, bytes_raw=len(raw) + 1)
    assert isinstance(pf.load_variant(path, bytes_raw=len(raw)), G.GraphVariant)


@pytest.fixture(scope="module")
def saved_variant() -> tuple[Path, dict]:
    v = json.loads((GOLDEN / "manifest.json").read_text())["variants"][0]
    return GOLDEN / v["file"], {k: v[k] for k in ("bytes_raw", "bytes_compressed", "sha256")}


@pytest.fixture
def real_variant(tmp_path: Path, saved_variant) -> tuple[Path, dict]:
    path = tmp_path / "outside" / f"v{VARIANT_SUFFIX}"
    path.parent.mkdir()
    path.write_bytes(saved_variant[0].read_bytes())
    return path, saved_variant[1]


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "symlink_out", "symlink_in", "dir_symlink_out"])
def test_only_regular_files_inside_the_portfolio_are_read(tmp_path: Path, real_variant, kind: str) -> None:
    src, info = real_variant
    d = _manifest_dir(tmp_path, info, file=f"variants/a{VARIANT_SUFFIX}")
    (d / "variants").mkdir() if kind != "dir_symlink_out" else None
    target = d / "variants" / f"a{VARIANT_SUFFIX}"
    if kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink_out":
        target.symlink_to(src)
    elif kind == "symlink_in":
        (d / "variants" / "real").write_bytes(src.read_bytes())
        target.symlink_to(d / "variants" / "real")
    else:
        (d / "variants").symlink_to(src.parent)
        os.rename(src, src.parent / target.name)
    started = time.monotonic()
    with pytest.raises(PortfolioError, match=str(target)):
        pf.verify_portfolio(d)
    with pytest.raises(PortfolioError, match=str(target)):
        PortfolioRuntime(d, profile_batch_sizes=None)
    assert time.monotonic() - started < 10  # no hang on /dev/zero or a FIFO


def test_manifest_must_be_a_small_regular_file(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(PortfolioError, match="manifest.json.*outside the portfolio"):
        pf.read_manifest(d)
    (d / "manifest.json").unlink()
    (d / "real.json").write_text(json.dumps(_good_manifest()))
    (d / "manifest.json").symlink_to(d / "real.json")
    with pytest.raises(PortfolioError, match="manifest.json.*symbolic link"):
        pf.read_manifest(d)
    (d / "manifest.json").unlink()
    with open(d / "manifest.json", "wb") as f:
        f.truncate(pf.MAX_MANIFEST_BYTES + 1)  # sparse: costs nothing on disk
    with pytest.raises(PortfolioError, match="more than the cap"):
        pf.read_manifest(d)


def _write_manifest_text(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(text)
    return d


def _good_manifest() -> dict:
    return {"format_version": FORMAT_VERSION, "input_spec": {"shape": [1, 8, 8], "dtype": "float32"},
            "variants": [{"id": "a", "level": 0, "sparsity": 0.0, "params": 1, "nonzero_params": 1, "macs": 1,
                          "file": f"variants/a{VARIANT_SUFFIX}", "bytes_raw": 10, "bytes_compressed": 10,
                          "sha256": "a" * 64, "latency_ms": {"1": 1.0, "8": 2.0}, "accuracy": 0.9,
                          "sparse_accuracy": None, "max_abs_diff": None}]}


@pytest.mark.parametrize("text_edit, match", [
    (lambda t: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda t: '{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    (lambda t: t.replace('"accuracy": 0.9', '"accuracy": NaN'), "NaN is not allowed"),
    (lambda t: t.replace('"1": 1.0', '"1": Infinity'), "Infinity is not allowed"),
    (lambda t: t.replace('"1": 1.0', '"1": 1e999'), "not finite"),
    (lambda t: t.replace('"params": 1,', '"params": ' + "9" * 5000 + ","), "not valid JSON"),
    (lambda t: t.replace(f"variants/a{VARIANT_SUFFIX}", "variants/a\\u0000.zst"), "relative path inside"),
    (lambda t: t.replace('"float32"', '"complex64"'), "dtype must be one of"),
    (lambda t: t.replace('"float32"', '"float32", "mean": [0.5, 0.5], "std": [1, 1]'), "2 values; the input has 1"),
    (lambda t: t.replace('"float32"', '"float32", "std": [0]'), "std values must be > 0"),
    (lambda t: t.replace('"accuracy": 0.9', '"accuracy": 1.5'), "accuracy must be"),
    (lambda t: t.replace('"bytes_raw": 10', f'"bytes_raw": {2**50}'), "bytes_raw must be"),
    (lambda t: t.replace('"id": "a"', '"id": "a\\u0000b"'), "id must be"),
    (lambda t: t.replace('"sparsity": 0.0', '"sparsity": "0"'), "sparsity must be"),
    (lambda t: t.replace('"macs": 1', '"macs": true'), "macs must be"),
    (lambda t: b"\xff\xfe{}".decode("latin-1"), "not valid JSON"),
])
def test_malformed_manifests_are_portfolio_errors(tmp_path: Path, text_edit, match: str) -> None:
    d = _write_manifest_text(tmp_path, text_edit(json.dumps(_good_manifest())))
    with pytest.raises(PortfolioError, match=match) as err:
        pf.read_manifest(d)
    assert str(d / "manifest.json") in str(err.value)


def test_validate_manifest_refuses_non_finite_numbers_in_memory(tmp_path: Path) -> None:
    for path, value in [(("variants", 0, "accuracy"), float("nan")), (("variants", 0, "latency_ms", "8"), float("inf")),
                        (("variants", 0, "sparse", "latency_ms"), float("nan")), (("build", "x"), float("nan"))]:
        m = _good_manifest()
        m.setdefault("build", {})
        m["variants"][0]["sparse"] = {}
        obj = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
        with pytest.raises(PortfolioError, match="finite"):
            pf.write_manifest(tmp_path / "w", m)


# ------------------------------------------------------------------------------------- golden

def test_golden_portfolio_loads_and_computes_the_stored_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written once (tests/data/make_golden_portfolio.py, torch 2.14.1); must load on later torch releases."""
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from make_golden_portfolio import golden_input

    expected = json.loads((GOLDEN / "expected.json").read_text())["outputs"]
    x = golden_input()
    with _no_code_paths():
        rt = PortfolioRuntime(GOLDEN, profile_batch_sizes=None)
    assert rt.variant_ids == list(expected)
    for vid, want in expected.items():
        rt.switch_to(vid)
        for batch in (1, 5):
            got, served = rt.infer(x[:batch])
            assert served == vid
            torch.testing.assert_close(got, torch.tensor(want)[:batch], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- fuzz

def test_fuzzed_graphs_give_portfolio_error_or_an_allow_listed_module(good, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutated graphs never run anything outside the allow-list: each load is a PortfolioError or a
    module whose every step is an allow-listed operator and which runs on a real batch."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    graph, tensors = good
    allowed = {fn for fn, _, _ in G.OPS.values()}
    names = sorted(G.OPS) + ["builtins.eval", "os.system", "torch.load", "aten.empty.memory_format", "", "__import__"]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=False, allow_infinity=False),
                        st.sampled_from(["1", "s0", "__import__('os')", "none", "tanh"]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.fixed_dictionaries({"ref": st.integers(-2, 80)}),
                                                           st.dictionaries(st.sampled_from(["ref", "op", "x"]), inner, max_size=2)),
                          max_leaves=6)

    def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
        out = [prefix]
        if isinstance(obj, dict):
            for k, v in obj.items():
                out += paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                out += paths(v, prefix + (i,))
        return out

    all_paths = [p for p in paths(graph) if p]
    mutation = st.tuples(st.sampled_from(all_paths), st.one_of(values, st.sampled_from(names)), st.sampled_from(["set", "delete", "op", "tweak", "tweak"]))
    x = torch.randn(3, 1, 8, 8)
    outcomes: dict[str, int] = {"refused": 0, "loaded": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(mutations: list) -> None:
        g = copy.deepcopy(graph)
        for path, value, how in mutations:
            obj = g
            try:
                for key in path[:-1]:
                    obj = obj[key]
                if how == "op" and isinstance(obj, dict) and "op" in obj:
                    obj["op"] = value if isinstance(value, str) else str(value)
                elif how == "tweak":  # small edits that often still load: int +- 1, a flipped bool
                    old = obj[path[-1]]
                    if isinstance(old, bool):
                        obj[path[-1]] = not old
                    elif isinstance(old, int):
                        obj[path[-1]] = old + (1 if isinstance(value, int) and value % 2 else -1)
                elif how == "delete" and isinstance(obj, (dict, list)):
                    del obj[path[-1]]
                else:
                    obj[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue
        data = zstandard.ZstdCompressor().compress(_raw(g, tensors))
        with _no_code_paths():
            try:
                module = pf.load_variant_bytes(data, name="fuzz")
            except PortfolioError as exc:
                assert str(exc).startswith("fuzz")
                outcomes["refused"] += 1
                return
        outcomes["loaded"] += 1
        assert {step[0] for step in module._steps} <= allowed
        with torch.no_grad():
            try:
                module(x)
            except (RuntimeError, ValueError, IndexError, TypeError):
                pass  # a numeric refusal from an allow-listed op at a batch size the dry run did not try

    started = time.monotonic()
    run()
    assert time.monotonic() - started < 60
    print(outcomes)
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes  # the fuzz reaches both sides
