"""Int8 kernels for squeeze-excitation and attention, side by side with the float path.

    python bench/bench_int8_kernels.py [--cases se_pool,se_mul,mul,matmul] [--batches 1,8]
                                       [--runs N] [--threads T] [--models] [--out FILE]

What a PT2E-quantized model leaves in float around squeeze-excitation and attention, against
every CPU kernel torch 2.13 has for it, timed in one process (the candidates taking turns, the
order rotating each round; each ratio is the median of per-round ratios to the float path):

- ``se_pool``: ``dequant -> adaptive_avg_pool2d([1, 1]) -> quant`` on the uint8 channels-last
  activations of the SE blocks of mobilenet_v3_large, regnet_y_400mf and efficientnet_b0 (full
  size). Candidates: ``qmean`` (this graph lowered by the catalog's fusion: the float32 mean of
  the levels, one small quantize) and torch's QuantizedCPU pool (the uint8 tensor copied into a
  ``quint8`` tensor, ``adaptive_avg_pool2d``, ``int_repr``).
- ``se_mul``: the SE gate ``mul(gate [N, C, 1, 1], x) -> quant`` as the graph has it (both
  operands float). Candidate: ``quantized.mul`` of ``x``'s existing quantize and a quantized
  gate -- an extra rounding of the gate the reference does not have.
- ``mul``: ``dequant(a) * dequant(b) -> quant`` with operands of one shape (the only ``mul``
  X86InductorQuantizer quantizes). Candidate: ``quantized.mul`` on ``quint8`` copies.
- ``matmul``: attention's products, batch B, 12 heads, sequence 128, head dim 64: ``q @ k^T``
  (float output) and ``p @ v -> quant`` (int8 output after quant lift-up), from uint8 operands
  with zero points (X86InductorQuantizer's activations). Candidates: ``aten._int_mm`` (the only
  int8 x int8 -> int32 product on CPU: 2-D, so one call per head, operand b shifted to int8,
  zero-point corrections on the int32 result) and ``quantized.matmul`` (``quint8`` copies; int8
  output only).

"steps" is the largest difference from the float path in output quantization steps (int8
outputs) or relative to the largest output (float outputs). ``--models`` adds the end-to-end
figure: each squeeze-excitation model of ``qalgebra.testing.zoo`` lowered with the whole catalog
and without ``qmean``, timed side by side (time with / time without).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.ao.quantization.fx._decomposed  # noqa: E402  registers quantized_decomposed
from torch import fx  # noqa: E402

from qalgebra.fusions import DEFAULT_FUSIONS  # noqa: E402
from qalgebra.fusions.reduce import QMEAN  # noqa: E402
from qalgebra.isa import cpu_description  # noqa: E402
from qalgebra.lower import lower, lower_with_report  # noqa: E402
from qalgebra.measure import paired_ratio, quiet_third_party, timed_samples  # noqa: E402

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
quantized = torch.ops.quantized

Kernel = Callable[[], torch.Tensor]

#: Channels and spatial size of every squeeze-excitation input at full size (224 x 224 images).
SE_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "mobilenet_v3_large": ((72, 28), (120, 28), (480, 14), (672, 14), (672, 7), (960, 7)),
    "regnet_y_400mf": ((48, 56), (104, 28), (208, 14), (440, 7)),
    "efficientnet_b0": ((32, 112), (96, 56), (144, 56), (144, 28), (240, 28), (240, 14),
                        (480, 14), (672, 14), (672, 7), (1152, 7)),
}  # fmt: skip
SE_MODELS = tuple(SE_SHAPES)

#: Activation qparams as X86InductorQuantizer calibrates them (uint8, zero point inside).
X_Q = (0.02, 3)
OUT_Q = (0.01, 0)
A_Q, B_Q = (0.014, 134), (0.018, 131)
MATMUL_OUT_Q = (0.5, 128)


def _u8(shape: tuple[int, ...], seed: int, channels_last: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _q(x: torch.Tensor, q: tuple[float, int]) -> torch.Tensor:
    return qd.quantize_per_tensor.default(x, q[0], q[1], 0, 255, torch.uint8)


def _dq(x: torch.Tensor, q: tuple[float, int]) -> torch.Tensor:
    return qd.dequantize_per_tensor.default(x, q[0], q[1], 0, 255, torch.uint8)


def _quint8(x: torch.Tensor, q: tuple[float, int]) -> torch.Tensor:
    """A ``quint8`` copy of the uint8 tensor ``x`` (what QuantizedCPU kernels take)."""
    return aten._make_per_tensor_quantized_tensor.default(x, q[0], q[1])


def _pool_island() -> fx.GraphModule:
    """``x -> dequant -> adaptive_avg_pool2d([1, 1]) -> quant``, as a quantized graph has it."""
    g = fx.Graph()
    x = g.placeholder("x")
    d = g.call_function(qd.dequantize_per_tensor.default, (x, *X_Q, 0, 255, torch.uint8))
    p = g.call_function(aten.adaptive_avg_pool2d.default, (d, [1, 1]))
    g.output(g.call_function(qd.quantize_per_tensor.default, (p, *X_Q, 0, 255, torch.uint8)))
    return fx.GraphModule(torch.nn.Module(), g)


class _QuantizedCPUPool(torch.nn.Module):
    """The pool on torch's QuantizedCPU kernel: a ``quint8`` copy in, ``int_repr`` out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = aten._make_per_tensor_quantized_tensor.default(x, *X_Q)
        return aten.int_repr.default(aten.adaptive_avg_pool2d.default(q, [1, 1]))


