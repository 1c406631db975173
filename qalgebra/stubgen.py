"""Typed stubs for torch operator namespaces, generated from the live op schemas.

torch types every ``torch.ops.<namespace>.<op>.<overload>`` as ``OpOverload[..., Any]``. This
module reads the schema of each selected overload from the installed torch and writes, per
namespace, two stub modules:

- ``<ns>.pyi`` types the **eager** call (``qalgebra.ops``): each overload a class deriving from
  ``OpOverload`` whose ``__call__`` mirrors its schema, each op a class deriving from
  ``OpOverloadPacket`` with one attribute per overload and a ``__call__`` ``@overload``-ed over
  its tensor overloads in the order the runtime tries them (see :func:`packet_call_overloads`);
- ``emit/<ns>.pyi`` types the **graph-side** call (``qalgebra.emit``), which builds a node
  through a Rewriter: ``__call__(rw, /, *, <every argument by keyword>) -> Node``, where a
  tensor argument is a graph value (``Node``, ``Node | None`` when optional), a symbolic size
  ``int | Node``, a scalar keeps its type, and defaults are the schema's. Only the overloads a
  graph may hold are there (:func:`qalgebra.schemas.emittable`); a packet is callable when its
  overloads can be told apart by their arguments (``onednn.qlinear_pointwise(rw, x_scale=...)``
  takes a float or a node: the emitted overload is ``.default`` or ``.tensor``).

In both, a namespace is a class ``Namespace`` with one attribute per op, so a misspelt op,
overload or argument is a type error. The output is deterministic for a given torch build;
``tests/test_stubs.py`` regenerates qalgebra's own stubs (``qalgebra/opstubs/``) and compares.

    python -m qalgebra.stubgen                  # rewrite qalgebra/opstubs/ (after a torch upgrade)
    python -m qalgebra.stubgen --out DIR        # the same stubs, somewhere else
    python -m qalgebra.stubgen --out DIR --ops mylib --ops aten.take,aten.exp --import mylib.ops

The last form stubs other ops -- a library's own (imported first with ``--import`` so that it
registers them) or aten ops qalgebra's selection leaves out -- into a stub package ``DIR`` of
your own; put its parent on mypy's path and cast, as :mod:`qalgebra.ops` and :mod:`qalgebra.emit`
do: ``mylib = cast("DIR.emit.mylib.Namespace", qalgebra.emit.namespace("mylib"))``.

>>> text = render_emit_namespace("onednn", load_packets("onednn", ["linear_dynamic_fp16"]))
>>> print(text[text.index("class linear_dynamic_fp16__default"):].split("\\n\\n")[0])
class linear_dynamic_fp16__default:
    def __call__(self, rw: Rewriter, /, *, x: Node, w: Node, bias: Node | None) -> Node: ...
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Importing this module registers the Python-defined ``quantized_decomposed`` library (torchao's
# convert_pt2e imports the same module, so both produce the same operators).
import torch.ao.quantization.fx._decomposed

from qalgebra.schemas import emittable, mentions_tensor, overload_names

__all__ = [
    "DEFAULT_OUT",
    "SELECTION",
    "Overload",
    "Packet",
    "StubGenerationError",
    "generate",
    "load_packets",
    "main",
    "namespace_op_names",
    "packet_call_overloads",
    "render_emit_namespace",
    "render_namespace",
    "write",
]

#: Where qalgebra's own stubs live (a stub-only subpackage, shipped with the package).
DEFAULT_OUT = Path(__file__).resolve().parent / "opstubs"
#: The command that regenerates them, named in every generated header.
COMMAND = "python -m qalgebra.stubgen"
MAX_LINE = 100
INDENT = "    "

# Which ops of which namespace get a stub; ``None`` means every op of the namespace. Every op the
# catalog matches or emits is here (tests/test_stubs.py checks it), and a few more a fusion of
# one's own is likely to need.
SELECTION: dict[str, tuple[str, ...] | None] = {
    "aten": (
        # dtype conversions, reshapes, copies and views
        "_to_copy", "to", "view", "reshape", "_unsafe_view", "permute", "clone", "contiguous",
        "expand", "flatten", "unflatten", "squeeze", "unsqueeze", "t", "transpose", "cat",
        "split", "split_with_sizes", "chunk", "unbind", "slice", "select", "narrow",
        "as_strided", "alias", "detach", "lift_fresh_copy", "sym_size",
        "_assert_tensor_metadata",
        # arithmetic of the decomposed quant / dequant forms, and the int8 shift
        "mul", "add", "sub", "div", "round", "clamp", "clamp_min", "clamp_max", "mean",
        "bitwise_xor", "exp", "take", "int_repr",
        # compute ops
        "bmm", "mm", "addmm", "linear", "conv1d", "conv2d", "conv3d", "convolution",
        "constant_pad_nd", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
        "_weight_int8pack_mm", "_int_mm", "max_pool2d", "max_pool2d_with_indices", "layer_norm",
        # unary post-ops
        "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "gelu", "leaky_relu",
        "elu", "mish", "tanh", "sigmoid",
        # in-place spellings export keeps, and dropout
        "relu_", "relu6_", "hardtanh_", "hardswish_", "hardsigmoid_", "silu_", "gelu_",
        "leaky_relu_", "elu_", "mish_", "tanh_", "sigmoid_", "clamp_", "clamp_min_",
        "clamp_max_", "add_", "sub_", "mul_", "div_", "dropout", "dropout_", "feature_dropout",
        "feature_dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
        "feature_alpha_dropout_",
    ),
    "prims": ("convert_element_type",),
    "quantized_decomposed": None,
    "onednn": None,
    "quantized": ("max_pool2d", "int4mm_packed_weight_cpu", "embedding_bag_byte_unpack"),
}  # fmt: skip

# Builtin names a signature may use; a class attribute with one of these names (an overload called
# ``int`` or ``float``) would shadow it inside that class body, so there it is spelt ``builtins.X``.
_BUILTIN_TYPE_NAMES = frozenset(
    {"bool", "complex", "float", "int", "list", "object", "str", "tuple"}
)


class StubGenerationError(Exception):
    """The installed torch has an operator this generator cannot render faithfully."""


@dataclass(frozen=True, slots=True)
class Overload:
    """One overload: its attribute name on the packet, its schema and the overload itself."""

    name: str
    schema: torch._C.FunctionSchema
    op: torch._ops.OpOverload[..., object]


@dataclass(frozen=True, slots=True)
class Packet:
    """One op: its name, its overloads in the order the runtime resolves a packet call, and
    those a graph may hold (:func:`qalgebra.schemas.emittable`)."""

    name: str
    overloads: tuple[Overload, ...]
    emittable: tuple[Overload, ...]


def torch_release() -> str:
    """The torch version without its local build label (CPU and CUDA builds share schemas)."""
    return str(torch.__version__).split("+", maxsplit=1)[0]


def namespace_op_names(namespace: str) -> list[str]:
    """Every op of ``namespace`` that the dispatcher or the JIT knows, sorted."""
    prefix = namespace + "::"
    return sorted(
        {
            schema.name.removeprefix(prefix)
            for schema in torch._C._jit_get_all_schemas()
            if schema.name.startswith(prefix)
        }
    )


def load_packets(namespace: str, ops: Sequence[str] | None) -> list[Packet]:
    """The packets of ``namespace`` named in ``ops`` (all of them when ``None``), sorted by name."""
    names = namespace_op_names(namespace) if ops is None else sorted(set(ops))
    if not names:
        raise StubGenerationError(f"namespace {namespace!r} has no registered op")
    ns = getattr(torch.ops, namespace)
    packets = []
    for name in names:
        packet = getattr(ns, name)
        overloads = tuple(
            Overload(ov, getattr(packet, ov)._schema, getattr(packet, ov))
            for ov in overload_names(packet)
        )
        chosen = set(emittable(packet))
        packets.append(Packet(name, overloads, tuple(o for o in overloads if o.op in chosen)))
    return packets


# --- type rendering ---------------------------------------------------------------------------

Qualify = Callable[[str], str]


def _plain(name: str) -> str:
    return name


def _qualified(name: str) -> str:
    return f"builtins.{name}"


def _union(*parts: str) -> str:
    seen: list[str] = []
    for part in parts:
        for piece in part.split(" | "):
            if piece not in seen:
                seen.append(piece)
    # ``None`` last, as ruff (RUF036) and people write an optional type.
    return " | ".join(sorted(seen, key=lambda piece: piece == "None"))


@dataclass(frozen=True, slots=True)
class Side:
    """How a schema type reads on one side: ``eager`` (tensors) or ``emit`` (graph values)."""

    tensor: str
    symbolic: bool  # a SymInt / SymFloat / SymBool may be a graph value (a size node)


EAGER = Side("torch.Tensor", symbolic=False)
EMIT = Side("Node", symbolic=True)


def render_type(
    t: torch._C.JitType,
    *,
    ret: bool,
    q: Qualify,
    n: int | None = None,
    typevars: set[str],
    side: Side = EAGER,
) -> str:
    """The Python type of a schema type, as an argument (``ret=False``) or a return value.

    Arguments are typed as permissively as the runtime accepts them (``int[]`` takes any sequence,
    ``int[2]`` also a bare int, ``Device`` also a string); returns are typed as concrete values.
    """
    kind = t.kind()
    sym = " | Node" if side.symbolic else ""
    if kind == "TensorType":
        return side.tensor
    if kind == "IntType":
        return q("int")
    if kind == "SymIntType":
        return _union(q("int"), "torch.SymInt") if not side.symbolic else f"{q('int')}{sym}"
    if kind == "FloatType":
        return q("float")
    if kind == "SymFloatType":
        return _union(q("float"), "torch.SymFloat") if not side.symbolic else f"{q('float')}{sym}"
    if kind == "BoolType":
        return q("bool")
    if kind == "SymBoolType":
        return _union(q("bool"), "torch.SymBool") if not side.symbolic else f"{q('bool')}{sym}"
    if kind == "ComplexType":
        return q("complex")
    if kind == "StringType":
        return q("str")
    if kind == "NumberType":  # schema ``Scalar``
        return _union(q("float"), q("int"), q("bool"))
    if kind == "ScalarTypeType":
        return "torch.dtype"
    if kind == "LayoutType":
        return "torch.layout"
    if kind == "MemoryFormatType":
        return "torch.memory_format"
    if kind == "DeviceObjType":
        return "torch.device" if ret else _union("torch.device", q("str"), q("int"))
    if kind == "GeneratorType":
        return "torch.Generator"
    if kind == "VarType":  # a schema type variable (``t``, ``tVal``) of TorchScript's list ops
        var = "_" + str(t.annotation_str).capitalize()
        typevars.add(var)
        return var
    if kind == "OptionalType":
        inner = render_type(t.getElementType(), ret=ret, q=q, n=n, typevars=typevars, side=side)
        return _union(inner, "None")
    if kind == "ListType":
        inner = render_type(t.getElementType(), ret=ret, q=q, typevars=typevars, side=side)
        if ret:
            return f"{q('list')}[{inner}]"
        seq = f"Sequence[{inner}]"
        # ``int[2] stride`` also takes a bare int, broadcast by the runtime.
        return _union(inner, seq) if n is not None and " | " not in inner else seq
    if kind == "TupleType" and isinstance(t, torch._C.TupleType):
        elems = [render_type(e, ret=ret, q=q, typevars=typevars, side=side) for e in t.elements()]
        return f"{q('tuple')}[{', '.join(elems)}]"
    raise StubGenerationError(f"no Python type for schema type {kind} ({t.annotation_str})")


#: Schema types whose defaults torch encodes as numbers (``MemoryFormat`` 0 is
#: ``torch.contiguous_format``): shown as ``...``.
_ENCODED_DEFAULTS = frozenset(
    {"ScalarTypeType", "MemoryFormatType", "LayoutType", "DeviceObjType", "GeneratorType"}
)


def render_default(t: torch._C.JitType, value: object) -> str:
    """A schema default as it reads in a stub, or ``...`` when it is no simple literal."""
    while t.kind() == "OptionalType":
        t = t.getElementType()
    if value is not None and t.kind() in _ENCODED_DEFAULTS:
        return "..."
    if value is None or isinstance(value, bool | str):
        return repr(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        inner = ", ".join(repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return "..."


# --- signature rendering ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """A rendered ``__call__``: parameters (receiver, ``/`` and ``*`` included) and return type."""

    params: tuple[str, ...]
    returns: str
    typevars: frozenset[str]


def _arg_n(arg: torch._C.Argument) -> int | None:
    # ``Argument.N`` (the fixed size of ``int[2]``) exists at runtime but not in torch's stubs.
    n = getattr(arg, "N", None)
    return n if isinstance(n, int) else None


def _check_names(schema: torch._C.FunctionSchema) -> list[str]:
    names = [a.name for a in schema.arguments]
    for name in names:
        if keyword.iskeyword(name) or not name.isidentifier():
            raise StubGenerationError(f"{schema}: argument {name!r} is not a Python identifier")
    return names


def _free(preferred: str, taken: Sequence[str], schema: torch._C.FunctionSchema) -> str:
    """``preferred``, or ``_preferred`` when an argument has that name."""
    for name in (preferred, "_" + preferred):
        if name not in taken:
            return name
    raise StubGenerationError(f"{schema}: no free name for {preferred!r}")


def signature(schema: torch._C.FunctionSchema, q: Qualify) -> Signature:
    """The eager ``__call__`` signature that mirrors ``schema``."""
    names = _check_names(schema)
    # torch's own ``__call__`` takes its receiver positional-only so an argument may be ``self``.
    receiver = _free("self", names, schema)
    typevars: set[str] = set()
    params = [receiver, "/"]
    star = False
    for arg in schema.arguments:
        if arg.kwarg_only and not star:
            params.append("*")
            star = True
        ty = render_type(arg.real_type, ret=False, q=q, n=_arg_n(arg), typevars=typevars)
        default = " = ..." if arg.has_default_value() else ""
        params.append(f"{arg.name}: {ty}{default}")
    rets = [render_type(r.real_type, ret=True, q=q, typevars=typevars) for r in schema.returns]
    if not rets:
        returns = "None"
    elif len(rets) == 1:
        returns = rets[0]
    else:
        returns = f"{q('tuple')}[{', '.join(rets)}]"
    return Signature(tuple(params), returns, frozenset(typevars))


@dataclass(frozen=True, slots=True)
class EmitParam:
    """One keyword of a graph-side call: its type, and its default (None: required)."""

    name: str
    type: str
    default: str | None


def emit_params(schema: torch._C.FunctionSchema, q: Qualify) -> tuple[EmitParam, ...]:
    """The keywords of the graph-side call of one overload, in schema order."""
    _check_names(schema)
    typevars: set[str] = set()
    params = []
    for arg in schema.arguments:
        ty = render_type(
            arg.real_type, ret=False, q=q, n=_arg_n(arg), typevars=typevars, side=EMIT
        )
        has = arg.has_default_value()
        default = render_default(arg.real_type, arg.default_value) if has else None
        params.append(EmitParam(arg.name, ty, default))
    if typevars:
        raise StubGenerationError(f"{schema}: a graph cannot hold a type variable argument")
    return tuple(params)


def merged_params(groups: Sequence[Sequence[EmitParam]]) -> tuple[EmitParam, ...]:
    """The keywords of overloads taking the same names, each typed as the union of its types.

    An argument with one default everywhere keeps it; one optional in some overloads only is
    optional (the runtime then picks the overload that takes what was given, or says why none).
    """
    merged = []
    for column in zip(*groups, strict=True):
        defaults = {p.default for p in column}
        if defaults == {None}:
            default = None
        elif len(defaults) == 1:
            default = column[0].default
        else:
            default = "..."
        merged.append(EmitParam(column[0].name, _union(*(p.type for p in column)), default))
    return tuple(merged)


def emit_signature(params: Sequence[EmitParam], schema: torch._C.FunctionSchema) -> Signature:
    """``__call__(self, rw: Rewriter, /, *, <params>) -> Node``."""
    names = [p.name for p in params]
    receiver, rw = _free("self", names, schema), _free("rw", names, schema)
    rendered = [
        f"{p.name}: {p.type}" + ("" if p.default is None else f" = {p.default}") for p in params
    ]
    star = ["*"] if rendered else []
    return Signature((receiver, f"{rw}: Rewriter", "/", *star, *rendered), "Node", frozenset())


def format_def(name: str, sig: Signature, indent: str) -> list[str]:
    """Lines of ``def name(...) -> R: ...``, wrapped the way ruff format wraps them."""
    one_line = f"{indent}def {name}({', '.join(sig.params)}) -> {sig.returns}: ..."
    if len(one_line) <= MAX_LINE:
        return [one_line]
    inner = indent + INDENT
    hugged = f"{inner}{', '.join(sig.params)}"
    if len(hugged) <= MAX_LINE:
        return [f"{indent}def {name}(", hugged, f"{indent}) -> {sig.returns}: ..."]
    return [
        f"{indent}def {name}(",
        *(f"{inner}{p}," for p in sig.params),
        f"{indent}) -> {sig.returns}: ...",
    ]


def packet_call_overloads(packet: Packet) -> tuple[Overload, ...]:
    """The overloads a packet's eager ``__call__`` is typed with, in the order the runtime tries
    them.

    A packet call from Python takes the first overload whose schema accepts the arguments, and a
    Python number is accepted where the schema says ``Tensor``: ``aten.add(1, 2)`` runs
    ``aten.add.Tensor``, never the TorchScript scalar overload ``aten.add.int``. So the overloads
    that take no tensor at all (``add.int``, ``add.t``, ``add.default(Scalar a, Scalar b)``) are
    left out of the packet's ``__call__`` (still reachable as attributes): listing them would type
    ``aten.add(1, 2)`` as ``int`` where the runtime returns a tensor.
    """
    with_tensor = tuple(
        ov
        for ov in packet.overloads
        if any(mentions_tensor(arg.real_type) for arg in ov.schema.arguments)
    )
    return with_tensor or packet.overloads


def emit_packet_groups(packet: Packet, q: Qualify) -> list[tuple[EmitParam, ...]] | None:
    """The graph-side packet call's signatures: one per set of overloads taking the same names,
    in the runtime's order; None when mypy could not tell the sets apart (a call valid for a
    later set would be taken by an earlier one), and the packet is not callable."""
    by_names: dict[tuple[str, ...], list[tuple[EmitParam, ...]]] = {}
    for ov in packet.emittable:
        params = emit_params(ov.schema, q)
        by_names.setdefault(tuple(p.name for p in params), []).append(params)
    groups = [merged_params(group) for group in by_names.values()]
    for i, earlier in enumerate(groups):
        accepted = {p.name for p in earlier}
        for later in groups[i + 1 :]:
            if {p.name for p in later if p.default is None} <= accepted:
                return None
    return groups


def class_header(name: str, base: str | None) -> list[str]:
    """``class name(base):``, with the base on its own line when the line would be too long."""
    if base is None:
        return [f"class {name}:"]
    line = f"class {name}({base}):"
    if len(line) <= MAX_LINE:
        return [line]
    return [f"class {name}(", f"{INDENT}{base},", "):"]


def _base_return(sigs: Sequence[Signature]) -> str:
    # The type the OpOverload / OpOverloadPacket base is parametrised with: the common return type,
    # or ``object`` when the overloads disagree or the return mentions a method's type variable.
    returns = {sig.returns for sig in sigs}
    if len(returns) == 1 and not any(sig.typevars for sig in sigs):
        return returns.pop()
    return "object"


class _Module:
    """Accumulates the lines of one stub module and the names they need imported."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.typevars: set[str] = set()

    def add_def(self, name: str, sig: Signature, *, overloaded: bool) -> None:
        if overloaded:
            self.lines.append(f"{INDENT}@overload")
        self.lines.extend(format_def(name, sig, INDENT))
        self.typevars |= sig.typevars

    def add_overload_class(self, ns: str, packet: Packet, ov: Overload) -> None:
        sig = signature(ov.schema, _plain)
        schema = ov.schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.is_write]
        comment = f"# {ns}.{packet.name}.{ov.name}"
        if written:
            comment += f"; writes into: {', '.join(written)}"
        self.lines += ["", comment]
        base = f"OpOverload[..., {_base_return([sig])}]"
        self.lines += class_header(f"{packet.name}__{ov.name}", base)
        self.add_def("__call__", sig, overloaded=False)

    def add_packet_class(self, packet: Packet) -> None:
        # An overload named like a builtin (``aten.add.int``) shadows it in the class body.
        shadowed = {ov.name for ov in packet.overloads} & _BUILTIN_TYPE_NAMES
        q: Qualify = _qualified if shadowed else _plain
        callable_ovs = packet_call_overloads(packet)
        base = _base_return([signature(ov.schema, _plain) for ov in callable_ovs])
        header = class_header(f"{packet.name}__packet", f"OpOverloadPacket[..., {base}]")
        self.lines += ["", *header]
        overloaded = len(callable_ovs) > 1
        for ov in callable_ovs:
            self.add_def("__call__", signature(ov.schema, q), overloaded=overloaded)
        self.lines += [f"{INDENT}{ov.name}: {packet.name}__{ov.name}" for ov in packet.overloads]

    def add_emit_overload_class(self, ns: str, packet: Packet, ov: Overload) -> None:
        written = [a.name for a in ov.schema.arguments if a.alias_info is not None and a.is_write]
        comment = f"# {ns}.{packet.name}.{ov.name}"
        if written:
            comment += f"; writes into: {', '.join(written)}"
        self.lines += ["", comment, "@final", *class_header(f"{packet.name}__{ov.name}", None)]
        params = emit_params(ov.schema, _plain)
        self.add_def("__call__", emit_signature(params, ov.schema), overloaded=False)

    def add_emit_packet_class(self, packet: Packet) -> None:
        shadowed = {ov.name for ov in packet.emittable} & _BUILTIN_TYPE_NAMES
        q: Qualify = _qualified if shadowed else _plain
        self.lines += ["", "@final", *class_header(f"{packet.name}__packet", None)]
        groups = emit_packet_groups(packet, q)
        schema = packet.emittable[0].schema
        for params in groups or ():
            sig = emit_signature(params, schema)
            self.add_def("__call__", sig, overloaded=len(groups or ()) > 1)
        self.lines += [f"{INDENT}{ov.name}: {packet.name}__{ov.name}" for ov in packet.emittable]


