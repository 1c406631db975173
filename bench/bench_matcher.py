"""Matcher timings: nested optional nodes, and find_matches on large graphs.

    python bench/bench_matcher.py            # k = 5, 10, 20, 40; graphs of ~2.5k .. 20k nodes
    python bench/bench_matcher.py --quick    # smaller sizes

1. k nested optional nodes (a chain of k optional ``clamp(_, i, max_i)`` told apart by their
   constant, and a chain of k identical optional ``mul(_, c_i)`` around a ``relu``): pattern
   build time, match time on a graph with every other level present, and match time on a graph
   where the chain cannot match (every split of the muls between the optionals is a candidate:
   a naive backtracking search costs 2^k there).
2. ``find_matches`` of the per-tensor quantize and dequantize patterns (every form) on graphs of
   repeated quant -> dequant -> relu blocks in mixed forms, sizes doubling: time, time per node
   and the ratio to the previous size, side by side (linear scaling: ratios near 2).
3. Compiling: ``Matcher(pattern)`` per catalog fusion, and what a call costs on the smallest
   graph (the dequantize pattern on one block) through a held ``Matcher``, with a pattern
   already compiled (kept while it lives), and with a new equal pattern each call (compiled per
   call: a throwaway pattern) -- as ratios to the held matcher, measured side by side.

Graphs are built directly with ``torch.fx`` (no meta values; decomposed dequants read their input
dtype from the quantize's conversion). The built graph is frozen out of the garbage collector
before timing so that collections of it do not show up as matcher time. Times are CPU times
(best of 5).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
from torch import fx

from qalgebra import Pattern, Var, call, optional
from qalgebra.combinators import dequantize_per_tensor, quantize_per_tensor
from qalgebra.fusions import DEFAULT_FUSIONS
from qalgebra.match import Matcher, find_matches, match_node
from qalgebra.pattern import walk
from qalgebra.qparams import qparams

aten = torch.ops.aten
prims = torch.ops.prims
qd = torch.ops.quantized_decomposed

X = Var("x", fx.Node)


def _best(fn: Callable[..., object], *args: object, repeat: int = 5) -> float:
    """The best of ``repeat`` runs, in CPU seconds of this process (the matcher is single-
    threaded Python: CPU time is what it costs, and other load on the machine does not show)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - start)
    return best


def _op(g: fx.Graph, target: object, *args: object) -> fx.Node:
    return g.call_function(target, args)  # type: ignore[arg-type]  # fx's Argument union


# --------------------------------------------------------------------------------------------
# 1. Nested optionals
# --------------------------------------------------------------------------------------------


def clamp_chain(k: int) -> Pattern:
    p: Pattern = X
    for i in range(k):
        v = Var(f"max{i}", float)
        p = optional(call(aten.clamp.default, p, float(i), v), defaults={v: -1.0})
    return call(aten.relu.default, p)


def mul_chain(k: int) -> Pattern:
    p: Pattern = call(aten.relu.default, X)
    for i in range(k):
        v = Var(f"c{i}", float)
        p = optional(call(aten.mul.Tensor, p, v), defaults={v: 1.0})
    return p


def _build_both(k: int) -> None:
    clamp_chain(k)
    mul_chain(k)


def _match_both(p: Pattern, node: fx.Node, q: Pattern, other: fx.Node) -> None:
    match_node(p, node)
    match_node(q, other)


