"""This checkout side by side with another revision: lowering, matching and fuzzing, one process.

    python bench/bench_against.py main                    # lowering + matcher
    python bench/bench_against.py main --fuzz 150         # and fuzz throughput (150 examples)
    python bench/bench_against.py HEAD~3 --quick          # smaller models and graphs

REF's ``qalgebra`` package is exported with ``git archive`` to a temporary directory as
``qalgebra_ref`` (its imports rewritten), so both versions run in this process, taking turns on
the same inputs: load from other processes hits both alike, and the ratio (this checkout's time
over REF's; below 1 is faster) is what to read, not the absolute figures. Times are CPU time of
this process (``time.process_time``, torch on one thread): best of ``--repeat`` for the matcher,
median for lowering and fuzzing.

- lowering: ``lower`` of the bench models (``bench_lowering.py``'s ResNet-style and FFN stacks,
  quantized once with torchao); the two lowered graphs must be the same code;
- matcher: ``bench_matcher.py``'s ``find_matches`` of the quantize/dequantize patterns on a large
  graph, and the nested optionals that cannot match;
- fuzz: one-worker campaigns with the same seed (``qalgebra.fuzz.run_campaign``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_matcher  # noqa: E402
import torch  # noqa: E402
from torch import fx  # noqa: E402

from qalgebra.measure import quiet_third_party  # noqa: E402
from qalgebra.testing.models import ffn_stack, resnet_like  # noqa: E402
from qalgebra.testing.quantize import quantize_pt2e  # noqa: E402

_SUBMODULE = re.compile(r"\bqalgebra\.(?=[a-z_])")  # qalgebra.match, "qalgebra.testing.x"
_FROM_PACKAGE = re.compile(r"^from qalgebra import", re.M)
_PACKAGE = re.compile(r"^(\s*)import qalgebra$", re.M)


def export_ref(ref: str, into: Path) -> None:
    """REF's qalgebra package as ``into/qalgebra_ref``, importing itself under that name."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "qalgebra"],
        check=True,
        capture_output=True,
    ).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    package = into / "qalgebra"
    for path in package.rglob("*.py"):
        text = path.read_text()
        text = _SUBMODULE.sub("qalgebra_ref.", text)
        text = _FROM_PACKAGE.sub("from qalgebra_ref import", text)
        text = _PACKAGE.sub(r"\1import qalgebra_ref as qalgebra", text)
        path.write_text(text)
    package.rename(into / "qalgebra_ref")


