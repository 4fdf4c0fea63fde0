"""Op kinds: one record per kind of graph op, the one place a new operator is added.

Each ``OpKind`` says everything the pipeline needs of its kind:

- how torch code writes it (``TorchForm``), for ``graph.trace``;
- its float computation (``run``), shared by the quantised network's training path and the
  exporter's float copy, and, where TFLM's int8 kernel rounds differently from a float op on the
  grid, its integer arithmetic (``integer``), which the quantised network runs at inference;
- whether TFLite runs it with its input's quantisation (``shares_input_scale``);
- the TFLite operator the exporter writes for it and how the cost model prices it (``cost`` class
  and ``cycles``, a key of the board files' ``cycles``).

So a new op is one record here, plus a handler in ``models/onnx_import`` if it comes from ONNX,
plus a fitted formula in the board files if "other" does not price it well enough. The weighted
kinds (conv, depthwise, fully connected) are records too, but their tracing (kind by ``groups``),
weights and layout are the layers' own business in ``graph``, ``quant`` and ``export``.

The input, BatchNorm (folded), ReLU fusion, Dropout and Identity are not traced through here:
they are folds and aliases, not operators of their own.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from smpq_edge.common.errors import UserError
from smpq_edge.network.fixedpoint import ADD_LEFT_SHIFT, INT8_MAX, INT8_MIN, Requantiser, quantize_multiplier

if TYPE_CHECKING:
    from smpq_edge.network.graph import Op
    from smpq_edge.network.quant import ActQuant

# (op, its inputs, their quantisers, its own quantiser) -> the int8 result on the float grid, or
# None where the float path is exact already for this op (e.g. average pooling with padding).
IntegerExecutor = Callable[["Op", list[torch.Tensor], list["ActQuant"], "ActQuant"], "torch.Tensor | None"]


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _no_fields(node: fx.Node, module: nn.Module | None) -> dict:
    return {}


def _always(node: fx.Node, module: nn.Module | None) -> bool:
    return True


@dataclass(frozen=True)
class TorchForm:
    """How torch code writes an op: modules (``call_module``) and functions or method names
    (``call_function`` / ``call_method`` targets), narrowed by ``matches``; ``fields`` gives the
    ``Op`` fields beyond name, inputs and shape, and raises ``UserError`` for a form TFLM lacks."""

    doc: str  # for the "supported:" list of error messages
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple = ()
    arity: int = 1  # tensor operands
    matches: Callable[[fx.Node, nn.Module | None], bool] = _always
    fields: Callable[[fx.Node, nn.Module | None], dict] = _no_fields


@dataclass(frozen=True)
class OpKind:
    name: str
    tflite: str  # the TFLite operator the exporter writes ("" for the graph input)
    run: Callable[["Op", list[torch.Tensor]], torch.Tensor] | None = None  # float; fused activation after it
    integer: IntegerExecutor | None = None
    shares_input_scale: bool = False
    weighted: bool = False
    # Cost-model class (cost.op_work): a weighted layer, a pooling window, or elementwise work.
    cost: Literal["layer", "pool", "elementwise", "none"] = "elementwise"
    cycles: str = "other"  # the board's formula for a non-weighted kind (boards.KERNEL_VARIANTS)
    tflite_aliases: tuple[str, ...] = ()  # other operators onnx2tf writes for it (RELU6 for a relu)
    torch: TorchForm | None = None  # None: traced by graph itself (layers, the input, a relu)


# ---- integer executors (TFLM's int8 kernels, reference integer_ops) ---------------------------


def _integer_input(op: Op, inputs: list[torch.Tensor], sources: list[ActQuant], target: ActQuant) -> torch.Tensor:
    """The emulator's quantise_input: round(x / scale) + zero point."""
    return target.dequantise(target.integers(inputs[0]))


def _add_table(op: Op, sources: list[ActQuant], target: ActQuant, device: torch.device) -> torch.Tensor:
    """The ADD's output for every pair of int8 inputs (reference integer_ops/add.h AddFunc: both
    inputs rescaled after a left shift of 20, summed, rescaled; multipliers as add_common.cc
    computes them from the float32 scales), on the float grid."""
    params = [s.params(8) for s in sources]  # int8 inputs (an int16 one came through a QUANTIZE)
    twice_max = 2 * max(p.tflite_scale for p in params)
    real = [p.tflite_scale / twice_max for p in params]
    real.append(twice_max / ((1 << ADD_LEFT_SHIFT) * target.params().tflite_scale))
    multiplier, shift = quantize_multiplier(np.array(real))
    levels = torch.arange(INT8_MIN, INT8_MAX + 1, dtype=torch.int64)
    first, second = ((Requantiser(m, s)((levels - p.zero_point) << ADD_LEFT_SHIFT))
                     for m, s, p in zip(multiplier, shift, params))
    total = (first[:, None] + second[None, :]).flatten()
    return target.dequantise(Requantiser(multiplier[2], shift[2])(total), op.activation).to(device)


