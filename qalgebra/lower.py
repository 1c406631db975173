"""Lower a PT2E-quantized GraphModule to a runnable graph of oneDNN int8 ops, eagerly.

``lower(gm, example_inputs)`` copies the graph, runs the catalog's fusions in priority order
(each one ``find_matches`` of its compiled matcher + typed replacement code), prepacks weights at
lowering time, removes dead nodes, lints and recompiles. The input module is never mutated: the
rewrite works on a copy.
Each rewrite is a transaction (:class:`~qalgebra.rewriter.Rewriter`): one that refuses or
fails is rolled back exactly, leaving that subgraph as it was, and the rest still lowers
(``strict=True`` raises on a failure instead). Arguments are checked first
(:mod:`qalgebra.validate`). ``lower_with_report`` also returns what fired, what each fusion
consumed, what was refused and why, what failed, which quantize/dequantize nodes are left, and
its near misses: where a fusion's structure matched but one of its ``where`` checks refused, and
the node is still there unlowered (the check's reason says why).

The lowered module returns the dtypes and shapes the input module returns: int8-mixed-bf16
outputs stay bf16, also where this CPU's oneDNN cannot emit a bf16 sum (computed in fp32, then
converted: ``qalgebra.isa``). The graph is lowered as exported: run under an ambient
``torch.autocast`` (not exported under it), the input module's conv/linear return bf16 and the
lowered module's oneDNN ops do not autocast.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
>>> lowered, report = lower_with_report(gm, (torch.randn(2),))
>>> report.total_fired
0
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx

from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
from qalgebra.costcheck import CostCheck, CostMode, CostStats
from qalgebra.errors import LoweringError, Refusal, RewriteError, UnsupportedGraphError
from qalgebra.fusion import Fusion
from qalgebra.fusions import DEFAULT_FUSIONS
from qalgebra.match import METADATA_ASSERTS, Matcher
from qalgebra.pattern import Var, any_of
from qalgebra.qparams import qparams
from qalgebra.rewriter import Rewriter
from qalgebra.selfcheck import SelfCheck, SelfCheckMode, SelfCheckStats
from qalgebra.validate import check_arguments

__all__ = [
    "DEFAULT_FUSIONS",
    "DEFAULT_SELFCHECK",
    "FailedRewrite",
    "LoweringReport",
    "NearMiss",
    "RefusedMatch",
    "lower",
    "lower_with_report",
]

#: The self-check mode ``lower`` uses unless told (see :mod:`qalgebra.selfcheck`).
DEFAULT_SELFCHECK: SelfCheckMode = "on"

_QUANT_TARGETS = frozenset(
    {
        "quantized_decomposed.quantize_per_tensor",
        "quantized_decomposed.dequantize_per_tensor",
        "quantized_decomposed.quantize_per_channel",
        "quantized_decomposed.dequantize_per_channel",
    }
)


@dataclass(frozen=True, slots=True)
class RefusedMatch:
    """A match the fusion's replacement code declined, and why."""

    fusion: str
    root: str
    reason: str
    #: What decided (:class:`~qalgebra.errors.Refusal`): ``"rule"``, ``"probe:<name>"``
    #: (this CPU's kernels were found wrong by an ISA probe), ``"selfcheck"`` or ``"cost"``.
    cause: str = "rule"


@dataclass(frozen=True, slots=True)
class NearMiss:
    """A node left unlowered where ``fusion``'s structure matched but a ``where`` check refused:
    the check's ``reason`` (without it, a failing check would be silent: nothing fired, nothing
    refused). Only fusions that lower (``exclusive``): a preparing one (dequant promotion:
    "a dequant read more than once") refuses most nodes by design."""

    fusion: str
    root: str
    reason: str


@dataclass(frozen=True, slots=True)
class FailedRewrite:
    """A rewrite that raised (not a :class:`Refusal`): rolled back, the match left unlowered.

    ``root`` is the matched node, or ``(matching)`` when the fusion's pattern checks raised.
    """

    fusion: str
    root: str
    error: str


