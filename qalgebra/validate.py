"""What the lowering checks before it rewrites anything: the arguments, and what no graph can run.

``lower`` rejects here, with an :class:`~qalgebra.errors.UnsupportedGraphError` naming the
argument or the node, what it can tell is wrong up front: not a GraphModule (an
``ExportedProgram`` or a plain module, with the call that gives one), example inputs that are not
a sequence, hold something other than tensors and numbers, or disagree with the graph's
placeholders (count, dtype, rank, static sizes; empty example inputs mean none are known and
are not compared), a malformed graph, a graph in training mode
(batch norm updating its statistics, dropout), and (de)quantize nodes that cannot run (a
dequantize of a tensor of another dtype, a quantize of an integer tensor, a quant range outside
its dtype, a scale of 0 to divide by). Everything else is judged fusion by fusion: what a fusion
cannot lower exactly is left as it is, with the reason in the report (``docs/bad-inputs.md``
lists the cases).

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
>>> check_arguments(gm, [torch.randn(2)]) is gm
True
>>> check_arguments(gm, [torch.randn(2), torch.randn(2)])
Traceback (most recent call last):
  ...
qalgebra.errors.UnsupportedGraphError: lower: example_inputs has 2 inputs, the graph takes 1 ...
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch._ops import OpOverload
from torch.utils import _pytree as pytree

from qalgebra.errors import UnsupportedGraphError

__all__ = ["check_arguments", "check_graph"]

#: Modules that compute differently in training mode (batch statistics, random masks).
_TRAINING_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)

#: Ops that only exist in training mode (batch norm updating its running statistics).
_TRAINING_OPS = frozenset(
    {"aten::_batch_norm_with_update", "aten::_native_batch_norm_legit_functional"}
)

_QUANTIZE = frozenset(
    {"quantized_decomposed::quantize_per_tensor", "quantized_decomposed::quantize_per_channel"}
)
_DEQUANTIZE = frozenset(
    {"quantized_decomposed::dequantize_per_tensor", "quantized_decomposed::dequantize_per_channel"}
)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

_EVAL_HINT = (
    "lower an eval-mode graph (after prepare_qat_pt2e: "
    "torchao.quantization.pt2e.move_exported_model_to_eval)"
)


def check_arguments(gm: object, example_inputs: object) -> fx.GraphModule:
    """``gm`` as a GraphModule, after checking it and ``example_inputs`` against each other."""
    module = _graph_module(gm)
    inputs = _inputs(example_inputs)
    placeholders = _match_placeholders(module, inputs)
    given = {
        node: value.dtype
        for node, value in zip(placeholders, inputs, strict=False)
        if isinstance(value, torch.Tensor)
    }
    check_graph(module, given)
    return module


def _graph_module(gm: object) -> fx.GraphModule:
    if isinstance(gm, fx.GraphModule):
        return gm
    kind = type(gm).__name__
    if isinstance(gm, torch.export.ExportedProgram):
        hint = "lower its module: lower(ep.module(), example_inputs)"
    elif isinstance(gm, nn.Module):
        hint = (
            "export and quantize it first "
            "(torch.export.export(...).module(), prepare_pt2e, convert_pt2e)"
        )
    else:
        hint = "pass the GraphModule convert_pt2e returns"
    raise UnsupportedGraphError(
        f"lower: expected a torch.fx.GraphModule (from convert_pt2e), got {kind}: {hint}"
    )


def _inputs(example_inputs: object) -> list[Any]:
    if not isinstance(example_inputs, list | tuple):
        raise UnsupportedGraphError(
            "lower: expected example_inputs as a tuple or list, got "
            f"{type(example_inputs).__name__}"
        )
    leaves, _ = pytree.tree_flatten_with_path(list(example_inputs))
    for path, leaf in leaves:
        if leaf is not None and not isinstance(leaf, torch.Tensor | int | float | bool):
            raise UnsupportedGraphError(
                f"lower: example_inputs{pytree.keystr(path)} is a {type(leaf).__name__}, "
                "expected a tensor (or a number)"
            )
    return [leaf for _, leaf in leaves]


def _match_placeholders(gm: fx.GraphModule, inputs: list[Any]) -> list[fx.Node]:
    """The placeholders, after checking ``inputs`` fit them (count; dtype, rank and static sizes
    where a placeholder records its value)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not inputs:
        return placeholders  # none given (the CLI, for a program saved without them)
    required = [p for p in placeholders if not p.args]  # a default value makes one optional
    if not len(required) <= len(inputs) <= len(placeholders):
        takes = (
            str(len(placeholders))
            if len(required) == len(placeholders)
            else f"{len(required)} to {len(placeholders)}"
        )
        names = ", ".join(p.name for p in placeholders)
        raise UnsupportedGraphError(
            f"lower: example_inputs has {len(inputs)} inputs, the graph takes {takes} ({names})"
        )
    for i, (node, value) in enumerate(zip(placeholders, inputs, strict=False)):
        expected = node.meta.get("val")
        if not isinstance(expected, torch.Tensor):
            continue
        where = f"lower: example input {i} (placeholder {node.name})"
        if not isinstance(value, torch.Tensor):
            raise UnsupportedGraphError(f"{where} is a {type(value).__name__}, expected a tensor")
        if value.dtype != expected.dtype:
            raise UnsupportedGraphError(
                f"{where} is {value.dtype}, the graph expects {expected.dtype}"
            )
        static = [d if type(d) is int else None for d in expected.shape]
        if value.dim() != len(static) or any(
            d is not None and d != v for d, v in zip(static, value.shape, strict=False)
        ):
            shape = ["?" if d is None else d for d in static]
            raise UnsupportedGraphError(
                f"{where} has shape {list(value.shape)}, the graph expects {shape}"
            )
    return placeholders


