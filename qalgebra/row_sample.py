"""The self-check's reference on a few rows of the batch, when its ops prove that this is exact.

The self-check runs a fused kernel at the graph's real shapes -- a smaller batch could make
oneDNN pick another kernel than the one the model will run -- and compares it with the float
reference of the subgraph it replaces. At batch 8 the reference was most of the check's time
(ResNet-50: 0.9 s of the 1.3 s it took; the kernels 0.1 s). When each row of the reference's
output (index along dim 0) is computed from the same row of its batched inputs alone, the
reference run on a few rows computes exactly those rows of the full result, and the kernel's
full output is compared there.

:func:`sampled_reference` proves this while it runs, node by node, with a short list of op
rules: pointwise ops (``torch.Tag.pointwise``, the quantize/dequantize ops) whose other operands
broadcast along dim 0; convolutions, pools, linears and matrix products that read their batched
operand by rows; reductions, softmaxes and concatenations along another dim. Any other op on
batched values -- a view or reshape that moves rows, a reduction over dim 0, dynamic
quantization's min/max over the whole tensor, a constant with rows of its own -- answers None
and the caller runs the whole reference. Values that do not depend on the batch (weights,
scales, the weight side of a match) are computed as usual.

What the sample cannot see: a kernel wrong only in rows that are not sampled. The rows are the
first, the last (where a split of the batch between threads or blocks ends) and evenly spaced
ones, :data:`ROWS_PER_SAMPLE` of every 8 rounded up, at least 2. ``selfcheck="full"`` checks
every row.

>>> sample_rows(8).tolist(), sample_rows(2)
([0, 7], None)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import fx

from qalgebra.fusions.pointwise import LOW_MEMORY_MAX_POOL
from qalgebra.trial import Skip, evaluate, promoted

__all__ = ["ROWS_PER_SAMPLE", "Sample", "sample_rows", "sampled_reference", "take_rows"]

#: Rows sampled per 8 rows of the batch (rounded up; at least 2, the first and the last).
ROWS_PER_SAMPLE = 1

_Rows: TypeAlias = Literal["rows"]
_Free: TypeAlias = Literal["free"]
#: ``"rows"``: the value has the batch's (sampled) rows along dim 0; ``"free"``: it does not
#: depend on the batch.
_State: TypeAlias = _Rows | _Free

aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed

#: Pointwise ops that ``torch.Tag.pointwise`` does not tag.
_POINTWISE = frozenset(
    {
        aten.hardswish.default,
        aten.hardswish_.default,
        aten.gelu_.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.detach.default,
        aten.alias.default,
        aten.contiguous.default,
        _qd.quantize_per_tensor.default,
        _qd.quantize_per_tensor.tensor,
        _qd.dequantize_per_tensor.default,
        _qd.dequantize_per_tensor.tensor,
        _qd.convert_element_type.no_fuse,
    }
)
#: Per-channel quantize/dequantize: pointwise unless the channel axis (argument 3) is dim 0.
_PER_CHANNEL = frozenset({_qd.quantize_per_channel.default, _qd.dequantize_per_channel.default})
#: Ops whose first argument is read by rows (the batch) and the rest are not batched.
_BY_ROWS = frozenset(
    {
        aten.convolution.default,
        aten._convolution.default,
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.max_pool2d.default,
        aten.max_pool2d_with_indices.default,
        aten.max_pool3d_with_indices.default,
        aten.avg_pool2d.default,
        aten.adaptive_avg_pool2d.default,
        aten._adaptive_avg_pool2d.default,
    }
)
#: Matrix products: the batched first operand must have at least 2 dims (its rows).
_MATMUL = frozenset({aten.linear.default, aten.mm.default, aten._weight_int8pack_mm.default})
#: Ops along one dim (argument 1; a list for the reductions), not dim 0.
_ALONG_DIM = frozenset(
    {
        aten.mean.dim,
        aten.sum.dim_IntList,
        aten.amax.default,
        aten._softmax.default,
        aten._log_softmax.default,
        aten.softmax.int,
        aten.cat.default,
    }
)


@dataclass(frozen=True, slots=True)
class Sample:
    """A reference run on some rows: the values it computed, which rows, of how many, and
    which nodes' values have those rows (the others do not depend on the batch)."""

    env: dict[fx.Node, object]
    rows: torch.Tensor
    batch: int
    batched: frozenset[fx.Node]


