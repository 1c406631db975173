"""Generate the operator-namespace stubs in ``stubs/qalgebra_opstubs/`` from live op schemas.

torch types every ``torch.ops.<namespace>.<op>.<overload>`` as ``OpOverload[..., Any]``. This script
reads the schema of each selected overload from the installed torch (``OpOverload._schema``; the
namespaces to cover in full are listed from ``torch._C._jit_get_all_schemas()``, which also holds
the Python-registered ``quantized_decomposed`` library once it is imported) and writes one ``.pyi``
module per namespace, in which:

- each overload is a class deriving from ``torch._ops.OpOverload`` with a ``__call__`` that mirrors
  its schema (argument names, kwarg-only arguments, defaults as ``...``, return types);
- each op is a class deriving from ``torch._ops.OpOverloadPacket`` with one attribute per overload
  and a ``__call__`` that is ``@overload``-ed over its tensor overloads in the order the runtime
  tries them (see ``packet_call_overloads``);
- the namespace is a class ``Namespace`` with one attribute per op, so a misspelt op is an error.

The output is deterministic for a given torch build. ``tests/test_stubs.py`` regenerates it and
compares byte for byte, so an upgrade of torch that changes a schema fails the tests until the stubs
are regenerated:

    python scripts/gen_stubs.py            # rewrite stubs/qalgebra_opstubs/
    python scripts/gen_stubs.py --out DIR  # write somewhere else
"""

from __future__ import annotations

import argparse
import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# Importing this module registers the Python-defined ``quantized_decomposed`` library (torchao's
# convert_pt2e imports the same module, so both produce the same operators).
import torch.ao.quantization.fx._decomposed

STUB_PACKAGE = "qalgebra_opstubs"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "stubs" / STUB_PACKAGE
MAX_LINE = 100
INDENT = "    "

# Which ops of which namespace get a stub; ``None`` means every op of the namespace.
SELECTION: dict[str, tuple[str, ...] | None] = {
    "aten": (
        # dtype conversions, reshapes and copies
        "_to_copy", "to", "view", "reshape", "_unsafe_view", "permute", "clone", "expand",
        "flatten", "squeeze", "unsqueeze", "t", "cat",
        # arithmetic of the decomposed quant / dequant forms
        "mul", "add", "sub", "round", "clamp", "clamp_min", "clamp_max", "mean",
        # compute ops
        "bmm", "mm", "addmm", "linear", "conv1d", "conv2d", "conv3d", "convolution",
        "_weight_int8pack_mm", "_int_mm", "max_pool2d", "max_pool2d_with_indices",
        # unary post-ops
        "relu", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "tanh", "sigmoid",
    ),
    "prims": ("convert_element_type",),
    "quantized_decomposed": None,
    "onednn": None,
    "quantized": ("max_pool2d", "int4mm_packed_weight_cpu", "embedding_bag_byte_unpack"),
}

# Builtin names a signature may use; a class attribute with one of these names (an overload called
# ``int`` or ``float``) would shadow it inside that class body, so there it is spelt ``builtins.X``.
_BUILTIN_TYPE_NAMES = frozenset(
    {"bool", "complex", "float", "int", "list", "object", "str", "tuple"}
)


class StubGenerationError(Exception):
    """The installed torch has an operator this generator cannot render faithfully."""


@dataclass(frozen=True, slots=True)
class Overload:
    """One overload: its attribute name on the packet and its schema."""

    name: str
    schema: torch._C.FunctionSchema


@dataclass(frozen=True, slots=True)
class Packet:
    """One op: its name and its overloads in the order the runtime resolves a packet call."""

    name: str
    overloads: tuple[Overload, ...]


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
    names = namespace_op_names(namespace) if ops is None else sorted(ops)
    if not names:
        raise StubGenerationError(f"namespace {namespace!r} has no registered op")
    ns = getattr(torch.ops, namespace)
    packets = []
    for name in names:
        packet = getattr(ns, name)
        overloads = tuple(
            Overload(ov, getattr(packet, ov)._schema) for ov in packet.overloads()
        )
        packets.append(Packet(name, overloads))
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
    return " | ".join(seen)


def render_type(
    t: torch._C.JitType, *, ret: bool, q: Qualify, n: int | None = None, typevars: set[str]
) -> str:
    """The Python type of a schema type, as an argument (``ret=False``) or a return value.

    Arguments are typed as permissively as the runtime accepts them (``int[]`` takes any sequence,
    ``int[2]`` also a bare int, ``Device`` also a string); returns are typed as concrete values.
    """
    kind = t.kind()
    if kind == "TensorType":
        return "torch.Tensor"
    if kind == "IntType":
        return q("int")
    if kind == "SymIntType":
        return _union(q("int"), "torch.SymInt")
    if kind == "FloatType":
        return q("float")
    if kind == "BoolType":
        return q("bool")
    if kind == "SymBoolType":
        return _union(q("bool"), "torch.SymBool")
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
        return _union(
            render_type(t.getElementType(), ret=ret, q=q, n=n, typevars=typevars), "None"
        )
    if kind == "ListType":
        inner = render_type(t.getElementType(), ret=ret, q=q, typevars=typevars)
        if ret:
            return f"{q('list')}[{inner}]"
        seq = f"Sequence[{inner}]"
        # ``int[2] stride`` also takes a bare int, broadcast by the runtime.
        return _union(inner, seq) if n is not None and " | " not in inner else seq
    if kind == "TupleType" and isinstance(t, torch._C.TupleType):
        elems = [render_type(e, ret=ret, q=q, typevars=typevars) for e in t.elements()]
        return f"{q('tuple')}[{', '.join(elems)}]"
    raise StubGenerationError(f"no Python type for schema type {kind} ({t.annotation_str})")


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


