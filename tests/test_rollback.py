"""A rewrite that fails at any of its Rewriter operations is rolled back exactly, for every fusion.

For each catalog fusion, a graph it fires on (a bundled model, a WOQ / dynamic case, or a form of
one), and each k: the k-th Rewriter operation of that fusion's first rewrite raises. Then

- the graph (code, every node's arguments and users' order, every node's metadata -- the same
  objects) and the module's attributes are exactly as they were before that rewrite;
- the failure is reported (fusion, node, error);
- the rest lowers exactly as when that match is refused before any edit (same code, same report
  otherwise, same outputs), and the result is close to the input module run eagerly;
- or, for an ``essential`` fusion (a fix-up the lowered graph cannot run without), the lowering
  raises ``RewriteError`` naming the fusion and node, after the same exact rollback.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import pytest
import torch
from test_lower import assert_close_to_reference
from test_rewriter import State
from torch import fx, nn

import qalgebra.lower as lower_module
from qalgebra.errors import RewriteError
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion, Refusal, Rewriter
from qalgebra.fusions.woq import bf16_k_multiple
from qalgebra.lower import FailedRewrite, LoweringReport, lower_with_report
from qalgebra.pattern import Match
from qalgebra.testing.forms import FORMS
from qalgebra.testing.models import MODELS
from qalgebra.testing.properties import flat_outputs
from qalgebra.testing.quantize import quantize_pt2e
from qalgebra.testing.woq_strategies import FamilyCase, dynamic_fp16_case, int_mm_case, woq_case
from qalgebra.testing.zoo import ZOO, build

pytestmark = pytest.mark.usefixtures("one_thread")

Close = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


@dataclasses.dataclass(frozen=True)
class Subject:
    """A graph, its inputs, and the numerics check of a lowering of it against the eager run."""

    gm: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    close: Close


class ConvThenView(nn.Module):
    """A conv whose float result is viewed: the view is respelled after lowering."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out.view(2, -1)


def _conv_then_view() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return ConvThenView().eval(), (torch.randn(2, 3, 8, 8),)


def _model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name == "conv_then_view":
        return _conv_then_view()
    if name in ZOO:  # public architectures as written (in-place ops, dropout, cats)
        return build(name, size="ci", batch=1)
    return MODELS[name]()