def sample_rows(batch: int) -> torch.Tensor | None:
    """The rows to check of a ``batch``, or None when sampling saves nothing (fewer than 3)."""
    if batch < 3:
        return None
    count = max(2, math.ceil(batch * ROWS_PER_SAMPLE / 8))
    rows = torch.linspace(0, batch - 1, count).round().to(torch.int64)
    unique: torch.Tensor = torch.unique(rows)
    return unique


def take_rows(value: object, rows: torch.Tensor) -> object:
    """``rows`` of a tensor (or of each tensor of a tuple) along dim 0, in the same layout."""
    if isinstance(value, list | tuple):
        return type(value)(take_rows(v, rows) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    picked = value.index_select(0, rows)
    if picked.stride() == value.narrow(0, 0, len(rows)).stride():
        return picked
    return torch.empty_like(value.narrow(0, 0, len(rows))).copy_(picked)


def sampled_reference(
    order: Sequence[fx.Node],
    inputs: Mapping[fx.Node, object],
    module: Any,
    *,
    drawn: Collection[fx.Node],
    promote: bool = False,
) -> Sample | None:
    """``order`` run eagerly on sampled rows of ``inputs``, or None.

    ``inputs``: the values the subgraph reads; the batch is the size along dim 0 that the
    tensors of the ``drawn`` ones (the activations, not constants) with more than one row
    share. None when the batch is too small to sample, when an op is not proved to keep
    rows apart, or when an op raises on the sample: the caller then runs the whole reference
    (which reports its own errors). ``promote``: compute in float32 where the graph says
    bfloat16, as :func:`~qalgebra.trial.evaluate` does for a reference.
    """
    batch = _batch(inputs[n] for n in drawn)
    rows = None if batch is None else sample_rows(batch)
    if batch is None or rows is None:
        return None
    env: dict[fx.Node, object] = {}
    state: dict[fx.Node, _State] = {}
    for node, value in inputs.items():
        batched = node in drawn and _is_batched(value, batch)
        picked = take_rows(value, rows) if batched else value
        env[node] = promoted(picked) if promote else picked
        state[node] = "rows" if batched else "free"
    for node in order:
        if node in env:
            continue
        try:
            evaluate([node], env, module, promote=promote)
        except (RuntimeError, TypeError, ValueError, IndexError, Skip):
            return None
        reads_rows = any(state.get(a) == "rows" for a in node.all_input_nodes)
        if not reads_rows:
            state[node] = "free"
        elif _keeps_rows(node, env, state) and _has_rows(env[node], len(rows)):
            state[node] = "rows"
        else:
            return None
    return Sample(env, rows, batch, frozenset(n for n, kind in state.items() if kind == "rows"))


def _batch(values: Iterable[object]) -> int | None:
    """The batch size: the size along dim 0 of the tensors with more than one row (all equal)."""
    sizes = {
        v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] > 1
    }
    return sizes.pop() if len(sizes) == 1 else None


