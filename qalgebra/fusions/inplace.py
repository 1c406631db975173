"""In-place ops as their functional forms, and dropout in eval as what it is: its input.

``torch.export`` keeps what a model writes: torchvision-style ``nn.ReLU(inplace=True)`` is
``aten.relu_``, ``x += y`` is ``aten.add_``, ``nn.Hardswish(inplace=True)`` ``aten.hardswish_``;
``nn.Dropout`` and ``F.dropout(training=False)`` in eval are ``aten.dropout(x, p, False)``. The
catalog's patterns are written once, in the functional spelling. These two rewrites run first,
so every later fusion -- and any fusion a user adds -- sees that one spelling:

- ``EVAL_DROPOUT``: ``dropout``/``dropout_`` (and the feature / alpha variants) with
  ``train=False`` is replaced by its input: that is what ATen returns (the very tensor, no
  copy), so the replacement is exact, aliasing included. With ``train=True`` it is left alone.
- ``FUNCTIONALIZE``: an in-place op (the unary post-ops, ``hardsigmoid_``/``sigmoid_``, the
  clamps, ``add_``/``sub_``/``mul_``/``div_``) whose write nothing else can see
  (:func:`qalgebra.aliasing.observable_write`: the written tensor is made by the graph, and
  after the write it is read only through the op's result) becomes the functional op with the
  same arguments. A binary op is rewritten only when the functional result keeps the written
  tensor's dtype (``add_`` casts to it; ``add`` would promote). Where the write is observable
  -- a graph input, a module attribute, or a tensor (or a view of it) read again afterwards --
  the op stays in place and the lowering report says why (a refusal of ``functionalize``).

Why a rewrite rather than spelling ``relu_`` as ``relu`` in the patterns: whether a write is
observable is a fact about the whole graph (readers after the op, aliases), not about the
matched subgraph; the rewrite decides it once per op, in graph order, so a chain of in-place
ops (``hardswish_`` then ``hardtanh_``) is decided on the already functional graph. Patterns
stay one spelling each (no ``relu | relu_`` in every post-op, residual and pointwise pattern),
the matcher's root index stays small, and an op that is not fused (an in-place op in float
code between int8 ops) still becomes functional, which later fusions rely on (a quant lifted
over it, a dequant promoted past it). No re-export, no decomposition: shapes and symbols in
``meta['val']`` are kept as they are.

>>> FUNCTIONAL[torch.ops.aten.relu_.default]
<OpOverload(op='aten.relu', overload='default')>
>>> FUNCTIONALIZE.name, EVAL_DROPOUT.name
('functionalize', 'eval_dropout')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._ops import OpOverload

from qalgebra.aliasing import observable_write
from qalgebra.checks import satisfies
from qalgebra.errors import Refusal
from qalgebra.fusion import Fusion
from qalgebra.match import node_dtype
from qalgebra.pattern import Match, Var, any_call, call, ignored, literal, where
from qalgebra.rewriter import Rewriter
from qalgebra.schemas import given_arguments
from qalgebra.shapes import known_shape

__all__ = ["EVAL_DROPOUT", "FUNCTIONAL", "FUNCTIONALIZE", "INPLACE_BINARY"]

aten = torch.ops.aten

#: In-place ops by name; each has a functional twin of the same name without ``_``.
_UNARY_NAMES = (
    "relu_",
    "relu6_",
    "hardtanh_",
    "hardswish_",
    "hardsigmoid_",
    "silu_",
    "gelu_",
    "leaky_relu_",
    "elu_",
    "mish_",
    "tanh_",
    "sigmoid_",
    "clamp_",
    "clamp_min_",
    "clamp_max_",
)
_BINARY_NAMES = ("add_", "sub_", "mul_", "div_")


def _overloads(names: tuple[str, ...]) -> dict[OpOverload[..., Any], OpOverload[..., Any]]:
    """In-place overload -> functional overload, for the tensor overloads of ``names``."""
    table: dict[OpOverload[..., Any], OpOverload[..., Any]] = {}
    for name in names:
        packet = getattr(aten, name)
        functional = getattr(aten, name[:-1])
        for overload in packet.overloads():
            op = getattr(packet, overload)
            twin = getattr(functional, overload, None)
            if not isinstance(twin, OpOverload) or not _is_tensor_write(op):
                continue  # e.g. add_.t, a list op
            if [a.name for a in op._schema.arguments] != [a.name for a in twin._schema.arguments]:
                raise AssertionError(f"{op} and {twin} take different arguments")
            table[op] = twin
    return table


def _is_tensor_write(op: OpOverload[..., Any]) -> bool:
    first = op._schema.arguments[0]
    return (
        first.alias_info is not None and first.alias_info.is_write and str(first.type) == "Tensor"
    )


#: Every in-place op ``FUNCTIONALIZE`` handles, with its functional twin.
FUNCTIONAL: dict[OpOverload[..., Any], OpOverload[..., Any]] = {
    **_overloads(_UNARY_NAMES),
    **_overloads(_BINARY_NAMES),
}
#: The binary ones: their functional twin may promote where the in-place op casts back.
INPLACE_BINARY = frozenset(op for op in FUNCTIONAL if op.overloadpacket.__name__ in _BINARY_NAMES)

_WRITTEN = Var("written", fx.Node)


def _keeps_dtype(node: fx.Node) -> str | None:
    """Why the functional twin of binary ``node`` could return another dtype, or None."""
    written, other = node.args[0], node.args[1] if len(node.args) > 1 else None
    assert isinstance(written, fx.Node)
    dtype = node_dtype(written)
    if dtype is None:
        return f"the dtype of {written.name} is unknown (no meta['val'])"
    mine = torch.empty((1,), dtype=dtype)
    if isinstance(other, fx.Node):
        other_dtype, shape = node_dtype(other), known_shape(other)
        if other_dtype is None or shape is None:
            return f"the dtype or shape of {other.name} is unknown (no meta['val'])"
        result = torch.result_type(mine, torch.empty((1,) * min(len(shape), 1), dtype=other_dtype))
    elif isinstance(other, bool | int | float):
        result = torch.result_type(mine, other)
    else:
        return f"its operand {other!r} is neither a tensor nor a number"
    if result != dtype:
        return f"{node.target} keeps {dtype}, its functional twin would return {result}"
    return None


def _functionalize(m: Match, rw: Rewriter) -> fx.Node:
    node = m.root
    why = observable_write(node)
    if why is None and node.target in INPLACE_BINARY:
        why = _keeps_dtype(node)
    if why is not None:
        raise Refusal(f"kept in place: {why}")
    target = node.target
    assert isinstance(target, OpOverload)
    return rw.call(FUNCTIONAL[target], **given_arguments(node))


#: Namespaces of the ops a lowering emits: an in-place op writing their output is int8 code
#: (the lowering's own range clamp on a fused op's uint8 output), not a model's post-op.
_LOWERED_NAMESPACES = frozenset({"onednn", "quantized"})


def _model_float_write(m: Match) -> bool:
    written = m[_WRITTEN]
    if getattr(written.target, "namespace", None) in _LOWERED_NAMESPACES:
        return False
    dtype = node_dtype(m.root) or node_dtype(written)  # in place: the same dtype
    return dtype is None or dtype.is_floating_point or dtype.is_complex


#: What the catalog's post-op patterns read is float code the model wrote; in-place int8 code
#: (the lowering's own clamps) is left as it is, so lowering a lowered graph changes nothing.
_FLOAT_WRITE = satisfies(
    _model_float_write, "the written tensor is a float tensor, not a lowered op's output"
)

FUNCTIONALIZE = Fusion(
    name="functionalize",
    family="functionalize",
    pattern=where(any_call(tuple(FUNCTIONAL), _WRITTEN), _FLOAT_WRITE),
    rewrite=_functionalize,
    exclusive=False,
    doc="relu_ / add_ / hardswish_ / ... whose write nothing else reads  =>  relu / add / ...",
)


_DROPPED = Var("dropout_input", fx.Node)
_DROPOUTS = tuple(
    op
    for name in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
    for op in (getattr(aten, name).default, getattr(aten, name + "_").default)
)

EVAL_DROPOUT = Fusion(
    name="eval_dropout",
    family="functionalize",
    pattern=call(_DROPOUTS, _DROPPED, ignored(), literal(False)),
    rewrite=lambda m, rw: rw.node(m[_DROPPED]),
    exclusive=False,
    doc="dropout(x, p, train=False) (any variant, in place or not)  =>  x",
)