def _quantized(name: str, form: str = "op") -> Subject:
    model, inputs = _model(name)
    op_form = quantize_pt2e(model, inputs, reduce_range=True)  # 7-bit: lowered on every CPU

    def close(reference: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> None:
        for r, g in zip(reference, got, strict=True):
            assert_close_to_reference(r, g, op_form)

    return Subject(FORMS[form](op_form), tuple(inputs), close)


def _case(case: FamilyCase) -> Subject:
    def close(reference: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> None:
        message = case.check(tuple(reference), tuple(got))
        assert message is None, message

    return Subject(case.graph, case.inputs, close)


def _woq(*out_features: int) -> Subject:
    k = bf16_k_multiple()  # a K the bf16 kernel takes on this CPU
    return _case(woq_case(seed=1, dtype=torch.bfloat16, k=k, out_features=out_features, rank=3))


#: A graph each catalog fusion fires on (checked by the test).
SUBJECTS: dict[str, Callable[[], Subject]] = {
    "eval_dropout": lambda: _quantized("mnasnet1_0"),
    "functionalize": lambda: _quantized("mnasnet1_0"),
    "quant_share_max_pool": lambda: _quantized("googlenet"),
    "quant_lift_up_cat": lambda: _quantized("googlenet"),
    "dequant_promotion": lambda: _quantized("shared_input_conv", "shared_dequants"),
    "quant_lift_up": lambda: _quantized("resnet_like_2"),
    "quant_lift_up_max_pool": lambda: _quantized("resnet_like_2"),
    "qconv_binary": lambda: _quantized("conv_add_conv_lhs"),
    "qlinear_binary": lambda: _quantized("linear3d_add_input_lhs"),
    "qconv": lambda: _quantized("conv2d_hardswish"),
    "qlinear": lambda: _quantized("linear3d_relu"),
    "qmaxpool2d": lambda: _quantized("inception"),
    "qcat": lambda: _quantized("inception"),
    "qreshape": lambda: _quantized("inception"),
    "qmean": lambda: _quantized("regnet_y_400mf"),
    "woq_int8_concat_linear": lambda: _woq(8, 4, 8),
    "woq_int8": lambda: _woq(8),
    "int_mm_linear": lambda: _case(int_mm_case(seed=2, rank=3, bias=True)),
    "linear_dynamic_fp16": lambda: _case(dynamic_fp16_case(seed=3, rank=3)),
    "accum_clone_elision": lambda: _quantized("conv_add_conv_lhs"),
    "view_as_reshape": lambda: _quantized("conv_then_view"),
}


@functools.cache
def _subject(fusion: str) -> Subject:
    return SUBJECTS[fusion]()


class InjectedFault(RuntimeError):
    """What an armed Rewriter raises at its chosen operation."""


class Probe(Rewriter):
    """A Rewriter that records what it did, and raises at one chosen operation when armed."""

    made: ClassVar[list[Probe]] = []
    fusion = ""
    root = ""
    fail_at = 0
    refuse = False
    before: State | None = None
    after: State | None = None
    committed = False

    def arm(self, k: int, *, refuse: bool = False) -> None:
        self.fail_at, self.refuse = k, refuse
        self.before = State.of(self.graph, self.module)

    def _begin(self, operation: str) -> None:
        super()._begin(operation)
        if len(self.operations) == self.fail_at:
            if self.refuse:
                raise Refusal("injected before any edit")
            raise InjectedFault(f"operation {self.fail_at} ({operation})")

    def commit(self) -> None:
        super().commit()
        self.committed = True

    def rollback(self) -> None:
        super().rollback()
        if self.before is not None:
            self.after = State.of(self.graph, self.module)


@dataclasses.dataclass(frozen=True)
class Target:
    """Arm the rewrite of ``fusion`` at ``root`` to fail at operation ``k`` (or to refuse)."""

    fusion: str
    root: str
    k: int = 0
    refuse: bool = False


def _tagged(f: Fusion, target: Target | None) -> Fusion:
    def rewrite(m: Match, rw: Rewriter) -> fx.Node:
        assert isinstance(rw, Probe)
        rw.fusion, rw.root = f.name, m.root.name
        Probe.made.append(rw)
        if target is not None and (f.name, m.root.name) == (target.fusion, target.root):
            rw.arm(target.k, refuse=target.refuse)
        return f.rewrite(m, rw)

    return dataclasses.replace(f, rewrite=rewrite)


@pytest.fixture
def probing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(lower_module, "Rewriter", Probe)
    Probe.made.clear()
    yield
    Probe.made.clear()


def _lower(
    subject: Subject, target: Target | None
) -> tuple[fx.GraphModule, LoweringReport, list[Probe]]:
    Probe.made.clear()
    fusions = tuple(_tagged(f, target) for f in DEFAULT_FUSIONS)
    lowered, report = lower_with_report(subject.gm, subject.inputs, fusions=fusions)
    return lowered, report, list(Probe.made)


def normalized(code: str) -> str:
    """Code with the lowering's constant counters dropped (they count across lowerings)."""
    return re.sub(r"_qalgebra_([a-z0-9_]*?)_\d+\b", r"_qalgebra_\1", code)


def _outputs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.clone() for t in flat_outputs(gm(*(x.clone() for x in inputs)))]


def test_every_catalog_fusion_has_a_subject() -> None:
    assert set(SUBJECTS) == {f.name for f in DEFAULT_FUSIONS}


@pytest.mark.usefixtures("probing")
@pytest.mark.parametrize("fusion", list(SUBJECTS))
def test_a_failure_at_any_operation_is_rolled_back_exactly(fusion: str) -> None:
    subject = _subject(fusion)
    reference = _outputs(subject.gm, subject.inputs)
    _, baseline, probes = _lower(subject, None)
    assert baseline.fired[fusion] >= 1 and not baseline.failed, baseline.summary()
    first = next(p for p in probes if p.fusion == fusion and p.committed)
    root, operations = first.root, first.operations
    assert operations[-1] == "commit" and len(operations) >= 2
    code_before = subject.gm.code
    if _ESSENTIAL[fusion]:
        _check_essential(subject, fusion, root, operations)
        return

    # The oracle: the same match refused before its first edit.
    refused, refused_report, _ = _lower(subject, Target(fusion, root, 1, refuse=True))
    expected_code = normalized(refused.code)
    expected_out = _outputs(refused, subject.inputs)
    subject.close(reference, expected_out)
    assert any((r.fusion, r.root) == (fusion, root) for r in refused_report.refused)
    assert refused_report.fired[fusion] == baseline.fired[fusion] - 1

    for k in range(1, len(operations) + 1):
        lowered, report, probes = _lower(subject, Target(fusion, root, k))
        where = f"{fusion} at {root}, operation {k} of {operations}"
        assert _armed(probes).after == _armed(probes).before, where  # graph, meta, module
        assert report.failed == [
            FailedRewrite(fusion, root, f"InjectedFault: operation {k} ({operations[k - 1]})")
        ], where
        assert report.fired == refused_report.fired, where
        assert report.refused == [r for r in refused_report.refused if r.root != root], where
        assert normalized(lowered.code) == expected_code, where
        got = _outputs(lowered, subject.inputs)
        assert all(torch.equal(a, b) for a, b in zip(got, expected_out, strict=True)), where
    assert subject.gm.code == code_before  # the caller's module is never touched


def _check_essential(subject: Subject, fusion: str, root: str, operations: Sequence[str]) -> None:
    """An essential fusion's failure fails the lowering, after the same exact rollback."""
    for k in range(1, len(operations) + 1):
        with pytest.raises(RewriteError) as caught:
            _lower(subject, Target(fusion, root, k))
        armed = _armed(Probe.made)
        assert armed.after == armed.before
        assert (caught.value.fusion, caught.value.node) == (fusion, root)
        assert isinstance(caught.value.__cause__, InjectedFault)


def _armed(probes: Sequence[Probe]) -> Probe:
    (armed,) = [p for p in probes if p.before is not None]
    return armed


_ESSENTIAL = {f.name: f.essential for f in DEFAULT_FUSIONS}
