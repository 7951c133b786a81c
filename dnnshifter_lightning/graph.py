"""A data-only computation graph for portfolio variants, and the interpreter that runs it.

A variant's computation is stored as JSON: a list of nodes, each an operator *name* from a fixed
allow-list (:data:`OPS`: the ATen ops our variants use) with arguments that are numbers, booleans,
``None``, references to earlier values, or flat lists of those. The loader validates every field
against the operator's argument schema (written here by hand, not taken from torch), looks the
operator up in a dict, and never evaluates a string: no pickle, ``eval``, ``exec``, sympy or
torch.export loader runs on the load path. See ``docs/design-notes/portfolio.md``.

* :func:`graph_from_module` (save side) runs :func:`torch.export.export` with a dynamic batch
  dimension, converts the ATen graph to this JSON, and checks that the interpreted graph computes
  what the module computes.
* :func:`validate_graph` (load side) checks a parsed graph against the allow-list and the tensors
  the file holds; :class:`GraphVariant` is the ``nn.Module`` whose ``forward`` walks the nodes.
  :func:`build_variant` validates, builds the module on ``meta`` tensors, runs it once on a
  ``meta`` batch (shapes must agree; activations are bounded), then the caller assigns the weights.

Example::

    >>> import torch
    >>> from dnnshifter_lightning.demo.models import DigitsCNN
    >>> model = DigitsCNN(width=2).eval()
    >>> graph, tensors = graph_from_module(model, torch.zeros(2, 1, 8, 8))
    >>> [n["op"] for n in graph["nodes"]][:3]
    ['aten.conv2d.default', 'aten.batch_norm.default', 'aten.relu.default']
    >>> module = build_variant(graph, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    >>> _ = module.assign_tensors(tensors)
    >>> torch.equal(module(torch.ones(5, 1, 8, 8)), model(torch.ones(5, 1, 8, 8)))
    True
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "GRAPH_FORMAT", "GRAPH_VERSION", "OPS", "GraphError", "GraphVariant", "graph_from_module",
    "validate_graph", "build_variant", "DTYPES",
    "MAX_NODES", "MAX_TENSORS", "MAX_LIST", "MAX_NAME_CHARS", "MAX_ACTIVATION_BYTES",
]

GRAPH_FORMAT = "dnnshifter-graph"
GRAPH_VERSION = 1

#: Bounds on a graph a file may declare (far above any real variant: ResNet-50 has ~450 nodes).
MAX_NODES = 100_000
MAX_TENSORS = 100_000
MAX_LIST = 1024  #: elements of one list argument (cat's inputs, a view's sizes)
MAX_RANK = 8
MAX_NAME_CHARS = 256
MAX_INT = 2**40  #: |int| in any argument
#: Bytes of all intermediate values of one forward at batch 1, checked on meta tensors at load.
MAX_ACTIVATION_BYTES = 2**30

#: safetensors dtype codes <-> torch dtypes we store and load.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_INPUT_DTYPES: dict[str, torch.dtype] = {str(t).removeprefix("torch."): t for t in DTYPES.values()}


class GraphError(ValueError):
    """The graph is malformed, uses an operator outside the allow-list, or cannot be saved."""


_aten = torch.ops.aten

# Argument schemas, by hand: ``name:KIND`` in order; ``|`` starts the optional ones, ``*`` the
# keyword-only ones (constants only). Kinds: T tensor, T? tensor or None, TN tensor or number,
# TL list of tensors, I int (or an int value), I? int or None, IL list of ints, IL? list or None,
# F number, N number or bool, B bool, NONE must be None (dtype / memory_format), S:a,b one of the
# strings, TUPLE a multi-output value (getitem only), SI int value or int (symbolic arithmetic).
_SPECS: dict[str, tuple[Callable[..., Any], str, str]] = {
    # name: (callable, schema, returns: "tensor" | "int" | "tuple3")
    "aten.conv1d.default": (_aten.conv1d.default, "input:T weight:T | bias:T? stride:IL padding:IL dilation:IL groups:I", "tensor"),
    "aten.conv2d.default": (_aten.conv2d.default, "input:T weight:T | bias:T? stride:IL padding:IL dilation:IL groups:I", "tensor"),
    "aten.linear.default": (_aten.linear.default, "input:T weight:T | bias:T?", "tensor"),
    "aten.addmm.default": (_aten.addmm.default, "self:T mat1:T mat2:T | * beta:N alpha:N", "tensor"),
    "aten.mm.default": (_aten.mm.default, "self:T mat2:T", "tensor"),
    "aten.t.default": (_aten.t.default, "self:T", "tensor"),
    "aten.batch_norm.default": (_aten.batch_norm.default,
                                "input:T weight:T? bias:T? running_mean:T? running_var:T? training:B momentum:F eps:F cudnn_enabled:B", "tensor"),
    "aten._native_batch_norm_legit_no_training.default": (_aten._native_batch_norm_legit_no_training.default,
                                                          "input:T weight:T? bias:T? running_mean:T running_var:T momentum:F eps:F", "tuple3"),
    "aten.layer_norm.default": (_aten.layer_norm.default, "input:T normalized_shape:IL | weight:T? bias:T? eps:F cudnn_enable:B", "tensor"),
    "aten.relu.default": (_aten.relu.default, "self:T", "tensor"),
    "aten.sigmoid.default": (_aten.sigmoid.default, "self:T", "tensor"),
    "aten.tanh.default": (_aten.tanh.default, "self:T", "tensor"),
    "aten.silu.default": (_aten.silu.default, "self:T", "tensor"),
    "aten.gelu.default": (_aten.gelu.default, "self:T | * approximate:S:none,tanh", "tensor"),
    "aten.hardtanh.default": (_aten.hardtanh.default, "self:T | min_val:N max_val:N", "tensor"),
    "aten.max_pool2d.default": (_aten.max_pool2d.default, "self:T kernel_size:IL | stride:IL padding:IL dilation:IL ceil_mode:B", "tensor"),
    "aten.avg_pool2d.default": (_aten.avg_pool2d.default,
                                "self:T kernel_size:IL | stride:IL padding:IL ceil_mode:B count_include_pad:B divisor_override:I?", "tensor"),
    "aten.adaptive_avg_pool2d.default": (_aten.adaptive_avg_pool2d.default, "self:T output_size:IL", "tensor"),
    "aten.add.Tensor": (_aten.add.Tensor, "self:T other:TN | * alpha:N", "tensor"),
    "aten.sub.Tensor": (_aten.sub.Tensor, "self:T other:TN | * alpha:N", "tensor"),
    "aten.mul.Tensor": (_aten.mul.Tensor, "self:T other:TN", "tensor"),
    "aten.div.Tensor": (_aten.div.Tensor, "self:T other:TN", "tensor"),
    "aten.mean.dim": (_aten.mean.dim, "self:T dim:IL? | keepdim:B * dtype:NONE", "tensor"),
    "aten.flatten.using_ints": (_aten.flatten.using_ints, "self:T | start_dim:I end_dim:I", "tensor"),
    "aten.view.default": (_aten.view.default, "self:T size:IL", "tensor"),
    "aten.reshape.default": (_aten.reshape.default, "self:T shape:IL", "tensor"),
    "aten.permute.default": (_aten.permute.default, "self:T dims:IL", "tensor"),
    "aten.transpose.int": (_aten.transpose.int, "self:T dim0:I dim1:I", "tensor"),
    "aten.squeeze.dim": (_aten.squeeze.dim, "self:T dim:I", "tensor"),
    "aten.unsqueeze.default": (_aten.unsqueeze.default, "self:T dim:I", "tensor"),
    "aten.cat.default": (_aten.cat.default, "tensors:TL | dim:I", "tensor"),
    "aten.softmax.int": (_aten.softmax.int, "self:T dim:I | dtype:NONE", "tensor"),
    "aten.log_softmax.int": (_aten.log_softmax.int, "self:T dim:I | dtype:NONE", "tensor"),
    "aten.dropout.default": (_aten.dropout.default, "input:T p:F train:B", "tensor"),
    "aten.clone.default": (_aten.clone.default, "self:T | * memory_format:NONE", "tensor"),
    "aten.sym_size.int": (_aten.sym_size.int, "self:T dim:I", "int"),
    "getitem": (operator.getitem, "self:TUPLE index:I", "tensor"),
    "sym.add": (operator.add, "a:SI b:SI", "int"),
    "sym.sub": (operator.sub, "a:SI b:SI", "int"),
    "sym.mul": (operator.mul, "a:SI b:SI", "int"),
    "sym.floordiv": (operator.floordiv, "a:SI b:SI", "int"),
}
#: Arguments that must have one value: the graph is inference-only (no running-stat updates).
_FIXED: dict[tuple[str, str], Any] = {
    ("aten.batch_norm.default", "training"): False,
    ("aten.dropout.default", "train"): False,
}
# In-place ATen ops export keeps in the graph (ReLU(inplace=True), ``out += x``); saved as their
# pure form after checking that nothing reads the overwritten value afterwards.
_INPLACE: dict[Any, str] = {
    _aten.relu_.default: "aten.relu.default", _aten.add_.Tensor: "aten.add.Tensor",
    _aten.sub_.Tensor: "aten.sub.Tensor", _aten.mul_.Tensor: "aten.mul.Tensor",
    _aten.div_.Tensor: "aten.div.Tensor", _aten.hardtanh_.default: "aten.hardtanh.default",
    _aten.sigmoid_.default: "aten.sigmoid.default", _aten.tanh_.default: "aten.tanh.default",
    _aten.silu_.default: "aten.silu.default",
}
_SYM_TARGETS = {operator.add: "sym.add", operator.sub: "sym.sub", operator.mul: "sym.mul",
                operator.floordiv: "sym.floordiv", operator.getitem: "getitem"}
_VIEW_OPS = {"aten.view.default", "aten.reshape.default", "aten.flatten.using_ints", "aten.permute.default",
             "aten.transpose.int", "aten.squeeze.dim", "aten.unsqueeze.default", "aten.t.default", "getitem"}
_SKIP_TARGETS = {_aten._assert_scalar.default, _aten.sym_constrain_range_for_size.default,
                 _aten._assert_tensor_metadata.default}


class _Arg:
    __slots__ = ("name", "kind", "choices", "required", "kwarg_only")

    def __init__(self, text: str, required: bool, kwarg_only: bool) -> None:
        self.name, _, kind = text.partition(":")
        self.kind, _, choices = kind.partition(":")
        self.choices = frozenset(choices.split(",")) if choices else frozenset()
        self.required, self.kwarg_only = required, kwarg_only


def _parse_schema(text: str) -> list[_Arg]:
    args, required, kwarg_only = [], True, False
    for tok in text.split():
        if tok == "|":
            required = False
        elif tok == "*":
            kwarg_only = True
        else:
            args.append(_Arg(tok, required, kwarg_only))
    return args


#: The allow-list: operator name -> (callable, argument schema, what it returns).
OPS: dict[str, tuple[Callable[..., Any], list[_Arg], str]] = {
    name: (fn, _parse_schema(schema), returns) for name, (fn, schema, returns) in _SPECS.items()
}
_NAME_OF: dict[Any, str] = {fn: name for name, (fn, _, _) in _SPECS.items() if name.startswith("aten.")}
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*$")


# ------------------------------------------------------------------------------------- validation

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) and abs(v) <= MAX_INT) or (isinstance(v, float) and math.isfinite(v))


def _ref(v: Any, n_env: int, where: str) -> int:
    if not (isinstance(v, dict) and len(v) == 1 and "ref" in v and _is_int(v["ref"])):
        raise GraphError(f"{where}: expected a reference {{'ref': index}}, got {_short(v)}")
    k = v["ref"]
    if not 0 <= k < n_env:
        raise GraphError(f"{where}: reference {k} is not to an earlier value (0..{n_env - 1})")
    return k


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(arg: _Arg, v: Any, kinds: Sequence[str], where: str) -> None:
    """Check one argument value against its kind; ``kinds`` are the kinds of earlier values."""
    kind, n = arg.kind, len(kinds)

    def tensor(x: Any, w: str) -> None:
        if kinds[_ref(x, n, w)] != "tensor":
            raise GraphError(f"{w}: expected a tensor value")

    def integer(x: Any, w: str) -> None:
        if isinstance(x, dict):
            if kinds[_ref(x, n, w)] != "int":
                raise GraphError(f"{w}: expected an int value")
        elif not (_is_int(x) and abs(x) <= MAX_INT):
            raise GraphError(f"{w}: expected an int, got {_short(x)}")

    def int_list(x: Any, w: str) -> None:
        if not isinstance(x, list) or len(x) > MAX_LIST:
            raise GraphError(f"{w}: expected a list of at most {MAX_LIST} ints, got {_short(x)}")
        for i, e in enumerate(x):
            integer(e, f"{w}[{i}]")

    if kind == "T":
        tensor(v, where)
    elif kind == "T?":
        if v is not None:
            tensor(v, where)
    elif kind == "TN":
        if not _is_number(v):
            tensor(v, where)
    elif kind == "TL":
        if not isinstance(v, list) or not 1 <= len(v) <= MAX_LIST:
            raise GraphError(f"{where}: expected a list of 1..{MAX_LIST} tensors, got {_short(v)}")
        for i, e in enumerate(v):
            tensor(e, f"{where}[{i}]")
    elif kind in ("I", "SI"):
        integer(v, where)
    elif kind == "I?":
        if v is not None:
            integer(v, where)
    elif kind == "IL":
        int_list(v, where)
    elif kind == "IL?":
        if v is not None:
            int_list(v, where)
    elif kind == "F":
        if not _is_number(v):
            raise GraphError(f"{where}: expected a finite number, got {_short(v)}")
    elif kind == "N":
        if not (_is_number(v) or isinstance(v, bool)):
            raise GraphError(f"{where}: expected a finite number or bool, got {_short(v)}")
    elif kind == "B":
        if not isinstance(v, bool):
            raise GraphError(f"{where}: expected a bool, got {_short(v)}")
    elif kind == "NONE":
        if v is not None:
            raise GraphError(f"{where}: must be null, got {_short(v)}")
    elif kind == "S":
        if not isinstance(v, str) or v not in arg.choices:
            raise GraphError(f"{where}: must be one of {sorted(arg.choices)}, got {_short(v)}")
    elif kind == "TUPLE":
        if not kinds[_ref(v, n, where)].startswith("tuple"):
            raise GraphError(f"{where}: expected a multi-output value")
    else:  # pragma: no cover - the schemas above use only the kinds handled here
        raise GraphError(f"{where}: unknown argument kind {kind}")


def _check_keys(obj: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise GraphError(f"{where} must be an object, got {type(obj).__name__}")
    extra, missing = set(obj) - allowed, required - set(obj)
    if extra or missing:
        raise GraphError(f"{where}: unexpected keys {sorted(map(str, extra))[:5]}, missing {sorted(missing)}")


def validate_graph(graph: Any, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Any]:
    """Check a parsed graph against the allow-list and the file's tensors (name -> dtype, shape).

    Returns the graph unchanged; raises :class:`GraphError` saying what is wrong.

    Example::

        >>> g = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION,
        ...      "inputs": [{"shape": [None, 3], "dtype": "float32"}], "tensors": [],
        ...      "nodes": [{"op": "aten.relu.default", "args": [{"ref": 0}]}], "outputs": [{"ref": 1}]}
        >>> validate_graph(g, {}) is g
        True
        >>> g["nodes"][0]["op"] = "builtins.eval"
        >>> validate_graph(g, {})
        Traceback (most recent call last):
            ...
        dnnshifter_lightning.graph.GraphError: graph.nodes[0]: operator 'builtins.eval' is not in the allow-list
    """
    _check_keys(graph, {"format", "version", "inputs", "tensors", "nodes", "outputs"},
                {"format", "version", "inputs", "tensors", "nodes", "outputs"}, "graph")
    if graph["format"] != GRAPH_FORMAT or graph["version"] != GRAPH_VERSION:
        raise GraphError(f"graph format must be {GRAPH_FORMAT!r} version {GRAPH_VERSION}, "
                         f"got {_short(graph['format'])} version {_short(graph['version'])}")
    inputs = graph["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise GraphError("graph.inputs must be a list with one input")
    _check_keys(inputs[0], {"shape", "dtype"}, {"shape", "dtype"}, "graph.inputs[0]")
    shape = inputs[0]["shape"]
    if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_RANK and shape[0] is None
            and all(_is_int(s) and 1 <= s <= MAX_INT for s in shape[1:])):
        raise GraphError(f"graph.inputs[0].shape must be [null, positive ints...] (rank <= {MAX_RANK}), "
                         f"got {_short(shape)}")
    if inputs[0]["dtype"] not in _INPUT_DTYPES:
        raise GraphError(f"graph.inputs[0].dtype must be one of {sorted(_INPUT_DTYPES)}, got {_short(inputs[0]['dtype'])}")

    entries = graph["tensors"]
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise GraphError(f"graph.tensors must be a list of at most {MAX_TENSORS} entries")
    names: set[str] = set()
    for i, t in enumerate(entries):
        where = f"graph.tensors[{i}]"
        _check_keys(t, {"name", "kind"}, {"name", "kind"}, where)
        name = t["name"]
        if not (isinstance(name, str) and len(name) <= MAX_NAME_CHARS and _TENSOR_NAME.match(name)):
            raise GraphError(f"{where}.name must be a dotted name of letters, digits and '_' "
                             f"(no leading '_', at most {MAX_NAME_CHARS} chars), got {_short(name)}")
        if t["kind"] not in ("parameter", "buffer"):
            raise GraphError(f"{where}.kind must be 'parameter' or 'buffer', got {_short(t['kind'])}")
        if name in names:
            raise GraphError(f"{where}: duplicate tensor {name!r}")
        names.add(name)
    if names != set(tensors):
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise GraphError(f"graph.tensors do not match the stored tensors: missing {missing[:5]}, unlisted {extra[:5]}")

    kinds: list[str] = ["tensor"] * (1 + len(entries))
    nodes = graph["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_NODES:
        raise GraphError(f"graph.nodes must be a list of 1..{MAX_NODES} nodes")
    for i, node in enumerate(nodes):
        where = f"graph.nodes[{i}]"
        _check_keys(node, {"op", "args", "kwargs"}, {"op", "args"}, where)
        op = node["op"]
        if not isinstance(op, str) or op not in OPS:
            raise GraphError(f"{where}: operator {_short(op)} is not in the allow-list")
        _, schema, returns = OPS[op]
        where = f"{where} ({op})"
        args, kwargs = node["args"], node.get("kwargs", {})
        positional = [a for a in schema if not a.kwarg_only]
        if not isinstance(args, list) or len(args) > len(positional):
            raise GraphError(f"{where}: args must be a list of at most {len(positional)} values")
        if len(args) < sum(a.required for a in positional):
            raise GraphError(f"{where}: needs at least {sum(a.required for a in positional)} args, got {len(args)}")
        if not isinstance(kwargs, dict):
            raise GraphError(f"{where}: kwargs must be an object")
        by_name = {a.name: a for a in schema if a.kwarg_only}
        for key in kwargs:
            if key not in by_name:
                raise GraphError(f"{where}: unknown keyword argument {_short(key)}")
        for arg, v in [*zip(positional, args), *((by_name[k], v) for k, v in kwargs.items())]:
            _check_value(arg, v, kinds, f"{where} argument {arg.name!r}")
            fixed = _FIXED.get((op, arg.name), v)
            if v is not fixed and v != fixed:
                raise GraphError(f"{where} argument {arg.name!r} must be {fixed!r} in an inference graph")
        if op == "getitem":
            k = args[0]["ref"]
            if not (_is_int(args[1]) and 0 <= args[1] < int(kinds[k].removeprefix("tuple"))):
                raise GraphError(f"{where}: index must be a constant int within the outputs of value {k}")
        kinds.append(returns)

    outputs = graph["outputs"]
    if not isinstance(outputs, list) or not 1 <= len(outputs) <= MAX_LIST:
        raise GraphError(f"graph.outputs must be a list of 1..{MAX_LIST} references")
    for i, o in enumerate(outputs):
        if kinds[_ref(o, len(kinds), f"graph.outputs[{i}]")] != "tensor":
            raise GraphError(f"graph.outputs[{i}] must be a tensor value")
    return graph


# ------------------------------------------------------------------------------------ interpreter

class GraphVariant(nn.Module):
    """A validated graph as an ``nn.Module``: ``forward`` walks the node list.

    Its parameters and buffers carry the original module's names (``features.0.weight``), in
    empty container modules, so the runtime can swap them (skeleton + weights) as for any module.
    Every input dimension but the batch is checked. Build it with :func:`build_variant`.
    """

    def __init__(self, graph: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        spec = graph["inputs"][0]
        self._input_shape = tuple(spec["shape"][1:])
        self._input_dtype = _INPUT_DTYPES[spec["dtype"]]
        slots = []
        for entry in graph["tensors"]:
            owner, attr = self._container(entry["name"])
            value = tensors[entry["name"]]
            if entry["kind"] == "parameter":
                owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))
            else:
                owner.register_buffer(attr, value)
            slots.append((owner, attr, entry["kind"] == "parameter"))
        self._slots = slots
        self._names = [entry["name"] for entry in graph["tensors"]]
        self._steps = []
        for node in graph["nodes"]:
            fn = OPS[node["op"]][0]
            template, refs, list_refs = [], [], []
            for pos, v in enumerate(node["args"]):
                if isinstance(v, dict):
                    refs.append((pos, v["ref"]))
                    template.append(None)
                elif isinstance(v, list) and any(isinstance(e, dict) for e in v):
                    list_refs.append((pos, [e if not isinstance(e, dict) else None for e in v],
                                      [(j, e["ref"]) for j, e in enumerate(v) if isinstance(e, dict)]))
                    template.append(None)
                else:
                    template.append(v)
            self._steps.append((fn, tuple(template), tuple(refs), tuple(list_refs), dict(node.get("kwargs", {}))))
        self._outputs = [o["ref"] for o in graph["outputs"]]
        self.eval()

    def _container(self, name: str) -> tuple[nn.Module, str]:
        *path, attr = name.split(".")
        owner: nn.Module = self
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise GraphError(f"tensor name {name!r}: {part!r} clashes with a module attribute")
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if hasattr(owner, attr):
            raise GraphError(f"tensor name {name!r}: {attr!r} clashes with a module attribute or another tensor")
        return owner, attr

    def assign_tensors(self, tensors: Mapping[str, torch.Tensor]) -> GraphVariant:
        """Point every parameter and buffer at ``tensors`` (same names, shapes and dtypes; no copy)."""
        if set(self._names) != set(tensors):
            raise GraphError("tensors do not match the graph's")
        for (owner, attr, is_param), name in zip(self._slots, self._names):
            old, new = (owner._parameters if is_param else owner._buffers)[attr], tensors[name]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise GraphError(f"{name}: expected {tuple(old.shape)} {old.dtype}, got {tuple(new.shape)} {new.dtype}")
            if is_param:
                owner._parameters[attr] = nn.Parameter(new, requires_grad=False)
            else:
                owner._buffers[attr] = new
        return self

    def forward(self, x: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != len(self._input_shape) + 1 or tuple(x.shape[1:]) != self._input_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected an input of shape (batch, {', '.join(map(str, self._input_shape))}), got {got}")
        env: list[Any] = [x]
        for owner, attr, is_param in self._slots:
            env.append(owner._parameters[attr] if is_param else owner._buffers[attr])
        for fn, template, refs, list_refs, kwargs in self._steps:
            if refs or list_refs:
                args = list(template)
                for pos, k in refs:
                    args[pos] = env[k]
                for pos, items, subs in list_refs:
                    items = list(items)
                    for j, k in subs:
                        items[j] = env[k]
                    args[pos] = items
                env.append(fn(*args, **kwargs))
            else:
                env.append(fn(*template, **kwargs))
        if len(self._outputs) == 1:
            return env[self._outputs[0]]
        return tuple(env[k] for k in self._outputs)


def build_variant(graph: Any, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> GraphVariant:
    """Validate ``graph``, build its module on ``meta`` tensors, and dry-run it on a meta batch.

    ``tensors`` gives each stored tensor's dtype and shape. The dry run (batch 1 and 2, no memory,
    no data) proves the shapes agree and bounds the activations (:data:`MAX_ACTIVATION_BYTES` at
    batch 1). The caller then assigns the real tensors with :meth:`GraphVariant.assign_tensors`.
    """
    validate_graph(graph, tensors)
    try:
        module = GraphVariant(graph, {k: torch.empty(s, dtype=d, device="meta") for k, (d, s) in tensors.items()})
    except GraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a name torch refuses
        raise GraphError(f"cannot build the graph's module ({type(exc).__name__}: {exc})") from exc
    spec = graph["inputs"][0]
    for batch in (1, 2):
        x = torch.empty(batch, *spec["shape"][1:], dtype=_INPUT_DTYPES[spec["dtype"]], device="meta")
        total = _dry_run(module, x)
        if batch == 1 and total > MAX_ACTIVATION_BYTES:
            raise GraphError(f"the graph's intermediate values take {total} bytes per sample, "
                             f"more than the cap of {MAX_ACTIVATION_BYTES}")
    return module


def _dry_run(module: GraphVariant, x: torch.Tensor) -> int:
    """Run the steps on meta tensors, summing the bytes of every intermediate tensor."""
    env: list[Any] = [x]
    for owner, attr, is_param in module._slots:
        env.append(owner._parameters[attr] if is_param else owner._buffers[attr])
    total = 0
    for i, (fn, template, refs, list_refs, kwargs) in enumerate(module._steps):
        args = list(template)
        for pos, k in refs:
            args[pos] = env[k]
        for pos, items, subs in list_refs:
            items = list(items)
            for j, k in subs:
                items[j] = env[k]
            args[pos] = items
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shapes or values the op refuses
            raise GraphError(f"graph.nodes[{i}] fails on a batch of {x.shape[0]}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        values = out if isinstance(out, tuple) else (out,)
        for v in values:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
                if total > MAX_ACTIVATION_BYTES * x.shape[0]:
                    raise GraphError(f"the graph's intermediate values exceed {MAX_ACTIVATION_BYTES} bytes per sample")
            elif not _is_int(v):
                raise GraphError(f"graph.nodes[{i}] produced a {type(v).__name__}")
        env.append(out)
    for k in module._outputs:
        if not isinstance(env[k], torch.Tensor):
            raise GraphError("an output is not a tensor")
    return total


# ------------------------------------------------------------------------------------------ saving

def _export(module: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    if example_input.dim() == 0:
        raise GraphError("example_input needs a batch dimension")
    if example_input.shape[0] < 2:  # export specialises sizes 0 and 1
        example_input = example_input[:1].repeat(2, *([1] * (example_input.dim() - 1)))
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(module.eval(), (example_input,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reason
        raise GraphError(f"cannot export {type(module).__name__} with a dynamic batch dimension: {exc}") from exc


def graph_from_module(module: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Export ``module`` (eval mode, dynamic batch) to ``(graph, tensors)``; checks the interpreted graph.

    Raises :class:`GraphError` naming the operator when the module uses one outside :data:`OPS`.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    program = _export(module, example_input)
    sig = program.graph_signature
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        raise GraphError("the module mutates its buffers or inputs in forward; a variant must be a pure function")
    index: dict[Any, int] = {}
    entries: list[dict[str, str]] = []
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    user_input = None
    specs = {s.arg.name: s for s in sig.input_specs}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        s = specs[node.name]
        if s.kind == InputKind.USER_INPUT:
            if user_input is not None:
                raise GraphError("a variant takes exactly one input tensor")
            user_input = node
            continue
        if s.kind == InputKind.PARAMETER:
            kind, name, value = "parameter", s.target, program.state_dict[s.target]
        elif s.kind == InputKind.BUFFER:
            kind, name = "buffer", s.target
            value = program.state_dict[s.target] if s.persistent else program.constants[s.target]
        elif s.kind == InputKind.CONSTANT_TENSOR:
            kind, name, value = "buffer", f"constants.c{len(tensors)}", program.constants[s.target]
        else:
            raise GraphError(f"unsupported graph input kind {s.kind} ({node.name})")
        if not _TENSOR_NAME.match(name) or len(name) > MAX_NAME_CHARS:
            raise GraphError(f"tensor name {name!r} cannot be stored (letters, digits, '_' and dots, no leading '_')")
        value = value.detach()
        if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor and not isinstance(value, nn.Parameter):
            raise GraphError(f"{name}: only plain tensors can be stored, got {type(value).__name__}")
        if value.dtype not in DTYPES.values():
            raise GraphError(f"{name}: dtype {value.dtype} cannot be stored")
        value = value.cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen_storage:  # tied / shared: safetensors stores copies
            value = value.clone()
        seen_storage.add(value.untyped_storage().data_ptr())
        entries.append({"name": name, "kind": kind})
        tensors[name] = value
    if user_input is None:
        raise GraphError("the exported program has no input")
    index[user_input] = 0
    for i, node in enumerate(n for n in placeholders if n is not user_input):
        index[node] = 1 + i
    val = user_input.meta.get("val")
    shape = [None] + [int(d) for d in val.shape[1:]]
    dtype = str(val.dtype).removeprefix("torch.")

    nodes: list[dict[str, Any]] = []
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    outputs: list[dict[str, int]] = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outs = node.args[0]
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            outputs = [_to_json(o, index, "output") for o in outs]
            continue
        if node.op != "call_function":
            raise GraphError(f"unsupported graph node {node.op} {node.target}")
        target = node.target
        if target in _SKIP_TARGETS and not node.users:
            continue
        if target in _INPLACE:
            name = _INPLACE[target]
            base = node.args[0]
            if base in index and index[base] <= len(entries) and base is not user_input:
                raise GraphError(f"{node.name}: an in-place op writes a weight; a variant must be a pure function")
            later = [u for u in base.users if u is not node and order[u] > order[node]]
            if later or (base.op == "call_function" and _op_name(base.target) in _VIEW_OPS):
                raise GraphError(f"{node.name}: in-place {target} on a value that is read again or is a view")
        else:
            name = _op_name(target)
        if name not in OPS:
            raise GraphError(f"operator {target} ({node.name}) is not in the portfolio format's allow-list; "
                             f"supported: {', '.join(sorted(OPS))}")
        schema = OPS[name][1]
        kw_only = {a.name for a in schema if a.kwarg_only}
        if set(node.kwargs) - kw_only:
            raise GraphError(f"{node.name}: unexpected keyword arguments {sorted(set(node.kwargs) - kw_only)} for {name}")
        entry: dict[str, Any] = {"op": name, "args": [_to_json(a, index, node.name) for a in node.args]}
        if node.kwargs:
            entry["kwargs"] = {k: _to_json(v, index, node.name) for k, v in node.kwargs.items()}
        index[node] = 1 + len(entries) + len(nodes)
        nodes.append(entry)
    graph = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "inputs": [{"shape": shape, "dtype": dtype}],
             "tensors": entries, "nodes": nodes, "outputs": outputs}
    _check_equivalent(module, graph, tensors, example_input)
    return graph, tensors


def _op_name(target: Any) -> str:
    try:
        return _NAME_OF.get(target) or _SYM_TARGETS.get(target) or str(target)
    except TypeError:  # unhashable target
        return str(target)


def _to_json(v: Any, index: Mapping[Any, int], where: str) -> Any:
    if isinstance(v, torch.fx.Node):
        if v not in index:
            raise GraphError(f"{where}: refers to a value that is not stored ({v.name})")
        return {"ref": index[v]}
    if isinstance(v, (list, tuple)):
        out = [_to_json(e, index, where) for e in v]
        if any(isinstance(e, list) for e in out):
            raise GraphError(f"{where}: nested lists are not part of the format")
        return out
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise GraphError(f"{where}: non-finite constant {v}")
        return v
    raise GraphError(f"{where}: cannot store a {type(v).__name__} argument ({_short(v)})")


def _check_equivalent(module: nn.Module, graph: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                      example_input: torch.Tensor) -> None:
    """The interpreted graph must compute what the module computes (batch 1 and the example's)."""
    built = build_variant(graph, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    built.assign_tensors(tensors)
    for x in (example_input[:1], example_input):
        with torch.no_grad():
            want, got = module(x), built(x)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        got = list(got) if isinstance(got, tuple) else [got]
        if len(want) != len(got) or any(w.shape != g.shape or not torch.allclose(w, g, rtol=1e-4, atol=1e-5)
                                        for w, g in zip(want, got)):
            diff = max(((w - g).abs().max().item() for w, g in zip(want, got) if w.shape == g.shape), default=math.inf)
            raise GraphError(f"the saved graph does not reproduce the module's output (max abs diff {diff})")
