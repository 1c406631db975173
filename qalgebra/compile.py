"""qalgebra inside ``torch.compile``: the catalog's fusions, then Inductor for everything else.

Two ways in, one pipeline:

- ``torch.compile(model, backend="qalgebra")``: the dynamo backend :func:`backend`, registered
  through the ``torch_dynamo_backends`` entry point (``options=`` are Inductor config patches
  but for :data:`COST_OPTION` and :data:`SELFCHECK_OPTION`, ``mode=`` an Inductor mode);
  ``with recording() as reports:`` collects what it did.
- ``compile(model, example_inputs, fusions=...)``: compiles at once (tracing with Inductor's
  freezing on) and returns a :class:`CompiledModule` whose ``reports`` say what fired.

The backend calls Inductor's ``compile_fx`` with ``freezing=True``, Inductor's decompositions
less those of the post-ops the catalog fuses, and :class:`~qalgebra.catalog_pass.CatalogPass`
as its ``joint_custom_pre_pass``: the pass lowers the aten graph with the catalog before
Inductor's freezing passes run, and leaves nothing for Inductor's own quantization patterns
(see :mod:`qalgebra.catalog_pass` and :mod:`qalgebra.inductor_prep`); Inductor compiles the rest
(constant folding, its float mkldnn fusions, C++ kernels for the pointwise ops between the
oneDNN calls). Each compile's :class:`CompileReport` says what qalgebra fused and refused, what
it respelled for Inductor, and whether any Inductor quantization pattern fired anyway.

Freezing means the weights are read once, at compile time. When dynamo traced without
freezing (``torch._inductor.config.freezing`` off), the module's tensors arrive as graph inputs;
the backend inlines them too and checks on every call that each is still the same tensor at
the same version, raising :class:`~qalgebra.errors.LoweringError` otherwise (never stale
numbers). Graphs are inference-only: compiled under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import get_custom_graph_passes
from torch._subclasses.fake_tensor import FakeTensor

from qalgebra.catalog_pass import CatalogPass
from qalgebra.costcheck import MODES as COST_MODES
from qalgebra.costcheck import CostMode
from qalgebra.errors import LoweringError, UnsupportedGraphError
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion
from qalgebra.inductor_prep import compile_decompositions, in_place_clamp_lowerings
from qalgebra.lower import DEFAULT_SELFCHECK, LoweringReport
from qalgebra.selfcheck import MODES as SELFCHECK_MODES
from qalgebra.selfcheck import SelfCheckMode

if TYPE_CHECKING:
    from torch._inductor.utils import InputType

__all__ = [
    "COST_OPTION",
    "SELFCHECK_OPTION",
    "CompileReport",
    "CompiledModule",
    "backend",
    "compile",
    "inductor_quant_fusions",
    "recording",
]


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class CompileReport:
    """What compiling one dynamo graph did."""

    #: qalgebra's lowering of the graph: fusions fired, refused, quant/dequant left.
    lowering: LoweringReport
    #: Quantize/dequantize nodes left unfused and respelled as arithmetic (or folded into
    #: constants) so that Inductor's quantization patterns leave them alone, and oneDNN kernels
    #: whose output quantize was written out after them (``inductor_prep.respell_unfused``).
    hidden_quant_nodes: tuple[str, ...]
    #: Inductor's own quantization fusions during this compile, by counter (empty: its
    #: patterns found nothing to fuse).
    inductor_quant_fusions: Mapping[str, int]
    #: Module tensors that arrived as graph inputs (traced without freezing) and were inlined.
    frozen_inputs: int
    #: Seconds in the backend (AOT autograd, qalgebra's pass, Inductor), tracing excluded.
    seconds: float
    #: Of which in qalgebra's pass (lowering, respelling, decomposing, transplanting).
    pass_seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for people."""
        lines = [
            f"compiled in {self.seconds:.2f} s (qalgebra's pass {self.pass_seconds:.2f} s); "
            f"qalgebra {self.lowering.summary()}"
        ]
        if self.hidden_quant_nodes:
            lines.append(f"  respelled for Inductor: {', '.join(self.hidden_quant_nodes)}")
        if self.inductor_quant_fusions:
            fused = ", ".join(f"{k} {v}" for k, v in sorted(self.inductor_quant_fusions.items()))
            lines.append(f"  Inductor's quantization fusions: {fused}")
        if self.frozen_inputs:
            lines.append(
                f"  module tensors inlined (traced without freezing): {self.frozen_inputs}"
            )
        return "\n".join(lines)


_RECORDERS: list[list[CompileReport]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[CompileReport]]:
    """Collect the report of every graph the ``qalgebra`` backend compiles inside the block."""
    reports: list[CompileReport] = []
    _RECORDERS.append(reports)
    try:
        yield reports
    finally:
        _RECORDERS.remove(reports)


