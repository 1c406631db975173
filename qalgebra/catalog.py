"""Adding fusions of yours to the catalog, each where it belongs in the priority order.

The catalog's rule (:data:`qalgebra.fusions.DEFAULT_FUSIONS`): a larger pattern is tried before
one it contains, else the smaller one would take its nodes first. :func:`with_fusions` places a
new fusion by that rule, computed: it goes before every fusion whose match its match contains,
and after every fusion whose match contains its match. What "contains" means is observed on
*witness* graphs (:func:`contains`): graphs where the fusions match, by default examples of every
registered test family (:func:`qalgebra.testing.families.witnesses`). Or say where it goes:
``before="qconv"`` / ``after="qlinear"``.

>>> import torch
>>> from torch import fx
>>> from qalgebra import Var, call
>>> from qalgebra.fusions import DEFAULT_FUSIONS
>>> x = Var("x", fx.Node)
>>> mine = Fusion("my_sigmoid", "mine", call(torch.ops.aten.sigmoid.default, x),
...               lambda m, rw: m.root)
>>> catalog = with_fusions(DEFAULT_FUSIONS, [mine], before="qconv")
>>> [f.name for f in catalog].index("my_sigmoid") == [f.name for f in catalog].index("qconv") - 1
True

:func:`load` reads fusions from a user's file or module (``path/to/mine.py:NAME`` or
``package.module:NAME``), as ``qalgebra lower|explain|fuzz|catalog --fusions`` do.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from qalgebra.errors import CatalogError
from qalgebra.fusion import Fusion

__all__ = ["PREPARING", "Placed", "contains", "load", "placement", "with_fusions"]


#: Catalog fusions that rewrite the graph so that larger patterns match it (they run first by
#: design, before the patterns that contain them): eval dropouts and in-place ops made
#: functional, shared dequants promoted (one per reader), quantizes lifted above views, pools
#: and cats so that they meet the conv or linear producing their input.
PREPARING = frozenset(
    {
        "eval_dropout",
        "functionalize",
        "dequant_promotion",
        "quant_lift_up",
        "quant_share_max_pool",
        "quant_lift_up_max_pool",
        "quant_lift_up_cat",
    }
)


@dataclass(frozen=True, slots=True)
class Placed:
    """A fusion and where it goes: right ``before`` or ``after`` the named fusion (at most one;
    neither: computed from containment). What a user's file may export for ``--fusions``."""

    fusion: Fusion
    before: str | None = None
    after: str | None = None

    def __post_init__(self) -> None:
        if self.before is not None and self.after is not None:
            raise CatalogError(f"{self.fusion.name}: give before= or after=, not both")


def _graph(g: fx.Graph | fx.GraphModule) -> fx.Graph:
    return g.graph if isinstance(g, fx.GraphModule) else g


def contains(outer: Fusion, inner: Fusion, witnesses: Iterable[fx.Graph | fx.GraphModule]) -> bool:
    """On some witness graph, a match of ``outer`` holds a match of ``inner`` that covers fewer
    of its nodes (so ``inner`` tried first would take them): ``outer`` goes first.

    A fusion that prepares the graph for others (:data:`PREPARING`, or one that keeps its inner
    nodes, ``exclusive=False``) takes nothing from a larger match: no fusion contains it.
    """
    if not inner.exclusive or inner.name in PREPARING:
        return False
    for g in witnesses:
        for big in outer.matcher.find_matches(_graph(g), exclusive=outer.exclusive):
            nodes = set(big.nodes)
            for node in big.nodes:
                for small in inner.matcher.iter_matches(node):
                    if set(small.nodes) < nodes:
                        return True
    return False