def se_pool_cases(batch: int) -> list[tuple[str, dict[str, Kernel]]]:
    """Each candidate a GraphModule, as a lowered model calls it (same call overhead)."""
    island = _pool_island()
    lowered, report = lower_with_report(island, (), fusions=[QMEAN])
    assert report.fired["qmean"] == 1, report.summary()
    quantized_cpu = fx.symbolic_trace(_QuantizedCPUPool())
    cases = []
    shapes = sorted({s for model in SE_MODELS for s in SE_SHAPES[model]})
    for i, (c, hw) in enumerate(shapes):
        x = _u8((batch, c, hw, hw), i, channels_last=True)
        cases.append(
            (
                f"[{batch}, {c}, {hw}, {hw}]",
                {
                    "float": lambda x=x: island(x),
                    "qmean": lambda x=x: lowered(x),
                    "QuantizedCPU pool": lambda x=x: quantized_cpu(x),
                },
            )
        )
    return cases


def se_mul_cases(batch: int) -> list[tuple[str, dict[str, Kernel]]]:
    cases = []
    for i, (c, hw) in enumerate(((72, 28), (480, 14), (96, 56), (1152, 7))):
        gen = torch.Generator().manual_seed(i)
        x = torch.rand((batch, c, hw, hw), generator=gen).contiguous(
            memory_format=torch.channels_last
        )
        gate = torch.rand((batch, c, 1, 1), generator=gen)
        x_q = _q(x, X_Q)  # the graph quantizes x anyway, for the pool
        cases.append(
            (
                f"[{batch}, {c}, {hw}, {hw}]",
                {
                    "float": lambda x=x, gate=gate: _q(gate * x, OUT_Q),
                    "quantized.mul (gate rounded)": lambda x_q=x_q, gate=gate: (
                        aten.int_repr.default(
                            quantized.mul(
                                _quint8(x_q, X_Q),
                                _quint8(_q(gate, (1 / 255, 0)), (1 / 255, 0)),
                                *OUT_Q,
                            )
                        )
                    ),
                },
            )
        )
    return cases


def mul_cases(batch: int) -> list[tuple[str, dict[str, Kernel]]]:
    cases = []
    for i, (c, hw) in enumerate(((64, 56), (256, 14), (768, 7))):
        a = _u8((batch, c, hw, hw), 2 * i, channels_last=True)
        b = _u8((batch, c, hw, hw), 2 * i + 1, channels_last=True)
        cases.append(
            (
                f"[{batch}, {c}, {hw}, {hw}]",
                {
                    "float": lambda a=a, b=b: _q(_dq(a, A_Q) * _dq(b, B_Q), OUT_Q),
                    "quantized.mul": lambda a=a, b=b: aten.int_repr.default(
                        quantized.mul(_quint8(a, A_Q), _quint8(b, B_Q), *OUT_Q)
                    ),
                },
            )
        )
    return cases