def _header(title: str) -> list[str]:
    return [
        f'"""{title}',
        "",
        f"Generated by ``{COMMAND}`` from torch {torch_release()}; do not edit.",
        '"""',
        "",
    ]


def _typing_import(body: str, typevars: set[str]) -> str:
    names = ["final"]
    if "@overload" in body:
        names.append("overload")
    if typevars:
        names.append("TypeVar")
    # isort's order: CamelCase names (TypeVar) before functions (final, overload).
    names.sort(key=lambda name: (not name[0].isupper(), name))
    return f"from typing import {', '.join(names)}"


def render_namespace(ns: str, packets: Sequence[Packet]) -> str:
    """The text of ``<ns>.pyi``: the eager namespace."""
    module = _Module()
    for packet in packets:
        for ov in packet.overloads:
            if ov.name == "packet":
                raise StubGenerationError(f"{ns}.{packet.name}: an overload is named 'packet'")
            module.add_overload_class(ns, packet, ov)
        module.add_packet_class(packet)
    module.lines += ["", "@final", "class Namespace:"]
    module.lines += [f'{INDENT}"""``torch.ops.{ns}``: one attribute per op."""', ""]
    module.lines += [f"{INDENT}name: str"]
    module.lines += [f"{INDENT}{p.name}: {p.name}__packet" for p in packets]
    body = "\n".join(module.lines)
    head = _header(f"Typed ``torch.ops.{ns}``: {len(packets)} ops.")
    if "builtins." in body:
        head.append("import builtins")
    if "Sequence[" in body:
        head.append("from collections.abc import Sequence")
    head.append(_typing_import(body, module.typevars))
    head += ["", "import torch", "from torch._ops import OpOverload, OpOverloadPacket"]
    if module.typevars:
        head += ["", *(f'{tv} = TypeVar("{tv}")' for tv in sorted(module.typevars))]
    return "\n".join(head) + "\n" + body + "\n"


