"""Save a quantized model in one process, run it lowered (or compiled) in another.

A lowered module cannot be written as it is: its prepacked oneDNN weights are opaque tensors
``torch.save`` refuses, and their layout is chosen for the CPU that packed them. So the artifact
is the *quantized program* (``convert_pt2e``'s graph, exported and written with
``torch.export.save``) plus a ``qalgebra.json`` entry saying which fusions lowered it and what
fired; :func:`load` lowers it again on the loading machine (milliseconds, with that machine's
:mod:`qalgebra.isa` answers) and :func:`load_compiled` compiles it through the ``qalgebra``
backend. The file is an ordinary ``.pt2`` program: ``torch.export.load`` and
``qalgebra lower`` read it too.

>>> import tempfile, torch
>>> from qalgebra.testing.models import build
>>> from qalgebra.testing.quantize import quantize_pt2e
>>> model, inputs = build("conv2d_relu")
>>> path = tempfile.mkdtemp() + "/conv.pt2"
>>> info = save(quantize_pt2e(model, inputs), path, inputs)
>>> info.fired["qconv"]
2
>>> lowered, report, _ = load_with_report(path)
>>> report.fired["qconv"]
2
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from qalgebra.errors import LoweringError, UnsupportedGraphError
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion
from qalgebra.isa import cpu_description
from qalgebra.lower import LoweringReport, lower_with_report
from qalgebra.ops import calls_kernel_op

if TYPE_CHECKING:
    from qalgebra.compile import CompiledModule

__all__ = ["FORMAT", "ArtifactInfo", "load", "load_compiled", "load_with_report", "save"]

#: The ``format`` field of the artifact's ``qalgebra.json``.
FORMAT = "qalgebra-quantized-program/1"
_META = "qalgebra.json"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ArtifactInfo:
    """What ``qalgebra.json`` records: how the program was lowered when it was saved."""

    format: str
    qalgebra_version: str
    torch_version: str
    #: The fusions (names, in order) the program was lowered with; :func:`load` needs them.
    fusions: tuple[str, ...]
    #: What fired at save time, on the saving machine (``cpu``): a loading CPU without the
    #: same int8 support may refuse some of it (see :mod:`qalgebra.isa`).
    fired: Mapping[str, int] = field(default_factory=dict)
    cpu: Mapping[str, object] = field(default_factory=dict)


def _qalgebra_version() -> str:
    try:
        return version("qalgebra")
    except PackageNotFoundError:
        return "unknown"


def _is_lowered(gm: fx.GraphModule) -> bool:
    return any(calls_kernel_op(n) for n in gm.graph.nodes)


def _program(
    model: object,
    example_inputs: Sequence[torch.Tensor] | None,
    dynamic_shapes: Any,
) -> torch.export.ExportedProgram:
    from qalgebra.compile import CompiledModule

    if isinstance(model, CompiledModule):
        model = model.source
    if isinstance(model, torch.export.ExportedProgram):
        return model
    if not isinstance(model, fx.GraphModule):
        raise UnsupportedGraphError(
            "save: expected the quantized program (convert_pt2e's GraphModule, an "
            f"ExportedProgram or a qalgebra CompiledModule), got {type(model).__name__}"
        )
    if _is_lowered(model):
        raise UnsupportedGraphError(
            "save: this module is already lowered (its prepacked oneDNN weights cannot be "
            "written); save the quantized program instead: it is lowered again at load"
        )
    if example_inputs is None:
        raise UnsupportedGraphError("save: a GraphModule needs example_inputs to be exported")
    return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)


def save(
    model: object,
    path: PathLike,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    fusions: Sequence[Fusion] = DEFAULT_FUSIONS,
    dynamic_shapes: Any = None,
) -> ArtifactInfo:
    """Write ``model``'s quantized program to ``path``, for :func:`load` in any process.

    ``model`` is convert_pt2e's GraphModule (exported here on ``example_inputs``, with
    ``dynamic_shapes`` as ``torch.export.export`` takes them), an ``ExportedProgram`` of it, or
    a :class:`qalgebra.compile.CompiledModule` (its source). The program is lowered once now,
    with ``fusions``: what fired is recorded, and a program qalgebra cannot lower is refused
    here rather than at load.
    """
    program = _program(model, example_inputs, dynamic_shapes)
    module = program.module()
    assert isinstance(module, fx.GraphModule)
    saved_inputs = program.example_inputs[0] if program.example_inputs else ()
    _, report = lower_with_report(module, tuple(saved_inputs), fusions=fusions)
    info = ArtifactInfo(
        format=FORMAT,
        qalgebra_version=_qalgebra_version(),
        torch_version=torch.__version__,
        fusions=tuple(f.name for f in fusions),
        fired=dict(report.fired),
        cpu=cpu_description(),
    )
    torch.export.save(program, path, extra_files={_META: json.dumps(asdict(info), indent=1)})
    return info


def _read(path: PathLike) -> tuple[torch.export.ExportedProgram, ArtifactInfo]:
    extra: dict[str, Any] = {_META: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"{os.fspath(path)}: not a program saved by qalgebra.artifact.save or "
            f"torch.export.save ({type(exc).__name__})"
        ) from exc
    if not extra[_META]:
        raise UnsupportedGraphError(
            f"{os.fspath(path)}: a torch.export program without qalgebra's metadata (write it "
            "with qalgebra.artifact.save, or `qalgebra lower PATH --out OUT`)"
        )
    data = json.loads(extra[_META])
    if data.get("format") != FORMAT:
        raise UnsupportedGraphError(
            f"{os.fspath(path)}: artifact format {data.get('format')!r}, expected {FORMAT!r}"
        )
    data["fusions"] = tuple(data["fusions"])
    return program, ArtifactInfo(**data)


def _check_fusions(info: ArtifactInfo, fusions: Sequence[Fusion], path: PathLike) -> None:
    missing = [name for name in info.fusions if name not in {f.name for f in fusions}]
    if missing:
        raise LoweringError(
            f"{os.fspath(path)} was saved with fusions {missing} that are not in this catalog; "
            "pass them with fusions="
        )


def load_with_report(
    path: PathLike, *, fusions: Sequence[Fusion] | None = None
) -> tuple[fx.GraphModule, LoweringReport, ArtifactInfo]:
    """Read an artifact and lower it here: the module, this lowering's report, the metadata.

    ``fusions`` default to the catalog; every fusion the artifact was saved with must be among
    them (a user's own fusions are code, not data: pass them again).
    """
    program, info = _read(path)
    chosen = DEFAULT_FUSIONS if fusions is None else tuple(fusions)
    _check_fusions(info, chosen, path)
    module = program.module()
    assert isinstance(module, fx.GraphModule)
    inputs = program.example_inputs[0] if program.example_inputs else ()
    lowered, report = lower_with_report(module, tuple(inputs), fusions=chosen)
    return lowered, report, info


def load(path: PathLike, *, fusions: Sequence[Fusion] | None = None) -> fx.GraphModule:
    """Read an artifact and return it lowered by qalgebra on this machine (eager)."""
    return load_with_report(path, fusions=fusions)[0]


def load_compiled(
    path: PathLike, *, fusions: Sequence[Fusion] | None = None, **compile_options: Any
) -> CompiledModule:
    """Read an artifact and compile it through the ``qalgebra`` backend on its saved inputs.

    ``compile_options`` go to :func:`qalgebra.compile.compile`.
    """
    from qalgebra.compile import compile as qalgebra_compile

    program, info = _read(path)
    chosen = DEFAULT_FUSIONS if fusions is None else tuple(fusions)
    _check_fusions(info, chosen, path)
    module = program.module()
    inputs = program.example_inputs[0] if program.example_inputs else ()
    return qalgebra_compile(module, tuple(inputs), fusions=chosen, **compile_options)
