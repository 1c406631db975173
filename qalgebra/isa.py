"""What this CPU's oneDNN int8 kernels can do, found by asking them, not by reading CPU flags.

Without AVX512-VNNI or AMX, oneDNN multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds adjacent products in saturating int16: ``255 * 127 * 2`` overflows and
the result is silently wrong. ``int8_pairs_saturate()`` runs one tiny product to find out, and
``pair_sum_may_saturate`` says whether given operand ranges are at risk.

Every such question is a *probe*: a function of no arguments returning a bool, run once per
process (its answer is cached) and listed in :data:`PROBES`. The lowering branches on probes, so
tests must see both answers on whatever CPU they run: :func:`forced` makes probes answer as
told, inside a ``with`` block; the environment variable ``QALGEBRA_FORCE_PROBES`` (for example
``int8_pairs_saturate=1,qconv_binary_emits_bf16=0``) does the same for a whole process, such as
a fuzz worker or a script run in a fresh interpreter.

>>> with forced(int8_pairs_saturate=True):
...     int8_pairs_saturate()
True
>>> with forced(int8_pairs_saturate=False):
...     pair_sum_may_saturate(255, torch.full((2,), 127, dtype=torch.int8))
False
>>> "int8_pairs_saturate" in PROBES
True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = [
    "FORCE_ENV",
    "INT16_MAX",
    "PROBES",
    "aten_vectors_are_avx2",
    "cpu_description",
    "forced",
    "foreign_answers",
    "int8_pairs_saturate",
    "kernel_fault_probe",
    "measured",
    "pair_safe_level",
    "pair_sum_may_saturate",
    "probe",
    "probe_answers",
    "qconv_binary_emits_bf16",
    "qconv_single_column_stride_wrong",
    "qlinear_binary_emits_bf16",
]

INT16_MAX = 32767

#: Environment variable forcing probe answers for a whole process: ``name=0|1`` pairs, commas.
FORCE_ENV = "QALGEBRA_FORCE_PROBES"

#: Every probe by name, in definition order.
PROBES: dict[str, Callable[[], bool]] = {}

_forced: dict[str, bool] = {}
_measured: dict[str, Callable[[], bool]] = {}
#: Probes that say whether a kernel is wrong here, not what the lowering may emit: forcing one
#: to "right" is how tests show the self-check catching that kernel on this CPU.
_KERNEL_FAULTS: set[str] = set()


def _parse_forced(text: str) -> dict[str, bool]:
    answers: dict[str, bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or value.strip() not in ("0", "1", "true", "false"):
            raise ValueError(f"{FORCE_ENV}: expected name=0|1 pairs, got {item!r}")
        answers[name.strip()] = value.strip() in ("1", "true")
    return answers


def probe(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Register ``fn`` as a probe: answered once per process, unless :func:`forced` says."""
    cached = functools.cache(fn)
    name = fn.__name__

    @functools.wraps(fn)
    def answer() -> bool:
        told = _forced.get(name)
        return cached() if told is None else told

    PROBES[name] = answer
    _measured[name] = cached
    return answer


def measured(name: str) -> bool:
    """The machine's own answer to probe ``name``, whatever :func:`forced` says.

    For tests that state a fact about this CPU's kernels (another lowering's numbers are wrong
    here), not for decisions: decisions read the probe, which tests force both ways.
    """
    _check_names({name: True})
    return _measured[name]()


def kernel_fault_probe(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Register ``fn`` as a probe (see :func:`probe`) answering whether a kernel computes some
    calls wrongly on this CPU; :func:`foreign_answers` leaves it out."""
    answer = probe(fn)
    _KERNEL_FAULTS.add(fn.__name__)
    return answer


def foreign_answers() -> dict[str, bool]:
    """The decision probes forced to another answer than this CPU's own: the lowering then
    decides as another CPU would, and this CPU's kernels may not run what it emits (a K only
    AVX2 vectors take reads past the rows with AVX512; 8-bit activations saturate on AVX2), so
    whatever runs the emitted kernels at lowering time (the self-check) must not."""
    return {
        name: told
        for name, told in _forced.items()
        if name not in _KERNEL_FAULTS and told != _measured[name]()
    }


def _check_names(names: Mapping[str, bool]) -> None:
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; known: {sorted(PROBES)}")


@contextlib.contextmanager
def forced(**answers: bool) -> Iterator[None]:
    """Make the named probes answer ``answers`` inside the block (tests, on any CPU)."""
    _check_names(answers)
    saved = dict(_forced)
    _forced.update(answers)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def probe_answers() -> dict[str, bool]:
    """Every probe's answer in this process (forced answers included)."""
    return {name: fn() for name, fn in PROBES.items()}


_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_description() -> dict[str, object]:
    """What identifies this CPU for oneDNN: model name, torch's capability, relevant flags."""
    model, flags = "unknown", set[str]()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
    }


