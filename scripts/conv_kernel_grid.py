"""Which conv geometries oneDNN's int8 conv computes wrongly, per ISA (docs/onednn_ops.md).

    python scripts/conv_kernel_grid.py [--random 600] [--seed 0] [--isas AVX2,AVX512_CORE,...]

Each ISA runs in a child process with ``ONEDNN_MAX_CPU_ISA`` set (``ALL``: the best this CPU
has) and calls ``onednn.qconv_prepack`` + ``onednn.qconv_pointwise`` directly (uint8
activations, per-channel int8 weights, bias, float output), comparing with ``F.conv{1,2,3}d`` of
the dequantized tensors. A conv is *wrong* when ``max |y - ref| > 1e-3 * max(1, max |ref|)``
(float rounding is ~1e-6 of that). Before each call a 4 MB tensor of 1e9 is allocated and freed,
so that a kernel reading memory it did not write shows it.

1. **Grid**: the width geometry (kernel width ``kw``, width stride ``sw``, output width ``ow``,
   the input width following from them) x groups (1, 2, 4) x channels per group (1->1, 1->8,
   4->1, 16->8), for 2-D (height 6, kernel height 2), 3-D (depth 3) and 1-D convs.
2. **Random**: geometries drawn with padding and dilation too, each run in a forked process (a
   crash is counted, not fatal), classified by :mod:`qalgebra.fusions.conv_guard`'s predicates:
   ``single_strided_column`` (A) and ``padding_only_axis`` (B).

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from qalgebra.fusions.conv_guard import padding_only_axis, single_strided_column  # noqa: E402

ISAS = ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "ALL")
CHANNELS = ((1, 1), (1, 8), (4, 1), (16, 8))  # (in, out) channels per group
GROUPS = (1, 2, 4)
WIDTH_AXIS = (1, 2, 3)  # kw, sw, ow each take these values
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Conv:
    """One conv call: input shape, weight shape and geometry (lists per spatial axis)."""

    input_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.input_shape[1] // self.groups, *self.kernel)

    def klass(self) -> str:
        geometry = (self.input_shape, self.weight_shape, self.stride, self.padding, self.dilation)
        a = single_strided_column(*geometry)
        b = padding_only_axis(*geometry) is not None
        return {(True, True): "A and B", (True, False): "A", (False, True): "B"}.get(
            (a, b), "neither"
        )


def is_wrong(conv: Conv, seed: int) -> bool:
    """Run ``conv`` through oneDNN and compare with the float reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, conv.input_shape, generator=g, dtype=torch.int64).to(torch.uint8)
    w = torch.randint(-127, 128, conv.weight_shape, generator=g, dtype=torch.int64).to(torch.int8)
    w_scales = torch.rand(conv.out_channels, generator=g) * 0.01 + 0.002
    bias = torch.randn(conv.out_channels, generator=g)
    x_scale, x_zp = 0.05, 3
    spatial = len(conv.kernel)
    view = (-1,) + (1,) * (spatial + 1)
    ref = _CONV[spatial](
        (x.float() - x_zp) * x_scale,
        w.float() * w_scales.view(view),
        bias,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    onednn = torch.ops.onednn
    packed = onednn.qconv_prepack(w, w_scales, x_scale, x_zp, *geometry, None)
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial)
    qx = x.contiguous(memory_format=layout) if layout is not None else x
    torch.empty(1 << 20).fill_(1e9)  # leave garbage where the kernel's buffers may land
    y = onednn.qconv_pointwise(
        qx, x_scale, x_zp, packed, w_scales, torch.zeros(conv.out_channels, dtype=torch.int64),
        bias, *geometry, 1.0, 0, torch.float32, "none", [], None,
    )  # fmt: skip
    limit = 1e-3 * max(1.0, float(ref.abs().max()))
    return float((y - ref).abs().max()) > limit


def grid_convs() -> list[tuple[tuple[int, int, int, int], tuple[int, int, int], Conv]]:
    """((rank, kw, sw, ow), (groups, in/g, out/g), conv) for the grid."""
    out = []
    for rank, kw, sw, ow, groups, (icg, ocg) in itertools.product(
        (2, 3, 1), WIDTH_AXIS, WIDTH_AXIS, WIDTH_AXIS, GROUPS, CHANNELS
    ):
        width = (ow - 1) * sw + kw
        lead = {1: (), 2: (6,), 3: (3, 6)}[rank]
        lead_kernel = (2,) * (rank - 1)
        conv = Conv(
            (1, icg * groups, *lead, width),
            ocg * groups,
            (*lead_kernel, kw),
            (*(1,) * (rank - 1), sw),
            (0,) * rank,
            (1,) * rank,
            groups,
        )
        out.append(((rank, kw, sw, ow), (groups, icg, ocg), conv))
    return out


def random_convs(n: int, seed: int) -> list[Conv]:
    r = random.Random(seed)
    out: list[Conv] = []
    while len(out) < n:
        groups = r.choice([1, 1, 2, 2, 3, 4, 8])
        icg, ocg = r.choice([1, 2, 3, 4, 8, 16]), r.choice([1, 2, 3, 4, 8, 16])
        kernel = (r.randint(1, 3), r.randint(1, 3))
        stride = (r.randint(1, 3), r.randint(1, 3))
        padding = (r.choice([0, 0, 1, 2]), r.choice([0, 0, 1, 2]))
        dilation = (r.choice([1, 1, 2, 3]), r.choice([1, 1, 2, 3]))
        small = r.random() < 0.3
        size = (r.randint(1, 3), r.randint(1, 3)) if small else (r.randint(1, 12), r.randint(1, 8))
        if any(
            (n_ + 2 * p - d * (k - 1) - 1) // s + 1 < 1
            for n_, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
        ):
            continue
        batch = r.choice([1, 1, 2])
        shape = (batch, icg * groups, *size)
        out.append(Conv(shape, ocg * groups, kernel, stride, padding, dilation, groups))
    return out