def signature(schema: torch._C.FunctionSchema, q: Qualify) -> Signature:
    """The ``__call__`` signature that mirrors ``schema``."""
    names = [a.name for a in schema.arguments]
    for name in names:
        if keyword.iskeyword(name) or not name.isidentifier():
            raise StubGenerationError(f"{schema}: argument {name!r} is not a Python identifier")
    # torch's own ``__call__`` takes its receiver positional-only so an argument may be ``self``.
    receiver = "_self" if "self" in names else "self"
    if receiver in names:
        raise StubGenerationError(f"{schema}: no free name for the receiver")
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


def _mentions_tensor(t: torch._C.JitType) -> bool:
    if t.kind() == "TensorType":
        return True
    if t.kind() in ("OptionalType", "ListType"):
        return _mentions_tensor(t.getElementType())
    return False


def packet_call_overloads(packet: Packet) -> tuple[Overload, ...]:
    """The overloads a packet's ``__call__`` is typed with, in the order the runtime tries them.

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
        if any(_mentions_tensor(arg.real_type) for arg in ov.schema.arguments)
    )
    return with_tensor or packet.overloads


def class_header(name: str, base: str) -> list[str]:
    """``class name(base):``, with the base on its own line when the line would be too long."""
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


def render_namespace(ns: str, packets: Sequence[Packet]) -> str:
    """The text of ``<ns>.pyi``."""
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
    typing_names = ["final"]
    if "@overload" in body:
        typing_names.append("overload")
    if module.typevars:
        typing_names.append("TypeVar")
    head = [
        f'"""Typed ``torch.ops.{ns}``: {len(packets)} ops.',
        "",
        f"Generated by scripts/gen_stubs.py from torch {torch_release()}; do not edit.",
        '"""',
        "",
    ]
    if "builtins." in body:
        head.append("import builtins")
    if "Sequence[" in body:
        head.append("from collections.abc import Sequence")
    # isort's order: CamelCase names (TypeVar) before functions (final, overload).
    typing_names.sort(key=lambda name: (not name[0].isupper(), name))
    head.append(f"from typing import {', '.join(typing_names)}")
    head += ["", "import torch", "from torch._ops import OpOverload, OpOverloadPacket"]
    if module.typevars:
        head += ["", *(f'{tv} = TypeVar("{tv}")' for tv in sorted(module.typevars))]
    return "\n".join(head) + "\n" + body + "\n"


def render_package_init() -> str:
    """The text of ``__init__.pyi``: the docstring that explains the mechanism."""
    namespaces = ", ".join(f"``{ns}``" for ns in SELECTION)
    return f'''"""Precise types for the torch operator namespaces qalgebra uses.

Namespaces: {namespaces}.

Generated by scripts/gen_stubs.py from torch {torch_release()}; do not edit.

This is a stub-only package: there is no runtime module of this name. mypy finds it through
``mypy_path = stubs`` and ``qalgebra/ops.py`` uses it only for typing, e.g.

    if TYPE_CHECKING:
        from qalgebra_opstubs import onednn as _onednn
    onednn = cast("_onednn.Namespace", torch.ops.onednn)

so ``from qalgebra.ops import onednn`` is typed by ``onednn.pyi`` while the value is the real
``torch.ops.onednn``. (A ``stubs/qalgebra/ops.pyi`` would never be read: mypy resolves the package
``qalgebra`` to the source tree first.) Every overload class derives from ``OpOverload`` and every
packet class from ``OpOverloadPacket``, so both still go where torch expects those.
"""
'''


def generate() -> dict[str, str]:
    """File name -> text of every stub file."""
    files = {"__init__.pyi": render_package_init()}
    for ns, ops in SELECTION.items():
        files[f"{ns}.pyi"] = render_namespace(ns, load_packets(ns, ops))
    for name, text in files.items():
        compile(text, name, "exec")  # fail here, not in mypy, if a schema renders as bad syntax
    return files


def write(out: Path) -> list[Path]:
    """Write every stub file into ``out`` and delete stale ``.pyi`` files there."""
    out.mkdir(parents=True, exist_ok=True)
    files = generate()
    for stale in out.glob("*.pyi"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in sorted(files.items()):
        path = out / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
