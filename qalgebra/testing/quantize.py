"""Run torchao's PT2E flow (X86InductorQuantizer) on a model, fast and deterministically.

The graphs qalgebra lowers come from this flow, so tests and demos need it in one call:
``export -> prepare_pt2e -> calibrate -> convert_pt2e``. Variants give the other graph shapes the
catalog must accept:

- ``dynamic_batch=True`` exports with a symbolic batch dimension (``torch.export.Dim``): shapes
  in ``node.meta["val"]`` carry a ``SymInt`` and reshapes take ``sym_size`` nodes.
- ``bf16=True`` gives the int8-mixed-bf16 form: the converted module is re-exported inside
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` and the autocast region is inlined
  (``run_decompositions({})``), which puts ``aten._to_copy(dtype=torch.bfloat16)`` after every
  dequantize (activation and weight) and on every bias, runs conv/linear in bf16 and feeds the
  bf16 result straight into the next ``quantize_per_tensor`` (torch 2.13 inserts no explicit
  conversion back to fp32: the quantize op upcasts internally). Exporting the converted module
  under an *ambient* autocast context inserts nothing -- export ignores it -- so the wrapper
  module is required. ``forms.with_fp32_before_quant`` adds the explicit fp32 conversion the
  older Inductor patterns were written for.
- ``reduce_range`` (default: on when ``qalgebra.isa.int8_pairs_saturate()``, i.e. the CPU has
  no VNNI/AMX int8 dot product) limits activations to 7 bits (``quant_max=127``). Without
  VNNI, oneDNN's int8 kernels add ``u8 * s8`` pairs in saturating int16 and give results tens
  of percent off the reference (measured in ``docs/onednn_ops.md``); with 7-bit activations
  they agree to float rounding on every CPU. Tests pass it explicitly (both ranges), so the
  graphs they check do not depend on the CPU they run on.
- ``dynamic=True``: ``get_default_x86_inductor_quantization_config(is_dynamic=True)``: each
  activation is quantized with qparams ``choose_qparams`` computes while the graph runs
  (``.tensor`` quantize/dequantize reading runtime scale and zero point).
- ``weight_per_tensor=True``: the weight observer is per tensor (symmetric int8, one scale per
  weight: ``dequantize_per_tensor`` of an int8 constant) instead of per output channel.
- ``act_dtype=torch.int8``: activations quantized to signed int8 (``[-128, 127]``, or
  ``[-64, 63]`` with ``reduce_range``) instead of uint8.

``torchao_lower`` wraps torchao's own lowering for differential tests.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from qalgebra.isa import int8_pairs_saturate

__all__ = [
    "quantization_config",
    "quantize_pt2e",
    "torchao_lower",
]


def _calibration_batches(
    example_inputs: tuple[torch.Tensor, ...], n: int
) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs, then ``n - 1`` deterministic perturbations of them (seeded)."""
    gen = torch.Generator().manual_seed(0)
    batches = [example_inputs]
    for _ in range(max(n, 1) - 1):
        batch = tuple(
            x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            if x.is_floating_point()
            else x
            for x in example_inputs
        )
        batches.append(batch)
    return batches


def _batch_dynamic_shapes(
    example_inputs: tuple[torch.Tensor, ...],
) -> tuple[dict[int, object], ...]:
    """One shared symbolic ``batch`` Dim on dimension 0 of every input."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in example_inputs)


class _Autocast(nn.Module):
    """Runs the wrapped module under CPU bf16 autocast, so export records the casts."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args)