def check_graph(gm: fx.GraphModule, given: Mapping[fx.Node, torch.dtype] | None = None) -> None:
    """Reject a malformed graph, one in training mode, or (de)quantize nodes that cannot run.

    ``given``: the dtype of placeholders' example inputs (with ``get_attr`` tensors, the values
    whose dtype is certain).
    """
    try:
        gm.graph.lint()
    except Exception as error:
        raise UnsupportedGraphError(f"lower: the graph is malformed: {error}") from error
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            if isinstance(sub, _TRAINING_MODULES) and sub.training:
                raise UnsupportedGraphError(
                    f"lower: {node.name} calls {type(sub).__name__} {node.target!r} in training "
                    f"mode; {_EVAL_HINT} or call .eval() before tracing"
                )
        elif node.op == "call_function" and isinstance(node.target, OpOverload):
            _check_call(gm, node, node.target, given or {})


def _check_call(
    gm: fx.GraphModule,
    node: fx.Node,
    op: OpOverload[..., Any],
    given: Mapping[fx.Node, torch.dtype],
) -> None:
    kind = _kind(op)
    if kind == "training" or (isinstance(kind, tuple) and _argument(node, *kind) is True):
        raise UnsupportedGraphError(
            f"lower: {node.name} ({op}) runs in training mode; {_EVAL_HINT}"
        )
    if kind in ("quantize", "dequantize"):
        _check_quant(gm, node, op, given, dequantize=kind == "dequantize")


@functools.cache
def _kind(op: OpOverload[..., Any]) -> str | tuple[int, str] | None:
    """What the checks look at in a call of ``op``: ``training`` (only exists in training
    mode), ``quantize``/``dequantize``, the (index, name) of its training flag, or nothing."""
    name = op._schema.name
    if name in _TRAINING_OPS:
        return "training"
    if name in _QUANTIZE:
        return "quantize"
    if name in _DEQUANTIZE:
        return "dequantize"
    for i, arg in enumerate(op._schema.arguments):
        if arg.name in ("training", "train"):
            return i, arg.name
    return None


def _argument(node: fx.Node, index: int, name: str) -> object:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


_QUANT_ARGUMENTS = ("input", "scale", "quant_min", "quant_max", "dtype")


@functools.cache
def _positions(op: OpOverload[..., Any]) -> tuple[tuple[int, str], ...]:
    """(index, name) of the (de)quantize arguments the checks read, in _QUANT_ARGUMENTS order
    (index -1: the op has no such argument)."""
    names = [arg.name for arg in op._schema.arguments]
    return tuple((names.index(n) if n in names else -1, n) for n in _QUANT_ARGUMENTS)


def _check_quant(
    gm: fx.GraphModule,
    node: fx.Node,
    op: OpOverload[..., Any],
    given: Mapping[fx.Node, torch.dtype],
    *,
    dequantize: bool,
) -> None:
    source, scale, low, high, dtype = (
        None if i < 0 else _argument(node, i, name) for i, name in _positions(op)
    )
    if not isinstance(dtype, torch.dtype) or not isinstance(source, fx.Node):
        return
    known = given.get(source) or _constant_dtype(gm, source)
    what = source.name if source.op != "get_attr" else f"{source.name} (attribute {source.target})"
    if dequantize and known is not None and known != dtype:
        raise UnsupportedGraphError(
            f"lower: {node.name} dequantizes {what} as {dtype}, but it holds {known} "
            "(the graph cannot run)"
        )
    if dequantize:
        return
    if known is not None and known not in _FLOATS:
        raise UnsupportedGraphError(
            f"lower: {node.name} quantizes {what}, a {known} tensor: quantize takes "
            "floats (the graph cannot run)"
        )
    if isinstance(scale, float) and scale == 0.0:
        raise UnsupportedGraphError(
            f"lower: {node.name} quantizes with scale 0.0 and divides by it (the graph cannot run)"
        )
    if dtype.is_floating_point or dtype == torch.bool:
        return  # float8 and the like: the fusions refuse what they do not lower
    info = torch.iinfo(dtype)
    for what, bound in (("quant_min", low), ("quant_max", high)):
        if isinstance(bound, int) and not info.min <= bound <= info.max:
            raise UnsupportedGraphError(
                f"lower: {node.name} has {what} {bound}, outside the range of {dtype} "
                f"[{info.min}, {info.max}] (the graph cannot run)"
            )


def _constant_dtype(gm: fx.GraphModule, node: fx.Node) -> torch.dtype | None:
    """The dtype of a ``get_attr`` tensor (known for certain), else None."""
    if node.op != "get_attr":
        return None
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value.dtype if isinstance(value, torch.Tensor) else None
