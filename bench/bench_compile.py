"""qalgebra under torch.compile vs Inductor's own quantization path, side by side.

    python bench/bench_compile.py [--quick] [--models a,b] [--batches 1,8] [--compiles N]
                                  [--runtime-processes N] [--same-process-compiles]
                                  [--selfcheck-off] [--out FILE]

Per model and batch, one child process quantizes the model (torchao's PT2E flow,
X86InductorQuantizer) and measures, side by side:

- compile time (wall time of the first call: dynamo, AOT autograd, the passes, code generation
  and the C++ compiler, each compile in a fresh Inductor cache and with qalgebra's check caches
  empty) of ``torch.compile(gm, backend="qalgebra")`` (its cost check on: layers faster in
  float stay float) and of
  ``torch.compile(gm)`` with freezing (Inductor's own quantization patterns), and the backend
  with ``cost="off"`` (every layer the catalog can fuse, fused), after one untimed warm-up
  compile of a small model with each, so that neither pays the process's one-time costs
  (pattern registration, pattern validation). Each timed compile runs in a process of its own,
  a first compile of the model as a user's is (see :func:`compile_in_fresh_process`);
  ``--same-process-compiles`` times them one after the other in the child instead (faster,
  and biased towards whichever graph fits Inductor's process-wide caches); ``--selfcheck-off``
  also times the backend with ``selfcheck="off"`` (compile time only: the graph it compiles is
  the self-checked one wherever every kernel passes its check);
- fused oneDNN conv/linear calls in the code each generated, and the quantization fusions
  Inductor itself made under the qalgebra backend (0 when its patterns found nothing);
- steady-state runtime (median of ``--runs`` calls after ``--warmup``, the modules taking
  turns, order rotating; qalgebra-compiled / Inductor-compiled is the median of per-round
  ratios) of the fp32 model, torchao's and qalgebra's eager lowerings and both compiled
  modules (compiled again in the child: the cost check of that compile decides anew, so the
  runtime table says what the timed qalgebra module fused and left float); with
  ``--runtime-processes N``, N processes each compile and time side by side, and the ratios
  are their median, with their range (a process's ratio is one sample of the state it happened
  to be in: see :func:`merge_runtimes`);
- numerics: max |output - reference| of each, the reference being the quantized module run
  eagerly.

``[decomposed]`` models are the same quantized graph with its per-tensor quantize/dequantize
ops written as arithmetic, zero points 0 left out (``qalgebra.testing.forms.to_decomposed``):
the form Inductor's patterns miss. ``--out`` writes the markdown with a header.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_lowering import cpu_model, fmt, git_revision, log  # noqa: E402
from torch import Tensor, fx, nn  # noqa: E402

from qalgebra.measure import (  # noqa: E402
    max_abs_diff,
    mutates_inputs,
    paired_ratio,
    quiet_third_party,
    timed_samples,
)
from qalgebra.testing.models import ffn_stack, resnet_like  # noqa: E402

Factory = Callable[[int], tuple[nn.Module, tuple[Tensor, ...]]]
T = TypeVar("T")

#: Fused oneDNN conv/linear calls in Inductor's generated wrapper code.
FUSED_CALL = re.compile(r"torch\.ops\.onednn\.(qconv\w*|qlinear\w*)\.\w+\(")


def transformer_encoder(batch: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """A 4-layer ``nn.TransformerEncoder`` (d_model 256, 4 heads, ff 1024), sequence 64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(300)
        layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
        return model, (torch.randn(batch, 64, 256),)