@dataclass(slots=True)
class LoweringReport:
    """What a lowering did: per-fusion counts, refusals, failures, leftovers, and how long."""

    fired: Counter[str] = field(default_factory=Counter)
    nodes_consumed: Counter[str] = field(default_factory=Counter)
    refused: list[RefusedMatch] = field(default_factory=list)
    failed: list[FailedRewrite] = field(default_factory=list)
    #: Quantize/dequantize nodes left in the lowered graph, in every form (a decomposed chain
    #: is named by its last node).
    unfused_quant_nodes: list[str] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    seconds: float = 0.0
    selfcheck: SelfCheckStats = field(default_factory=SelfCheckStats)
    #: What the cost check timed and left in float (:mod:`qalgebra.costcheck`; compile only).
    cost: CostStats = field(default_factory=CostStats)

    @property
    def total_fired(self) -> int:
        return sum(self.fired.values())

    @property
    def probe_refusals(self) -> list[RefusedMatch]:
        """The refusals an ISA probe decided (this CPU's kernel computes the match wrongly)."""
        return [r for r in self.refused if r.cause.startswith("probe:")]

    def summary(self) -> str:
        """A few lines for people."""
        lines = [f"lowered in {self.seconds * 1e3:.1f} ms"]
        for name, count in sorted(self.fired.items()):
            lines.append(f"  {name}: fired {count}x, consumed {self.nodes_consumed[name]} nodes")
        for r in self.refused:
            by = "" if r.cause == "rule" else f" [{r.cause}]"
            lines.append(f"  refused {r.fusion} at {r.root}: {r.reason}{by}")
        for f in self.failed:
            lines.append(f"  failed {f.fusion} at {f.root} (rolled back): {f.error}")
        for n in self.near_misses:
            lines.append(f"  near miss {n.fusion} at {n.root}: {n.reason}")
        if self.selfcheck.mode != "off":
            lines.append(f"  {self.selfcheck.summary()}")
        if self.cost.mode != "off":
            lines.append(f"  {self.cost.summary()}")
        if self.unfused_quant_nodes:
            lines.append(f"  unfused quant/dequant nodes: {', '.join(self.unfused_quant_nodes)}")
        return "\n".join(lines)


