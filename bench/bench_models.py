"""Benchmark qalgebra's lowering against torchao's on the model zoo (public architectures).

    python bench/bench_models.py [--models a,b] [--batches 1,8] [--size full|ci]
                                 [--runs N] [--out bench/MODELS.md]

For each architecture of ``qalgebra.testing.zoo`` (ResNet, MobileNet V2/V3, MnasNet, EfficientNet,
RegNetY, GoogLeNet, Inception v3, ShuffleNet V2, DenseNet, a transformer encoder) and each batch
size, quantized with torchao's PT2E flow (X86InductorQuantizer, default config), one process
reports side by side the columns of ``bench/bench_lowering.py``: lowering time of qalgebra
(median of 7) and torchao (one call), oneDNN ops, numerics against the un-lowered quantized module,
steady-state runtime per call of fp32 eager, the reference, torchao's and qalgebra's lowered
modules (taking turns; qalgebra / torchao as the median of per-round ratios). It adds what the
zoo is for: how many quantized conv/linear layers each lowering left in float, and which
quantize/dequantize nodes are left in qalgebra's output, by the op that produces their input.

Full-size models take minutes each to quantize and lower (torchao re-exports every model); a
crash of either lowering is recorded in the output, never hidden. Nothing is cached on disk.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # runnable from a checkout; bench_lowering is a sibling script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_lowering as bl  # noqa: E402
import torch  # noqa: E402
from torch import fx  # noqa: E402

from qalgebra.measure import Comparison, compare, quiet_third_party  # noqa: E402
from qalgebra.testing.zoo import ZOO, Size, build  # noqa: E402

#: Ops a quantized conv / linear is spelled with before lowering (left in float if still there).
_FLOAT_COMPUTE = ("aten.conv", "aten.linear", "aten.addmm", "aten.mm")
_QUANT = "quantized_decomposed.quantize_per_tensor"
_DEQUANT = "quantized_decomposed.dequantize_per_tensor"


@dataclass
class ModelResult:
    """A zoo model at one batch size: the comparison, and what the zoo adds to it."""

    comparison: Comparison
    compute_layers: int = 0
    float_compute_left: dict[str, int] = field(default_factory=dict)
    leftovers: Counter[str] = field(default_factory=Counter)


def _count_float_compute(gm: fx.GraphModule) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith(_FLOAT_COMPUTE)
    )


def _producer(node: fx.Node) -> str:
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node):
        return str(source.target) if source.op == "call_function" else source.op
    return "?"


def leftovers(gm: fx.GraphModule) -> Counter[str]:
    """Quantize (``q``) and dequantize (``dq``) nodes left, by the op producing their input."""
    out: Counter[str] = Counter()
    for n in gm.graph.nodes:
        target = str(n.target) if n.op == "call_function" else ""
        if target.startswith(_QUANT):
            out[f"q after {_producer(n)}"] += 1
        elif target.startswith(_DEQUANT):
            out[f"dq after {_producer(n)}"] += 1
    return out


def measure(
    name: str, size: Size, batch: int, runs: int, warmup: int, *, time_reference: bool
) -> ModelResult:
    model, inputs = build(name, size=size, batch=batch)
    label = f"{name}[b{batch}]"
    result = compare(
        label,
        model,
        inputs,
        step=bl.step,
        runs=runs,
        warmup=warmup,
        lower_repeats=bl.LOWER_REPEATS,
        time_reference=time_reference,
    )
    out = ModelResult(result)
    exported = torch.export.export(model, inputs).module()
    assert isinstance(exported, fx.GraphModule)
    out.compute_layers = _count_float_compute(exported)
    for who in ("qalgebra", "torchao"):
        if who in result.graphs:
            out.float_compute_left[who] = _count_float_compute(result.graphs[who])
    if "qalgebra" in result.graphs:
        out.leftovers = leftovers(result.graphs["qalgebra"])
    result.graphs.clear()  # full-size modules: free them before the next model
    return out


def coverage_table(results: list[ModelResult]) -> list[str]:
    lines = [
        "| model | conv/linear layers | left in float: qalgebra | left in float: torchao "
        "| q/dq left: qalgebra | q/dq left after (qalgebra) |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in results:
        c = r.comparison
        left = ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in r.leftovers.most_common())
        lines.append(
            f"| {c.name} | {r.compute_layers} | {r.float_compute_left.get('qalgebra', 'n/a')} "
            f"| {r.float_compute_left.get('torchao', 'n/a')} | {sum(r.leftovers.values())} "
            f"| {left or 'none'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--size", choices=("full", "ci"), default="full")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per module")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (see bench_lowering.py)"
    )
    parser.add_argument(
        "--time-reference",
        action="store_true",
        help="also time the un-lowered quantized module (several times slower than fp32)",
    )
    parser.add_argument(
        "--out", type=Path, help="also write the markdown report here (after every model)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ZOO))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(ZOO)}")
    batches = [int(b) for b in args.batches.split(",")]
    command = "python bench/bench_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start_load = os.getloadavg()
    results: list[ModelResult] = []
    for name in names:
        for batch in batches:
            bl.log(f"{name} batch {batch}: start")
            start = time.perf_counter()
            r = measure(
                name, args.size, batch, args.runs, args.warmup, time_reference=args.time_reference
            )
            results.append(r)
            c = r.comparison
            bl.log(
                f"{c.name}: {time.perf_counter() - start:.0f} s; lowering qalgebra "
                f"{bl.fmt(c.qalgebra_lower_ms, ' ms')} torchao "
                f"{bl.fmt(c.torchao_lower_ms, ' ms')}; "
                f"runtime {c.runtime_ms}; qalgebra/torchao {bl.fmt_ratio(c.qalgebra_over_torchao)}"
            )
            gc.collect()
            if args.out is not None:  # a long run keeps what it measured so far
                _write(args, command, start_load, results)
    print("\n".join(_body(results)))
    return 1 if any(r.comparison.qalgebra_error for r in results) else 0


def _body(results: list[ModelResult]) -> list[str]:
    coverage = ("Fusion coverage and quantize/dequantize nodes left", coverage_table(results))
    return bl.report_body([r.comparison for r in results], {}, [coverage])


def _write(
    args: argparse.Namespace,
    command: str,
    start_load: tuple[float, float, float],
    results: list[ModelResult],
) -> None:
    head = bl.header(
        command,
        (start_load, os.getloadavg()),
        bl.Args(False, args.out, args.runs, args.warmup, 0.0, args.threads),
    )
    head[0] = "# Model zoo benchmark: qalgebra vs torchao"
    args.out.write_text("\n".join(head + _body(results)))
    bl.log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
