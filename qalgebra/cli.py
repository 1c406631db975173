"""The ``qalgebra`` command: ``demo``, ``catalog``, ``lower``, ``explain`` and ``fuzz``.

- ``qalgebra demo`` quantizes two bundled models with torchao's PT2E flow (X86InductorQuantizer),
  lowers each with qalgebra and with torchao, and compares what fired, numerics and speed.
- ``qalgebra catalog`` lists the fusions :func:`qalgebra.lower.lower` applies, in priority order.
- ``qalgebra lower PATH [--out OUT]`` lowers a quantized program saved with
  ``torch.export.save`` (``--out``: and writes it as a :mod:`qalgebra.artifact`).
- ``qalgebra explain`` says why a fusion does not match at a node of a bundled model or of a
  saved program (``--program PATH``).
- ``qalgebra fuzz`` checks the lowering's properties on random graphs (:mod:`qalgebra.fuzz`).

``catalog``, ``lower``, ``explain`` and ``fuzz`` take ``--fusions FILE_OR_MODULE:NAME[,...]``:
fusions of yours (a ``Fusion``, a ``qalgebra.catalog.Placed`` one, or a
``qalgebra.testing.families.FusionFamily``, whose examples ``fuzz`` then draws too), added to
the catalog by priority (:func:`qalgebra.catalog.with_fusions`).

torch, torchao and the lowering are imported inside the commands, so ``--help`` is instant. What
the commands measure with (:func:`~qalgebra.measure.compare`, ...) is :mod:`qalgebra.measure`,
shared with the benchmarks.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from qalgebra.measure import (
    Comparison,
    compare,
    max_abs_diff,
    onednn_op_count,
    quiet_third_party,
    run_fresh,
)

if TYPE_CHECKING:
    import torch
    from torch import fx

    from qalgebra.fusion import Fusion
    from qalgebra.pattern import Mismatch
    from qalgebra.selfcheck import SelfCheckMode

__all__ = ["app", "main"]

app = typer.Typer(
    help="qalgebra: lower PT2E-quantized models to oneDNN int8 ops, eagerly, from typed patterns.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

# ---------------------------------------------------------------------------------------------
# Progress display


class _Steps:
    """A rich progress bar over a known number of steps, and a log line per finished step."""

    def __init__(self, console: Console, total: int) -> None:
        self._console = console
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=total)

    def __enter__(self) -> _Steps:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        self._progress.update(self._task, description=description)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self._progress.console.print(f"[dim]  done  {description} ({seconds:.2f} s)[/dim]")
        self._progress.advance(self._task)


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _fmt_diff(d: float | None) -> str:
    return "-" if d is None else f"{d:.3g}"


def _fired_table(results: Sequence[Comparison]) -> Table:
    table = Table(title="Fusions fired (qalgebra)", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("fusion")
    table.add_column("fired", justify="right")
    table.add_column("nodes consumed", justify="right")
    for r in results:
        if r.report is None:
            table.add_row(r.name, "[red]lowering failed[/red]", "-", "-")
            continue
        if not r.report.fired:
            table.add_row(r.name, "(none)", "0", "0")
        for fusion, count in sorted(r.report.fired.items()):
            table.add_row(r.name, fusion, str(count), str(r.report.nodes_consumed[fusion]))
    return table


def _refusals_table(results: Sequence[Comparison]) -> Table | None:
    rows = [
        (r.name, x.fusion, x.root, escape(x.reason))
        for r in results
        if r.report is not None
        for x in r.report.refused
    ] + [
        (r.name, x.fusion, x.root, escape(f"failed, rolled back: {x.error}"))
        for r in results
        if r.report is not None
        for x in r.report.failed
    ]
    if not rows:
        return None
    table = Table(title="Refused (or failed) matches", title_justify="left")
    for column in ("model", "fusion", "at node", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _numerics_table(results: Sequence[Comparison]) -> Table:
    table = Table(
        title="Numerics: max |output - reference|; reference = the quantized module run eagerly",
        title_justify="left",
    )
    table.add_column("model", no_wrap=True)
    table.add_column("qalgebra", justify="right")
    table.add_column("torchao", justify="right")
    table.add_column("fp32 (quant. error)", justify="right")
    table.add_column("max |ref|", justify="right")
    for r in results:
        table.add_row(
            r.name,
            _fmt_diff(r.diff.get("qalgebra")),
            _fmt_diff(r.diff.get("torchao")),
            _fmt_diff(r.diff.get("fp32")),
            f"{r.reference_abs_max:.3g}",
        )
    return table


def _lowering_table(results: Sequence[Comparison]) -> Table:
    table = Table(title="Lowering time, and oneDNN ops in the output graph", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("qalgebra", justify="right")
    table.add_column("torchao", justify="right")
    table.add_column("torchao/qalgebra", justify="right")
    table.add_column("oneDNN ops qa/tao", justify="right")
    for r in results:
        ratio = (
            f"{r.torchao_lower_ms / r.qalgebra_lower_ms:.1f}x"
            if r.torchao_lower_ms and r.qalgebra_lower_ms
            else "-"
        )
        ops = f"{r.onednn_ops.get('qalgebra', '-')}/{r.onednn_ops.get('torchao', '-')}"
        table.add_row(r.name, _fmt_ms(r.qalgebra_lower_ms), _fmt_ms(r.torchao_lower_ms), ratio, ops)
    return table


def _runtime_table(results: Sequence[Comparison], runs: int) -> Table:
    table = Table(
        title=f"Steady-state runtime, ms: median of {runs} runs (x = time / fp32 eager)",
        title_justify="left",
    )
    table.add_column("model", no_wrap=True)
    whos = ("fp32", "reference", "torchao", "qalgebra")
    for who in ("fp32 eager", "reference", "torchao", "qalgebra"):
        table.add_column(who, justify="right")
    for r in results:
        base = r.runtime_ms.get("fp32")
        cells = []
        for who in whos:
            ms = r.runtime_ms.get(who)
            if ms is None:
                cells.append("-")
            elif base and who != "fp32":
                cells.append(f"{ms:.3g} ({ms / base:.1f}x)")
            else:
                cells.append(f"{ms:.3g}")
        table.add_row(r.name, *cells)
    return table


def _print_errors(console: Console, results: Sequence[Comparison]) -> None:
    for r in results:
        for who, error in (("qalgebra", r.qalgebra_error), ("torchao", r.torchao_error)):
            if error is not None:
                console.print(f"[red]{who} lowering failed on {r.name}:[/red]")
                console.print(error, markup=False, highlight=False)
        for who, mutated in sorted(r.mutates_inputs.items()):
            if mutated:
                console.print(
                    f"[yellow]note:[/yellow] the {who}-lowered {r.name} writes into its input "
                    "tensors (every measurement here runs on fresh copies)"
                )


# ---------------------------------------------------------------------------------------------
# Commands


@app.command()
def demo(
    blocks: Annotated[
        int,
        typer.Option(
            "--blocks", min=1, help="ResNet basic blocks, and FFN layers, in the two models."
        ),
    ] = 3,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A smoke test: one block each (overrides --blocks), 5 timing runs, one lowering.",
        ),
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="torch intra-op threads. 1 keeps timings stable on a busy machine: with more, "
            "oneDNN/OpenMP workers stall whenever another process holds a core.",
        ),
    ] = 1,
) -> None:
    """Quantize a ResNet-style stack and a transformer FFN stack (3-D input) with torchao, lower
    each with qalgebra and with torchao, and compare fusions, numerics and speed."""
    quiet_third_party()
    console = Console()
    if quick:
        blocks = 1
    runs, warmup, lower_repeats = (5, 1, 1) if quick else (10, 2, 3)
    console.print("[bold]qalgebra demo[/bold]: importing torch and torchao ...")
    import torch

    from qalgebra.testing.models import ffn_stack, resnet_like

    torch.set_num_threads(threads)

    models = [
        (f"resnet_like({blocks})", resnet_like(blocks)),
        (f"ffn_stack({blocks},3d)", ffn_stack(blocks, three_d=True)),
    ]
    per_model = 7 if runs > 0 else 6  # export, prepare, calibrate, convert, 2 lowerings, timing
    results: list[Comparison] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    with _Steps(console, per_model * len(models)) as steps:
        for name, factory in models:
            model, inputs = factory()
            results.append(
                compare(
                    name,
                    model,
                    inputs,
                    step=steps.step,
                    runs=runs,
                    warmup=warmup,
                    lower_repeats=lower_repeats,
                )
            )
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"demo steps took {time.perf_counter() - start:.1f} s "
        f"({time.process_time() - cpu_start:.1f} s CPU; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    console.print(_fired_table(results))
    refusals = _refusals_table(results)
    if refusals is not None:
        console.print(refusals)
    for r in results:
        if r.report is not None and r.report.unfused_quant_nodes:
            console.print(
                f"{r.name}: quant/dequant nodes left unfused by qalgebra: "
                + ", ".join(r.report.unfused_quant_nodes)
            )
    console.print(_numerics_table(results))
    for r in results:
        console.print(
            f"numerics {r.name}: qalgebra max abs diff {_fmt_diff(r.diff.get('qalgebra'))}, "
            f"torchao {_fmt_diff(r.diff.get('torchao'))} (vs the reference)"
        )
    console.print(_lowering_table(results))
    if lower_repeats > 1:
        console.print(
            f"[dim]qalgebra: median of {lower_repeats} lowerings; torchao: one call "
            "(it re-exports and decomposes the model every time)[/dim]"
        )
    else:
        console.print("[dim]--quick: one lowering each, first-call costs included[/dim]")
    console.print(_runtime_table(results, runs))
    _print_errors(console, results)
    if any(r.qalgebra_error is not None for r in results):
        raise typer.Exit(code=1)


FusionsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fusions",
        help="Fusions of yours, added to the catalog by priority: FILE.py:NAME[,NAME...] or "
        "MODULE:NAME[,...] naming Fusion, qalgebra.catalog.Placed or "
        "qalgebra.testing.families.FusionFamily objects (repeatable).",
    ),
]


def _with_fusions(specs: Sequence[str] | None, err: Console) -> tuple[Fusion, ...]:
    """The catalog, with the fusions ``--fusions`` names placed by priority."""
    from qalgebra.errors import QAlgebraError
    from qalgebra.lower import DEFAULT_FUSIONS

    if not specs:
        return DEFAULT_FUSIONS
    from qalgebra.catalog import load
    from qalgebra.testing.families import catalog_with

    try:
        loaded = [obj for spec in specs for obj in load(spec)]
        return catalog_with(loaded)
    except (QAlgebraError, TypeError) as exc:
        raise _fail(err, f"--fusions: {exc}", code=2) from None


@app.command()
def catalog(fusions: FusionsOption = None) -> None:
    """The fusions lower() applies, in priority order (a pattern before any it contains)."""
    from qalgebra.lower import DEFAULT_FUSIONS

    chosen = _with_fusions(fusions, Console(stderr=True))
    title = "DEFAULT_FUSIONS" if chosen == DEFAULT_FUSIONS else "DEFAULT_FUSIONS with yours (*)"
    table = Table(title=f"qalgebra fusion catalog ({title}, priority order)")
    table.add_column("#", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("doc")
    for i, fusion in enumerate(chosen, 1):
        mine = "" if fusion in DEFAULT_FUSIONS else " *"
        table.add_row(str(i), fusion.name + mine, fusion.family, escape(fusion.doc))
    Console().print(table)


def _fail(console: Console, message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code=code)


def _load_program(
    path: Path, err: Console
) -> tuple[torch.export.ExportedProgram, fx.GraphModule, tuple[torch.Tensor, ...]]:
    """A program saved with ``torch.export.save``: itself, its module, its example inputs
    (empty when none usable were saved)."""
    if not path.is_file():
        raise _fail(err, f"{path}: no such file")
    import torch
    from torch import fx

    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise _fail(
            err,
            f"{path}: not a program saved with torch.export.save "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        ) from None
    try:
        gm = ep.module()
    except Exception as exc:
        raise _fail(err, f"{path}: cannot rebuild a module ({type(exc).__name__}: {exc})") from None
    if not isinstance(gm, fx.GraphModule):
        raise _fail(err, f"{path}: the program's module is a {type(gm).__name__}, not a graph")
    saved = getattr(ep, "example_inputs", None)
    args: tuple[torch.Tensor, ...] = ()
    if isinstance(saved, tuple) and len(saved) == 2 and isinstance(saved[0], tuple):
        args = tuple(a for a in saved[0] if isinstance(a, torch.Tensor))
        if len(args) != len(saved[0]) or saved[1]:
            args = ()
    return ep, gm, args


@app.command()
def lower(
    path: Annotated[
        Path,
        typer.Argument(
            help="A quantized program saved with torch.export.save(torch.export.export("
            "converted_model, example_inputs), PATH)."
        ),
    ],
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Run the lowered module on the saved example inputs and compare it with the "
            "program run eagerly.",
        ),
    ] = True,
    show_graph: Annotated[
        bool, typer.Option("--show-graph", help="Print the lowered graph's Python code.")
    ] = False,
    selfcheck: Annotated[
        str,
        typer.Option(
            "--selfcheck",
            help="on: run each distinct fused kernel call once on random inputs against the "
            "subgraph it replaces (on sampled rows of the batch where that is exact) and leave "
            "unfused what disagrees; full: compare every row; off: trust the kernels.",
        ),
    ] = "on",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write a qalgebra artifact here (qalgebra.artifact.load lowers it again, in "
            "any process).",
        ),
    ] = None,
    fusions: FusionsOption = None,
) -> None:
    """Lower a saved quantized program with qalgebra and print the lowering report.

    The lowered module itself cannot be written (its prepacked oneDNN weights are opaque
    tensors, packed for this CPU): ``--out`` writes the program with qalgebra's metadata, which
    ``qalgebra.artifact.load`` lowers again at load time, in milliseconds.
    """
    quiet_third_party()
    console = Console()
    err = Console(stderr=True)
    from qalgebra.errors import QAlgebraError
    from qalgebra.lower import lower_with_report
    from qalgebra.selfcheck import MODES

    if selfcheck not in MODES:
        raise _fail(err, f"--selfcheck must be one of {', '.join(MODES)}, not {selfcheck!r}", 2)
    ep, gm, args = _load_program(path, err)
    chosen = _with_fusions(fusions, err)
    if not args:
        console.print("[yellow]note:[/yellow] no usable example inputs saved; numerics not checked")
    try:
        lowered, report = lower_with_report(
            gm, args, fusions=chosen, selfcheck=cast("SelfCheckMode", selfcheck)
        )
    except QAlgebraError as exc:
        raise _fail(err, f"{path}: lowering refused: {exc}") from None
    except Exception as exc:
        raise _fail(
            err,
            f"{path}: lowering failed ({type(exc).__name__}: {exc}); please report this with "
            "the file",
        ) from None
    console.print(f"[bold]{path}[/bold]: {len(gm.graph.nodes)} nodes -> {len(lowered.graph.nodes)}")
    console.print(report.summary(), markup=False, highlight=False)
    console.print(f"oneDNN ops in the lowered graph: {onednn_op_count(lowered)}")
    if check and args:
        try:
            diff = max_abs_diff(run_fresh(lowered, args), run_fresh(gm, args))
        except Exception as exc:
            raise _fail(
                err, f"running the lowered module failed ({type(exc).__name__}: {exc})"
            ) from None
        console.print(f"numerics: max abs diff vs the program run eagerly: {diff:.3g}")
    if show_graph:
        console.print(lowered.code, markup=False, highlight=False)
    if out is not None:
        from qalgebra.artifact import save

        try:
            save(ep, out)
        except (QAlgebraError, OSError) as exc:
            raise _fail(err, f"writing {out} failed: {exc}") from None
        console.print(f"wrote {out} (load it with qalgebra.artifact.load)")


@app.command()
def explain(
    model: Annotated[
        str | None,
        typer.Option("--model", help="A bundled model (qalgebra.testing.models.MODELS)."),
    ] = None,
    program: Annotated[
        Path | None,
        typer.Option(
            "--program", help="Or a quantized program of yours saved with torch.export.save."
        ),
    ] = None,
    *,
    fusion: Annotated[str, typer.Option("--fusion", help="A fusion name (see `catalog`).")],
    node: Annotated[
        str | None,
        typer.Option("--node", help="A node of the quantized graph; omit it to try every node."),
    ] = None,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline",
            help="Explain against the graph the fusion sees inside lower(): after the fusions "
            "before it in priority order have run. Default: the graph convert_pt2e produced.",
        ),
    ] = False,
    fusions: FusionsOption = None,
) -> None:
    """Why FUSION does (not) match at NODE of a bundled model quantized with torchao, or of a
    saved program (``--program``)."""
    quiet_third_party()
    console = Console()
    err = Console(stderr=True)
    from qalgebra.lower import lower_with_report
    from qalgebra.match import explain as explain_match

    catalog = _with_fusions(fusions, err)
    by_name = {f.name: f for f in catalog}
    if fusion not in by_name:
        raise _fail(err, f"unknown fusion {fusion!r}; known: {', '.join(by_name)}", code=2)
    if (model is None) == (program is None):
        raise _fail(err, "give --model NAME or --program PATH (one of them)", code=2)
    chosen = by_name[fusion]
    if program is not None:
        _, gm, inputs = _load_program(program, err)
        model = str(program)
    else:
        assert model is not None
        gm, inputs = _quantized_model(model, console, err)
    where = "the quantized graph"
    if pipeline:
        if program is not None and not inputs:
            raise _fail(err, f"{program}: --pipeline needs the example inputs saved with it", 2)
        before = catalog[: catalog.index(chosen)]
        gm, report = lower_with_report(gm, inputs, fusions=before)
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(report.fired.items())) or "nothing fired"
        where = f"the graph after {', '.join(f.name for f in before) or 'no fusion'} ({fired})"
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    if node is not None and node not in nodes:
        raise _fail(
            err,
            f"no call node {node!r} in {where} of {model}"
            + (" (an earlier fusion may have consumed it)" if pipeline else "")
            + f"; nodes: {', '.join(nodes)}",
            code=2,
        )
    if node is not None:
        console.print(_explain_one(fusion, nodes[node], explain_match(chosen.matcher, nodes[node])))
        return
    console.print(f"{fusion} on {where} of {model}:", highlight=False)
    wrong_root: list[str] = []
    for n in nodes.values():
        mismatch = explain_match(chosen.matcher, n)
        if mismatch is not None and not mismatch.path:
            wrong_root.append(n.name)  # not even the pattern's root op: nothing to explain
            continue
        console.print(_explain_one(fusion, n, mismatch), markup=False, highlight=False)
    if wrong_root:
        console.print(
            f"not a possible root of {fusion} (the root op differs): {', '.join(wrong_root)}",
            markup=False,
            highlight=False,
        )


def _quantized_model(
    model: str, console: Console, err: Console
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """A bundled model, quantized with torchao's PT2E flow, and its inputs."""
    from qalgebra.testing.models import MODELS
    from qalgebra.testing.quantize import quantize_pt2e

    if model not in MODELS:
        close = difflib.get_close_matches(model, list(MODELS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise _fail(
            err, f"unknown model {model!r}; {hint}known: {', '.join(sorted(MODELS))}", code=2
        )
    module, inputs = MODELS[model]()
    with console.status(f"quantizing {model} with torchao ..."):
        return quantize_pt2e(module, inputs), tuple(inputs)


def _explain_one(fusion: str, n: fx.Node, mismatch: Mismatch | None) -> Text:
    op = str(n.target)
    if mismatch is None:
        return Text(f"{fusion} matches at node {n.name} ({op})")
    lines = [f"{fusion} does not match at node {n.name} ({op}):"]
    for i, failure in enumerate((mismatch, *mismatch.tied)):
        at = failure.node.name if failure.node is not None else repr(failure.at)
        if i:  # another alternative that fails as far in
            lines.append("  or")
        lines.append(f"  path:   {failure.path_str}")
        lines.append(f"  node:   {at}")
        lines.append(f"  reason: {failure.reason}")
    return Text("\n".join(lines))


@app.command()
def fuzz(
    max_examples: Annotated[
        int | None,
        typer.Option("--max-examples", help="Examples to check (100 if --minutes is not given)."),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            "--minutes", help="Run this long (with --max-examples: whichever ends first)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Campaign seed (default: random).")
    ] = None,
    families: Annotated[
        list[str] | None,
        typer.Option("--families", help="Families to draw from, comma-separated or repeated."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Where the failing graphs' reproduction scripts go.")
    ] = Path("fuzz-failures"),
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Processes sharing the work (default: 2 if 2 cores)."),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Example database: a directory, or a Redis URL shared by machines (default: "
            "$QALGEBRA_HYPOTHESIS_DB, else .hypothesis/examples).",
        ),
    ] = None,
    fusions: FusionsOption = None,
    compiled: Annotated[
        bool,
        typer.Option(
            "--compiled",
            help="Compile each example with torch.compile's qalgebra backend and check what "
            "ships (about 2 s an example; failures under database keys of their own).",
        ),
    ] = False,
) -> None:
    """Check the lowering's properties on random quantized graphs (exit 1 on any failure).

    With ``--fusions``, every example is lowered with your fusions in place: the catalog's
    families must still hold, and your families (FusionFamily) are drawn too. With
    ``--compiled``, every example goes through ``torch.compile`` instead of the eager
    lowering."""
    quiet_third_party()
    from qalgebra.errors import ExampleDatabaseError
    from qalgebra.fuzz import run_campaign

    err = Console(stderr=True)
    chosen = _with_fusions(fusions, err)
    names = [n for entry in families or [] for n in entry.split(",") if n]
    try:
        summary = run_campaign(
            max_examples, minutes, seed, names or None, out, workers=workers, database=db,
            fusions=chosen, compiled=compiled,
        )  # fmt: skip
    except KeyError as exc:
        raise _fail(err, str(exc.args[0]) if exc.args else str(exc), code=2) from None
    except ExampleDatabaseError as exc:
        raise _fail(Console(stderr=True), str(exc), code=2) from None
    raise typer.Exit(summary.exit_code)


def main() -> None:
    """Entry point of the ``qalgebra`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