def cpu(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.process_time()
    fn(*args, **kwargs)
    return time.process_time() - start


def row(name: str, ref: float, ours: float, note: str = "") -> float:
    print(f"| {name} | {ref * 1e3:.1f} | {ours * 1e3:.1f} | {ours / ref:.2f} | {note} |")
    return ours / ref


def _code(gm: fx.GraphModule) -> str:
    return re.sub(r"_qalgebra_(\w+?)_\d+", r"_qalgebra_\1_N", gm.code)


def bench_lowering(ref: dict[str, ModuleType], quick: bool, repeat: int) -> list[float]:
    import qalgebra.lower

    sizes = (2, 8) if quick else (2, 8, 32)
    models = {f"resnet_like({n})": resnet_like(n) for n in sizes}
    models |= {f"ffn_stack({n},3d)": ffn_stack(n) for n in sizes}
    models |= {f"ffn_stack({n},2d)": ffn_stack(n, three_d=False) for n in sizes}
    ratios = []
    for name, factory in models.items():
        module, inputs = factory()
        gm = quantize_pt2e(module, inputs)
        lowerings: list[Callable[..., Any]] = [ref["lower"].lower, qalgebra.lower.lower]
        same = _code(lowerings[0](gm, inputs)) == _code(lowerings[1](gm, inputs))
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(repeat):
            for side in (0, 1) if i % 2 else (1, 0):  # who goes first alternates
                times[side].append(cpu(lowerings[side], gm, inputs))
        note = "same graph" if same else "**graphs differ**"
        ratios.append(row(f"lower {name}", *map(statistics.median, times), note))
    return ratios


def bench_matching(ref: dict[str, ModuleType], quick: bool, repeat: int) -> list[float]:
    import qalgebra.combinators
    import qalgebra.match

    ref_pattern, ref_comb, ref_match = ref["pattern"], ref["combinators"], ref["match"]
    graph, _ = bench_matcher.large_graph(2500 if quick else 10000)
    gc.collect()
    gc.freeze()  # the graph is long-lived: its collections are no matcher time
    ref_x = ref_pattern.Var("x", fx.Node)
    ratios = []
    ours_comb = qalgebra.combinators
    for kind in ("quantize_per_tensor", "dequantize_per_tensor"):
        theirs = getattr(ref_comb, kind)(ref_x, ref_comb.qparams("x"))
        ours = getattr(ours_comb, kind)(bench_matcher.X, ours_comb.qparams("x"))
        best = (
            min(cpu(ref_match.find_matches, theirs, graph) for _ in range(repeat)),
            min(cpu(qalgebra.match.find_matches, ours, graph) for _ in range(repeat)),
        )
        ratios.append(row(f"find_matches {kind} ({len(graph.nodes)} nodes)", *best))
    k = 20
    root = fx.Graph().placeholder("x")
    for i in range(k // 2):
        root = root.graph.call_function(torch.ops.aten.mul.Tensor, (root, float(i + 2)))
    chains = []
    for mod in (ref_pattern, sys.modules["qalgebra.pattern"]):
        p = mod.call(torch.ops.aten.relu.default, mod.Var("x", fx.Node))
        for i in range(k):
            v = mod.Var(f"c{i}", float)
            p = mod.optional(mod.call(torch.ops.aten.mul.Tensor, p, v), defaults={v: 1.0})
        chains.append(p)
    best = (
        min(cpu(ref_match.match_node, chains[0], root) for _ in range(repeat)),
        min(cpu(qalgebra.match.match_node, chains[1], root) for _ in range(repeat)),
    )
    ratios.append(row(f"{k} nested optionals that cannot match", *best))
    gc.unfreeze()
    return ratios


def bench_fuzz(ref: dict[str, ModuleType], examples: int, repeat: int) -> list[float]:
    import qalgebra.fuzz

    campaigns: list[Callable[..., Any]] = [ref["fuzz"].run_campaign, qalgebra.fuzz.run_campaign]
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeat):
        for side in (0, 1) if i % 2 else (1, 0):
            with tempfile.TemporaryDirectory() as out:
                seed, run = 100 + i, campaigns[side]
                spent = cpu(run, examples, None, seed, None, Path(out), workers=1, quiet=True)
                times[side].append(spent)
    return [row(f"fuzz {examples} examples (one worker)", *map(statistics.median, times))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the revision to compare with (e.g. main)")
    parser.add_argument("--quick", action="store_true", help="smaller models and graphs")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--fuzz", type=int, default=0, help="examples per fuzz campaign (0: none)")
    parser.add_argument("--no-lowering", action="store_true", help="matcher (and fuzz) only")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        export_ref(args.ref, Path(tmp))
        sys.path.insert(0, tmp)
        ref = {
            name: importlib.import_module(f"qalgebra_ref.{name}")
            for name in ("pattern", "combinators", "match", "lower", "fuzz")
        }
        print(f"CPU ms of {args.ref} and of this checkout, side by side\n")
        print(f"| workload | {args.ref} | this checkout | ratio | |")
        print("| --- | ---: | ---: | ---: | --- |")
        ratios = bench_matching(ref, args.quick, args.repeat)
        if not args.no_lowering:
            ratios += bench_lowering(ref, args.quick, args.repeat)
        if args.fuzz:
            ratios += bench_fuzz(ref, args.fuzz, max(3, args.repeat // 2))
        print(f"\ngeometric mean of the ratios: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