def inductor_quant_fusions() -> Counter[str]:
    """Inductor's quantization-fusion counters so far in this process (``torch._dynamo``'s).

    The ``*_matcher_count`` counters of ``fx_passes/quantization.py`` (weight prepack, post-op
    fusion, dequant promotion, quantized max_pool/cat/reshape, WOQ) and ``quant_lift_up_count``;
    not the ``*_lower_count`` ones, which count the lowering of oneDNN ops (qalgebra's too) to
    Inductor's IR, nor the float ``mkldnn_*`` fusions.
    """
    from torch._dynamo.utils import counters

    return Counter(
        {
            key: value
            for key, value in counters["inductor"].items()
            if value
            and (
                key == "quant_lift_up_count"
                or (key.endswith("_matcher_count") and key.startswith(("q", "dequant", "woq")))
            )
        }
    )


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass(frozen=True)
class _Lifted:
    """A module tensor dynamo passed as a graph input, inlined at compile time."""

    index: int
    tensor: torch.Tensor
    version: int


def _is_module_tensor(node: fx.Node, value: object) -> bool:
    """Whether dynamo marked this input static: a parameter or buffer of a traced module."""
    if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor):
        return False
    tensor_dict = node.meta.get("tensor_dict", {})
    return (
        getattr(value, "_dynamo_static_input_type", None) is not None
        or "_dynamo_static_input_type" in tensor_dict
    )