def render_emit_namespace(ns: str, packets: Sequence[Packet]) -> str:
    """The text of ``emit/<ns>.pyi``: the graph-side namespace (ops a graph may hold)."""
    module = _Module()
    chosen = [p for p in packets if p.emittable]
    for packet in chosen:
        for ov in packet.emittable:
            module.add_emit_overload_class(ns, packet, ov)
        module.add_emit_packet_class(packet)
    module.lines += ["", "@final", "class Namespace:"]
    module.lines += [f'{INDENT}"""``qalgebra.emit.{ns}``: one attribute per op."""', ""]
    module.lines += [f"{INDENT}{p.name}: {p.name}__packet" for p in chosen]
    body = "\n".join(module.lines)
    head = _header(f"Typed graph-side calls of ``torch.ops.{ns}``: {len(chosen)} ops.")
    if "builtins." in body:
        head.append("import builtins")
    if "Sequence[" in body:
        head.append("from collections.abc import Sequence")
    head.append(_typing_import(body, set()))
    head += [""]
    if "torch." in body:
        head.append("import torch")
    head += ["from torch.fx import Node", "", "from qalgebra.rewriter import Rewriter"]
    return "\n".join(head) + "\n" + body + "\n"


def render_package_init(selection: dict[str, tuple[str, ...] | None]) -> str:
    """The text of ``__init__.pyi``: the docstring that explains the mechanism."""
    namespaces = ", ".join(f"``{ns}``" for ns in selection)
    return f'''"""Precise types for torch operator namespaces.

Namespaces: {namespaces}.

Generated by ``{COMMAND}`` from torch {torch_release()}; do not edit.

A stub-only package: no runtime module has this name. ``<ns>.pyi`` types the eager call of each
op (``qalgebra.ops``), ``emit/<ns>.pyi`` the call that builds a graph node through a Rewriter
(``qalgebra.emit``). Each is used for typing only, e.g.

    if TYPE_CHECKING:
        from qalgebra.opstubs import onednn as _onednn
    onednn = cast("_onednn.Namespace", torch.ops.onednn)

so ``from qalgebra.ops import onednn`` is typed by ``onednn.pyi`` while the value is the real
``torch.ops.onednn``. Every eager overload class derives from ``OpOverload`` and every packet
class from ``OpOverloadPacket``, so both still go where torch expects those.
"""
'''