def placement(
    base: Sequence[Fusion], fusion: Fusion, witnesses: Sequence[fx.Graph | fx.GraphModule]
) -> int:
    """Where ``fusion`` goes in ``base`` by containment: before the first fusion it contains,
    else after the last one that contains it, else at the end. A pair where each contains the
    other is left to the rest.

    Raises :class:`~qalgebra.errors.CatalogError` when the two disagree (it contains a fusion
    that comes before one containing it): say where it goes with ``before=``/``after=``.
    """
    outer = [contains(f, fusion, witnesses) for f in base]
    inner = [contains(fusion, f, witnesses) for f in base]
    # each way round (alike patterns, or one holding a smaller instance of itself): undecided
    after = [i for i in range(len(base)) if outer[i] and not inner[i]]
    before = [i for i in range(len(base)) if inner[i] and not outer[i]]
    if after and before and max(after) >= min(before):
        raise CatalogError(
            f"{fusion.name} contains {base[min(before)].name} but is contained in "
            f"{base[max(after)].name}, which comes after it: place it with before= or after="
        )
    if before:
        return min(before)
    return max(after) + 1 if after else len(base)


def with_fusions(
    base: Sequence[Fusion],
    extra: Iterable[Fusion | Placed],
    *,
    before: str | None = None,
    after: str | None = None,
    witnesses: Iterable[fx.Graph | fx.GraphModule] | None = None,
) -> tuple[Fusion, ...]:
    """``base`` with each of ``extra`` inserted where it belongs, one after the other.

    ``before``/``after`` name a fusion of ``base`` that every fusion of ``extra`` not
    :class:`Placed` goes right before/after (in order); without either, its place is computed
    by :func:`placement` on ``witnesses`` (default: examples of every registered test family,
    :func:`qalgebra.testing.families.witnesses`, drawn once per process).
    """
    if before is not None and after is not None:
        raise CatalogError("with_fusions: give before= or after=, not both")
    catalog = list(base)
    corpus: list[fx.Graph | fx.GraphModule] | None = None if witnesses is None else list(witnesses)
    anchor_after = after
    for item in extra:
        placed = item if isinstance(item, Placed) else Placed(item, before, anchor_after)
        if not isinstance(placed.fusion, Fusion):
            raise CatalogError(f"with_fusions: expected a Fusion, got {type(item).__name__}")
        names = [f.name for f in catalog]
        if placed.fusion.name in names:
            raise CatalogError(f"with_fusions: a fusion named {placed.fusion.name!r} is there")
        if placed.before is not None or placed.after is not None:
            name = placed.before if placed.before is not None else placed.after
            if name not in names:
                raise CatalogError(f"with_fusions: no fusion named {name!r}; known: {names}")
            at = names.index(name) + (placed.after is not None)
        else:
            if corpus is None:
                from qalgebra.testing.families import witnesses as default_witnesses

                corpus = list(default_witnesses())
            at = placement(catalog, placed.fusion, corpus)
        catalog.insert(at, placed.fusion)
        if placed is not item and after is not None:
            anchor_after = placed.fusion.name  # the next one after this one: the given order
    return tuple(catalog)


def load(spec: str) -> list[object]:
    """The objects ``spec`` names: ``FILE.py:NAME[,NAME...]`` or ``MODULE:NAME[,NAME...]``.

    A file is imported as a module of its own (its directory is not put on ``sys.path``).
    Raises :class:`~qalgebra.errors.CatalogError` naming what is missing.
    """
    source, sep, names = spec.rpartition(":")
    if not sep or not source or not names:
        raise CatalogError(f"--fusions {spec!r}: expected FILE_OR_MODULE:NAME[,NAME...]")
    module = _import(source)
    found: list[object] = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if not hasattr(module, name):
            public = [n for n in vars(module) if not n.startswith("_")]
            raise CatalogError(f"{source} defines no {name!r}; it defines: {', '.join(public)}")
        found.append(getattr(module, name))
    return found


def _import(source: str) -> object:
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        if not path.is_file():
            raise CatalogError(f"{source}: no such file")
        module_name = f"qalgebra_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise CatalogError(f"{source}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise CatalogError(
                f"{source}: importing it failed: {type(exc).__name__}: {exc}"
            ) from exc
        return module
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise CatalogError(f"{source}: no such file or module ({exc})") from exc