MODELS: dict[str, Factory] = {
    "resnet_like(8)": lambda b: resnet_like(8, batch=b, size=32)(),
    "resnet_like(32)": lambda b: resnet_like(32, batch=b, size=32)(),
    "ffn_stack(8,3d)": lambda b: ffn_stack(8, three_d=True, batch=b, seq=64)(),
    "ffn_stack(8,2d)": lambda b: ffn_stack(8, three_d=False, batch=b, seq=64)(),
    "transformer_encoder": transformer_encoder,
}
#: The public architectures of ``qalgebra.testing.zoo`` (full size) the issue names.
ZOO_MODELS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "googlenet",
    "shufflenet_v2_x1_0",
    "transformer_encoder",
)
DECOMPOSED = " [decomposed]"
#: The qalgebra backend with the cost check off: every layer the catalog can fuse is fused.
ALL_FUSED = "qalgebra compiled, cost off"
#: The qalgebra backend with the self-check off (``--selfcheck-off``; compile time only).
UNCHECKED = "qalgebra compiled, self-check off"
#: The runtime ratios a child measures side by side in its process (per-round medians): the
#: result's key, and the numerator's and denominator's modules, in the table's order.
RUNTIME_RATIOS: dict[str, tuple[str, str]] = {
    "qalgebra/Inductor compiled": ("qalgebra compiled", "Inductor compiled"),
    "all fused/Inductor compiled": (ALL_FUSED, "Inductor compiled"),
    "qalgebra compiled/eager": ("qalgebra compiled", "qalgebra eager"),
}
QUICK_MODELS = ("resnet_like(8)", "ffn_stack(8,3d)", "resnet_like(8)" + DECOMPOSED)


