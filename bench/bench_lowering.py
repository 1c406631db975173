"""Benchmark qalgebra's lowering against torchao's on models of growing size.

    python bench/bench_lowering.py [--quick] [--out bench/RESULTS.md]

For ResNet-style stacks (``resnet_like(N)``) and transformer FFN stacks (``ffn_stack(N)``, 2-D and
3-D input), N = 2, 8, 32, quantized with torchao's PT2E flow (X86InductorQuantizer), one run
reports side by side:

- lowering time: ``qalgebra.lower.lower_with_report`` (median of 7) vs torchao's
  ``lower_pt2e_quantized_to_x86`` (one call), and their ratio;
- oneDNN ops in each output graph (nodes calling an ``onednn.*`` or ``quantized.*`` op);
- numerics: max |output - reference| of each, the reference being the quantized (un-lowered)
  module run eagerly;
- steady-state runtime medians (``--runs`` calls after ``--warmup``, the modules taking turns) of
  the fp32 model, the reference, the torchao-lowered and the qalgebra-lowered module;
- ``torch.compile`` of the fp32 model, in a child process (cold Inductor cache) killed after
  ``--compile-timeout`` seconds: a model that compiles too slowly is skipped with a note.

It prints markdown; ``--out`` also writes it with a header (date, CPU, versions, command). A crash
or a numerics problem of either lowering is recorded in the output, never hidden.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from qalgebra.measure import Comparison, compare, median_ms, quiet_third_party  # noqa: E402
from qalgebra.testing.models import ffn_stack, resnet_like  # noqa: E402

SIZES = (2, 8, 32)
#: qalgebra lowerings timed per model (the median is reported): tens of milliseconds each, so
#: one descheduling on a shared machine would move a single sample by a third.
LOWER_REPEATS = 7
#: qalgebra's output is flagged when it is further than this from the reference, relative to
#: max(1, max |reference|): a lowering that keeps to the contract (one quantization step per
#: int8 element, float rounding elsewhere) stays orders of magnitude below it.
NUMERICS_FLAG = 1e-3


@dataclass(frozen=True)
class Spec:
    """One benchmark model: ``resnet`` or ``ffn`` (2-D or 3-D input), ``n`` blocks/layers."""

    kind: str
    n: int
    three_d: bool = False

    @property
    def name(self) -> str:
        if self.kind == "resnet":
            return f"resnet_like({self.n})"
        return f"ffn_stack({self.n},{'3d' if self.three_d else '2d'})"

    @property
    def token(self) -> str:
        return f"{self.kind}:{self.n}:{int(self.three_d)}"

    @staticmethod
    def parse(token: str) -> Spec:
        kind, n, three_d = token.split(":")
        return Spec(kind, int(n), bool(int(three_d)))

    def build(self) -> tuple[nn.Module, tuple[Tensor, ...]]:
        if self.kind == "resnet":
            return resnet_like(self.n)()
        return ffn_stack(self.n, three_d=self.three_d)()


def specs(sizes: tuple[int, ...]) -> list[Spec]:
    out = [Spec("resnet", n) for n in sizes]
    out += [Spec("ffn", n, three_d) for three_d in (False, True) for n in sizes]
    return out


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(description: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log(f"{description}: {time.perf_counter() - start:.2f} s")


# ---------------------------------------------------------------------------------------------
# torch.compile of the fp32 model, in a child process


def compile_child(token: str, runs: int, warmup: int) -> None:
    """Child process: compile the fp32 model, time it, print one JSON line."""
    quiet_third_party()
    model, inputs = Spec.parse(token).build()
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*inputs)
    compile_s = time.perf_counter() - start
    times = median_ms({"compiled": compiled, "eager": model}, inputs, runs=runs, warmup=warmup)
    print(json.dumps({"compile_s": compile_s, **times}))


@dataclass
class Compiled:
    compile_s: float | None = None
    runtime_ms: float | None = None
    eager_ms: float | None = None
    note: str = ""


def run_compile(spec: Spec, runs: int, warmup: int, threads: int, timeout: float) -> Compiled:
    if timeout <= 0:
        return Compiled(note="not run (--compile-timeout 0)")
    with tempfile.TemporaryDirectory(prefix="qalgebra-bench-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--compile-child", spec.token]
        cmd += ["--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads)]
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return Compiled(note=f"skipped: compiling took more than {timeout:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return Compiled(note=f"failed: {last[:200]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Compiled(data["compile_s"], data["compiled"], data["eager"])


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return f"0{unit}"
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return text + unit


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "n/a"


def numerics_problem(r: Comparison) -> str | None:
    diff = r.diff.get("qalgebra")
    if diff is None:
        return None
    limit = NUMERICS_FLAG * max(1.0, r.reference_abs_max)
    if diff > limit:
        return (
            f"max |qalgebra - reference| = {diff:.3g} > {limit:.3g} "
            f"(torchao: {fmt(r.diff.get('torchao'))}, max |reference| = "
            f"{r.reference_abs_max:.3g}, fp32 quantization error {fmt(r.diff.get('fp32'))})"
        )
    return None


def lowering_table(results: list[Comparison]) -> list[str]:
    lines = [
        "| model | ref. nodes | qalgebra lowering | torchao lowering | torchao / qalgebra "
        "| oneDNN ops qalgebra | oneDNN ops torchao | max abs diff qalgebra "
        "| max abs diff torchao | fp32 vs ref. (quant. error) | max abs ref. |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        qa = "CRASH" if r.qalgebra_error else fmt(r.qalgebra_lower_ms, " ms")
        tao = "CRASH" if r.torchao_error else fmt(r.torchao_lower_ms, " ms")
        qa_diff = fmt(r.diff.get("qalgebra"))
        if numerics_problem(r):
            qa_diff = f"**{qa_diff} (!)**"
        lines.append(
            f"| {r.name} | {r.reference_nodes} | {qa} | {tao} "
            f"| {ratio(r.torchao_lower_ms, r.qalgebra_lower_ms)} "
            f"| {r.onednn_ops.get('qalgebra', 'n/a')} | {r.onednn_ops.get('torchao', 'n/a')} "
            f"| {qa_diff} | {fmt(r.diff.get('torchao'))} | {fmt(r.diff.get('fp32'))} "
            f"| {r.reference_abs_max:.3g} |"
        )
    return lines


def runtime_table(results: list[Comparison], compiled: dict[str, Compiled]) -> list[str]:
    lines = [
        "| model | fp32 eager | reference | torchao-lowered | qalgebra-lowered "
        "| reference / fp32 | torchao / fp32 | qalgebra / fp32 | qalgebra / torchao (per round) "
        "| torch.compile fp32 (compile time) | compiled / eager (same process) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t = r.runtime_ms
        base = t.get("fp32")
        c = compiled.get(r.name, Compiled(note="not run"))
        if c.runtime_ms is not None:
            comp = f"{fmt(c.runtime_ms, ' ms')} ({fmt(c.compile_s, ' s')})"
            comp_ratio = ratio(c.runtime_ms, c.eager_ms)
        else:
            comp, comp_ratio = c.note, "n/a"
        lines.append(
            f"| {r.name} | {fmt(base, ' ms')} | {fmt(t.get('reference'), ' ms')} "
            f"| {fmt(t.get('torchao'), ' ms')} | {fmt(t.get('qalgebra'), ' ms')} "
            f"| {ratio(t.get('reference'), base)} | {ratio(t.get('torchao'), base)} "
            f"| {ratio(t.get('qalgebra'), base)} | {fmt_ratio(r.qalgebra_over_torchao)} "
            f"| {comp} | {comp_ratio} |"
        )
    return lines


def fired_lines(results: list[Comparison]) -> list[str]:
    lines = ["| model | qalgebra fusions fired (nodes consumed) | refused | quant/dequant left |"]
    lines.append("|---|---|--:|--:|")
    for r in results:
        if r.report is None:
            lines.append(f"| {r.name} | lowering crashed | n/a | n/a |")
            continue
        fired = ", ".join(
            f"{k} {v} ({r.report.nodes_consumed[k]})" for k, v in sorted(r.report.fired.items())
        )
        lines.append(
            f"| {r.name} | {fired or 'none'} | {len(r.report.refused)} "
            f"| {len(r.report.unfused_quant_nodes)} |"
        )
    return lines


def op_difference_lines(results: list[Comparison]) -> list[str]:
    """Per model, the ``call_function`` targets whose count differs between the two outputs."""
    lines = []
    for r in results:
        qa, tao = r.ops.get("qalgebra"), r.ops.get("torchao")
        if qa is None or tao is None:
            continue
        keys = sorted(k for k in qa.keys() | tao.keys() if qa[k] != tao[k])
        if not keys:
            lines.append(f"- **{r.name}**: identical op counts.")
            continue
        diffs = ", ".join(f"`{k}` {qa[k]} vs {tao[k]}" for k in keys)
        lines.append(f"- **{r.name}** (qalgebra vs torchao): {diffs}")
    return lines


def problem_lines(results: list[Comparison], compiled: dict[str, Compiled]) -> list[str]:
    lines: list[str] = []
    for r in results:
        for who, error in (("qalgebra", r.qalgebra_error), ("torchao", r.torchao_error)):
            if error:
                lines += [f"- **{who} lowering crashed on {r.name}**:", "", "```", error, "```"]
        problem = numerics_problem(r)
        if problem:
            lines.append(f"- **qalgebra numerics on {r.name}**: {problem}")
        for who, mutated in sorted(r.mutates_inputs.items()):
            if mutated:
                lines.append(
                    f"- the **{who}**-lowered {r.name} writes into its input tensors (an in-place "
                    "`sum` post-op accumulating into a graph input); measured on fresh copies"
                )
        c = compiled.get(r.name)
        if c is not None and c.note and c.runtime_ms is None:
            lines.append(f"- torch.compile on {r.name}: {c.note}")
    return lines or ["- none"]


def report_body(
    results: list[Comparison],
    compiled: dict[str, Compiled],
    extra: Sequence[tuple[str, list[str]]] = (),
) -> list[str]:
    """The markdown sections of a report; ``extra`` (title, lines) go after the runtimes."""
    sections = [
        ("Lowering and numerics", lowering_table(results)),
        ("Steady-state runtime (median)", runtime_table(results, compiled)),
        *extra,
        ("What fired", fired_lines(results)),
        (
            "Output graphs: ops whose count differs (qalgebra vs torchao)",
            op_difference_lines(results),
        ),
        ("Problems found", problem_lines(results, compiled)),
    ]
    body: list[str] = []
    for title, lines in sections:
        body += [f"## {title}", "", *lines, ""]
    return body


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{names[0] if names else 'unknown'} ({len(names)} logical CPUs; ISA: {', '.join(isa)})"


def git_revision() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(
    command: str, load: tuple[tuple[float, ...], tuple[float, ...]], args: Args
) -> list[str]:
    import torchao

    from qalgebra.isa import int8_pairs_saturate

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start_load, end_load = (" / ".join(f"{x:.2f}" for x in la) for la in load)
    return [
        "# Lowering benchmark: qalgebra vs torchao",
        "",
        f"- date: {now}",
        f"- command: `{command}`",
        f"- CPU: {cpu_model()}; torch threads: {torch.get_num_threads()} (`--threads`: on a "
        "shared machine more threads make every OpenMP region wait for a descheduled worker; "
        "measured here, fp32 resnet_like(2) took 455 ms with 2 threads vs 1.07 ms with 1 "
        "while other jobs ran)",
        f"- torch {torch.__version__}, torchao {torchao.__version__}, Python "
        f"{platform.python_version()}, qalgebra at `{git_revision()}`",
        f"- int8 products saturate on this CPU: {int8_pairs_saturate()} (then the quantizer uses "
        "7-bit activations, `reduce_range=True`)",
        f"- load average (1/5/15 min) at start: {start_load}; at end: {end_load}. The machine is "
        "shared: runtimes are indicative, ratios measured in one process more than absolutes.",
        f"- method: lowering time = median of {LOWER_REPEATS} `lower_with_report` calls for "
        "qalgebra, one `lower_pt2e_quantized_to_x86` call for torchao (it re-exports and "
        "decomposes the model on every call), each after a `gc.collect()`, after one untimed "
        "warm-up lowering of each; runtime = median of "
        f"{args.runs} calls after {args.warmup} warm-up calls, the four modules taking turns "
        "(order rotating each round; qalgebra / torchao = median of the per-round ratios), "
        "each call on fresh copies of the inputs; reference = the quantized module from "
        "`convert_pt2e` run eagerly; torch.compile = default mode, cold Inductor cache, in a "
        f"child process, skipped after {args.compile_timeout:.0f} s.",
        "",
    ]


@dataclass
class Args:
    quick: bool
    out: Path | None
    runs: int
    warmup: int
    compile_timeout: float
    threads: int


def parse_args(argv: list[str] | None = None) -> tuple[Args, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="N = 2 only, 5 runs, no compile")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5)")
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help="seconds allowed per torch.compile (default 300; 0 skips it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: with more, OpenMP workers stall whenever "
        "another process holds a core, and a shared machine's timings become noise)",
    )
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    runs = ns.runs if ns.runs is not None else (5 if ns.quick else 20)
    warmup = ns.warmup if ns.warmup is not None else (1 if ns.quick else 5)
    timeout = ns.compile_timeout
    if timeout is None:
        timeout = 0.0 if ns.quick else 300.0
    return Args(ns.quick, ns.out, runs, warmup, timeout, ns.threads), ns.compile_child


def warm_up() -> None:
    """One untimed lowering of each kind, so no model pays the first call's one-time costs."""
    from qalgebra.lower import lower
    from qalgebra.testing.quantize import quantize_pt2e, torchao_lower

    with step("warm-up (quantize + both lowerings of resnet_like(1) and ffn_stack(1))"):
        for spec in (Spec("resnet", 1), Spec("ffn", 1, True)):
            model, inputs = spec.build()
            converted = quantize_pt2e(model, inputs)
            lower(converted, inputs)
            torchao_lower(converted, inputs)