def _integer_add(op: Op, inputs: list[torch.Tensor], sources: list[ActQuant], target: ActQuant) -> torch.Tensor:
    """TFLM's int8 ADD, looked up in ``_add_table``: its output depends on the two int8 inputs only."""
    table = _add_table(op, sources, target, inputs[0].device)
    first, second = sources
    # index (q1 + 128) * 256 + (q2 + 128), exact in float32 (below 2^16)
    index = first.integers(inputs[0], 8).add_(first.params(8).zero_point - INT8_MIN).mul_(256)
    index.add_(second.integers(inputs[1], 8)).add_(second.params(8).zero_point - INT8_MIN)
    return table.take(index.to(torch.int64))


def _integer_relu(op: Op, inputs: list[torch.Tensor], sources: list[ActQuant], target: ActQuant) -> torch.Tensor | None:
    """TFLM's int8 RELU (activations.h ReluQuantized, multiplier as CalculateReluOpData: the
    float32 ratio of the scales), looked up per int8 input like the ADD. A standalone RELU6 stays
    on the float path."""
    if op.activation != "relu":
        return None
    (source,) = sources
    p_in, p_out = source.params(8), target.params()
    multiplier, shift = quantize_multiplier(np.array([float(np.float32(p_in.scale) / np.float32(p_out.scale))]))
    levels = torch.arange(INT8_MIN, INT8_MAX + 1, dtype=torch.int64)
    table = target.dequantise(Requantiser(multiplier, shift)(levels - p_in.zero_point), "relu").to(inputs[0].device)
    return table.take(source.integers(inputs[0], 8).add_(p_in.zero_point - INT8_MIN).to(torch.int64))


def _integer_avgpool(op: Op, inputs: list[torch.Tensor], sources: list[ActQuant],
                     target: ActQuant) -> torch.Tensor | None:
    """TFLM's int8 (and int16) AVERAGE_POOL_2D (reference integer_ops/pooling.h): the window's sum
    of the integers, divided with rounding half away from zero, same quantisation in and out
    (the sum in float64: int16 windows can pass float32's exact 2^24). A padded
    window (which TFLM averages over its in-bounds part) stays on the float path."""
    if op.padding != (0, 0):
        return None
    x = inputs[0]
    count = math.prod(op.kernel)
    zero_point = target.params().zero_point
    q = target.integers(x).add_(zero_point)
    total = F.avg_pool2d(q.to(torch.float64), op.kernel, op.stride, divisor_override=1)
    half = count // 2
    rounded = torch.div(torch.where(total > 0, total + half, total - half), count, rounding_mode="trunc")
    return target.dequantise(rounded.sub_(zero_point), op.activation)


# ---- torch forms ----------------------------------------------------------------------------


def _input_window(node: fx.Node, module: nn.Module | None) -> dict:
    """Global pooling: the window is the whole input map, stride 1."""
    return {"kernel": tuple(node.args[0].meta["tensor_meta"].shape[2:])}


def _is_global_pool(node: fx.Node, module: nn.Module | None) -> bool:
    """AdaptiveAvgPool2d(1), or a mean over H and W."""
    if module is not None:
        return _pair(module.output_size) == (1, 1)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return sorted(d % 4 for d in dims) == [2, 3]


def _pool_window(node: fx.Node, module: nn.Module) -> dict:
    if getattr(module, "ceil_mode", False) or _pair(getattr(module, "dilation", 1)) != (1, 1):
        raise UserError(f"layer '{node.target}': ceil_mode/dilated pooling is not supported")
    stride = module.stride if module.stride is not None else module.kernel_size
    return {"kernel": _pair(module.kernel_size), "stride": _pair(stride), "padding": _pair(module.padding)}


# ---- float executors ------------------------------------------------------------------------