def _zoo_factory(name: str) -> Factory:
    def factory(batch: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
        from qalgebra.testing import zoo

        model, inputs = zoo.build(name, size="full", batch=batch)
        return model, tuple(inputs)

    return factory


def _zoo_models() -> dict[str, Factory]:
    """``zoo:<name>`` for each of :data:`ZOO_MODELS` the zoo registry has (when it exists)."""
    try:
        from qalgebra.testing import zoo
    except ImportError:
        return {}
    return {f"zoo:{name}": _zoo_factory(name) for name in ZOO_MODELS if name in zoo.ZOO}


MODELS.update(_zoo_models())


#: Models also measured in the decomposed form.
DECOMPOSED_MODELS = ("resnet_like(8)", "resnet_like(32)", "ffn_stack(8,3d)", "transformer_encoder")


def all_models() -> list[str]:
    return list(MODELS) + [f"{n}{DECOMPOSED}" for n in DECOMPOSED_MODELS]


# ---------------------------------------------------------------------------------------------
# Child: one model, one batch


@contextlib.contextmanager
def generated_code() -> Iterator[list[str]]:
    """The wrapper code Inductor generates inside the block."""
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def fresh(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Copies: a module that writes into its inputs (Inductor's and torchao's in-place ``sum``
    into a residual input do) must not change what the next call sees."""
    return tuple(x.clone() for x in inputs)


def compile_once(
    gm: nn.Module, inputs: tuple[Tensor, ...], backend: str | Callable[..., Any]
) -> dict[str, Any]:
    """Compile a copy of ``gm`` (freezing on, fresh cache), run it once; time and inspect.

    qalgebra's per-process caches (the self-check's verdicts, the cost check's timings) are
    emptied first: the eager lowering measured before, or an earlier compile of the same model,
    would otherwise have paid for this compile's checks, which a compile in a fresh process pays.
    """
    from torch._inductor import config
    from torch._inductor.utils import fresh_cache

    from qalgebra import costcheck, selfcheck
    from qalgebra.compile import inductor_quant_fusions, recording

    selfcheck.clear_cache()
    costcheck.clear_cache()
    model = copy.deepcopy(gm)
    before = inductor_quant_fusions()
    with (
        fresh_cache(),
        config.patch(freezing=True),
        torch.no_grad(),
        generated_code() as codes,
        recording() as reports,
    ):
        compiled = torch.compile(model, backend=backend)
        args = fresh(inputs)
        start = time.perf_counter()
        out = compiled(*args)
        seconds = time.perf_counter() - start
    after = inductor_quant_fusions()
    after.subtract(before)
    return {
        "module": compiled,
        "out": out,
        "seconds": seconds,
        "fused": sum(len(FUSED_CALL.findall(code)) for code in codes),
        "inductor_quant_fusions": sum(v for v in after.values() if v > 0),
        "qalgebra_fired": sum(sum(r.lowering.fired.values()) for r in reports),
        "left_float": len(
            {
                (i, x.root)
                for i, r in enumerate(reports)
                for x in r.lowering.refused
                if x.cause == "cost"
            }
        ),
        "pass_seconds": sum(r.pass_seconds for r in reports),
        "graphs": len(codes),
    }


def summarize_compiles(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's compiles: the first's counts, the medians of its times, each time."""
    summary = dict(rounds[0])
    for key in ("seconds", "pass_seconds"):
        summary[key] = statistics.median(r[key] for r in rounds)
    summary["seconds each"] = [r["seconds"] for r in rounds]
    return summary


def warm_up() -> None:
    """One compile of a small quantized model with each backend (process one-time costs)."""
    from qalgebra.testing.quantize import quantize_pt2e

    model, inputs = resnet_like(1)()
    gm = quantize_pt2e(model, inputs)
    for backend in ("inductor", "qalgebra"):
        compile_once(gm, inputs, backend)


def quantized(name: str, batch: int) -> tuple[nn.Module, fx.GraphModule, tuple[Tensor, ...]]:
    """The float model, its PT2E-quantized graph (decomposed for ``[decomposed]`` names), inputs."""
    from qalgebra.testing.forms import to_decomposed
    from qalgebra.testing.quantize import quantize_pt2e

    base = name.removesuffix(DECOMPOSED)
    model, inputs = MODELS[base](batch)
    gm = quantize_pt2e(model, inputs)
    if name.endswith(DECOMPOSED):
        gm = to_decomposed(gm)
    return model, gm, inputs


def backends(unchecked: bool = False) -> list[tuple[str, str | Callable[..., Any]]]:
    """The compiled columns, each with what ``torch.compile`` is given as its backend;
    ``unchecked``: with the self-check off too (its compile time only)."""
    from qalgebra.compile import backend as qalgebra_backend

    chosen: list[tuple[str, str | Callable[..., Any]]] = [
        ("Inductor compiled", "inductor"),
        ("qalgebra compiled", "qalgebra"),
        (ALL_FUSED, functools.partial(qalgebra_backend, cost="off")),
    ]
    if unchecked:
        chosen.append((UNCHECKED, functools.partial(qalgebra_backend, selfcheck="off")))
    return chosen


def compile_child(name: str, batch: int, who: str) -> dict[str, Any]:
    """One timed compile of ``name`` with ``who``'s backend, in this (fresh) process."""
    quiet_third_party()
    _, gm, inputs = quantized(name, batch)
    warm_up()
    done = compile_once(gm, inputs, dict(backends(unchecked=True))[who])
    return {k: v for k, v in done.items() if k not in ("out", "module")}


def compile_in_fresh_process(name: str, batch: int, who: str, timeout: float) -> dict[str, Any]:
    """:func:`compile_child` in a new process.

    Compiling in the process that compiled the same model before is not a first compile:
    Inductor's index analysis keeps process-wide caches (sympy's, and ``functools`` caches
    of at most 128 entries) that an earlier compile of the same model fills. Measured on
    ShuffleNet-V2 at batch 1, Inductor's code generation took 0.5-0.6 s when the model had
    been compiled before in the process and 1.5-2.4 s in a fresh one, while qalgebra's lowered
    graph, whose index expressions overflow those caches, took about 2 s either way: compiled
    in turns in one process it measured 1.08x Inductor's compile time, each in its own process
    0.85x. A user's compile is a first compile, so each timed compile gets a process of its own
    (after the same warm-up compile of a small model).
    """
    cmd = [sys.executable, __file__, "--compile-child", name, "--backend", who]
    cmd += ["--batches", str(batch), "--threads", str(torch.get_num_threads())]
    out = run_for_json(cmd, timeout)
    if isinstance(out, str):
        raise RuntimeError(f"compile process failed: {out}")
    return out


def run_for_json(cmd: list[str], timeout: float) -> dict[str, Any] | str:
    """The JSON dict ``cmd`` prints last, or the last line of its stderr when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["?"])[-1][:300]
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def rotated(items: list[T], rounds: int) -> Iterator[tuple[int, T]]:
    """``(round, item)`` for ``rounds`` rounds over ``items``, each round starting one item
    later: no item always comes first."""
    for round_ in range(rounds):
        turn = round_ % len(items)
        for item in items[turn:] + items[:turn]:
            yield round_, item


def child(
    name: str,
    batch: int,
    runs: int,
    warmup: int,
    compiles: int = 1,
    *,
    same_process: bool = False,
    timeout: float = 1800,
    unchecked: bool = False,
) -> dict[str, Any]:
    from qalgebra.lower import lower
    from qalgebra.testing.quantize import torchao_lower

    quiet_third_party()
    model, gm, inputs = quantized(name, batch)
    result: dict[str, Any] = {"model": name, "batch": batch, "nodes": len(gm.graph.nodes)}
    with torch.no_grad():
        reference = gm(*fresh(inputs))
    modules: dict[str, Callable[..., object]] = {"fp32 eager": model}
    eager = {"torchao eager": torchao_lower, "qalgebra eager": lower}
    for who, lowering in eager.items():
        try:
            modules[who] = lowering(gm, inputs)
        except Exception as exc:  # a crash is a result, recorded
            result[f"{who} error"] = f"{type(exc).__name__}: {exc}"[:300]
    compiled = backends()
    timed = backends(unchecked)
    rounds: dict[str, list[dict[str, Any]]] = {who: [] for who, _ in timed}
    if not same_process:
        for round_, (who, _) in rotated(timed, compiles):
            log(f"{name} batch {batch}: compiling with {who} ({round_ + 1}/{compiles})")
            try:
                rounds[who].append(compile_in_fresh_process(name, batch, who, timeout))
            except Exception as exc:
                result[f"{who} error"] = f"{type(exc).__name__}: {exc}"[:300]
    warm_up()
    # the modules timed below; with --same-process-compiles, also the timed compiles
    in_child = (timed, compiles) if same_process else (compiled, 1)
    for _, (who, backend) in rotated(*in_child):
        if not same_process and f"{who} error" in result:
            continue
        log(f"{name} batch {batch}: compiling with {who} in this process")
        try:
            done = compile_once(gm, inputs, backend)
        except Exception as exc:
            result[f"{who} error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if who not in modules and who != UNCHECKED:  # timed below: its own decisions
            modules[who] = done.pop("module")
            result.setdefault("timed", {})[who] = {k: done[k] for k in ("fused", "left_float")}
        if same_process:
            rounds[who].append({k: v for k, v in done.items() if k != "out"})
    for who, done_rounds in rounds.items():
        if done_rounds:
            result[who] = summarize_compiles(done_rounds)
    for who in ("qalgebra compiled", ALL_FUSED, UNCHECKED):
        ours, theirs = rounds[who], rounds["Inductor compiled"]
        if ours and len(ours) == len(theirs):
            result[f"{who} compile ratios"] = [
                a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)
            ]
    diffs = {}
    for who, module in modules.items():
        with torch.no_grad():
            diffs[who] = max_abs_diff(module(*fresh(inputs)), reference)
    result["diff"] = diffs
    result["writes its inputs"] = [who for who, m in modules.items() if mutates_inputs(m, inputs)]
    result["reference abs max"] = float(reference.abs().max())
    log(f"{name} batch {batch}: timing {runs} rounds")
    samples = timed_samples(modules, inputs, runs=runs, warmup=warmup)
    result["runtime ms"] = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    for key, (num, den) in RUNTIME_RATIOS.items():
        result[key] = paired_ratio(samples, num, den)
    return result


# ---------------------------------------------------------------------------------------------
# Parent: children, report


@dataclass
class Args:
    models: list[str]
    batches: list[int]
    runs: int
    warmup: int
    threads: int
    compiles: int
    timeout: float
    out: Path | None
    same_process: bool = False
    runtime_processes: int = 1
    unchecked: bool = False


def run_child(args: Args, name: str, batch: int) -> dict[str, Any]:
    """The child of ``name`` at ``batch``; with ``--runtime-processes N``, N - 1 more children
    that only compile in process and time (see :func:`merge_runtimes`)."""
    first = run_one_child(args, name, batch, args.compiles)
    extra = [run_one_child(args, name, batch, 0) for _ in range(args.runtime_processes - 1)]
    return merge_runtimes(first, extra)


def run_one_child(args: Args, name: str, batch: int, compiles: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--batches", str(batch)]
    cmd += ["--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--compiles", str(compiles), "--timeout", str(args.timeout)]
    if args.same_process:
        cmd.append("--same-process-compiles")
    if args.unchecked:
        cmd.append("--selfcheck-off")
    # the child runs its timed compiles in processes of their own, each given --timeout
    per_round = len(backends(args.unchecked))
    timeout = args.timeout * (1 + (0 if args.same_process else per_round * compiles))
    try:
        out = run_for_json(cmd, timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
    return out if isinstance(out, dict) else {"model": name, "batch": batch, "error": out}


def merge_runtimes(first: dict[str, Any], extra: list[dict[str, Any]]) -> dict[str, Any]:
    """``first``'s result with each runtime ratio the median over the processes.

    Measured on the AMD EPYC: the same compiled module ran in 2.6 ms in one process and 4.8 ms
    in the next, and a ratio moved by several percent between processes (``resnet_like(8)``
    at batch 8: 1.027-1.076x over four), more than within one: one process's ratio is one
    sample of whatever state that process happened to be in (the cause was not found). The
    absolute times and numerics shown stay the first process's.
    """
    if not extra:
        return first
    merged = dict(first)
    for key in RUNTIME_RATIOS:
        values = [r[key] for r in (first, *extra) if isinstance(r.get(key), float)]
        merged[f"{key} per process"] = values
        merged[key] = statistics.median(values) if values else None
    merged["timed per process"] = [r["timed"] for r in (first, *extra) if "timed" in r]
    merged["runtime errors"] = [r["error"] for r in extra if "error" in r]
    return merged


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "n/a"


def compile_ratio(result: dict[str, Any], who: str) -> str:
    """``who``'s compile time / Inductor's: the median of the per-round ratios and their range
    when there were several rounds, else the one ratio."""
    ratios = result.get(f"{who} compile ratios") or []
    if len(ratios) > 1:
        low, high = min(ratios), max(ratios)
        return f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"
    seconds = result.get(who, {}).get("seconds")
    return ratio(seconds, result.get("Inductor compiled", {}).get("seconds"))


def compile_table(results: list[dict[str, Any]]) -> list[str]:
    unchecked = any(UNCHECKED in r for r in results)
    lines = [
        "| model | batch | Inductor compile | qalgebra compile (its pass) | qalgebra / Inductor "
        "| cost off: compile, / Inductor "
        + ("| self-check off: compile (its pass), / Inductor " if unchecked else "")
        + "| fused oneDNN conv/linear: Inductor "
        "| qalgebra (+ left float by the cost check) | qalgebra, cost off "
        "| Inductor's quant. fusions under qalgebra |",
        "|---|--:|--:|--:|--:|--:|" + ("--:|" if unchecked else "") + "--:|--:|--:|--:|",
    ]
    for r in results:
        ind, qa = r.get("Inductor compiled", {}), r.get("qalgebra compiled", {})
        off, un = r.get(ALL_FUSED, {}), r.get(UNCHECKED, {})
        no_check = (
            f"| {fmt(un.get('seconds'), ' s')} ({fmt(un.get('pass_seconds'), ' s')}), "
            f"{compile_ratio(r, UNCHECKED)} "
            if unchecked
            else ""
        )
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(ind.get('seconds'), ' s')} "
            f"| {fmt(qa.get('seconds'), ' s')} ({fmt(qa.get('pass_seconds'), ' s')}) "
            f"| {compile_ratio(r, 'qalgebra compiled')} "
            f"| {fmt(off.get('seconds'), ' s')}, {compile_ratio(r, ALL_FUSED)} "
            f"{no_check}| {ind.get('fused', 'n/a')} | {qa.get('fused', 'n/a')} "
            f"(+{qa.get('left_float', 'n/a')}) | {off.get('fused', 'n/a')} "
            f"| {qa.get('inductor_quant_fusions', 'n/a')} |"
        )
    return lines


RUNTIME_COLUMNS = (
    "fp32 eager",
    "torchao eager",
    "qalgebra eager",
    "Inductor compiled",
    "qalgebra compiled",
    ALL_FUSED,
)


def runtime_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | batch | " + " | ".join(RUNTIME_COLUMNS) + " | qalgebra compiled / Inductor "
        "compiled (per round) | cost off / Inductor compiled (per round) | qalgebra compiled / "
        "qalgebra eager (per round) | timed qalgebra module: fused (+ left float) |",
        "|---|--:|" + "--:|" * (len(RUNTIME_COLUMNS) + 4),
    ]
    for r in results:
        t = r.get("runtime ms", {})
        cells = " | ".join(fmt(t.get(c), " ms") for c in RUNTIME_COLUMNS)
        shown = " | ".join(ratio_cell(r, k) for k in RUNTIME_RATIOS)
        timed = [t.get("qalgebra compiled", {}) for t in r.get("timed per process", [])]
        timed = timed or [r.get("timed", {}).get("qalgebra compiled", {})]
        decided = "; ".join(
            dict.fromkeys(f"{t.get('fused', 'n/a')} (+{t.get('left_float', 'n/a')})" for t in timed)
        )
        lines.append(f"| {r['model']} | {r['batch']} | {cells} | {shown} | {decided} |")
    return lines


def ratio_cell(result: dict[str, Any], key: str) -> str:
    """A runtime ratio; over several processes, their median and range."""
    value = result.get(key)
    if value is None:
        return "n/a"
    per_process = result.get(f"{key} per process", [])
    if len(per_process) > 1:
        low, high = min(per_process), max(per_process)
        return f"{value:.3f}x ({low:.3f}-{high:.3f}, {len(per_process)} processes)"
    return f"{value:.3f}x"


def numerics_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | batch | max abs ref. | " + " | ".join(RUNTIME_COLUMNS) + " |",
        "|---|--:|--:|" + "--:|" * len(RUNTIME_COLUMNS),
    ]
    for r in results:
        d = r.get("diff", {})
        cells = " | ".join(fmt(d.get(c)) for c in RUNTIME_COLUMNS)
        ref = fmt(r.get("reference abs max"))
        lines.append(f"| {r['model']} | {r['batch']} | {ref} | {cells} |")
    return lines


def problem_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        for key, value in r.items():
            if key.endswith("error"):
                lines.append(f"- {r['model']} batch {r['batch']}: {key}: {value}")
        for error in r.get("runtime errors", []):
            lines.append(f"- {r['model']} batch {r['batch']}: a runtime-only child: {error}")
        for who in r.get("writes its inputs", []):
            lines.append(
                f"- {r['model']} batch {r['batch']}: the {who} module writes into the caller's "
                "input tensors (measured on copies)"
            )
    return lines or ["- none"]


def header(command: str, args: Args, load: tuple[str, str]) -> list[str]:
    import datetime
    import platform

    import torchao

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# torch.compile benchmark: qalgebra's catalog vs Inductor's quantization patterns",
        "",
        f"- date: {now}",
        f"- command: `{command}`",
        f"- CPU: {cpu_model()}; torch threads: {args.threads}",
        f"- torch {torch.__version__}, torchao {torchao.__version__}, Python "
        f"{platform.python_version()}, qalgebra at `{git_revision()}`",
        f"- load average (1/5/15 min) at start: {load[0]}; at end: {load[1]}. A shared "
        "machine: ratios measured side by side in one process mean more than absolutes.",
        f"- method: one child process per model and batch; runtime = median of {args.runs} "
        f"calls after {args.warmup} warm-up calls, the modules taking turns; compile time = "
        "first call (dynamo + AOT + passes + codegen + C++ compiler), fresh Inductor cache "
        "and qalgebra's self-check and cost-check caches emptied, "
        + (
            "each compile after the others in the child, "
            if args.same_process
            else "each compile in a process of its own (a first compile of the model), "
        )
        + "after one warm-up compile of resnet_like(1) with each backend"
        + (
            f"; {args.compiles} compiles per backend, the order rotating, times and ratios "
            "the medians (per-round ratios, their range in brackets)."
            if args.compiles > 1
            else "; one compile per backend."
        )
        + (
            f" Runtime ratios: the median over {args.runtime_processes} processes, each "
            "compiling and timing side by side (their range in brackets); absolute times and "
            "numerics from the first."
            if args.runtime_processes > 1
            else ""
        ),
        "",
    ]


def parse_args(argv: list[str] | None) -> tuple[Args, str | tuple[str, str] | None]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)}")
    parser.add_argument("--models", help=f"comma-separated, from: {'; '.join(all_models())}")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,8)")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--compiles",
        type=int,
        default=1,
        help="compiles per backend, the order rotating; times are medians (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds per child and per compile process (a child gets it once more for each "
        "of the compiles it starts)",
    )
    parser.add_argument(
        "--runtime-processes",
        type=int,
        default=1,
        help="processes that each compile and time the runtime side by side; the ratios shown "
        "are their median (default 1; the first also times the compiles)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument(
        "--same-process-compiles",
        action="store_true",
        help="time the compiles in the child that times the runtime, one after the other "
        "(faster; later compiles of the model find its index analysis cached)",
    )
    parser.add_argument(
        "--selfcheck-off",
        action="store_true",
        help="also time the compile of the backend with selfcheck='off' (a column of its own)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.models:
        models = [m.strip() for m in re.split(r",(?![^(]*\))", ns.models)]  # not inside (...)
    else:
        models = list(QUICK_MODELS) if ns.quick else all_models()
    unknown = [m for m in models if m not in all_models()]
    if unknown and ns.child is None and ns.compile_child is None:
        parser.error(f"unknown model(s) {unknown}; known: {all_models()}")
    batches = [int(b) for b in (ns.batches or ("1" if ns.quick else "1,8")).split(",")]
    runs = ns.runs if ns.runs is not None else (10 if ns.quick else 30)
    warmup = ns.warmup if ns.warmup is not None else (2 if ns.quick else 5)
    if ns.compiles < (0 if ns.child is not None else 1):  # a runtime-only child gets 0
        parser.error("--compiles must be at least 1")
    if ns.runtime_processes < 1:
        parser.error("--runtime-processes must be at least 1")
    args = Args(
        models,
        batches,
        runs,
        warmup,
        ns.threads,
        ns.compiles,
        ns.timeout,
        ns.out,
        ns.same_process_compiles,
        ns.runtime_processes,
        ns.selfcheck_off,
    )
    if ns.compile_child is not None:
        return args, (ns.compile_child, ns.backend)
    return args, ns.child


def main(argv: list[str] | None = None) -> int:
    args, child_model = parse_args(argv)
    torch.set_num_threads(args.threads)
    if isinstance(child_model, tuple):
        name, who = child_model
        print(json.dumps(compile_child(name, args.batches[0], who)))
        return 0
    if child_model is not None:
        result = child(
            child_model,
            args.batches[0],
            args.runs,
            args.warmup,
            args.compiles,
            same_process=args.same_process,
            timeout=args.timeout,
            unchecked=args.unchecked,
        )
        print(json.dumps(result))
        return 0
    command = "python bench/bench_compile.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start_load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for name in args.models:
        for batch in args.batches:
            log(f"{name} batch {batch}: start")
            results.append(run_child(args, name, batch))
            log(f"{name} batch {batch}: {json.dumps(results[-1])[:400]}")
    end_load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    body = [
        "## Compile time and fused oneDNN ops",
        "",
        *compile_table(results),
        "",
        "## Steady-state runtime (median)",
        "",
        *runtime_table(results),
        "",
        "## Numerics: max |output - reference|",
        "",
        *numerics_table(results),
        "",
        "## Problems",
        "",
        *problem_lines(results),
        "",
    ]
    print("\n".join(body))
    if args.out is not None:
        args.out.write_text("\n".join(header(command, args, (start_load, end_load)) + body))
        log(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
