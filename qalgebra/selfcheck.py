"""Lowering-time self-check: every distinct fused kernel call runs once against its reference.

A rewrite replaces a matched subgraph (``m.nodes``, reading some nodes outside it) by new nodes
reading the same outside nodes: both compute one function. When the new nodes call a kernel
(an ``onednn.*`` / ``quantized.*`` op, or ``aten._weight_int8pack_mm``), :class:`SelfCheck` runs
both on the same random inputs -- shapes from ``meta['val']`` or :func:`~qalgebra.shapes.
known_shape` (symbolic sizes at their hints), dtypes from :func:`~qalgebra.match.node_dtype`,
integer values within the tensor's recorded quantization range -- and refuses the match
(:class:`~qalgebra.errors.Refusal`, cause ``"selfcheck"``) when the kernel's result is
outside :func:`agreement`'s bound. The check only reads the graph: it needs nothing from the
fusion, so it covers user-written fusions too.

Verdicts are cached per process by the call's *signature* -- the fusion, each new node's op,
its input shapes and dtypes, its geometry, post-op and output dtype (floats, such as scales,
and weight values are left out; zero points only as zero / non-zero): a model whose layers
repeat a shape pays for one run. What a check cannot evaluate (an unknown shape or dtype, a
reference that raises on random inputs) is counted as skipped and fused as before. So is every
kernel while probes are forced to another CPU's answers (:func:`qalgebra.isa.foreign_answers`):
the lowering then emits what another CPU runs, which this CPU may compute wrongly or crash on.

>>> stats = SelfCheckStats()
>>> SelfCheck("off", stats).enabled
False
>>> sorted(MODES)
['off', 'on']
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast, get_args

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from qalgebra.combinators import quantize_per_tensor
from qalgebra.errors import LoweringError, Refusal
from qalgebra.fusions.common import QUANT_RANGE_KEY
from qalgebra.isa import foreign_answers
from qalgebra.match import match_node, node_dtype
from qalgebra.pattern import Match, ignored
from qalgebra.qparams import qparams
from qalgebra.rewriter import Rewriter
from qalgebra.shapes import known_shape
from qalgebra.testing.oracle import BF16_RTOL, FLOAT_ATOL, FP32_RTOL, compare_outputs

__all__ = [
    "MODES",
    "SelfCheck",
    "SelfCheckMode",
    "SelfCheckStats",
    "agreement",
    "clear_cache",
    "emits_kernel",
]

SelfCheckMode: TypeAlias = Literal["off", "on"]
"""``"on"``: check each new signature once per process; ``"off"``: never."""
MODES: tuple[str, ...] = get_args(SelfCheckMode)

#: Namespaces whose ops are kernels the check distrusts; plus the single aten kernels below.
KERNEL_NAMESPACES = frozenset({"onednn", "quantized"})
KERNEL_OPS = frozenset({torch.ops.aten._weight_int8pack_mm.default})

#: A quantized output may differ from the reference by this many integer levels (a value at
#: x.5 rounded the other way) ...
MAX_STEPS = 1
#: ... and this fraction of its elements must be exactly equal (a kernel computing the same
#: function differs only where the exact value sits on a rounding edge). Measured on 1,500
#: drawn graphs of every family (fp32 and bf16): 0 steps, every element equal.
MIN_AGREEMENT = 0.9


@dataclass(slots=True)
class SelfCheckStats:
    """What the self-check did during one lowering (``LoweringReport.selfcheck``)."""

    mode: str = "off"
    #: Signatures run now (not in the cache before this lowering).
    ran: int = 0
    #: Matches whose signature's verdict came from the cache.
    cached: int = 0
    #: Matches refused because their kernel disagreed (run now or cached).
    refused: int = 0
    #: Matches not checked, by reason (unknown shape or dtype, reference failed on random input).
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people."""
        skipped = sum(self.skipped.values())
        return (
            f"self-check ({self.mode}): {self.ran} signature(s) run in {self.seconds * 1e3:.1f} "
            f"ms, {self.cached} served from the cache, {self.refused} refused, {skipped} skipped"
            + (
                f" ({'; '.join(f'{k}: {v}' for k, v in sorted(self.skipped.items()))})"
                if skipped
                else ""
            )
        )