def main(argv: list[str] | None = None) -> int:
    args, child = parse_args(argv)
    torch.set_num_threads(args.threads)
    if child is not None:
        compile_child(child, args.runs, args.warmup)
        return 0
    quiet_third_party()
    command = "python bench/bench_lowering.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start_load = os.getloadavg()
    sizes = (2,) if args.quick else SIZES
    warm_up()
    results: list[Comparison] = []
    compiled: dict[str, Compiled] = {}
    for spec in specs(sizes):
        log(f"{spec.name}: start")
        model, inputs = spec.build()
        result = compare(
            spec.name,
            model,
            inputs,
            step=step,
            runs=args.runs,
            warmup=args.warmup,
            lower_repeats=LOWER_REPEATS,
        )
        results.append(result)
        if result.qalgebra_error:
            log(f"{spec.name}: QALGEBRA LOWERING FAILED\n{result.qalgebra_error}")
        with step(f"{spec.name}: torch.compile (child process)"):
            compiled[spec.name] = run_compile(
                spec, args.runs, args.warmup, args.threads, args.compile_timeout
            )
        log(
            f"{spec.name}: qalgebra {fmt(result.qalgebra_lower_ms, ' ms')}, torchao "
            f"{fmt(result.torchao_lower_ms, ' ms')}, diffs {result.diff}, runtimes "
            f"{result.runtime_ms}, compile {compiled[spec.name]}"
        )
    load = (start_load, os.getloadavg())
    body = report_body(results, compiled)
    print("\n".join(body))
    if args.out is not None:
        args.out.write_text("\n".join(header(command, load, args) + body))
        log(f"wrote {args.out}")
    return 1 if any(r.qalgebra_error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
