"""Each catalog fusion's short description, paired with the explanation of a near miss; and
what a fusion derives from its pattern (its compiled matcher, its doc).

A near miss is a small hand-built graph that a fusion almost matches, with one thing off (a
per-tensor weight, an ``alpha`` the fusion does not take, a weight that is not a constant, ...).
The explanation must point at that thing; the description must print each shared part once.
Both are kept in ``tests/golden/<fusion>.txt``, reviewed by hand: a change in either shows up as a
diff of that file. ``QALGEBRA_UPDATE_GOLDEN=1`` rewrites the files instead of comparing, for a
deliberate change (then read the diff before committing it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from graphs import QP, GraphBuilder, convert, dequantize, dequantize_weight, quantize
from torch import fx

from qalgebra import PatternError, Var, call, list_of
from qalgebra.fusion import DOC_WIDTH
from qalgebra.fusions import DEFAULT_FUSIONS, Fusion, Rewriter
from qalgebra.lower import lower_with_report
from qalgebra.match import Matcher, explain
from qalgebra.pattern import Match

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("QALGEBRA_UPDATE_GOLDEN") == "1"

#: One near miss: what is off, and a builder of (graph, the node to explain).
NearMiss = tuple[str, Callable[[], tuple[GraphBuilder, fx.Node]]]

U8 = torch.uint8


def _dequantized_input(b: GraphBuilder, shape: tuple[int, ...]) -> fx.Node:
    return dequantize(b, b.input("q", shape, U8))


def _promotion() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    d = _dequantized_input(b, (2, 3))
    b.op(aten.relu.default, d)
    return b, d


def _lift_up() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    v = b.op(aten.view.default, _dequantized_input(b, (2, 6)), [3, 4])
    return b, quantize(b, v)


def _lift_up_max_pool() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    pool = b.op(aten.max_pool2d.default, b.input("x", (1, 2, 4, 4)), [2, 2], [2, 2])
    b.op(aten.relu.default, pool)
    return b, quantize(b, pool)


def _conv(b: GraphBuilder, x: fx.Node, w: fx.Node) -> fx.Node:
    return b.op(aten.conv2d.default, x, w, None, [1, 1], [0, 0], [1, 1], 1)


def _conv_weight(b: GraphBuilder) -> fx.Node:
    return dequantize_weight(b, (4, 3, 1, 1))[1]


def _qconv_binary() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    conv = _conv(b, _dequantized_input(b, (1, 3, 4, 4)), _conv_weight(b))
    return b, b.op(aten.add.Tensor, conv, b.input("other", (1, 4, 4, 4)), alpha=2)


def _qlinear_binary() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    lin = b.op(aten.linear.default, _dequantized_input(b, (2, 3)), dequantize_weight(b)[1])
    return b, b.op(aten.sub.Tensor, lin, b.input("other", (2, 4)))


def _qconv() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    w = b.input("w", (4, 3, 1, 1), torch.int8)
    per_tensor = b.op(qd.dequantize_per_tensor.default, w, 0.5, 0, -128, 127, torch.int8)
    conv = _conv(b, _dequantized_input(b, (1, 3, 4, 4)), per_tensor)
    return b, b.op(aten.relu.default, conv)


def _qlinear() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, b.op(aten.linear.default, b.input("x", (2, 3)), dequantize_weight(b)[1])


def _qmaxpool2d() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    pool = b.op(aten.avg_pool2d.default, _dequantized_input(b, (1, 2, 4, 4)), [2, 2])
    return b, quantize(b, pool)


def _qcat() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    cat = b.op(aten.cat.default, [_dequantized_input(b, (2, 3)), b.input("x", (2, 3))], 1)
    return b, quantize(b, cat)


def _qreshape() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, quantize(b, b.op(aten.relu.default, _dequantized_input(b, (2, 6))))


def _qmean() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, quantize(b, b.op(aten.mean.dim, b.input("x", (1, 2, 4, 4)), [-1, -2], True))


def _woq_linear(b: GraphBuilder, w: fx.Node) -> fx.Node:
    x = b.input("x", (2, 8), torch.bfloat16)
    lin = b.op(aten.linear.default, x, convert(b, w, torch.bfloat16))
    return b.op(aten.mul.Tensor, lin, b.const(torch.ones(4, dtype=torch.bfloat16)))


def _woq() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, _woq_linear(b, b.input("w", (4, 8), torch.int8))


def _woq_concat() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, _woq_linear(b, b.const(torch.zeros(4, 8, dtype=torch.int8)))


def _int_mm() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    a = b.input("a", (32, 8), torch.int8)
    mm = b.op(aten._int_mm.default, a, b.const(torch.zeros(8, 16, dtype=torch.int8)))
    scaled = b.op(aten.mul.Tensor, mm, b.const(torch.ones(32, 1)))
    return b, b.op(aten.mul.Tensor, scaled, b.const(torch.ones(16)))


def _dynamic_fp16() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    half = convert(b, b.const(torch.zeros(4, 3)), torch.bfloat16)
    return b, b.op(aten.linear.default, b.input("x", (2, 3)), convert(b, half, torch.float32))


def _accum_clone() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    conv = _conv(b, b.input("x", (1, 3, 4, 4)), b.const(torch.zeros(4, 3, 1, 1)))
    return b, b.op(aten.clone.default, conv, memory_format=torch.channels_last)


def _view_as_reshape() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, b.op(aten.reshape.default, b.input("x", (2, 3)), [6])


def _eval_dropout() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, b.op(aten.dropout.default, b.input("x", (2, 3)), 0.5, True)


def _functionalize() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    return b, b.op(aten.clamp_max_.default, b.input("q", (2, 3), U8), 127)


def _share_max_pool() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    b.op(aten.relu.default, dequantize(b, quantize(b, x)))
    pool = b.op(aten.max_pool2d.default, x, [2, 2], [2, 2])
    return b, quantize(b, pool, QP(scale=0.05))


def _lift_up_cat() -> tuple[GraphBuilder, fx.Node]:
    b = GraphBuilder()
    a = b.op(aten.relu.default, b.input("x", (1, 2, 4, 4)))
    b.op(aten.neg.default, a)
    cat = b.op(aten.cat.default, [a, b.input("y", (1, 2, 4, 4))], 1)
    return b, quantize(b, cat)


NEAR_MISSES: dict[str, NearMiss] = {
    "eval_dropout": ("a dropout in training (train=True)", _eval_dropout),
    "functionalize": ("clamp_max_ of a uint8 tensor (int8 code)", _functionalize),
    "quant_share_max_pool": ("x quantized with another scale than its pool", _share_max_pool),
    "quant_lift_up_cat": ("a cat input read twice", _lift_up_cat),
    "dequant_promotion": ("a dequantize read once (nothing to promote)", _promotion),
    "quant_lift_up": ("view -> quantize of a dequantize (the pointwise family's)", _lift_up),
    "quant_lift_up_max_pool": ("the max_pool2d is read twice", _lift_up_max_pool),
    "qconv_binary": ("add(conv, other) with alpha=2", _qconv_binary),
    "qlinear_binary": ("sub(linear, other) instead of add", _qlinear_binary),
    "qconv": ("a conv weight that is an input, not a constant", _qconv),
    "qlinear": ("a linear of a float activation", _qlinear),
    "qmaxpool2d": ("avg_pool2d instead of max_pool2d", _qmaxpool2d),
    "qcat": ("cat of a dequantized and a float input", _qcat),
    "qreshape": ("relu instead of a movement", _qreshape),
    "qmean": ("a mean of a float input, not of a dequantize", _qmean),
    "woq_int8": ("an int8 weight that is an input, not a constant", _woq),
    "woq_int8_concat_linear": ("one WOQ linear of x, no sibling", _woq_concat),
    "int_mm_linear": ("_int_mm scaled without converting it first", _int_mm),
    "linear_dynamic_fp16": ("a weight rounded through bf16, not fp16", _dynamic_fp16),
    "accum_clone_elision": ("a clone of a float conv output", _accum_clone),
    "view_as_reshape": ("a reshape", _view_as_reshape),
}


def _golden_text(fusion: Fusion) -> str:
    what, build = NEAR_MISSES[fusion.name]
    b, node = build()
    b.module()  # the graph as the fusion would see it (with its output)
    mismatch = explain(fusion.matcher, node)
    assert mismatch is not None, f"{fusion.name} matches its near miss ({what})"
    return (
        f"# {fusion.name}: description\n{fusion.describe()}\n\n"
        f"# near miss: {what}; explain at {node.name}\n{mismatch}\n"
    )


def test_every_catalog_fusion_has_a_near_miss() -> None:
    assert sorted(NEAR_MISSES) == sorted(f.name for f in DEFAULT_FUSIONS)


@pytest.mark.parametrize("fusion", DEFAULT_FUSIONS, ids=lambda f: f.name)
def test_description_and_near_miss_explanation(fusion: Fusion) -> None:
    text = _golden_text(fusion)
    path = GOLDEN / f"{fusion.name}.txt"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("fusion", DEFAULT_FUSIONS, ids=lambda f: f.name)
def test_description_is_short_and_names_each_shared_part_once(fusion: Fusion) -> None:
    text = fusion.describe()
    assert len(text.encode()) < 8_000
    _, _, definitions = text.partition("\nwith\n")
    names = [line.split(" = ", 1)[0].strip() for line in definitions.splitlines()]
    assert len(names) == len(set(names))  # each part defined once
    for name in names:  # ... and used more than once (else it is printed in place)
        assert text.count(name) >= 3, name


# --------------------------------------------------------------------------------------------
# What a fusion derives from its pattern
# --------------------------------------------------------------------------------------------

X = Var("x", fx.Node)


def _keep(m: Match, rw: Rewriter) -> fx.Node:
    return m.root


def test_a_fusion_derives_its_doc_unless_given_one() -> None:
    relu = Fusion("relu", "demo", call(aten.relu.default, X), _keep)
    assert relu.doc == "aten.relu.default(x)"
    assert Fusion("relu", "demo", relu.pattern, _keep, doc="relu => relu").doc == "relu => relu"
    qlinear = next(f for f in DEFAULT_FUSIONS if f.name == "qlinear")
    long = Fusion("long", "demo", qlinear.pattern, _keep)
    assert len(long.doc) == DOC_WIDTH and long.doc.endswith("...") and "\n" not in long.doc
    assert long.describe() == qlinear.pattern.describe()


def test_a_fusion_compiles_its_pattern_when_made_and_lowers_through_it() -> None:
    with pytest.raises(PatternError, match="both inside and outside a list_of"):
        Fusion("bad", "demo", call(aten.cat.default, list_of(X), X), _keep)
    b = GraphBuilder()
    relu = b.op(aten.relu.default, b.input("x"))
    b.op(aten.neg.default, b.op(aten.neg.default, relu))
    gm = b.module()
    fusion = Fusion("relu", "demo", call(aten.relu.default, X), _keep)
    _, report = lower_with_report(gm, (torch.zeros(2, 3),), fusions=[fusion])
    assert report.fired == {"relu": 1}
    # The lowering matches with the fusion's matcher (compiled once), not its pattern anew.
    object.__setattr__(fusion, "matcher", Matcher(call(aten.neg.default, X)))
    _, report = lower_with_report(gm, (torch.zeros(2, 3),), fusions=[fusion])
    assert report.fired == {"relu": 2}  # the two negs
