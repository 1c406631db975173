"""Run a matched subgraph and the nodes a rewrite wrote for it, eagerly, on random inputs.

What :mod:`qalgebra.selfcheck` (do they compute the same function?) and
:mod:`qalgebra.costcheck` (which is faster?) share: the nodes a match reads from outside it
(:class:`Operands`: inputs drawn at random, constants computed from the module), values for
them (:func:`random_value`: shapes from ``meta['val']`` or :func:`~qalgebra.shapes.known_shape`,
symbolic sizes at their hints, integers within the tensor's recorded quantization range),
evaluation of nodes in order (:func:`evaluate`) and a cache key that says what a kernel call
sees without the weights' or scales' values (:func:`signature`).
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from qalgebra.combinators import quantize_per_tensor
from qalgebra.draws import random_floats, random_ints
from qalgebra.eager_ops import eager_call
from qalgebra.fusions.common import QUANT_RANGE_KEY
from qalgebra.match import match_node, node_dtype
from qalgebra.pattern import Match, ignored
from qalgebra.qparams import qparams
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape

__all__ = [
    "CheckStats",
    "ConstantMemo",
    "Operands",
    "Skip",
    "ancestors",
    "bound_call",
    "clone",
    "constant_ancestors",
    "evaluate",
    "fetch_attr",
    "int_range",
    "intra_op_threads",
    "operands",
    "promoted",
    "random_inputs",
    "random_value",
    "signature",
    "unique",
]


@dataclass(slots=True)
class CheckStats:
    """What a check did during one lowering: the part both checks' statistics share."""

    mode: str = "off"
    #: Matches whose signature's outcome came from the cache.
    cached: int = 0
    #: Matches the check refused (judged now or from the cache).
    refused: int = 0
    #: Matches not judged, by reason (an unknown shape or dtype, a side raised...): fused.
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def skipped_text(self) -> str:
        """``N skipped`` and, if any, the reasons."""
        total = sum(self.skipped.values())
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{total} skipped" + (f" ({reasons})" if total else "")


class Skip(Exception):
    """This match cannot be run (the reason is counted; the match is judged as if it passed)."""


@dataclass(frozen=True, slots=True)
class Operands:
    """What a match and its replacement read, and the replacement's nodes in order."""

    #: Nodes outside the match it reads that are not constants: drawn at random.
    external: tuple[fx.Node, ...]
    #: Nodes outside the match computed from module attributes only: evaluated.
    constants: tuple[fx.Node, ...]
    #: The replacement's nodes ``new`` depends on, in dependency order, ``new`` last.
    candidate: tuple[fx.Node, ...]

    def key(self, module: Any) -> object:
        """:func:`signature` of these operands."""
        return signature(self.external, self.constants, self.candidate, module)


class ConstantMemo:
    """Whether a node is computed from module attributes only (so not drawn at random).

    Memoized for a lowering: a rewrite replaces nodes by equivalent ones, so a node never
    changes from constant to not. Iterative, as a long chain may sit above a node.
    """

    def __init__(self) -> None:
        self._memo: dict[fx.Node, bool] = {}

    def __call__(self, node: fx.Node) -> bool:
        memo = self._memo
        stack = [node]
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in memo]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            memo[n] = n.op == "get_attr" or (
                n.op == "call_function" and all(memo[a] for a in n.all_input_nodes)
            )
        return memo[node]


def operands(m: Match, rw: Rewriter, new: fx.Node, is_constant: ConstantMemo) -> Operands:
    """What ``m`` reads from outside it, split into drawn and computed, and ``new``'s nodes."""
    inside = set(m.nodes)
    read = unique(a for n in m.nodes for a in n.all_input_nodes if a not in inside)
    constants = [n for n in read if is_constant(n)]
    chosen = set(constants)
    return Operands(
        external=tuple(n for n in read if n not in chosen),
        constants=tuple(constants),
        candidate=tuple(ancestors(new, set(rw.created))),
    )


