"""Mutation check: deliberately broken rewrites must make the lowering properties fail.

    python scripts/mutation_check.py                 # every mutant, then the table
    python scripts/mutation_check.py --mutants post_op_dropped,output_zp_dropped

Each mutant patches qalgebra in a fresh Python process (monkeypatched replacement code, or a
mutated combinator with the catalog rebuilt from it) and runs the tests that must catch it: the
property tests (tests/test_properties_lowering.py, Hypothesis profile ``ci``: derandomized, so
every run sees the same graphs), or another file (``Mutant.tests``). The unmutated files run
first: a mutant is *caught* when a test that passes unmutated fails under it (tests failing
unmutated -- known bugs -- are deselected). Whatever the CPU, the tests force the probes of
``qalgebra.isa`` both ways, so the table is the same on every CPU; the one printed at the end is
recorded in docs/findings.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = "tests/test_properties_lowering.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    apply: Callable[[], None]
    #: The test files that must catch it.
    tests: tuple[str, ...] = (TESTS,)


# --------------------------------------------------------------------------------------------
# The mutants (applied in the child process, before pytest imports the tests)


def _patch_fused_calls(
    edit: Callable[[Any, list[Any]], None] | None = None,
    then: Callable[[Callable[..., Any], Any, tuple[Any, ...], Any], Any] | None = None,
) -> None:
    """Wrap ``Rewriter.call``: ``edit(target, args)`` may rewrite the args of oneDNN calls, and
    ``then(call, target, args, node)`` may replace the node built (``call`` builds more)."""
    import torch

    from qalgebra.rewriter import Rewriter

    onednn = torch.ops.onednn
    fused = {
        onednn.qconv_pointwise.default,
        onednn.qconv2d_pointwise.binary,
        onednn.qlinear_pointwise.default,
        onednn.qlinear_pointwise.binary,
    }
    original = Rewriter.call

    def call(self: Rewriter, target: Any, *args: Any, **kwargs: Any) -> Any:
        if target not in fused:
            return original(self, target, *args, **kwargs)
        mutable = list(args)
        if edit is not None:
            edit(target, mutable)
        node = original(self, target, *mutable, **kwargs)
        if then is None:
            return node
        return then(lambda *more: original(self, *more), target, tuple(mutable), node)

    setattr(Rewriter, "call", call)  # noqa: B010  # the mutant replaces the method


def _index(target: Any, *names: str) -> int:
    """The position of the first argument of ``target``'s schema named one of ``names``."""
    for i, arg in enumerate(target._schema.arguments):
        if arg.name in names:
            return i
    raise KeyError(f"{target} has no argument named {names}")


def _qparams_swapped() -> None:
    def edit(target: Any, args: list[Any]) -> None:
        scale, zp = args[1], args[2]
        args[1], args[2] = float(zp) if zp else 1.0, int(scale)

    _patch_fused_calls(edit)


def _post_op_dropped() -> None:
    def edit(target: Any, args: list[Any]) -> None:
        at = _index(target, "attr", "post_op_name", "unary_post_op", "unary_attr")
        args[at : at + 3] = ["none", [], ""]

    _patch_fused_calls(edit)


def _output_zp_dropped() -> None:
    def edit(target: Any, args: list[Any]) -> None:
        args[_index(target, "output_zero_point")] = 0

    _patch_fused_calls(edit)


def _accum_qparams_from_input() -> None:
    import torch

    def edit(target: Any, args: list[Any]) -> None:
        if target is torch.ops.onednn.qconv2d_pointwise.binary:
            args[_index(target, "accum_scale")] = args[1]
            args[_index(target, "accum_zero_point")] = args[2]

    _patch_fused_calls(edit)


def _float_outputs_zeroed() -> None:
    """Every fused op with a float output: its result multiplied by 0 (all zeros)."""
    import torch

    def then(call: Callable[..., Any], target: Any, args: tuple[Any, ...], node: Any) -> Any:
        if args[_index(target, "output_dtype")] in (torch.float32, torch.bfloat16):
            return call(torch.ops.aten.mul.Tensor, node, 0.0)
        return node

    _patch_fused_calls(then=then)


def _linear_output_zp_off_by_one() -> None:
    import torch

    onednn = torch.ops.onednn
    linears = (onednn.qlinear_pointwise.default, onednn.qlinear_pointwise.binary)

    def edit(target: Any, args: list[Any]) -> None:
        dtype = args[_index(target, "output_dtype")]
        if target in linears and dtype in (torch.uint8, torch.int8):
            args[_index(target, "output_zero_point")] += 1

    _patch_fused_calls(edit)


def _leaky_slope_default() -> None:
    def edit(target: Any, args: list[Any]) -> None:
        at = _index(target, "attr", "post_op_name", "unary_post_op", "unary_attr")
        if args[at] == "leaky_relu":
            args[at + 1] = [0.01]

    _patch_fused_calls(edit)