def _is_batched(value: object, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _has_rows(value: object, count: int) -> bool:
    if isinstance(value, list | tuple):  # None: an output the eager equivalent leaves out
        return all(v is None or _has_rows(v, count) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count


def _keeps_rows(
    node: fx.Node, env: Mapping[fx.Node, object], state: Mapping[fx.Node, _State]
) -> bool:
    """Whether ``node``'s output rows are its batched operands' rows (values already in ``env``)."""
    if node.op != "call_function":
        return False
    target = node.target
    args = node.args
    out = env[node]
    if target is operator.getitem:
        return True  # of a tuple whose every element has the rows (checked when it was made)
    if target in _POINTWISE or target in _PER_CHANNEL or _tagged_pointwise(target):
        if target in _PER_CHANNEL and _is_rows(args[0], state):
            axis = args[3] if len(args) > 3 else node.kwargs.get("axis")
            if not isinstance(axis, int) or axis % _rank(env, args[0]) == 0:
                return False
        return isinstance(out, torch.Tensor) and _broadcast_by_rows(node, env, state, out.dim())
    if target in _BY_ROWS or target == LOW_MEMORY_MAX_POOL:
        return _only_first_rows(node, state)
    if target in _MATMUL:
        return _only_first_rows(node, state) and _rank(env, args[0]) >= 2
    if target is aten.addmm.default:  # bias + rows @ weight
        bias = args[0]
        bias_value = env.get(bias) if isinstance(bias, fx.Node) else bias
        free_bias = not _is_rows(bias, state) and _broadcast_free(bias_value, 2)
        return free_bias and _is_rows(args[1], state) and not _is_rows(args[2], state)
    if target is aten.bmm.default:
        return all(_is_rows(a, state) for a in args[:2])
    if target in _ALONG_DIM:
        return _along_other_dim(node, env, state)
    return False


def _tagged_pointwise(target: object) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ())


def _is_rows(arg: object, state: Mapping[fx.Node, _State]) -> bool:
    return isinstance(arg, fx.Node) and state.get(arg) == "rows"


def _rank(env: Mapping[fx.Node, object], arg: object) -> int:
    """The rank of ``arg``'s value; -1 when it is not a tensor."""
    value = env.get(arg) if isinstance(arg, fx.Node) else arg
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _operand_nodes(args: fx.node.Argument) -> list[fx.Node]:
    """Every node among ``args`` (inside lists, tuples and dicts too), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _broadcast_free(value: object, rank: int) -> bool:
    """Whether a value that is not batched broadcasts along dim 0 of a rank-``rank`` output."""
    if not isinstance(value, torch.Tensor):
        return True  # a number
    return value.dim() < rank or value.shape[0] == 1


def _broadcast_by_rows(
    node: fx.Node, env: Mapping[fx.Node, object], state: Mapping[fx.Node, _State], rank: int
) -> bool:
    """A pointwise op: batched operands have the output's rank, the others broadcast."""
    for arg in _operand_nodes((node.args, node.kwargs)):
        if state.get(arg) == "rows":
            if _rank(env, arg) != rank:
                return False
        elif not _broadcast_free(env.get(arg), rank):
            return False
    return True


def _only_first_rows(node: fx.Node, state: Mapping[fx.Node, _State]) -> bool:
    first, *rest = node.args
    others = _operand_nodes((tuple(rest), node.kwargs))
    return _is_rows(first, state) and not any(state.get(a) == "rows" for a in others)


def _along_other_dim(
    node: fx.Node, env: Mapping[fx.Node, object], state: Mapping[fx.Node, _State]
) -> bool:
    args = node.args
    if node.target is aten.cat.default:
        tensors = args[0]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, list | tuple) or not tensors:
            return False
        if not all(_is_rows(t, state) for t in tensors):
            return False
        first = tensors[0]
    else:
        first = args[0]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if not _is_rows(first, state) or any(
            state.get(a) == "rows" for a in _operand_nodes(args[1:])
        ):
            return False
    rank = _rank(env, first)
    dims = [d for d in (dim if isinstance(dim, list | tuple) else [dim]) if type(d) is int]
    if not dims or len(dims) != (len(dim) if isinstance(dim, list | tuple) else 1):
        return False  # None (every dim), an empty list (every dim) or symbolic
    return rank > 0 and all(d % rank != 0 for d in dims)