def bench_optionals(ks: list[int]) -> None:
    print("k nested optionals   build      match (half present)   match (cannot match)")
    for k in ks:
        build = _best(_build_both, k)
        clamps, muls = clamp_chain(k), mul_chain(k)

        g = fx.Graph()
        node = g.placeholder("x")
        for i in range(0, k, 2):
            node = _op(g, aten.clamp.default, node, float(i), 100.0 + i)
        clamp_root = _op(g, aten.relu.default, node)
        assert match_node(clamps, clamp_root) is not None

        g2 = fx.Graph()
        node = _op(g2, aten.relu.default, g2.placeholder("x"))
        for i in range(k // 2):
            node = _op(g2, aten.mul.Tensor, node, float(i + 2))
        ok_root = node
        g3 = fx.Graph()
        node = g3.placeholder("x")  # no relu at the bottom: no split can match
        for i in range(k // 2):
            node = _op(g3, aten.mul.Tensor, node, float(i + 2))
        bad_root = node
        assert match_node(muls, ok_root) is not None
        assert match_node(muls, bad_root) is None

        hit = _best(_match_both, clamps, clamp_root, muls, ok_root)
        miss = _best(match_node, muls, bad_root)
        print(
            f"k = {k:3d}            {build * 1e3:7.2f} ms  {hit * 1e3:10.3f} ms"
            f"          {miss * 1e3:10.3f} ms"
        )


# --------------------------------------------------------------------------------------------
# 2. find_matches on large graphs
# --------------------------------------------------------------------------------------------

QUANT_FORMS = ("op_default", "decomposed", "decomposed_clamp", "op_default_zp0")
DEQUANT_FORMS = ("op_default", "decomposed", "decomposed_zp0")


def _quant(g: fx.Graph, x: fx.Node, form: str) -> fx.Node:
    scale, zp = 0.0234375, (0 if form.endswith("zp0") else 84)
    if form.startswith("op_default"):
        return _op(g, qd.quantize_per_tensor.default, x, scale, zp, 0, 255, torch.uint8)
    y = _op(g, aten.round.default, _op(g, aten.mul.Tensor, x, 1.0 / scale))
    y = _op(g, aten.add.Tensor, y, zp)
    if form == "decomposed_clamp":
        y = _op(g, aten.clamp.default, y, 0, 255)
    else:
        y = _op(g, aten.clamp_max.default, _op(g, aten.clamp_min.default, y, 0), 255)
    return _op(g, prims.convert_element_type.default, y, torch.uint8)


def _dequant(g: fx.Graph, q: fx.Node, form: str) -> fx.Node:
    scale = 0.0234375
    if form == "op_default":
        return _op(g, qd.dequantize_per_tensor.default, q, scale, 84, 0, 255, torch.uint8)
    y = _op(g, prims.convert_element_type.default, q, torch.float32)
    if form != "decomposed_zp0":
        y = _op(g, aten.sub.Tensor, y, 84)
    return _op(g, aten.mul.Tensor, y, scale)


def large_graph(n_nodes: int) -> tuple[fx.Graph, int]:
    """Repeated quant -> dequant -> relu blocks in mixed forms; (graph, number of blocks)."""
    g = fx.Graph()
    x = g.placeholder("x")
    blocks = 0
    while len(g.nodes) < n_nodes:
        q = _quant(g, x, QUANT_FORMS[blocks % len(QUANT_FORMS)])
        d = _dequant(g, q, DEQUANT_FORMS[blocks % len(DEQUANT_FORMS)])
        x = _op(g, aten.relu.default, d)
        blocks += 1
    g.output(x)
    return g, blocks


def bench_find_matches(sizes: list[int]) -> None:
    qp = qparams("x")
    patterns = {"quantize": quantize_per_tensor(X, qp), "dequantize": dequantize_per_tensor(X, qp)}
    print()
    print(
        "find_matches     nodes   blocks   "
        + "   ".join(f"{name:>10s} [ms]  us/node  ratio" for name in patterns)
    )
    previous: dict[str, float] = {}
    for n in sizes:
        g, blocks = large_graph(n)
        gc.collect()
        gc.freeze()  # the graph is long-lived: keep it out of the collector's generations
        row = f"             {len(g.nodes):8d} {blocks:8d}   "
        for name, p in patterns.items():
            found = find_matches(p, g)
            assert len(found) == blocks, (name, len(found), blocks)
            t = _best(find_matches, p, g)
            ratio = f"{t / previous[name]:5.2f}" if name in previous else "    -"
            previous[name] = t
            row += f"   {t * 1e3:13.1f}  {t / len(g.nodes) * 1e6:7.2f}  {ratio}"
        gc.unfreeze()
        print(row)
    print("(ratio: time over the previous size's time; the sizes double, so linear is ~2)")


# --------------------------------------------------------------------------------------------
# 3. Compiling
# --------------------------------------------------------------------------------------------


def bench_compile() -> None:
    print()
    print("compile Matcher(pattern)   distinct sub-patterns   ms")
    for fusion in DEFAULT_FUSIONS:
        t = _best(Matcher, fusion.pattern)
        print(f"  {fusion.name:24s} {len(list(walk(fusion.pattern))):10d}        {t * 1e3:8.2f}")
    g, _ = large_graph(10)
    qp = qparams("x")
    held = Matcher(dequantize_per_tensor(X, qp))
    kept = dequantize_per_tensor(X, qp)

    def with_matcher() -> None:
        for _ in range(100):
            find_matches(held, g)

    def with_kept_pattern() -> None:
        for _ in range(100):
            find_matches(kept, g)

    def with_new_pattern() -> None:
        for _ in range(100):
            find_matches(dequantize_per_tensor(X, qp), g)

    base = _best(with_matcher)
    print(f"find_matches on {len(g.nodes)} nodes, per call: held Matcher {base * 1e4:.1f} us; "
          f"pattern compiled before x{_best(with_kept_pattern) / base:.2f}; "
          f"new pattern each call (built and compiled) x{_best(with_new_pattern) / base:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    ks = [5, 10, 20] if args.quick else [5, 10, 20, 40]
    sizes = [1250, 2500, 5000] if args.quick else [2500, 5000, 10000, 20000]
    bench_optionals(ks)
    bench_find_matches(sizes)
    bench_compile()


if __name__ == "__main__":
    main()
