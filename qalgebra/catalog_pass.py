"""The catalog as an Inductor graph pass: lower, in place, the aten graph AOT autograd traced.

Where it runs (torch 2.13): Inductor rewrites quantized graphs in its *freezing* passes
(``torch/_inductor/freezing.py`` inlines the parameters as constants, then
``fx_passes/freezing_patterns.py`` runs the weight-prepack patterns of
``fx_passes/quantization.py``), after AOT autograd traced the dynamo graph into a functional
aten graph. A ``post_grad_custom_pre_pass`` runs after them: too late. Before them, in the same
``fw_compiler_freezing``, run the joint-graph passes and with them the ``joint_custom_pre_pass``
hook: :class:`CatalogPass` is that hook (:mod:`qalgebra.compile` sets it up).

It sees the graph in the forms the catalog matches (``convolution``; ``addmm``/``mm`` with
``permute``, viewed for N-D input; autocast's casts explicit; the post-ops whole, see
:mod:`qalgebra.inductor_prep`), with the parameters still graph inputs: it reads the values
freezing is about to inline from the tracing context, lowers a copy of the graph with
:func:`qalgebra.lower.lower_with_report`, prepares the result for Inductor and puts it in
place of the original body (the placeholders stay: freezing replaces them by position).

Lowering after functionalization matters: an in-place oneDNN op (the binary conv's sum) put in
the graph before AOT autograd would be functionalized into a higher-order op that fake tensors
cannot run on prepacked (mkldnn) weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import no_python_dispatcher
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.fx_passes.post_grad import remove_noop_ops
from torch._subclasses.fake_tensor import unset_fake_temporarily

from qalgebra.costcheck import CostMode
from qalgebra.errors import LoweringError
from qalgebra.fusions import Fusion
from qalgebra.inductor_prep import (
    convolutions_as_timed,
    decompose,
    fetch,
    fresh_name,
    functional_clamps,
    kernels_closed_to_post_op_patterns,
    mark_traced,
    propagate_vals,
    respell_unfused,
    scalar_constants_as_vectors,
    woq_scales_as_buffers,
)
from qalgebra.lower import DEFAULT_SELFCHECK, LoweringReport, lower_with_report
from qalgebra.selfcheck import SelfCheckMode

__all__ = ["CatalogPass", "PassResult"]


@dataclass(frozen=True)
class PassResult:
    """What one run of the pass did."""

    lowering: LoweringReport
    #: Quantize/dequantize nodes left unfused and respelled, and kernels whose output quantize
    #: was written out (see ``respell_unfused``).
    hidden: tuple[str, ...]
    #: Wall time of the whole pass (lowering, preparation, transplant).
    seconds: float


def _frozen_indices(params: Sequence[object], metadata: Any) -> list[int]:
    """Indices of the parameters freezing will inline: not mutated, not aliased by an output."""
    mutated = {
        i
        for i, info in enumerate(metadata.input_info)
        if info.mutates_data or info.mutates_metadata
    }
    aliased = {out.base_idx for out in metadata.output_info if out.base_idx is not None}
    return [
        i
        for i, p in enumerate(params)
        if isinstance(p, torch.Tensor) and i not in mutated and i not in aliased
    ]


def _with_constants(graph: fx.Graph, params: Sequence[object], indices: list[int]) -> fx.Graph:
    """A copy of ``graph`` reading ``params[i]`` (set on the owning module) for each index.

    Every placeholder is kept, in order (Inductor's freezing later replaces the parameter ones
    by position); the copies of the inlined ones are left without users.
    """
    owner = graph.owning_module
    assert owner is not None
    copy = fx.Graph()
    placeholders = graph.find_nodes(op="placeholder")
    val_map = {ph: copy.node_copy(ph) for ph in placeholders}
    for i in indices:
        name = fresh_name(owner, "_qalgebra_frozen_")
        value = params[i]
        assert isinstance(value, torch.Tensor)
        setattr(owner, name, value.detach())
        constant = copy.create_node("get_attr", name)
        constant.meta = dict(placeholders[i].meta)
        val_map[placeholders[i]] = constant
    copy.output(copy.graph_copy(graph, val_map))
    return copy


def _transplant(graph: fx.Graph, lowered: fx.GraphModule) -> None:
    """Make ``graph`` (in place) the lowered graph: same placeholder nodes, lowered body."""
    owner = graph.owning_module
    assert owner is not None
    output = graph.output_node()
    output_meta = dict(output.meta)
    for node in reversed(list(graph.nodes)):
        if node.op != "placeholder":
            graph.erase_node(node)
    new_placeholders = lowered.graph.find_nodes(op="placeholder")
    val_map = dict(zip(new_placeholders, graph.find_nodes(op="placeholder"), strict=True))
    graph.output(graph.graph_copy(lowered.graph, val_map)).meta.update(output_meta)
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        value = fetch(lowered, target)
        if not hasattr(owner, target):
            setattr(owner, target, value)
        elif fetch(owner, target) is not value:
            raise LoweringError(f"qalgebra: constant {target} clashes with the compiled module's")


class CatalogPass(CustomGraphPass):
    """Inductor's ``joint_custom_pre_pass``: lower with qalgebra's ``fusions``, in place.

    Only valid inside a freezing inference compile (the parameters' values come from the
    tracing context). ``cost``: whether layers faster in float stay float
    (:mod:`qalgebra.costcheck`); ``selfcheck``: how each new kernel is checked against the
    subgraph it replaces (:mod:`qalgebra.selfcheck`). ``result`` holds what the last call did.
    """

    def __init__(
        self,
        fusions: Sequence[Fusion],
        *,
        cost: CostMode = "measure",
        selfcheck: SelfCheckMode = DEFAULT_SELFCHECK,
    ) -> None:
        self.fusions = tuple(fusions)
        self.cost: CostMode = cost
        self.selfcheck: SelfCheckMode = selfcheck
        self.result: PassResult | None = None

    def uuid(self) -> None:
        return None  # never cached: a frozen graph is not cacheable anyway

    def __call__(self, graph: fx.Graph) -> None:
        start = time.perf_counter()
        context = torch._guards.TracingContext.try_get()
        metadata = None if context is None else context.fw_metadata
        if context is None or metadata is None or graph.owning_module is None:
            raise LoweringError("qalgebra's pass runs inside Inductor's freezing compile only")
        if len(graph.find_nodes(op="placeholder")) != len(metadata.input_info):
            return  # a subgraph of a higher-order op: not the frozen graph
        params = list(context.params_flat_unwrap_subclasses or ())
        # Inductor runs this right after the pre-pass; first, so that no-op clones (an eval
        # dropout is one) do not stand between a linear and its post-op or quantize.
        remove_noop_ops(graph)
        mark_traced(graph)
        # Real tensors, dispatched as eager code is: AOT autograd leaves the Python dispatcher
        # on, which adds tens of microseconds to every op the checks run and time.
        with unset_fake_temporarily(), no_python_dispatcher():
            source = _with_constants(graph, params, _frozen_indices(params, metadata))
            lowered, report = lower_with_report(
                fx.GraphModule(graph.owning_module, source),
                (),
                fusions=self.fusions,
                cost=self.cost,
                selfcheck=self.selfcheck,
            )
            hidden = respell_unfused(lowered)
            functional_clamps(lowered.graph)
            convolutions_as_timed(lowered.graph)
            scalar_constants_as_vectors(lowered)
            woq_scales_as_buffers(lowered)
            kernels_closed_to_post_op_patterns(lowered.graph)
        propagate_vals(lowered)  # under the compile's fake mode, as the rest
        decompose(lowered.graph)
        _transplant(graph, lowered)
        self.result = PassResult(report, hidden, time.perf_counter() - start)