def _range_clamp_high_off_by_one() -> None:
    import qalgebra.fusions.common as common

    original = common.range_clamp

    def range_clamp(rw: Any, node: Any, bounds: tuple[int, int], info: Any, **kw: Any) -> Any:
        low, high = bounds
        return original(rw, node, (low, high + 1), info, **kw)

    _patch_everywhere("range_clamp", range_clamp)


def _patch_everywhere(name: str, value: object) -> None:
    """Rebind ``name`` in every loaded qalgebra module that has it (replacement code looks
    its helpers up in its module's globals at call time)."""
    import qalgebra.lower  # noqa: F401  loads the catalog

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("qalgebra") and hasattr(module, name):
            setattr(module, name, value)


def _clamp_dropped() -> None:
    _patch_everywhere("clamp_to_quant_range", lambda m, rw, node, **kw: node)


def _saturation_check_off() -> None:
    _patch_everywhere("pair_sum_may_saturate", lambda max_abs_activation, weight: False)


def _mean_truncated() -> None:
    """The int8 mean (``qmean``) converted to int8 without its ``round``: truncated."""
    import torch

    from qalgebra.rewriter import Rewriter

    original = Rewriter.call

    def call(self: Rewriter, target: Any, *args: Any, **kwargs: Any) -> Any:
        if target is torch.ops.aten.round.default:
            return args[0]
        return original(self, target, *args, **kwargs)

    setattr(Rewriter, "call", call)  # noqa: B010  # the mutant replaces the method


def _shift_zero_point_kept() -> None:
    """int8 activations shifted to uint8 for conv, their zero point left unshifted."""
    _patch_everywhere("_plus_128", lambda q, rw: q)


def _per_tensor_scale_dropped() -> None:
    """A per-tensor weight scale expanded per channel as 1.0."""
    import dataclasses

    import torch

    from qalgebra.fusions import common

    original = common.weight_quant

    def weight_quant(m: Any) -> Any:
        wq = original(m)
        if common.WQ.scales in m:
            return wq
        return dataclasses.replace(wq, scales=torch.ones_like(wq.scales))

    _patch_everywhere("weight_quant", weight_quant)


def _dequant_sub_swapped() -> None:
    """The decomposed dequant's ``sub(x, zp)`` written ``sub(zp, x)`` in the pattern."""
    import torch

    import qalgebra.combinators as c
    from qalgebra.checks import dtype_in
    from qalgebra.pattern import (
        Pattern,
        PatternLike,
        any_of,
        call,
        dtype_of,
        literal,
        optional,
        where,
    )
    from qalgebra.qparams import QParams

    aten, qd = c.aten, c.qd

    def dequantize_per_tensor(x: PatternLike, qp: QParams) -> Pattern:
        op_form = call(
            (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor),
            x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype,
        )  # fmt: skip
        to_float = where(
            c.dtype_convert(dtype_of(x, qp.dtype), literal(torch.float32)),
            dtype_in(qp.dtype, c._QUANTIZED_DTYPES),
        )
        shifted = optional(
            call(aten.sub.Tensor, qp.zero_point, to_float),  # MUTATION: operands swapped
            through=1,
            defaults={qp.zero_point: 0},
        )
        return any_of(op_form, call(aten.mul.Tensor, shifted, qp.scale))

    c.dequantize_per_tensor = dequantize_per_tensor
    _rebuild_catalog()


def _binary_sub_as_add() -> None:
    """``with_binary`` also takes ``sub`` -- in both operand orders, as if it commuted."""
    import qalgebra.combinators as c
    from qalgebra.pattern import Pattern, PatternLike, any_of, call

    aten = c.aten

    def with_binary(p: PatternLike, other: PatternLike, op: Any = aten.add.Tensor) -> Pattern:
        return any_of(
            call(op, p, other),
            call(aten.sub.Tensor, p, other),  # MUTATION: sub treated as add
            call(aten.sub.Tensor, other, p),
        )

    c.with_binary = with_binary
    _rebuild_catalog()


