"""What keeping reduced-range activations in their range costs under torch.compile.

    python bench/bench_range_cost.py [--models a,b] [--batches 1,8] [--runs N] [--out FILE]

Where int8 pair sums saturate (AVX2 without VNNI), qalgebra's models quantize activations to
7 bits (``quant_max=127``), and qalgebra keeps every uint8 output in that range: a ``hardtanh``
post-op on a conv with none, an in-place clamp after a binary conv. Inductor's own path lets
oneDNN write up to 255, outside the quantize's range, and does not pay for either.

This diagnostic compiles each model three ways and times them side by side in one process
(modules taking turns; ratios are medians of per-round ratios, as in bench_compile.py):

- ``Inductor compiled``: ``torch.compile`` with freezing, Inductor's quantization patterns;
- ``qalgebra compiled``: the backend as shipped;
- ``range not kept``: the backend with the range enforcement switched off (and the
  self-check, which would refuse kernels whose outputs leave the range). Its values are
  **not** the quantized model's: this is not a configuration, only the measure of what the
  enforcement costs. Its max error equal to Inductor's says it computes what Inductor does.

The numerics line gives each one's max |output - reference| (the quantized model run eagerly).
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from bench_compile import compile_once, fresh, quantized, warm_up
from bench_lowering import cpu_model, git_revision, log

from qalgebra import isa
from qalgebra.compile import backend as qalgebra_backend
from qalgebra.fusions import common
from qalgebra.measure import max_abs_diff, paired_ratio, quiet_third_party, timed_samples

COLUMNS = ("Inductor compiled", "qalgebra compiled", "range not kept")


def measure(name: str, batch: int, runs: int) -> list[str]:
    """One markdown row of ``name`` at ``batch``: runtimes, ratios, numerics."""
    _, gm, inputs = quantized(name, batch)
    with torch.no_grad():
        reference = gm(*fresh(inputs))
    modules = {
        "Inductor compiled": compile_once(gm, inputs, "inductor")["module"],
        "qalgebra compiled": compile_once(gm, inputs, "qalgebra")["module"],
    }
    unkept = functools.partial(qalgebra_backend, selfcheck="off")
    with mock.patch.object(common, "_narrow_quant_range", lambda m: None):
        modules["range not kept"] = compile_once(gm, inputs, unkept)["module"]
    errors = {}
    for who, module in modules.items():
        with torch.no_grad():
            errors[who] = max_abs_diff(module(*fresh(inputs)), reference)
    log(f"{name} batch {batch}: timing {runs} rounds")
    samples = timed_samples(modules, inputs, runs=runs, warmup=5)
    times = " | ".join(f"{statistics.median(samples[c]) * 1e3:.3f} ms" for c in COLUMNS)
    ours = paired_ratio(samples, "qalgebra compiled", "Inductor compiled")
    unkept_ratio = paired_ratio(samples, "range not kept", "Inductor compiled")
    price = paired_ratio(samples, "qalgebra compiled", "range not kept")
    numerics = " / ".join(f"{errors[c]:.3g}" for c in COLUMNS)
    return [
        f"| {name} | {batch} | {times} | {ours:.3f}x | {unkept_ratio:.3f}x | {price:.3f}x "
        f"| {numerics} |"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="zoo:mobilenet_v2,resnet_like(8)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_third_party()
    models = [m.strip() for m in re.split(r",(?![^(]*\))", args.models)]
    lines = [
        "| model | batch | " + " | ".join(COLUMNS) + " | qalgebra / Inductor | range not kept "
        "/ Inductor | qalgebra / range not kept | max error: " + " / ".join(COLUMNS) + " |",
        "|---|--:|" + "--:|" * (len(COLUMNS) + 4),
    ]
    warm_up()
    for name in models:
        for batch in (int(b) for b in args.batches.split(",")):
            lines += measure(name, batch, args.runs)
            log(lines[-1])
    header = [
        "# What keeping 7-bit activations in range costs under torch.compile",
        "",
        f"- command: `python bench/bench_range_cost.py {' '.join(sys.argv[1:])}`",
        f"- CPU: {cpu_model()}; int8 pair sums saturate: {isa.int8_pairs_saturate()}; "
        f"torch threads: {args.threads}; qalgebra at `{git_revision()}`",
        "",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