def _forked(conv: Conv, seed: int) -> str:
    """``"wrong"``, ``"right"`` or ``"crash"``: ``is_wrong`` in a forked process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one answer, then leave without cleanup
        os.close(read)
        try:
            answer = b"wrong" if is_wrong(conv, seed) else b"right"
        except RuntimeError:
            answer = b"error"
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    data = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    return data.decode() or "crash"


@dataclass(frozen=True)
class GridRow:
    rank: int
    kw: int
    sw: int
    ow: int
    groups: int
    icg: int
    ocg: int
    wrong: bool


@dataclass
class IsaResult:
    """What one ISA's child found."""

    grid: list[GridRow]
    random: Counter[tuple[str, str]]  # (class, outcome) -> count


def child(n_random: int, seed: int) -> None:
    """One ISA: the grid and the random geometries; prints one JSON line."""
    torch.set_num_threads(1)
    grid = [
        GridRow(*key, *channels, is_wrong(conv, i))
        for i, (key, channels, conv) in enumerate(grid_convs())
    ]
    randoms = Counter[tuple[str, str]]()
    for i, conv in enumerate(random_convs(n_random, seed)):
        randoms[conv.klass(), _forked(conv, seed + i)] += 1
    out = {
        "grid": [asdict(row) for row in grid],
        "random": [[k, v, c] for (k, v), c in randoms.items()],
    }
    print(json.dumps(out))


def run_isa(isa: str, n_random: int, seed: int) -> IsaResult:
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "ALL":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, __file__, "--child", "--random", str(n_random), "--seed", str(seed)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    randoms = Counter({(str(k), str(v)): int(c) for k, v, c in data["random"]})
    return IsaResult([GridRow(**row) for row in data["grid"]], randoms)


def _width_class(row: GridRow) -> str:
    if row.ow == 1 and row.kw > 1 and row.sw > 1:
        return "ow = 1, kw > 1, sw > 1"
    return "ow = 1, kw = 1 or sw = 1" if row.ow == 1 else "ow >= 2"


def _count(rows: Sequence[GridRow]) -> str:
    return f"{sum(r.wrong for r in rows)}/{len(rows)}"


def tables(results: dict[str, IsaResult]) -> list[str]:
    """The markdown tables: grid by class, 2-D detail, channels, random by class."""
    isas = list(results)
    head = " | ".join(isas) + " |"
    rule = "--:|" * len(isas)
    lines = ["Grid, wrong / run, per ISA (`ONEDNN_MAX_CPU_ISA`):", ""]
    lines += ["| rank | width geometry | " + head, "|--:|---|" + rule]
    for rank in (2, 3, 1):
        for klass in ("ow = 1, kw > 1, sw > 1", "ow = 1, kw = 1 or sw = 1", "ow >= 2"):
            cells = [
                _count([r for r in results[i].grid if r.rank == rank and _width_class(r) == klass])
                for i in isas
            ]
            lines.append(f"| {rank}-D | {klass} | " + " | ".join(cells) + " |")
    per = len(GROUPS) * len(CHANNELS)
    lines += ["", f"2-D, output width 1, by kernel width and width stride ({per} convs each):", ""]
    lines += ["| kw | sw | " + head, "|--:|--:|" + rule]
    for kw, sw in itertools.product(WIDTH_AXIS, WIDTH_AXIS):
        cells = [
            _count([r for r in results[i].grid if (r.rank, r.kw, r.sw, r.ow) == (2, kw, sw, 1)])
            for i in isas
        ]
        lines.append(f"| {kw} | {sw} | " + " | ".join(cells) + " |")
    lines += ["", "2-D, ow = 1, kw > 1, sw > 1, by groups and channels per group:", ""]
    lines += ["| groups | in -> out per group | " + head, "|--:|---|" + rule]
    for groups, (icg, ocg) in itertools.product(GROUPS, CHANNELS):
        cells = [
            _count(
                [
                    r
                    for r in results[i].grid
                    if r.rank == 2
                    and _width_class(r) == "ow = 1, kw > 1, sw > 1"
                    and (r.groups, r.icg, r.ocg) == (groups, icg, ocg)
                ]
            )
            for i in isas
        ]
        lines.append(f"| {groups} | {icg} -> {ocg} | " + " | ".join(cells) + " |")
    lines += ["", "Random 2-D geometries by class (A: one strided column, B: outputs reading only"]
    lines += ["padding), wrong + crashed / run:", ""]
    lines += ["| class | " + head, "|---|" + rule]
    for klass in ("A", "B", "A and B", "neither"):
        cells = []
        for i in isas:
            c = results[i].random
            total = sum(n for (k, _), n in c.items() if k == klass)
            cells.append(f"{c[klass, 'wrong']} + {c[klass, 'crash']} / {total}")
        lines.append(f"| {klass} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", type=int, default=600, help="random geometries per ISA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isas", default=",".join(ISAS), help="ONEDNN_MAX_CPU_ISA values")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.random, args.seed)
        return 0
    results = {isa: run_isa(isa, args.random, args.seed) for isa in args.isas.split(",")}
    print(f"python scripts/conv_kernel_grid.py --random {args.random} --seed {args.seed}\n")
    print("\n".join(tables(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