def _rebuild_catalog() -> None:
    """Re-import the fusions and the lowering so they pick up patched module attributes."""
    for name in list(sys.modules):
        if name.startswith("qalgebra.fusions") or name in (
            "qalgebra.lower",
            "qalgebra.testing.properties",
        ):
            del sys.modules[name]
    import qalgebra.lower  # noqa: F401


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "qparams_swapped",
            "activation scale and zero point swapped in the fused qconv/qlinear call",
            _qparams_swapped,
        ),
        Mutant(
            "post_op_dropped", "unary post-op dropped (attr forced to 'none')", _post_op_dropped
        ),
        Mutant("output_zp_dropped", "output zero point forced to 0", _output_zp_dropped),
        Mutant(
            "accum_qparams_from_input",
            "conv binary: accumulator scale/zero point taken from the main input",
            _accum_qparams_from_input,
        ),
        Mutant(
            "dequant_sub_swapped",
            "decomposed dequant pattern: sub(zp, x) instead of sub(x, zp)",
            _dequant_sub_swapped,
        ),
        Mutant(
            "binary_sub_as_add",
            "binary families take sub(a, b) in either order, as if it were add",
            _binary_sub_as_add,
        ),
        Mutant(
            "clamp_dropped",
            "no clamp to a narrower (reduce_range) output quant range",
            _clamp_dropped,
        ),
        Mutant(
            "mean_truncated",
            "qmean: the mean of the int8 levels truncated instead of rounded",
            _mean_truncated,
        ),
        Mutant(
            "shift_zero_point_kept",
            "conv: int8 activations shifted by +128, the zero point not",
            _shift_zero_point_kept,
        ),
        Mutant(
            "per_tensor_scale_dropped",
            "a per-tensor weight scale expanded per channel as 1.0",
            _per_tensor_scale_dropped,
        ),
        Mutant(
            "saturation_check_off",
            "no refusal of int8 products that saturate on a saturating CPU",
            _saturation_check_off,
        ),
        Mutant(
            "float_outputs_zeroed",
            "every fused float output replaced by zeros",
            _float_outputs_zeroed,
        ),
        Mutant(
            "linear_output_zp_off_by_one",
            "qlinear (and binary) int8 output zero point + 1",
            _linear_output_zp_off_by_one,
        ),
        Mutant(
            "leaky_slope_default",
            "leaky_relu's slope replaced by its default, 0.01",
            _leaky_slope_default,
        ),
        Mutant(
            "range_clamp_high_off_by_one",
            "the clamp to a narrow (reduce_range) output range lets quant_max + 1 through",
            _range_clamp_high_off_by_one,
            tests=("tests/test_lower.py",),
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Driver


def _child(mutant: str | None, pytest_args: Sequence[str]) -> int:
    import pytest

    if mutant:
        MUTANTS[mutant].apply()
    return int(pytest.main(list(pytest_args)))


def _pytest(
    mutant: str | None, tests: Sequence[str], extra: Sequence[str], report: Path
) -> tuple[int, float]:
    args = [
        sys.executable,
        __file__,
        "--child",
        mutant or "",
        "--",
        *tests,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *extra,
    ]
    # This checkout's qalgebra, whatever is installed; the ci profile, no example database.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "QALGEBRA_HYPOTHESIS_PROFILE": "ci", "PYTHONPATH": path}
    env.pop("QALGEBRA_HYPOTHESIS_DB", None)
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return proc.returncode, time.monotonic() - start


def _failed(report: Path) -> list[tuple[str, str]]:
    """(test id, property that failed -- ``[fires]`` etc., or the exception type) per failure."""
    import re
    import xml.etree.ElementTree as ET

    if not report.exists():
        return [("<no report: pytest crashed>", "")]
    failed = []
    for case in ET.parse(report).iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            module = case.get("classname", "").split(".")[-1]
            test = f"tests/{module}.py::{case.get('name')}"
            message = problem.get("message", "")
            # a PropertyFailure says "[prop] ..."; Hypothesis may group several failures
            found = re.search(r"PropertyFailure: \[(\w+)\]", message + (problem.text or ""))
            failed.append((test, found.group(1) if found else message.split(":")[0][:40]))
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        mutant, rest = argv[1], argv[argv.index("--") + 1 :]
        return _child(mutant or None, rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", default=",".join(MUTANTS), help="comma-separated names")
    args = parser.parse_args(argv)
    names = [n for n in args.mutants.split(",") if n]
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {', '.join(MUTANTS)}")
    out = Path(tempfile.mkdtemp(prefix="qalgebra-mutation-"))  # the junit reports
    files = sorted({test for name in names for test in MUTANTS[name].tests})
    code, seconds = _pytest(None, files, [], out / "baseline.xml")
    baseline = [test for test, _ in _failed(out / "baseline.xml")] if code else []
    print(f"unmutated: exit {code}, {seconds:.0f} s, failing (deselected): {baseline or 'none'}")
    deselect = [f"--deselect={t}" for t in baseline]
    rows = []
    for name in names:
        tests = MUTANTS[name].tests
        code, seconds = _pytest(name, tests, ["-x", *deselect], out / f"{name}.xml")
        failed = _failed(out / f"{name}.xml") if code else []
        rows.append((name, MUTANTS[name].description, bool(code), failed, seconds))
        print(f"{name}: {'caught' if code else 'NOT caught'} ({seconds:.0f} s) {failed[:1]}")
    print()
    print("| mutant | what it breaks | caught | by (first failing test, property) | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, description, caught, failed, seconds in rows:
        by = f"`{failed[0][0].split('::', 1)[1]}` [{failed[0][1]}]" if failed else "-"
        verdict = "yes" if caught else "**no**"
        print(f"| `{name}` | {description} | {verdict} | {by} | {seconds:.0f} |")
    return 0 if all(row[2] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