def int_mm_per_head(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dequant(a) @ dequant(b)`` from uint8 ``a`` [..., M, K], ``b`` [..., K, N] with
    ``_int_mm``: u8 x s8 -> s32 per 2-D slice (b shifted by 128 to int8), then zero points."""
    k = a.shape[-1]
    a3 = a.reshape(-1, a.shape[-2], k)
    b8 = aten.bitwise_xor.Scalar(b.view(torch.int8), -128).reshape(-1, k, b.shape[-1])
    out = torch.empty((a3.shape[0], a3.shape[1], b8.shape[2]), dtype=torch.int32)
    for i in range(a3.shape[0]):
        aten._int_mm.out(a3[i], b8[i], out=out[i])
    zb = B_Q[1] - 128
    rows = aten.sum.dim_IntList(a3, [2], True, dtype=torch.int32)
    cols = aten.sum.dim_IntList(b8, [1], True, dtype=torch.int32)
    corrected = out - (rows * zb + cols * A_Q[1] - k * A_Q[1] * zb)
    products = corrected.to(torch.float32) * (A_Q[0] * B_Q[0])
    return products.reshape(*a.shape[:-1], b.shape[-1])


def matmul_cases(batch: int) -> list[tuple[str, dict[str, Kernel]]]:
    heads, seq, dim = 12, 128, 64
    cases: list[tuple[str, dict[str, Kernel]]] = []
    for name, sa, sb, quant_out in (
        ("q @ k^T (float out)", (batch, heads, seq, dim), (batch, heads, dim, seq), False),
        ("p @ v (int8 out)", (batch, heads, seq, seq), (batch, heads, seq, dim), True),
    ):
        a, b = _u8(sa, 1), _u8(sb, 2)

        def finish(y: torch.Tensor, quant_out: bool = quant_out) -> torch.Tensor:
            return _q(y, MATMUL_OUT_Q) if quant_out else y

        kernels: dict[str, Kernel] = {
            "float": lambda a=a, b=b, f=finish: f(_dq(a, A_Q) @ _dq(b, B_Q)),
            "_int_mm per head": lambda a=a, b=b, f=finish: f(int_mm_per_head(a, b)),
        }
        if quant_out:
            kernels["quantized.matmul"] = lambda a=a, b=b: aten.int_repr.default(
                quantized.matmul(_quint8(a, A_Q), _quint8(b, B_Q), *MATMUL_OUT_Q)
            )
        cases.append((f"{name} [{batch}, {heads}, ...]", kernels))
    return cases


CASES: dict[str, Callable[[int], list[tuple[str, dict[str, Kernel]]]]] = {
    "se_pool": se_pool_cases,
    "se_mul": se_mul_cases,
    "mul": mul_cases,
    "matmul": matmul_cases,
}


def _difference(reference: torch.Tensor, other: torch.Tensor) -> str:
    if reference.dtype == torch.uint8:
        return str(int((reference.int() - other.int()).abs().max()))
    rel = float((reference - other).abs().max() / reference.abs().max().clamp_min(1e-30))
    return f"{rel:.1e} rel"


def run_case(kernels: dict[str, Kernel], names: Sequence[str], runs: int, warmup: int) -> list[str]:
    """The float path's time, then per candidate of ``names`` its time relative to the float
    path (median of per-round ratios) and its difference from it ("n/a": no such kernel)."""
    reference = kernels["float"]()
    samples = timed_samples(kernels, (), runs=runs, warmup=warmup)
    base = sorted(samples["float"])[len(samples["float"]) // 2]
    cells = [f"{base * 1e3:.3f} ms"]
    for name in names:
        ratio = paired_ratio(samples, name, "float")
        if ratio is None:
            cells.append("n/a")
        else:
            cells.append(f"{ratio:.2f}x ({_difference(reference, kernels[name]())})")
    return cells


def kernel_tables(
    cases: Sequence[str], batches: Sequence[int], runs: int, warmup: int
) -> list[str]:
    lines: list[str] = []
    for case in cases:
        for batch in batches:
            rows = CASES[case](batch)
            names = list(dict.fromkeys(n for _, kernels in rows for n in kernels if n != "float"))
            lines += [
                f"### {case}, batch {batch}",
                "",
                "| shape | float path | "
                + " | ".join(f"{n} / float (steps)" for n in names)
                + " |",
                "|---|--:|" + "--:|" * len(names),
            ]
            for label, kernels in rows:
                cells = run_case(kernels, names, runs, warmup)
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
            lines.append("")
    return lines


def model_table(batches: Sequence[int], runs: int, warmup: int) -> list[str]:
    """Each SE model lowered with and without ``qmean``, timed side by side."""
    from qalgebra.testing.quantize import quantize_pt2e
    from qalgebra.testing.zoo import build

    without = tuple(f for f in DEFAULT_FUSIONS if f is not QMEAN)
    lines = [
        "### squeeze-excitation models, end to end (full size)",
        "",
        "| model | batch | qmean fired | lowered without qmean | with / without | "
        "max abs diff to the reference: with, without |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for name in SE_MODELS:
        for batch in batches:
            model, inputs = build(name, size="full", batch=batch)
            gm = quantize_pt2e(model, inputs)
            with_qmean, report = lower_with_report(gm, inputs)
            plain = lower(gm, inputs, fusions=without)
            with torch.no_grad():
                ref = gm(*inputs)
                diffs = [float((m(*inputs) - ref).abs().max()) for m in (with_qmean, plain)]
            modules = {"with": with_qmean, "without": plain}
            samples = timed_samples(modules, inputs, runs=runs, warmup=warmup)
            base = sorted(samples["without"])[len(samples["without"]) // 2]
            ratio = paired_ratio(samples, "with", "without")
            lines.append(
                f"| {name} | {batch} | {report.fired['qmean']} | {base * 1e3:.2f} ms | "
                f"{ratio:.3f} | {diffs[0]:.2e}, {diffs[1]:.2e} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=21, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", action="store_true", help="also the zoo's SE models")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    quiet_third_party()
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    batches = [int(b) for b in args.batches.split(",")]
    command = "python bench/bench_int8_kernels.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    load = os.getloadavg()
    lines = kernel_tables(cases, batches, args.runs, args.warmup)
    if args.models:
        lines += model_table(batches, max(5, args.runs // 2), args.warmup)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Int8 kernels for squeeze-excitation and attention vs the float path",
        "",
        f"- {now}; `{command}`",
        f"- CPU: {cpu_description()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), Python {platform.python_version()}",
        f"- load average at start / end: {load[0]:.1f} / {os.getloadavg()[0]:.1f} (a shared "
        "machine: read the ratios, measured side by side, not the absolute times)",
        "",
    ]
    text = "\n".join(head + lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
