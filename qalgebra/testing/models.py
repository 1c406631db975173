"""Small eval-mode models that exercise every fusion family of the catalog.

Each factory in :data:`MODELS` returns ``(model, example_inputs)`` built under a fixed seed (the
global RNG is forked, so building a model never perturbs the caller's random stream). Shapes
are tiny: quantizing a model with :func:`qalgebra.testing.quantize.quantize_pt2e` takes well
under a second, so property tests can afford dozens of them.

The registry names say what the quantized graph contains, e.g. ``conv2d_hardswish`` (a conv
whose hardswish output is quantized for a following conv: the int8-output form; the following
conv repeats the post-op with a float output), ``conv_add_conv_rhs_relu``
(``relu(y + conv(x))`` where ``y`` is another conv's quantized output) or ``linear3d_gelu_tanh``.

Every unary model is ``post(op2(q(post(op1(x)))))``: ``op1`` shows the post-op with an int8
output, ``op2`` the same post-op with a float output, because a post-op is only fused with an
int8 output when a quantize follows it, and X86InductorQuantizer puts one there only when a
quantized consumer follows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONV_POST_OPS",
    "LINEAR_POST_OPS",
    "MODELS",
    "ModelFactory",
    "build",
    "ffn_stack",
    "resnet_like",
]

ModelFactory = Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]
"""Builds a fresh, seeded ``(eval-mode model, example inputs)`` pair."""

_POST_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": lambda t: F.hardtanh(t, -1.0, 1.0),
    "hardswish": F.hardswish,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "tanh": torch.tanh,
}

CONV_POST_OPS: tuple[str, ...] = ("none", "relu", "relu6", "hardtanh", "hardswish", "silu")
"""Post-ops of the qconv unary family (relu6 and hardtanh both lower to oneDNN hardtanh)."""

LINEAR_POST_OPS: tuple[str, ...] = (
    "none",
    "relu",
    "gelu",
    "gelu_tanh",
    "leaky_relu",
    "tanh",
    "hardtanh",
    "relu6",
    "hardswish",
    "silu",
)
"""Post-ops of the qlinear unary family: Inductor's set and every other one oneDNN accepts."""


