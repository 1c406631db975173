"""Benchmark the graphs of other quantization configs: what lowering them buys, side by side.

    python bench/bench_configs.py [--runs 30] [--warmup 5] [--threads 1]

For each model and config variant (``dynamic``: runtime activation qparams; ``per_tensor``:
per-tensor weights; ``int8_act``: signed int8 activations; ``default`` for comparison), quantized
with torchao's PT2E flow (7-bit activations: exact on every CPU), one process measures:

- qalgebra's lowering time (median of 5) and the fusions that fired;
- runtime, the modules taking turns round by round: the qalgebra-lowered module over the
  un-lowered reference run eagerly, and over torchao's lowering of the same graph (the median of
  per-round ratios, :func:`qalgebra.measure.paired_ratio`); torchao's oneDNN op count says whether
  it fused anything at all;
- numerics: max |qalgebra - reference|.

It prints a markdown table. Figures taken on a shared machine move with its load; the ratios,
measured in the same rounds, move much less than the absolute times.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qalgebra.lower import lower_with_report  # noqa: E402
from qalgebra.measure import onednn_op_count, paired_ratio, quiet_third_party, timed_samples  # noqa: E402
from qalgebra.testing.models import ffn_stack, resnet_like  # noqa: E402
from qalgebra.testing.quantize import quantize_pt2e, torchao_lower  # noqa: E402

MODELS = {
    "ffn_stack(8,3d)": ffn_stack(8, three_d=True),
    "ffn_stack(8,2d)": ffn_stack(8, three_d=False),
    "resnet_like(2)": resnet_like(2),
}
VARIANTS = ("default", "dynamic", "per_tensor", "int8_act")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def measure(name: str, variant: str, runs: int, warmup: int) -> str:
    model, inputs = MODELS[name]()
    gm = quantize_pt2e(
        model,
        inputs,
        reduce_range=True,
        dynamic=variant == "dynamic",
        weight_per_tensor=variant == "per_tensor",
        act_dtype=torch.int8 if variant == "int8_act" else torch.uint8,
    )
    lower_ms: list[float] = []
    for _ in range(5):
        gc.collect()
        start = time.perf_counter()
        ours, report = lower_with_report(gm, inputs)
        lower_ms.append((time.perf_counter() - start) * 1e3)
    theirs = torchao_lower(gm, inputs)
    modules = {"reference": gm, "qalgebra": ours, "torchao": theirs}
    try:
        with torch.no_grad():
            theirs(*inputs)
        torchao_ops = str(onednn_op_count(theirs))
    except RuntimeError as exc:  # torchao's lowered module may not run: recorded, not timed
        del modules["torchao"]
        torchao_ops = f"{onednn_op_count(theirs)}, fails at run time: {str(exc).splitlines()[0]}"
    samples = timed_samples(modules, inputs, runs=runs, warmup=warmup)
    with torch.no_grad():
        diff = float((ours(*inputs) - gm(*inputs)).abs().max())
    fired = ", ".join(f"{k} {v}" for k, v in sorted(report.fired.items()))
    return (
        f"| {name} | {variant} | {statistics.median(lower_ms):.1f} | {fired} | "
        f"{onednn_op_count(ours)} | {torchao_ops} | "
        f"{_fmt(paired_ratio(samples, 'qalgebra', 'reference'))} | "
        f"{_fmt(paired_ratio(samples, 'qalgebra', 'torchao'))} | {diff:.2g} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: with more, OpenMP workers stall whenever "
        "another process holds a core, and the figures measure the machine's load)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    print(
        "| model | config | qalgebra lowering ms | fired | qalgebra oneDNN ops | torchao oneDNN "
        "ops | qalgebra / reference runtime | qalgebra / torchao runtime | max diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in MODELS:
        for variant in VARIANTS:
            print(measure(name, variant, args.runs, args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