@probe
def int8_pairs_saturate() -> bool:
    """True when oneDNN's u8 x s8 products saturate in int16 pairs on this machine."""
    onednn = torch.ops.onednn
    weight = torch.full((1, 2), 127, dtype=torch.int8)
    packed = onednn.qlinear_prepack(weight, None)
    x = torch.full((1, 2), 255, dtype=torch.uint8)
    scales = torch.ones(1)
    zero_points = torch.zeros(1, dtype=torch.int64)
    y = onednn.qlinear_pointwise(
        x, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return float(y.item()) != 2.0 * 255 * 127


def pair_sum_may_saturate(max_abs_activation: int, weight: torch.Tensor) -> bool:
    """Whether two adjacent products of these ranges can leave int16 on a saturating CPU."""
    if not int8_pairs_saturate():
        return False
    max_abs_weight = int(weight.to(torch.int16).abs().max().item()) if weight.numel() else 0
    return 2 * max_abs_activation * max_abs_weight > INT16_MAX


def pair_safe_level(max_abs_weight: int) -> int:
    """The largest uint8 level ``L`` with ``2 * L * max_abs_weight <= 32767``.

    Activations at or below it are computed exactly on every CPU, saturating or not (int8
    activations are shifted by +128 first on a saturating CPU): data chosen within it checks the
    numerics of a lowering that only a VNNI/AMX CPU would do, on any CPU.

    >>> pair_safe_level(127), pair_safe_level(64)
    (129, 255)
    """
    return min(255, INT16_MAX // (2 * max(max_abs_weight, 1)))


@probe
def qlinear_binary_emits_bf16() -> bool:
    """Whether ``onednn.qlinear_pointwise.binary`` accepts a bf16 ``other`` and output here."""
    onednn = torch.ops.onednn
    packed = onednn.qlinear_prepack(torch.ones((2, 2), dtype=torch.int8), None)
    x = torch.ones((1, 2), dtype=torch.uint8)
    other = torch.zeros((1, 2), dtype=torch.bfloat16)
    try:
        onednn.qlinear_pointwise.binary(
            x, 1.0, 0, packed, torch.ones(2), torch.zeros(2, dtype=torch.int64), other, None,
            1.0, 0, torch.bfloat16, 1.0, 0, "add", 1.0, "none", [], "",
        )  # fmt: skip
    except RuntimeError:
        return False
    return True


@probe
def qconv_binary_emits_bf16() -> bool:
    """Whether ``onednn.qconv2d_pointwise.binary`` accepts a bf16 accumulator and output here."""
    onednn = torch.ops.onednn
    weight = torch.ones((2, 2, 1, 1), dtype=torch.int8)
    scales = torch.ones(2)
    packed = onednn.qconv_prepack(weight, scales, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    x = torch.ones((1, 2, 2, 2), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    accum = torch.zeros((1, 2, 2, 2), dtype=torch.bfloat16)
    accum = accum.contiguous(memory_format=torch.channels_last)
    try:
        onednn.qconv2d_pointwise.binary(
            x, 1.0, 0, packed, scales, torch.zeros(2, dtype=torch.int64), accum, None,
            [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.bfloat16, 1.0, 0, "sum", 1.0, "none", [], "",
        )  # fmt: skip
    except RuntimeError:
        return False
    return True


@probe
def aten_vectors_are_avx2() -> bool:
    """Whether ATen dispatches its AVX2 kernels here (8 floats a vector; AVX512: 16).

    The vectorized bf16 ``_weight_int8pack_mm`` reads activations a whole vector at a time with
    no tail (see :func:`qalgebra.fusions.woq.bf16_k_multiple`).
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


@kernel_fault_probe
def qconv_single_column_stride_wrong() -> bool:
    """Whether oneDNN's int8 conv is wrong here for one output column, kernel and stride > 1.

    Runs the two smallest convs measured wrong (docs/onednn_ops.md, "Conv geometries oneDNN
    gets wrong"): one only with the AMX kernel, one with every AVX512 kernel (AVX2's computes
    both right). Small integers and scales 1: the exact answer is exact in float32.
    """
    onednn = torch.ops.onednn
    cases = (((1, 8, 6, 2), 2, 2), ((1, 2, 4, 2), 16, 2))  # (input shape, outputs, groups)
    for shape, outputs, groups in cases:
        channels = shape[1] // groups
        x = (torch.arange(math.prod(shape)) % 5).to(torch.uint8).reshape(shape)
        weight = (torch.arange(outputs * channels * 4) % 3 - 1).to(torch.int8)
        weight = weight.reshape(outputs, channels, 2, 2)
        ones = torch.ones(outputs)
        geometry = ([1, 2], [0, 0], [1, 1], groups)  # stride, padding, dilation, groups
        packed = onednn.qconv_prepack(weight, ones, 1.0, 0, *geometry, None)
        y = onednn.qconv_pointwise(
            x.contiguous(memory_format=torch.channels_last), 1.0, 0, packed, ones,
            torch.zeros(outputs, dtype=torch.int64), None, *geometry, 1.0, 0, torch.float32,
            "none", [], None,
        )  # fmt: skip
        exact = torch.nn.functional.conv2d(x.float(), weight.float(), None, *geometry)
        if not torch.equal(y, exact):
            return True
    return False


_forced.update(_parse_forced(os.environ.get(FORCE_ENV, "")))
_check_names(_forced)
