"""What the lowering-time self-check costs on the benchmark models (qalgebra.selfcheck).

    python bench/bench_selfcheck.py [--sizes 2,8,32] [--repeats 7]

For ``resnet_like(N)`` and ``ffn_stack(N)`` (2-D and 3-D input), quantized once with torchao's
PT2E flow, each round lowers the model three ways, side by side in one process (the order
rotates between rounds, each lowering after a ``gc.collect()``):

- ``off``: ``lower_with_report(..., selfcheck="off")``;
- ``cold``: ``selfcheck="on"`` with the verdict cache cleared first (a process's first lowering
  of these shapes: every distinct signature runs once);
- ``warm``: ``selfcheck="on"`` with the verdicts of ``cold`` cached (any later lowering of the
  same shapes in the process).

It prints medians, the ratios to ``off`` and what the self-check did (signatures run, served
from the cache, skipped, refused; the median time spent inside the self-check), and the time
of the ISA probe ``qconv_single_column_stride_wrong`` (first call in a fresh process, and once
oneDNN is warm).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import fx  # noqa: E402

from qalgebra import isa, selfcheck  # noqa: E402
from qalgebra.lower import LoweringReport, lower_with_report  # noqa: E402
from qalgebra.measure import quiet_third_party  # noqa: E402
from qalgebra.testing.models import ffn_stack, resnet_like  # noqa: E402
from qalgebra.testing.quantize import quantize_pt2e  # noqa: E402

MODES = ("off", "cold", "warm")


def lower_once(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], mode: str
) -> tuple[float, LoweringReport]:
    if mode == "cold":
        selfcheck.clear_cache()
    gc.collect()
    start = time.perf_counter()
    _, report = lower_with_report(gm, inputs, selfcheck="off" if mode == "off" else "on")
    return time.perf_counter() - start, report


def bench_model(
    name: str, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], repeats: int
) -> str:
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    checking: dict[str, list[float]] = {"cold": [], "warm": []}
    reports: dict[str, LoweringReport] = {}
    for r in range(repeats):
        order = MODES[r % 3 :] + MODES[: r % 3]
        if "warm" in order[: order.index("cold")]:  # warm must follow a cold run's verdicts
            order = ("cold", "warm", *(m for m in order if m not in ("cold", "warm")))
        for mode in order:
            seconds, report = lower_once(gm, inputs, mode)
            samples[mode].append(seconds)
            reports[mode] = report
            if mode in checking:
                checking[mode].append(report.selfcheck.seconds)
    ms = {m: statistics.median(v) * 1e3 for m, v in samples.items()}
    check_ms = {m: statistics.median(v) * 1e3 for m, v in checking.items()}
    cold, warm = reports["cold"].selfcheck, reports["warm"].selfcheck
    skipped = sum(cold.skipped.values())
    return (
        f"| {name} | {ms['off']:.1f} | {ms['cold']:.1f} | {ms['warm']:.1f} "
        f"| {ms['cold'] / ms['off']:.2f}x | {ms['warm'] / ms['off']:.2f}x "
        f"| {cold.ran} | {cold.cached} | {warm.cached} | {skipped} | {cold.refused} "
        f"| {check_ms['cold']:.1f} | {check_ms['warm']:.2f} |"
    )


def probe_times() -> str:
    code = (
        "import time; from qalgebra import isa; t = time.perf_counter(); "
        "isa.qconv_single_column_stride_wrong(); print(time.perf_counter() - t)"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    raw = isa.qconv_single_column_stride_wrong.__wrapped__  # type: ignore[attr-defined]
    raw()
    start = time.perf_counter()
    answer = raw()
    warm = time.perf_counter() - start
    return (
        f"probe qconv_single_column_stride_wrong: answer {answer}; first call in a fresh "
        f"process {float(fresh) * 1e3:.1f} ms (imports excluded, oneDNN start-up included), "
        f"with oneDNN warm {warm * 1e3:.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,8,32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    models = [(f"resnet_like({n})", resnet_like(n)) for n in sizes]
    models += [(f"ffn_stack({n},2d)", ffn_stack(n, three_d=False)) for n in sizes]
    models += [(f"ffn_stack({n},3d)", ffn_stack(n)) for n in sizes]
    print(f"python bench/bench_selfcheck.py --sizes {args.sizes} --repeats {args.repeats}")
    print()
    print(
        "| model | off (ms) | cold (ms) | warm (ms) | cold / off | warm / off | signatures run "
        "| cached (cold) | cached (warm) | skipped | refused | checking, cold (ms) "
        "| checking, warm (ms) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, factory in models:
        model, inputs = factory()
        gm = quantize_pt2e(model, inputs)
        lower_with_report(gm, inputs, selfcheck="on")  # warm-up: imports, oneDNN, probes
        print(bench_model(name, gm, inputs, args.repeats), flush=True)
    print()
    print(probe_times())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