def _drop_unused_get_attrs(gm: fx.GraphModule) -> None:
    """Re-export leaves the float weights as dead get_attr nodes; they are noise for matchers."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _to_bf16_form(
    converted: fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[dict[int, object], ...] | None,
) -> fx.GraphModule:
    """Re-export ``converted`` under autocast and inline the autocast region (see module doc)."""
    shapes = None if dynamic_shapes is None else (dynamic_shapes,)
    ep = torch.export.export(
        _Autocast(converted), example_inputs, dynamic_shapes=shapes, strict=False
    )
    gm = ep.run_decompositions({}).module()
    assert isinstance(gm, fx.GraphModule)
    _drop_unused_get_attrs(gm)
    return gm


def quantization_config(
    *,
    is_qat: bool = False,
    dynamic: bool = False,
    reduce_range: bool = False,
    weight_per_tensor: bool = False,
    act_dtype: torch.dtype = torch.uint8,
) -> Any:
    """X86InductorQuantizer's default config, with the variants of :func:`quantize_pt2e`.

    Returns torchao's ``QuantizationConfig`` (untyped: torchao ships no type information).
    """
    from torchao.quantization.pt2e import (
        FusedMovingAvgObsFakeQuantize,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(
        is_qat=is_qat, is_dynamic=dynamic, reduce_range=reduce_range
    )
    if act_dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"act_dtype must be torch.uint8 or torch.int8, got {act_dtype}")
    if act_dtype == torch.int8:
        low, high = (-64, 63) if reduce_range else (-128, 127)
        act = dataclasses.replace(
            config.input_activation, dtype=torch.int8, quant_min=low, quant_max=high
        )
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    if weight_per_tensor:
        eps = 2.0**-12
        observer: Any = (
            FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=eps)
            if is_qat
            else MinMaxObserver.with_args(eps=eps)
        )
        weight = dataclasses.replace(
            config.weight,
            qscheme=torch.per_tensor_symmetric,
            ch_axis=None,
            observer_or_fake_quant_ctr=observer,
        )
        config = dataclasses.replace(config, weight=weight)
    return config


def quantize_pt2e(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    is_qat: bool = False,
    dynamic_batch: bool = False,
    calibration_batches: int = 2,
    bf16: bool = False,
    reduce_range: bool | None = None,
    dynamic: bool = False,
    weight_per_tensor: bool = False,
    act_dtype: torch.dtype = torch.uint8,
    quantize_matmul: bool = False,
) -> fx.GraphModule:
    """Quantize ``model`` with torchao's X86InductorQuantizer and return the converted graph.

    The input model is not modified (it is deep-copied first). Calibration runs the example
    inputs and ``calibration_batches - 1`` seeded perturbations of them, so the quantization
    parameters are reproducible. ``reduce_range=None`` picks 7-bit activations where oneDNN's
    int8 products saturate (see the module docstring); pass a bool to force either.
    With ``dynamic_batch`` every input's dimension 0 is one symbolic ``batch`` (size >= 2 in the
    example inputs, or export specialises it). ``dynamic``, ``weight_per_tensor`` and
    ``act_dtype`` choose the config's variant (:func:`quantization_config`). ``quantize_matmul``
    also quantizes the inputs of every ``torch.matmul`` (activation x activation, as in
    attention): the quantizer's ``set_function_type_qconfig(torch.matmul, config)``, which its
    default recipe leaves off.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import (
        convert_pt2e,
        prepare_pt2e,
        prepare_qat_pt2e,
    )
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    inputs = tuple(example_inputs)
    if reduce_range is None:
        reduce_range = int8_pairs_saturate()
    quantizer = xiq.X86InductorQuantizer()
    config = quantization_config(
        is_qat=is_qat,
        dynamic=dynamic,
        reduce_range=reduce_range,
        weight_per_tensor=weight_per_tensor,
        act_dtype=act_dtype,
    )
    quantizer.set_global(config)
    if quantize_matmul:
        quantizer.set_function_type_qconfig(torch.matmul, config)
    model = copy.deepcopy(model)
    model.train(is_qat)
    dynamic_shapes = _batch_dynamic_shapes(inputs) if dynamic_batch else None
    exported = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes).module()
    with torch.no_grad():
        if is_qat:
            prepared = prepare_qat_pt2e(exported, quantizer)
            for batch in _calibration_batches(inputs, calibration_batches):
                prepared(*batch)
            prepared = move_exported_model_to_eval(prepared)
        else:
            prepared = prepare_pt2e(exported, quantizer)
            for batch in _calibration_batches(inputs, calibration_batches):
                prepared(*batch)
        converted = convert_pt2e(prepared)
    assert isinstance(converted, fx.GraphModule)
    if bf16:
        return _to_bf16_form(converted, inputs, dynamic_shapes)
    return converted


def torchao_lower(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """torchao's peer lowering (Inductor freezing passes, no codegen) on a copy of ``gm``.

    ``torchao.quantization.pt2e.lowering.lower_pt2e_quantized_to_x86`` re-exports the module
    (strict, static shapes: a symbolic batch is specialised), decomposes it and runs Inductor's
    quantization fusion passes; the result calls ``onednn.*`` ops eagerly.
    """
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    with torch.no_grad():
        lowered = lower_pt2e_quantized_to_x86(copy.deepcopy(gm), tuple(example_inputs))
    assert isinstance(lowered, fx.GraphModule)
    return lowered