def _inline_lifted(
    gm: fx.GraphModule, example_inputs: Sequence[object]
) -> tuple[fx.GraphModule, list[object], list[_Lifted]]:
    """Turn the module tensors dynamo lifted to inputs into buffers of a copy of ``gm``.

    AOT autograd then treats them as parameters, which Inductor's freezing (and the pass)
    inline. Returns the module to compile, the remaining inputs and what was inlined.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(example_inputs):
        return gm, list(example_inputs), []
    lifted = [
        _Lifted(i, x, x._version)
        for i, (node, x) in enumerate(zip(placeholders, example_inputs, strict=True))
        if isinstance(x, torch.Tensor) and _is_module_tensor(node, x)
    ]
    if not lifted:
        return gm, list(example_inputs), []
    root = torch.nn.Module()
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    for item in lifted:
        name = f"_qalgebra_lifted_{item.index}"
        if isinstance(item.tensor, torch.nn.Parameter):
            # A parameter stays one, requiring grad as it did: AOT autograd's decompositions
            # read it, as in a trace with freezing on. ``matmul`` of a strided 3-D input folds
            # it into one ``mm`` only when the weight requires grad; otherwise it is a ``bmm``
            # over the weight expanded, which Inductor's freezing passes cannot prepack.
            weight = torch.nn.Parameter(item.tensor.detach(), item.tensor.requires_grad)
            root.register_parameter(name, weight)
        else:
            root.register_buffer(name, item.tensor.detach())
        constant = graph.create_node("get_attr", name)
        constant.meta = dict(placeholders[item.index].meta)
        val_map[placeholders[item.index]] = constant
    graph.output(graph.graph_copy(gm.graph, val_map))
    out = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    out.meta = dict(gm.meta)
    kept = {item.index for item in lifted}
    return out, [x for i, x in enumerate(example_inputs) if i not in kept], lifted


def _checking_lifted(
    inner: Callable[..., Any], lifted: list[_Lifted], total: int
) -> Callable[..., Any]:
    """``inner`` called with the inputs that were not inlined, after checking those that were."""
    kept = [i for i in range(total) if i not in {item.index for item in lifted}]

    def run(*args: object) -> Any:
        for item in lifted:
            given = args[item.index]
            if given is not item.tensor or item.tensor._version != item.version:
                raise LoweringError(
                    "qalgebra: a module tensor changed after compiling (the backend reads "
                    "weights once, like Inductor's freezing); call torch._dynamo.reset() and "
                    "compile again"
                )
        return inner(*[args[i] for i in kept])

    return run


#: The key of ``torch.compile(..., options=)`` that sets the backend's ``cost`` (the other
#: keys are Inductor's config patches, but for :data:`SELFCHECK_OPTION`).
COST_OPTION = "qalgebra.cost"
#: The key of ``torch.compile(..., options=)`` that sets the backend's ``selfcheck``.
SELFCHECK_OPTION = "qalgebra.selfcheck"
_OPTIONS = (COST_OPTION, SELFCHECK_OPTION)


def _cost(cost: CostMode, options: Mapping[str, Any] | None) -> CostMode:
    return cast(CostMode, _chosen(COST_OPTION, cost, COST_MODES, options))


def _selfcheck(selfcheck: SelfCheckMode, options: Mapping[str, Any] | None) -> SelfCheckMode:
    return cast(SelfCheckMode, _chosen(SELFCHECK_OPTION, selfcheck, SELFCHECK_MODES, options))


def _chosen(
    key: str, given: str, modes: Sequence[str], options: Mapping[str, Any] | None
) -> object:
    """``options[key]`` if set, else ``given``; one of ``modes`` or a clear error."""
    chosen = (options or {}).get(key, given)
    if chosen not in modes:
        raise UnsupportedGraphError(
            f"qalgebra: {key} must be one of {tuple(modes)}, got {chosen!r}"
        )
    return chosen


def _config_patches(
    catalog: CatalogPass, mode: str | None, options: Mapping[str, Any] | None
) -> dict[str, Any]:
    patches: dict[str, Any] = {}
    if mode is not None:
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update({k: v for k, v in (options or {}).items() if k not in _OPTIONS})
    theirs = get_custom_graph_passes(patches.get("joint_custom_pre_pass"))
    patches["joint_custom_pre_pass"] = (catalog, *theirs)
    patches["freezing"] = True
    return patches


def _publish(report: CompileReport, sink: list[CompileReport] | None) -> None:
    if sink is not None:
        sink.append(report)
    for recorder in _RECORDERS:
        recorder.append(report)


def backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
    reports: list[CompileReport] | None = None,
    cost: CostMode = "measure",
    selfcheck: SelfCheckMode = DEFAULT_SELFCHECK,
) -> Callable[..., Any]:
    """The ``qalgebra`` dynamo backend: qalgebra's ``fusions``, then Inductor with freezing.

    ``mode`` and ``options`` are Inductor's (``torch.compile(..., mode=, options=)`` passes
    them here); ``freezing`` is always on. ``cost`` (or ``options["qalgebra.cost"]``):
    ``"measure"`` leaves in float each layer that runs faster there than its fused int8 kernel
    on this machine (:mod:`qalgebra.costcheck`), ``"off"`` fuses every layer it can.
    ``selfcheck`` (or ``options["qalgebra.selfcheck"]``): as :func:`qalgebra.lower.lower`'s;
    ``"off"`` saves the compile the time of running each new kernel once at the model's shapes
    (on ResNet-18 at batch 8, about a tenth of the compile) and trusts the CPU probes alone. The
    report of this graph goes to ``reports`` (if given) and to every :func:`recording` block
    open.
    """
    from torch._inductor.compile_fx import compile_fx

    start = time.perf_counter()
    graph_module, inputs, lifted = _inline_lifted(gm, example_inputs)
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        raise UnsupportedGraphError(
            "qalgebra compiles inference graphs: an input requires grad (call the model under "
            "torch.no_grad(), or detach the input)"
        )
    catalog = CatalogPass(
        fusions, cost=_cost(cost, options), selfcheck=_selfcheck(selfcheck, options)
    )
    before = inductor_quant_fusions()
    with torch.no_grad(), in_place_clamp_lowerings():
        compiled = compile_fx(
            graph_module,
            cast("list[InputType]", inputs),
            config_patches=_config_patches(catalog, mode, options),
            decompositions=compile_decompositions(),
        )
    if not callable(compiled):
        raise LoweringError(f"qalgebra: Inductor returned {type(compiled).__name__}, not code")
    inner: Callable[..., Any] = compiled
    if catalog.result is None:
        raise LoweringError("qalgebra: Inductor compiled the graph without running the catalog")
    after = inductor_quant_fusions()
    after.subtract(before)
    report = CompileReport(
        lowering=catalog.result.lowering,
        hidden_quant_nodes=catalog.result.hidden,
        inductor_quant_fusions={k: v for k, v in after.items() if v > 0},
        frozen_inputs=len(lifted),
        seconds=time.perf_counter() - start,
        pass_seconds=catalog.result.seconds,
    )
    _publish(report, reports)
    if lifted:
        return _checking_lifted(inner, lifted, len(example_inputs))
    return inner


# ---------------------------------------------------------------------------------------------
# compile()


class CompiledModule(torch.nn.Module):
    """A model compiled through the ``qalgebra`` backend, and what each compile did."""

    def __init__(
        self,
        source: torch.nn.Module,
        compiled: Callable[..., Any],
        reports: list[CompileReport],
        seconds: float,
    ) -> None:
        super().__init__()
        #: The model as given (what :func:`qalgebra.artifact.save` writes).
        self.source = source
        self._compiled = compiled
        #: One report per graph compiled so far (graph breaks and recompiles add more).
        self.reports = reports
        #: Wall time of the first call: tracing, lowering and Inductor.
        self.compile_seconds = seconds

    def forward(self, *args: Any) -> Any:
        return self._compiled(*args)


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    cost: CostMode = "measure",
    selfcheck: SelfCheckMode = DEFAULT_SELFCHECK,
    **compile_options: Any,
) -> CompiledModule:
    """``torch.compile(model, backend=qalgebra)`` with ``fusions``, compiled now.

    ``cost``, ``selfcheck``: see :func:`backend`. ``compile_options`` go to ``torch.compile``
    (``dynamic=``, ``mode=``, ``options=``, ``fullgraph=``...). The first call, on
    ``example_inputs``, traces with Inductor's freezing on (module tensors become constants
    under dynamo's guards) and under ``no_grad``.
    """
    if "backend" in compile_options:
        raise TypeError("qalgebra.compile.compile: the backend is qalgebra's")
    reports: list[CompileReport] = []
    chosen = functools.partial(
        backend, fusions=tuple(fusions), reports=reports, cost=cost, selfcheck=selfcheck
    )
    compiled = torch.compile(model, backend=chosen, **compile_options)
    start = time.perf_counter()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled(*example_inputs)
    return CompiledModule(model, compiled, reports, time.perf_counter() - start)