@dataclass(frozen=True, slots=True)
class _Verdict:
    ok: bool
    message: str


class _Skip(Exception):
    """This match cannot be checked (the reason is counted, the match fuses unchecked)."""


_VERDICTS: dict[Hashable, _Verdict] = {}


def clear_cache() -> None:
    """Forget every cached verdict (tests; after replacing a kernel at runtime)."""
    _VERDICTS.clear()


def emits_kernel(nodes: Iterable[fx.Node]) -> bool:
    """Whether any of ``nodes`` calls a kernel the self-check distrusts."""
    return any(_is_kernel(n.target) for n in nodes if n.op == "call_function")


def _is_kernel(target: object) -> bool:
    return target in KERNEL_OPS or getattr(target, "namespace", None) in KERNEL_NAMESPACES


class SelfCheck:
    """Checks each rewrite of one lowering (see the module docstring); counts into ``stats``."""

    def __init__(self, mode: SelfCheckMode, stats: SelfCheckStats) -> None:
        if mode not in MODES:
            raise LoweringError(f"lower: selfcheck must be one of {MODES}, got {mode!r}")
        self.enabled = mode != "off"
        self.stats = stats
        stats.mode = mode
        self._constants: dict[fx.Node, bool] = {}

    def check(self, fusion: str, m: Match, rw: Rewriter, new: fx.Node) -> None:
        """Raise :class:`Refusal` if the nodes ``rw`` built for ``m`` disagree with ``m``."""
        if not self.enabled or new is m.root or not emits_kernel(rw.created):
            return
        foreign = foreign_answers()
        if foreign:
            names = ", ".join(sorted(foreign))
            self.stats.skipped[f"probes forced to another CPU's answers ({names})"] += 1
            return
        start = time.perf_counter()
        try:
            verdict = self._verdict(fusion, m, rw, new)
        except _Skip as skip:
            self.stats.skipped[str(skip)] += 1
            return
        finally:
            self.stats.seconds += time.perf_counter() - start
        if not verdict.ok:
            self.stats.refused += 1
            raise Refusal(f"self-check: {verdict.message}", cause="selfcheck")

    def _verdict(self, fusion: str, m: Match, rw: Rewriter, new: fx.Node) -> _Verdict:
        inside = set(m.nodes)
        read = _unique(a for n in m.nodes for a in n.all_input_nodes if a not in inside)
        constants = [n for n in read if self._constant(n)]
        external = [n for n in read if n not in set(constants)]
        candidate = _ancestors(new, set(rw.created))
        key = (fusion, _signature(external, constants, candidate, rw.module))
        cached = _VERDICTS.get(key)
        if cached is not None:
            self.stats.cached += 1
            return cached
        verdict = _run_check(m, rw.module, external, constants, candidate, new)
        self.stats.ran += 1
        _VERDICTS[key] = verdict
        return verdict

    def _constant(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from module attributes only (so not drawn at random).

        Memoized for the lowering: a rewrite replaces nodes by equivalent ones, so a node never
        changes from constant to not. Iterative, as a long chain may sit above a node.
        """
        memo = self._constants
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


def _unique(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _ancestors(root: fx.Node, among: set[fx.Node]) -> list[fx.Node]:
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


def _signature(
    external: Sequence[fx.Node],
    constants: Sequence[fx.Node],
    candidate: Sequence[fx.Node],
    module: Any,
) -> object:
    """The cache key of a check: what the kernel calls see, not the weights' or scales' values."""
    index = {n: f"in{i}" for i, n in enumerate(external)}
    index.update({n: f"const{i}" for i, n in enumerate(constants)})
    index.update({n: f"new{i}" for i, n in enumerate(candidate)})
    inputs = tuple(_abstract_input(n) for n in external)
    calls = []
    for node in candidate:
        if node.op == "get_attr":
            value = _fetch_attr(module, str(node.target))
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


def _abstract_input(node: fx.Node) -> object:
    val = node.meta.get("val")
    if isinstance(val, int | torch.SymInt):
        return ("int",)
    shape = known_shape(node)
    dtype = node_dtype(node)
    return (
        None if shape is None else tuple(_hint(d) for d in shape),
        dtype,
        _int_range(node, dtype) if dtype is not None and not dtype.is_floating_point else None,
    )


# --------------------------------------------------------------------------------------------
# Running both sides


def _run_check(
    m: Match,
    module: Any,
    external: Sequence[fx.Node],
    constants: Sequence[fx.Node],
    candidate: Sequence[fx.Node],
    new: fx.Node,
) -> _Verdict:
    generator = torch.Generator().manual_seed(0)
    base: dict[fx.Node, object] = {n: _random_value(n, generator) for n in external}
    try:
        for node in constants:
            _evaluate(_constant_ancestors(node), base, module)
        ref_env = {n: _promoted(v) for n, v in base.items()}
        _evaluate(_ancestors(m.root, set(m.nodes)), ref_env, module, promote=True)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise _Skip(f"the reference raised {type(exc).__name__}") from exc
    readable = set(base) | set(candidate)
    if any(a not in readable and a.op != "get_attr" for n in candidate for a in n.all_input_nodes):
        raise _Skip("the replacement reads a node inside the match")
    new_env = {n: _clone(v) for n, v in base.items()}
    try:
        _evaluate(candidate, new_env, module)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _Verdict(
            False, f"the fused op raised {type(exc).__name__} on random inputs: {first}"
        )
    return agreement(
        ref_env[m.root],
        new_env[new],
        dtype=node_dtype(m.root),
        bf16=_computes_bf16(m.nodes),
        magnitude=_largest_float(ref_env[n] for n in m.nodes if n in ref_env),
    )


def _largest_float(values: Iterable[object]) -> float:
    """The largest magnitude among the float tensors in ``values`` (0.0 if none)."""
    largest = 0.0
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            largest = max(largest, float(value.detach().abs().max()))
    return largest


def _evaluate(
    order: Sequence[fx.Node], env: dict[fx.Node, object], module: Any, *, promote: bool = False
) -> None:
    """Run ``order`` eagerly, reading node values from (and writing them to) ``env``.

    ``promote``: compute in float32 where the graph says bfloat16 (values and dtype arguments),
    so that the reference is the exact function the bf16 graph approximates.
    """

    def value(node: fx.Node) -> object:
        if node not in env:
            if node.op != "get_attr":
                raise _Skip(f"no value for {node.op} node {node.name}")
            env[node] = _fetch_attr(module, str(node.target))
        return _promoted(env[node]) if promote else env[node]

    for node in order:
        if node in env:
            continue
        if node.op == "get_attr":
            value(node)
            continue
        args = _substitute(node.args, value, promote)
        kwargs = {k: _substitute(v, value, promote) for k, v in node.kwargs.items()}
        if node.op == "call_function":
            env[node] = cast(Callable[..., object], node.target)(*args, **kwargs)
        elif node.op == "call_method":
            self_arg, *rest = args
            env[node] = getattr(self_arg, str(node.target))(*rest, **kwargs)
        else:
            raise _Skip(f"cannot evaluate a {node.op} node")


def _promoted(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    return torch.float32 if value == torch.bfloat16 else value


def _substitute(arg: object, value: Callable[[fx.Node], object], promote: bool) -> Any:
    """``arg`` with every node replaced by its value (inside lists and tuples too)."""
    if isinstance(arg, fx.Node):
        return value(arg)
    if isinstance(arg, list | tuple):
        return type(arg)(_substitute(a, value, promote) for a in arg)
    return _promoted(arg) if promote and isinstance(arg, torch.dtype) else arg


def _fetch_attr(module: Any, target: str) -> object:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _hint(size: object) -> int:
    if type(size) is int:
        return size
    if isinstance(size, torch.SymInt):
        try:
            return int(optimization_hint(size))
        except Exception as exc:  # unbacked, or no hint recorded
            raise _Skip("a symbolic size without a hint") from exc
    raise _Skip(f"a size of type {type(size).__name__}")


_PRODUCER_Q = qparams("selfcheck_producer")
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


def _int_range(node: fx.Node, dtype: torch.dtype) -> tuple[int, int]:
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


def _constant_ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and everything it is computed from, in dependency order (all constants)."""
    return _ancestors(node, _upstream(node))


def _upstream(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _random_value(node: fx.Node, generator: torch.Generator) -> object:
    """A random value ``node`` could take (an int: its hint)."""
    val = node.meta.get("val")
    if isinstance(val, int | torch.SymInt):
        return _hint(val)
    shape = known_shape(node)
    if shape is None:
        raise _Skip("an input's shape is unknown")
    dims = [_hint(d) for d in shape]
    dtype = node_dtype(node)
    if dtype is None:
        raise _Skip("an input's dtype is unknown")
    if dtype.is_floating_point:
        return torch.randn(dims, generator=generator).to(dtype)
    if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        low, high = _int_range(node, dtype)
        return torch.randint(low, high + 1, dims, generator=generator, dtype=torch.int64).to(dtype)
    raise _Skip(f"an input of dtype {dtype}")


def _computes_bf16(nodes: Iterable[fx.Node]) -> bool:
    return any(node_dtype(n) == torch.bfloat16 for n in nodes)


def agreement(
    reference: object,
    fused: object,
    *,
    dtype: torch.dtype | None = None,
    bf16: bool = False,
    magnitude: float = 0.0,
) -> _Verdict:
    """Whether ``fused`` computes ``reference`` closely enough (the self-check's bound).

    ``dtype``: the dtype the replaced node had (None: unknown), which ``fused`` must have; a
    float ``reference`` computed in float32 for a bf16 graph (``bf16``) is rounded to it first.
    Quantized outputs: at most :data:`MAX_STEPS` integer levels apart and at least
    :data:`MIN_AGREEMENT` of the elements equal. Float outputs: within the oracle's relative
    tolerance of the reference's magnitude (``FP32_RTOL``; ``BF16_RTOL`` for a bf16 graph,
    whose kernel rounds where the float32 reference does not), and of ``magnitude``, the
    largest float value the replaced subgraph computes: a squashing post-op (tanh, sigmoid)
    keeps the rounding error of its larger pre-activation while shrinking the output (measured:
    a dynamic linear + tanh, outputs up to 1, differed by 1.8e-5 from its pre-activation sums).
    """
    refs, fuseds = _tensors(reference), _tensors(fused)
    if refs is None or fuseds is None or len(refs) != len(fuseds):
        return _Verdict(
            False, f"the fused op returns {_kind(fused)}, the reference {_kind(reference)}"
        )
    if dtype is not None and len(fuseds) == 1 and fuseds[0].dtype != dtype:
        return _Verdict(False, f"the fused op returns {_kind(fused)}, the graph's value {dtype}")
    refs = [
        r.to(f.dtype) if r.is_floating_point() and f.is_floating_point() else r
        for r, f in zip(refs, fuseds, strict=True)
    ]
    rtol = BF16_RTOL if bf16 else FP32_RTOL
    result = compare_outputs(
        refs, fuseds, quant_step=None, max_steps=MAX_STEPS, rtol=rtol,
        atol=FLOAT_ATOL + rtol * magnitude,
    )  # fmt: skip
    if not result.ok:
        return _Verdict(False, result.message)
    for i, (ref, out) in enumerate(zip(refs, fuseds, strict=True)):
        if ref.dtype in (torch.uint8, torch.int8) and ref.numel():
            equal = float((ref == out).double().mean())
            if equal < MIN_AGREEMENT:
                return _Verdict(
                    False,
                    f"output {i}: only {equal:.3f} of the quantized elements equal the reference "
                    f"(need {MIN_AGREEMENT}); {result.message}",
                )
    return _Verdict(True, result.message)


def _tensors(value: object) -> list[torch.Tensor] | None:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__