def _is_quant_node(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return packet is not None and str(packet) in _QUANT_TARGETS


_LEFT_QP = qparams("left", runtime=True)
#: A per-tensor quantize or dequantize in any form, decomposed chains included.
_LEFTOVER = Matcher(
    any_of(
        quantize_per_tensor(Var("x", fx.Node), _LEFT_QP),
        dequantize_per_tensor(Var("x", fx.Node), _LEFT_QP),
    )
)


def _unfused_quant_nodes(graph: fx.Graph) -> list[str]:
    """The quantize/dequantize nodes left: op forms by target, a decomposed chain by its last
    node (``mul`` of a dequantize, dtype conversion of a quantize), in graph order."""
    roots = {m.root for m in _LEFTOVER.find_matches(graph)}
    return [n.name for n in graph.nodes if n in roots or _is_quant_node(n)]


class _Overlay(torch.nn.Module):
    """The module a graph under rewrite reads its attributes from, without copying the source.

    Lookups fall through to the caller's module (read only); constants a rewrite adds
    (prepacked weights) are registered here. The output GraphModule is built once, at the end,
    from this overlay: copying the caller's module up front cost one code generation and a
    copy of every attribute, most of which the lowering then replaced.
    """

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["_qalgebra_base"] = base  # not a submodule: never copied nor registered
        self.training = base.training

    def __getattr__(self, name: str) -> Any:
        added = self.__dict__["_buffers"]  # constants are registered as buffers, nothing else
        if name in added:
            return added[name]
        return getattr(self.__dict__["_qalgebra_base"], name)


def _copy_graph(gm: fx.GraphModule, module: torch.nn.Module) -> fx.Graph:
    """A copy of ``gm``'s graph, owned by ``module``, keeping export's pytree in/out handling."""
    # fx types the owner as a GraphModule; the graph only looks attributes up through it.
    graph = fx.Graph(owning_module=cast(fx.GraphModule, module))
    graph.set_codegen(copy.deepcopy(gm.graph._codegen))
    graph.output(graph.graph_copy(gm.graph, {}))
    return graph


def _build_module(source: fx.GraphModule, overlay: _Overlay, graph: fx.Graph) -> fx.GraphModule:
    """The output module: the live attributes of ``graph``, generated code, the source's meta."""
    out = fx.GraphModule(overlay, graph, class_name=type(source).__name__)
    out.meta = dict(getattr(source, "meta", {}))
    # The constants become plain attributes: out of state_dict (packed tensors are opaque),
    # untouched by .to()/.half() (oneDNN reads them as packed), and read by the generated code
    # without nn.Module.__getattr__ (measured: 1.7 us per buffer read, 0.13 us per attribute;
    # a fused op reads four, every call).
    for name, value in overlay.named_buffers(recurse=False):
        if hasattr(out, name):
            delattr(out, name)  # GraphModule made it a persistent buffer, or a parameter
            out.__dict__[name] = value
    return out


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run weight prepacking on one intra-op thread, then restore the caller's setting.

    A prepack is a small reorder: threads gain nothing, and their OpenMP barrier stalls whenever
    another process holds a core (measured on this 2-core machine: qconv_prepack 24 ms with two
    threads, 0.27 ms with one; qlinear_prepack 11 ms vs 1.3 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector during the rewrite, then restore the caller's state.

    A lowering allocates tens of thousands of container objects that live until it returns;
    every automatic collection meanwhile re-traverses them, and a full one traverses the whole
    process heap (measured: ffn_stack(32) lowering in a process holding 550k objects, median
    162 ms with the collector running, 108-128 ms paused). Garbage is left for the next
    collection, as for any other allocation; nothing is held longer than the call.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _erase_dead(graph: fx.Graph, chains: list[tuple[fx.Node, ...]]) -> None:
    """Erase the replaced nodes nothing reads any more, and what only they read.

    Only matched nodes, and then their inputs (weights, qparams), can die from a rewrite: a
    worklist from them replaces a whole-graph dead-code pass (and its per-node purity checks),
    so later fusions neither match nor prepack what was replaced. A matched node is erased once
    unread even if fx deems it impure (an in-place op, an eval dropout): the fusion that
    replaced it answers for its effect (``qalgebra.fusions.inplace``); other impure nodes stay.
    """
    work = [n for chain in chains for n in chain]
    matched = set(work)
    while work:
        node = work.pop()
        if node._erased or node.op in ("placeholder", "output"):
            continue
        asserts = [u for u in node.users if u.target in METADATA_ASSERTS and not u.users]
        if asserts and len(asserts) == len(node.users):
            for user in asserts:  # they check a value nothing else reads any more
                graph.erase_node(user)
        if node.users or (node not in matched and node.is_impure()):
            continue  # read elsewhere: if those readers die, they bring it back here
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


def _apply(
    fusion: Fusion,
    graph: fx.Graph,
    module: torch.nn.Module,
    report: LoweringReport,
    checks: tuple[SelfCheck, CostCheck],
    near: list[tuple[fx.Node, NearMiss]],
    *,
    strict: bool,
) -> None:
    """One pass of ``fusion``: each match is one :class:`Rewriter` transaction, committed when
    the rewrite and the root's replacement succeed, rolled back (and reported) otherwise.
    Roots where a check refused are explained into ``near``."""
    missed: list[fx.Node] = []
    try:
        matches = fusion.matcher.find_matches(graph, exclusive=fusion.exclusive, near_misses=missed)
    except Exception as error:  # a failing check: this fusion is skipped, the graph untouched
        _failed(fusion, "(matching)", error, report, strict=strict)
        return
    if fusion.exclusive:  # the others prepare (promotion): their checks refuse routinely
        near.extend((node, miss) for node in missed if (miss := _near_miss(fusion, node)))
    replaced: dict[fx.Node, fx.Node] = {}
    chains: list[tuple[fx.Node, ...]] = []
    for m in matches:
        rw = Rewriter(graph, module, m.root, replaced)
        try:
            new = fusion.rewrite(m, rw)
            for check in checks:  # a Refusal if the kernel disagrees, or is the slower
                check.check(fusion.name, m, rw, new)
            if new is not m.root:
                rw.replace(m.root, new, consumed=m.nodes)
            rw.commit()
        except Refusal as refusal:
            _roll_back(rw, fusion, m.root.name)
            report.refused.append(
                RefusedMatch(fusion.name, m.root.name, str(refusal), refusal.cause)
            )
            continue
        except Exception as error:
            _roll_back(rw, fusion, m.root.name)
            _failed(fusion, m.root.name, error, report, strict=strict)
            continue
        chains.extend(rw.consumed)
        report.fired[fusion.name] += 1
        report.nodes_consumed[fusion.name] += len(m.nodes)
    _erase_dead(graph, chains)


def _near_miss(fusion: Fusion, node: fx.Node) -> NearMiss | None:
    """The check that refused ``fusion`` at ``node``, among the failures reached furthest."""
    mismatch = fusion.matcher.explain(node)
    if mismatch is None:
        return None
    for failure in (mismatch, *mismatch.tied):
        if failure.path and failure.path[-1] == _CHECK_STEP:
            return NearMiss(fusion.name, node.name, failure.reason.removeprefix("check failed: "))
    return None


#: The last step of a path where a ``where`` check failed (:meth:`Matcher.explain`).
_CHECK_STEP = "<check>"


def _roll_back(rw: Rewriter, fusion: Fusion, root: str) -> None:
    """Undo a rewrite; if even that fails, the lowering stops (the caller's module is a copy
    away from any of this, so it is untouched either way)."""
    try:
        rw.rollback()
    except Exception as error:
        raise LoweringError(
            f"lower: rolling back {fusion.name} at {root} failed ({type(error).__name__}: "
            f"{error}); the lowering stops, the input module is untouched"
        ) from error


def _failed(
    fusion: Fusion, root: str, error: Exception, report: LoweringReport, *, strict: bool
) -> None:
    if strict or fusion.essential:
        raise RewriteError(fusion.name, root, f"{type(error).__name__}: {error}") from error
    report.failed.append(FailedRewrite(fusion.name, root, f"{type(error).__name__}: {error}"))


def lower_with_report(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    strict: bool = False,
    selfcheck: SelfCheckMode = DEFAULT_SELFCHECK,
    cost: CostMode = "off",
) -> tuple[fx.GraphModule, LoweringReport]:
    """Like :func:`lower`, and also say what fired, what was refused or failed, what is left.

    ``cost="measure"`` leaves in float each layer that computes faster there than its fused
    kernel on this machine (:mod:`qalgebra.costcheck`): for graphs Inductor compiles next.
    """
    start = time.perf_counter()
    source = check_arguments(gm, example_inputs)
    chosen = _fusions(fusions)
    report = LoweringReport()
    checks = (SelfCheck(selfcheck, report.selfcheck), CostCheck(cost, report.cost))
    near: list[tuple[fx.Node, NearMiss]] = []
    with _gc_paused():
        overlay = _Overlay(source)
        graph = _copy_graph(source, overlay)
        with _single_thread():
            for fusion in chosen:
                _apply(fusion, graph, overlay, report, checks, near, strict=strict)
        out = _build_module(source, overlay, graph)
        out.graph.lint()
    report.unfused_quant_nodes = _unfused_quant_nodes(out.graph)
    # only what is still there: a node a later fusion lowered was not missed
    report.near_misses = list(dict.fromkeys(m for node, m in near if not node._erased))
    report.seconds = time.perf_counter() - start
    return out, report


def _fusions(fusions: object) -> tuple[Fusion, ...]:
    if not isinstance(fusions, Sequence) or isinstance(fusions, str):
        raise UnsupportedGraphError(
            f"lower: expected fusions as a sequence of Fusion, got {type(fusions).__name__}"
        )
    for i, f in enumerate(fusions):
        if not isinstance(f, Fusion):
            raise UnsupportedGraphError(
                f"lower: fusions[{i}] is a {type(f).__name__}, expected a Fusion"
            )
    return tuple(fusions)


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    strict: bool = False,
    selfcheck: SelfCheckMode = DEFAULT_SELFCHECK,
) -> fx.GraphModule:
    """A new, runnable module whose graph calls oneDNN int8 ops; ``gm`` is left untouched.

    A rewrite that raises (a oneDNN error, a bug in replacement code) is rolled back and its
    match left unlowered: the report lists it under ``failed`` and the rest of the model still
    lowers. With ``strict=True`` it raises :class:`~qalgebra.errors.RewriteError` (naming the
    fusion and the node, chained to the cause) instead.

    ``selfcheck`` (:mod:`qalgebra.selfcheck`): ``"on"`` runs each distinct fused kernel call
    once per process on random inputs against the subgraph it replaces (the reference on
    sampled rows of the batch where that is exact), and leaves unfused what disagrees;
    ``"full"`` compares every row; ``"off"`` trusts the kernels.
    """
    return lower_with_report(
        gm, example_inputs, fusions=fusions, strict=strict, selfcheck=selfcheck
    )[0]