def random_inputs(ops: Operands, module: Any, seed: int = 0) -> dict[fx.Node, object]:
    """Values for ``ops``: the external nodes drawn (seeded), the constants' ancestors computed.

    Raises :class:`Skip` when a value cannot be drawn or computed.
    """
    generator = torch.Generator().manual_seed(seed)
    env: dict[fx.Node, object] = {n: random_value(n, generator) for n in ops.external}
    try:
        for node in ops.constants:
            evaluate(constant_ancestors(node), env, module)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise Skip(f"a constant raised {type(exc).__name__}") from exc
    return env


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` intra-op threads, then restore the caller's setting.

    Both checks run kernels as the model will: at the thread count the caller had when the
    lowering began (the lowering itself prepacks on one thread).
    """
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unique(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def ancestors(root: fx.Node, among: set[fx.Node]) -> list[fx.Node]:
    """``root`` and the nodes of ``among`` it reads, transitively, in dependency order."""
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(node: fx.Node) -> None:
        if node in seen:
            return
        seen.add(node)
        for arg in node.all_input_nodes:
            if arg in among:
                visit(arg)
        order.append(node)

    visit(root)
    return order


# --------------------------------------------------------------------------------------------
# Signatures


def signature(
    external: Sequence[fx.Node],
    constants: Sequence[fx.Node],
    candidate: Sequence[fx.Node],
    module: Any,
) -> object:
    """The cache key of a check: what the kernel calls see, not the weights' or scales' values."""
    index = {n: f"in{i}" for i, n in enumerate(external)}
    index.update({n: f"const{i}" for i, n in enumerate(constants)})
    index.update({n: f"new{i}" for i, n in enumerate(candidate)})
    inputs = tuple(abstract_input(n) for n in external)
    calls = []
    for node in candidate:
        if node.op == "get_attr":
            value = fetch_attr(module, str(node.target))
            calls.append(("const", *_tensor_key(value)))
            continue
        names = _argument_names(node.target)
        args = tuple(
            _abstract(a, names[i] if i < len(names) else "", index) for i, a in enumerate(node.args)
        )
        kwargs = tuple(sorted((k, _abstract(v, k, index)) for k, v in node.kwargs.items()))
        calls.append((str(node.target), args, kwargs))
    return inputs, tuple(calls)


@functools.cache
def _argument_names(target: object) -> list[str]:
    schema = getattr(target, "_schema", None)
    return [a.name for a in schema.arguments] if schema is not None else []


def _abstract(value: object, name: str, index: dict[fx.Node, str]) -> object:
    if isinstance(value, fx.Node):
        return index.get(value, ("node", value.op, str(value.target)))
    kind = type(value)
    if kind is float:
        return "float"  # scales, post-op scalars: values the kernel takes, not its path
    if kind is int:
        if "zero_point" in name or name.endswith("zp"):
            return "zp0" if value == 0 else "zp"  # the kernel's path, not the value
        return value
    if isinstance(value, list | tuple):
        return tuple(_abstract(v, name, index) for v in value)
    if value is None or kind in (bool, str, torch.dtype, torch.memory_format):
        return value
    return kind.__name__


def _tensor_key(value: object) -> tuple[object, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.layout
    return (type(value).__name__,)


def abstract_input(node: fx.Node) -> object:
    val = node.meta.get("val")
    if isinstance(val, int | torch.SymInt):
        return ("int",)
    shape = known_shape(node)
    dtype = node_dtype(node)
    return (
        None if shape is None else tuple(hint(d) for d in shape),
        dtype,
        int_range(node, dtype) if dtype is not None and not dtype.is_floating_point else None,
    )


# --------------------------------------------------------------------------------------------
# Running both sides


def evaluate(
    order: Sequence[fx.Node], env: dict[fx.Node, object], module: Any, *, promote: bool = False
) -> None:
    """Run ``order`` eagerly, reading node values from (and writing them to) ``env``.

    ``promote``: compute in float32 where the graph says bfloat16 (values and dtype arguments),
    so that the reference is the exact function the bf16 graph approximates.
    """

    def value(node: fx.Node) -> object:
        if node not in env:
            if node.op != "get_attr":
                raise Skip(f"no value for {node.op} node {node.name}")
            env[node] = fetch_attr(module, str(node.target))
        return promoted(env[node]) if promote else env[node]

    for node in order:
        if node in env:
            continue
        if node.op == "get_attr":
            value(node)
            continue
        args = substitute(node.args, value, promote)
        kwargs = {k: substitute(v, value, promote) for k, v in node.kwargs.items()}
        if node.op == "call_function":
            env[node] = eager_call(node)(*args, **kwargs)  # the op, or the same numbers faster
        elif node.op == "call_method":
            self_arg, *rest = args
            env[node] = getattr(self_arg, str(node.target))(*rest, **kwargs)
        else:
            raise Skip(f"cannot evaluate a {node.op} node")


def bound_call(
    node: fx.Node,
    env: dict[fx.Node, object],
    module: Any,
    *,
    call_as: Callable[..., object] | None = None,
) -> Callable[[], object]:
    """A thunk calling ``node``'s op on its arguments' values in ``env`` (computed already);
    ``call_as``: another binding of the same op to call instead (the same arguments)."""

    def value(arg: fx.Node) -> object:
        if arg not in env:
            if arg.op != "get_attr":
                raise Skip(f"no value for {arg.op} node {arg.name}")
            env[arg] = fetch_attr(module, str(arg.target))
        return env[arg]

    if node.op != "call_function":
        raise Skip(f"cannot call a {node.op} node")
    args = substitute(node.args, value, False)
    kwargs = {k: substitute(v, value, False) for k, v in node.kwargs.items()}
    target = cast(Callable[..., object], node.target) if call_as is None else call_as
    return lambda: target(*args, **kwargs)


def promoted(value: object) -> object:
    """``value`` with bf16 widened to float32: a bf16 tensor as a float32 one, the dtype itself
    as ``torch.float32``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        # not ``value == torch.bfloat16`` for a tensor: that goes through the tensor's
        # ``__eq__`` (about 20 us) to come out False
        return value.float() if value.dtype == torch.bfloat16 else value
    return torch.float32 if value is torch.bfloat16 else value


def substitute(arg: object, value: Callable[[fx.Node], object], promote: bool) -> Any:
    """``arg`` with every node replaced by its value (inside lists and tuples too)."""
    if isinstance(arg, fx.Node):
        return value(arg)
    if isinstance(arg, list | tuple):
        return type(arg)(substitute(a, value, promote) for a in arg)
    return promoted(arg) if promote and isinstance(arg, torch.dtype) else arg


def fetch_attr(module: Any, target: str) -> object:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value


def hint(size: object) -> int:
    if type(size) is int:
        return size
    if isinstance(size, torch.SymInt):
        try:
            return int(optimization_hint(size))
        except Exception as exc:  # unbacked, or no hint recorded
            raise Skip("a symbolic size without a hint") from exc
    raise Skip(f"a size of type {type(size).__name__}")


_PRODUCER_Q = qparams("trial_producer")
_PRODUCER = quantize_per_tensor(ignored(), _PRODUCER_Q)
_qd = torch.ops.quantized_decomposed
_QUANTIZE = frozenset({_qd.quantize_per_tensor.default, _qd.quantize_per_tensor.tensor})
_DEQUANTIZE = frozenset({_qd.dequantize_per_tensor.default, _qd.dequantize_per_tensor.tensor})
_CONVERSIONS = frozenset(
    {
        torch.ops.prims.convert_element_type.default,
        torch.ops.aten._to_copy.default,
        torch.ops.aten.to.dtype,
    }
)


def _quant_range_args(node: fx.Node) -> tuple[int, int] | None:
    qmin, qmax = node.args[3:5] if len(node.args) >= 5 else (None, None)
    return (qmin, qmax) if isinstance(qmin, int) and isinstance(qmax, int) else None


def int_range(node: fx.Node, dtype: torch.dtype) -> tuple[int, int]:
    """The values an integer tensor can hold: its dtype's range, narrowed by what is known --
    the range a rewrite recorded, the quantize producing it, the dequantizes reading it."""
    info = torch.iinfo(dtype)
    low, high = info.min, info.max
    ranges: list[tuple[int, int]] = []
    recorded = node.meta.get(QUANT_RANGE_KEY)
    if isinstance(recorded, tuple):
        ranges.append((int(recorded[0]), int(recorded[1])))
    if node.op == "call_function" and node.target in _QUANTIZE:
        ranges.extend(filter(None, [_quant_range_args(node)]))
    elif node.op == "call_function" and node.target in _CONVERSIONS:  # a decomposed quantize?
        producer = match_node(_PRODUCER, node)
        if producer is not None:
            ranges.append((producer[_PRODUCER_Q.quant_min], producer[_PRODUCER_Q.quant_max]))
    ranges.extend(
        filter(None, [_quant_range_args(u) for u in node.users if u.target in _DEQUANTIZE])
    )
    for a, b in ranges:
        if max(low, a) <= min(high, b):
            low, high = max(low, a), min(high, b)
    return low, high


def constant_ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and everything it is computed from, in dependency order (all constants)."""
    return ancestors(node, upstream(node))


def upstream(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def random_value(node: fx.Node, generator: torch.Generator) -> object:
    """A random value ``node`` could take (an int: its hint)."""
    val = node.meta.get("val")
    if isinstance(val, int | torch.SymInt):
        return hint(val)
    shape = known_shape(node)
    if shape is None:
        raise Skip("an input's shape is unknown")
    dims = [hint(d) for d in shape]
    dtype = node_dtype(node)
    if dtype is None:
        raise Skip("an input's dtype is unknown")
    strides = _strides(val, len(dims))
    if dtype.is_floating_point:
        return random_floats(dims, strides, dtype, generator)
    if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        low, high = int_range(node, dtype)
        return random_ints(dims, strides, low, high, dtype, generator)
    raise Skip(f"an input of dtype {dtype}")


def _strides(val: object, rank: int) -> list[int] | None:
    """The recorded value's strides at their hints, or None (unknown: contiguous)."""
    if not isinstance(val, torch.Tensor) or val.dim() != rank:
        return None
    try:
        return [hint(s) for s in val.stride()]
    except Skip:
        return None