def _seeded(seed: int) -> Callable[[ModelFactory], ModelFactory]:
    """Run a factory under a forked, seeded RNG and put the model in eval mode."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        @functools.wraps(factory)
        def build_seeded() -> tuple[nn.Module, tuple[Tensor, ...]]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, inputs = factory()
            return model.eval(), inputs

        return build_seeded

    return wrap


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvUnary(nn.Module):
    """``post(conv2(post(conv1(x))))``: the post-op with int8 and with float output."""

    def __init__(self, post: str, *, dim: int = 2, bias: bool = True) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        self.conv1 = conv(3, 8, 3, padding=1, bias=bias)
        self.conv2 = conv(8, 8, 3, padding=1, bias=bias)
        self.post = _POST_OPS[post]

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.conv2(self.post(self.conv1(x))))


class ConvAdd(nn.Module):
    """``conv(x) + other`` or ``other + conv(x)``, +- relu, followed by a conv (int8 output).

    ``other`` is another conv's output (``source="conv"``) or the model's second input, which is
    quantized and dequantized (``source="dequant"``). ``float_out`` drops the final conv so the
    add's result leaves the model as float.
    """

    def __init__(self, source: str, *, swap: bool, relu: bool, float_out: bool = False) -> None:
        super().__init__()
        self.source = source
        self.swap = swap
        self.relu = relu
        self.float_out = float_out
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.other = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        other: Tensor = self.other(x) if self.source == "conv" else y
        main: Tensor = self.conv(x)
        out = other + main if self.swap else main + other
        if self.relu:
            out = F.relu(out)
        if self.float_out:
            return out
        head: Tensor = self.head(out)
        return head


class LinearUnary(nn.Module):
    """``post(fc2(post(fc1(x))))`` on 2-D or 3-D input, with or without bias."""

    def __init__(self, post: str, *, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32, bias=bias)
        self.fc2 = nn.Linear(32, 16, bias=bias)
        self.post = _POST_OPS[post]

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.fc2(self.post(self.fc1(x))))


class LinearAdd(nn.Module):
    """``fc1(x) + other`` (either order), +- relu, then ``fc2`` (int8 output of the add).

    ``other`` is the second input (float, never quantized by the quantizer: the qlinear binary
    family's extra input is float) or another linear's output (``source="linear"``).
    """

    def __init__(self, source: str, *, swap: bool, relu: bool) -> None:
        super().__init__()
        self.source = source
        self.swap = swap
        self.relu = relu
        self.fc1 = nn.Linear(16, 16)
        self.other = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        other: Tensor = self.other(x) if self.source == "linear" else y
        main: Tensor = self.fc1(x)
        out = other + main if self.swap else main + other
        if self.relu:
            out = F.relu(out)
        result: Tensor = self.fc2(out)
        return result


class SharedInput(nn.Module):
    """One quantized input feeding two convs (and a linear on 3-D): dequant promotion."""

    def __init__(self, three_d: bool = False) -> None:
        super().__init__()
        self.three_d = three_d
        if three_d:
            self.a: nn.Module = nn.Linear(16, 16)
            self.b: nn.Module = nn.Linear(16, 16)
        else:
            self.a = nn.Conv2d(4, 8, 3, padding=1)
            self.b = nn.Conv2d(4, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.relu(self.a(x)), self.b(x)], dim=-1 if self.three_d else 1)


class InceptionBlock(nn.Module):
    """Branches (1x1 conv, 3x3 conv, maxpool -> 1x1 conv) joined by cat, pooled, flattened.

    No relu before a maxpool or cat: with torchao 0.18, ``conv -> relu -> max_pool2d`` leaves
    the pool in float (its input is the relu, not a dequantize), while ``conv -> max_pool2d``
    and ``cat(conv, conv)`` get the ``dequant -> op -> quant`` shape the quantized pointwise
    family lowers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 1)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        pooled = F.max_pool2d(x, 3, 1, 1)
        y = torch.cat([self.b1(x), self.b2(x), self.b3(pooled)], dim=1)
        y = F.max_pool2d(y, 2)
        logits: Tensor = self.fc(torch.flatten(y, 1))
        return logits


class MaxPoolVariants(nn.Module):
    """``max_pool2d`` spelled with every default-argument combination, between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        pools = [
            F.max_pool2d(y, 2),
            F.max_pool2d(y, 2, 2),
            F.max_pool2d(y, 3, 2, 1),
            F.max_pool2d(y, 2, 2, 0, 1, ceil_mode=True),
        ]
        return torch.cat([head(p) for head, p in zip(self.heads, pools, strict=True)], dim=1)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-relu-conv + identity, relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        residual: Tensor = self.conv2(F.relu(self.conv1(x)))
        return F.relu(residual + x)


class ResNetLike(nn.Module):
    """Stem, ``n_blocks`` basic blocks, global pool, classifier."""

    def __init__(self, n_blocks: int, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.blocks = nn.Sequential(*(BasicBlock(channels) for _ in range(n_blocks)))
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.stem(x)))
        x = self.blocks(x)
        logits: Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits


class FFN(nn.Module):
    """Transformer feed-forward: ``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        update: Tensor = self.fc2(F.gelu(self.fc1(x)))
        return x + update


# ---------------------------------------------------------------------------------------------
# Factories


def resnet_like(n_blocks: int = 2, *, batch: int = 2, size: int = 16) -> ModelFactory:
    """A ResNet-style stack of ``n_blocks`` basic blocks, for demos and benchmarks."""

    @_seeded(100 + n_blocks)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        return ResNetLike(n_blocks), (torch.randn(batch, 3, size, size),)

    return factory


def ffn_stack(n: int = 2, three_d: bool = True, *, batch: int = 2, seq: int = 8) -> ModelFactory:
    """``n`` transformer FFN layers (dim 32, hidden 64); 3-D input ``[batch, seq, 32]`` or 2-D."""

    @_seeded(200 + n)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        model = nn.Sequential(*(FFN(32, 64) for _ in range(n)))
        shape = (batch, seq, 32) if three_d else (batch * seq, 32)
        return model, (torch.randn(*shape),)

    return factory