def _first(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The input itself: the graph input, or a standalone RELU, whose activation the caller applies."""
    return inputs[0]


def _flatten_or_reshape(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    x = inputs[0]
    return torch.flatten(x, 1) if len(op.out_shape) == 1 else x.reshape(x.shape[0], *op.out_shape)


KINDS: dict[str, OpKind] = {kind.name: kind for kind in (
    OpKind("input", "", run=_first, integer=_integer_input, cost="none"),
    OpKind("conv", "CONV_2D", weighted=True, cost="layer"),
    OpKind("depthwise", "DEPTHWISE_CONV_2D", weighted=True, cost="layer"),
    OpKind("fc", "FULLY_CONNECTED", weighted=True, cost="layer"),
    OpKind("add", "ADD", run=lambda op, x: x[0] + x[1], integer=_integer_add, cycles="add",
           torch=TorchForm("add", functions=(operator.add, torch.add, "add"), arity=2)),
    OpKind("avgpool", "AVERAGE_POOL_2D", run=lambda op, x: F.avg_pool2d(x[0], op.kernel, op.stride, op.padding),
           integer=_integer_avgpool, shares_input_scale=True, cost="pool", cycles="average_pool_2d",
           torch=TorchForm("AvgPool2d", modules=(nn.AvgPool2d,), fields=_pool_window)),
    # Written as MEAN by onnx2tf and rewritten to AVERAGE_POOL_2D by the exporter (CMSIS-NN has a
    # kernel for it); same numbers for equal input and output quantisation.
    OpKind("global_avgpool", "AVERAGE_POOL_2D", run=lambda op, x: x[0].mean(dim=(2, 3), keepdim=True),
           integer=_integer_avgpool, shares_input_scale=True, cost="pool", cycles="average_pool_2d",
           torch=TorchForm("AdaptiveAvgPool2d(1)", modules=(nn.AdaptiveAvgPool2d,), functions=(torch.mean, "mean"),
                           matches=_is_global_pool, fields=_input_window)),
    OpKind("maxpool", "MAX_POOL_2D", run=lambda op, x: F.max_pool2d(x[0], op.kernel, op.stride, op.padding),
           shares_input_scale=True, cost="pool", cycles="max_pool_2d",
           torch=TorchForm("MaxPool2d", modules=(nn.MaxPool2d,), fields=_pool_window)),
    OpKind("reshape", "RESHAPE", run=_flatten_or_reshape, shares_input_scale=True, cycles="reshape",
           torch=TorchForm("Flatten/reshape", modules=(nn.Flatten,),
                           functions=(torch.flatten, "flatten", "view", "reshape", torch.reshape))),
    # A ReLU/ReLU6 that cannot fuse into the op before it (graph._fuse_or_emit_relu).
    OpKind("relu", "RELU", run=_first, integer=_integer_relu, tflite_aliases=("RELU6",)),
    # TFLM's int8 SOFTMAX after the logits when the model ended in one (Graph.output_softmax):
    # never traced, run by nothing that trains (softmax.py has its integer port for the
    # emulator's scores). Priced by "other", which predicts ~2,000 instructions for 10 classes
    # against 5,480 measured with CMSIS-NN (4,960 reference) on QEMU mps2-an386.
    OpKind("softmax", "SOFTMAX"),
    # TFLM's QUANTIZE between an int8 and an int16 tensor, which the exporter puts at every type
    # boundary of a model with 16x8 layers (quant.activation_types): never traced, run by
    # ActQuant.convert.
    OpKind("quantize", "QUANTIZE", cycles="quantize"),
)}

WEIGHTED_KINDS = tuple(name for name, kind in KINDS.items() if kind.weighted)
# The TFLite operator of each weighted kind ("conv" -> "CONV_2D"), for readers of exported models.
WEIGHTED_TFLITE = {name: KINDS[name].tflite for name in WEIGHTED_KINDS}


def traced_kind(node: fx.Node, module: nn.Module | None) -> OpKind | None:
    """The kind whose torch form ``node`` is (a module call when ``module`` is given), or None."""
    for kind in KINDS.values():
        form = kind.torch
        if form is None:
            continue
        written = isinstance(module, form.modules) if module is not None else node.target in form.functions
        if written and form.matches(node, module):
            return kind
    return None


def traceable_modules() -> tuple[type[nn.Module], ...]:
    return tuple(m for kind in KINDS.values() if kind.torch for m in kind.torch.modules)


def supported_torch() -> str:
    """The torch forms ``graph.trace`` takes, for error messages."""
    forms = [kind.torch.doc for kind in KINDS.values() if kind.torch]
    return ", ".join(["Conv2d (plain or depthwise)", "Linear", "BatchNorm2d after a convolution", "ReLU", "ReLU6",
                      *forms, "Dropout", "Identity"])