def render_emit_init() -> str:
    """The text of ``emit/__init__.pyi``."""
    return f'''"""Typed graph-side calls: ``qalgebra.emit``'s namespaces (see the parent package).

Generated by ``{COMMAND}`` from torch {torch_release()}; do not edit.
"""
'''


def generate(
    selection: dict[str, tuple[str, ...] | None] | None = None,
) -> dict[str, str]:
    """Relative path -> text of every stub file for ``selection`` (default: :data:`SELECTION`)."""
    chosen = SELECTION if selection is None else selection
    files = {"__init__.pyi": render_package_init(chosen), "emit/__init__.pyi": render_emit_init()}
    for ns, ops in chosen.items():
        packets = load_packets(ns, ops)
        files[f"{ns}.pyi"] = render_namespace(ns, packets)
        files[f"emit/{ns}.pyi"] = render_emit_namespace(ns, packets)
    for name, text in files.items():
        compile(text, name, "exec")  # fail here, not in mypy, if a schema renders as bad syntax
    return files


def write(out: Path, selection: dict[str, tuple[str, ...] | None] | None = None) -> list[Path]:
    """Write every stub file into ``out`` and delete stale ``.pyi`` files there."""
    files = generate(selection)
    (out / "emit").mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.pyi"), *out.glob("emit/*.pyi")]:
        if stale.relative_to(out).as_posix() not in files:
            stale.unlink()
    written = []
    for name, text in sorted(files.items()):
        path = out / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def parse_selection(specs: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """``["mylib", "aten.take,aten.exp"]`` -> ``{"mylib": None, "aten": ("take", "exp")}``."""
    selection: dict[str, tuple[str, ...] | None] = {}
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            ns, _, op = item.partition(".")
            if not op:
                selection[ns] = None
            elif ns not in selection or selection[ns] is not None:
                selection[ns] = (*(selection.get(ns) or ()), op)
    return selection


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Generate typed stubs of torch operator namespaces."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--ops",
        action="append",
        default=[],
        help="NAMESPACE (every op) or NAMESPACE.OP[,NAMESPACE.OP...]; repeatable "
        "(default: qalgebra's own selection)",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        help="a module to import first (one that registers the ops); repeatable",
    )
    args = parser.parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    selection = parse_selection(args.ops) if args.ops else None
    for path in write(args.out, selection):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