def _conv_unary(post: str, dim: int = 2, bias: bool = True) -> ModelFactory:
    @_seeded(1)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        shape = (2, 3, 8, 8) if dim == 2 else (2, 3, 16)
        return ConvUnary(post, dim=dim, bias=bias), (torch.randn(*shape),)

    return factory


def _conv_add(source: str, swap: bool, relu: bool, float_out: bool = False) -> ModelFactory:
    @_seeded(2)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        model = ConvAdd(source, swap=swap, relu=relu, float_out=float_out)
        return model, (torch.randn(2, 4, 8, 8), torch.randn(2, 8, 8, 8))

    return factory


def _linear_unary(post: str, three_d: bool, bias: bool = True) -> ModelFactory:
    @_seeded(3)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        shape = (2, 4, 16) if three_d else (4, 16)
        return LinearUnary(post, bias=bias), (torch.randn(*shape),)

    return factory


def _linear_add(source: str, swap: bool, relu: bool, three_d: bool) -> ModelFactory:
    @_seeded(4)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        shape = (2, 4, 16) if three_d else (4, 16)
        return LinearAdd(source, swap=swap, relu=relu), (torch.randn(*shape), torch.randn(*shape))

    return factory


def _simple(module: Callable[[], nn.Module], *shape: int, seed: int = 5) -> ModelFactory:
    @_seeded(seed)
    def factory() -> tuple[nn.Module, tuple[Tensor, ...]]:
        return module(), (torch.randn(*shape),)

    return factory


def _registry() -> dict[str, ModelFactory]:
    models: dict[str, ModelFactory] = {}
    for post in CONV_POST_OPS:
        models[f"conv2d_{post}"] = _conv_unary(post)
    models["conv2d_nobias_relu"] = _conv_unary("relu", bias=False)
    # X86InductorQuantizer (torchao 0.18) does not annotate conv1d: this graph stays float, a
    # model the catalog does not cover (lowering must return it unchanged and runnable).
    models["float_conv1d_relu"] = _conv_unary("relu", dim=1)
    for source in ("conv", "dequant"):
        for order in ("lhs", "rhs"):
            for relu in (False, True):
                name = f"conv_add_{source}_{order}" + ("_relu" if relu else "")
                models[name] = _conv_add(source, order == "rhs", relu)
    models["conv_add_conv_lhs_float_out"] = _conv_add("conv", False, False, float_out=True)
    models["conv_add_conv_rhs_relu_float_out"] = _conv_add("conv", True, True, float_out=True)
    for post in LINEAR_POST_OPS:
        models[f"linear_{post}"] = _linear_unary(post, three_d=False)
    for post in ("none", "relu", "gelu", "gelu_tanh"):
        models[f"linear3d_{post}"] = _linear_unary(post, three_d=True)
    models["linear_nobias"] = _linear_unary("none", three_d=False, bias=False)
    models["linear3d_nobias_relu"] = _linear_unary("relu", three_d=True, bias=False)
    for source in ("input", "linear"):
        for order in ("lhs", "rhs"):
            for relu in (False, True):
                for three_d in (False, True):
                    name = (
                        ("linear3d" if three_d else "linear")
                        + f"_add_{source}_{order}"
                        + ("_relu" if relu else "")
                    )
                    models[name] = _linear_add(source, order == "rhs", relu, three_d)
    models["shared_input_conv"] = _simple(SharedInput, 2, 4, 8, 8)
    models["shared_input_linear3d"] = _simple(lambda: SharedInput(three_d=True), 2, 4, 16)
    models["inception"] = _simple(InceptionBlock, 2, 3, 8, 8, seed=6)
    models["maxpool_variants"] = _simple(MaxPoolVariants, 2, 3, 8, 8, seed=7)
    models["resnet_like_2"] = resnet_like(2)
    models["ffn_stack_2_3d"] = ffn_stack(2, three_d=True)
    models["ffn_stack_2_2d"] = ffn_stack(2, three_d=False)
    return models


MODELS: Mapping[str, ModelFactory] = MappingProxyType(_registry())
"""Every model by name; ``MODELS[name]()`` builds a fresh ``(model, example_inputs)``."""


def build(name: str) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """``MODELS[name]()`` with a message listing the known names on a typo."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return factory()
