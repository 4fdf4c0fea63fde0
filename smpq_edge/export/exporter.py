"""The export stage: a finetuned ``QuantNet`` and its policy -> a mixed int4/int8 ``.tflite``.

onnx2tf lays out the operators, tensors and options of a full-integer model; it is run once on a
plain float copy of the network whose weights already lie on the policy's integer grid and whose
activations are not quantised. That model is then rewritten so it carries *our* numbers exactly:

- every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED gets the ``QuantNet``'s integer weights and
  scales (``quantize_weight``): per-channel for conv (quantized_dimension 0) and depthwise
  (dimension 3, layout [1, H, W, C]), per tensor for fully connected; int4 layers become packed
  INT4 tensors (type 17);
- each bias becomes int32 at input_scale x weight_scale[c];
- every activation tensor (graph input, op outputs) gets the ``ActQuant`` scale and zero point;
  ops that TFLite runs with the same scale in and out (pooling, reshape) keep their input's;
- MEAN over H and W (onnx2tf's global average pooling) becomes AVERAGE_POOL_2D with the full
  window, which CMSIS-NN has a kernel for (MEAN has none) and which TFLM computes identically
  for equal input and output quantisation;
- a model that ended in a Softmax (``ModelSource.output_softmax``) gets TFLM's int8 SOFTMAX after
  its logits: output scale 1/256, zero point -128 (the only int8 output TFLM accepts), beta 1;
- a layer with int16 activations (the policy's ``wide`` layers, TFLM's 16x8 kernels) gets int16
  input and output tensors (symmetric, zero point 0) and an int64 bias; the ops that share their
  input's scale run in its type, and a QUANTIZE (int8 <-> int16) goes wherever an op reads a tensor
  of the other type (``quant.activation_types``), and before the graph's output, which stays int8.

The same onnx2tf layout is rewritten twice: with the policy's bits and with int8 everywhere
(the reference model). Any mismatch between the traced graph and onnx2tf's operators stops with a
``UserError`` naming the layer.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from smpq_edge.common.errors import UserError
from smpq_edge.export.int4 import pack_int4
from smpq_edge.export.onnx_to_tflite import export_int8
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.network.graph import Graph, Op
from smpq_edge.network.ops import KINDS, WEIGHTED_TFLITE
from smpq_edge.common.precision import DECODE_OP, PACKED_INT4, WEIGHT_BITS, is_lut
from smpq_edge.network.quant import QuantNet, activation_types, apply_activation, quantize_weight
from smpq_edge.network.softmax import BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT

_WEIGHTED_OPS = {tflite: kind for kind, tflite in WEIGHTED_TFLITE.items()}
# Operators that TFLite runs with the same input and output quantisation: those of the kinds that
# share their input's, and the layout operators onnx2tf writes around them (MEAN: global pooling).
_SAME_SCALE_OPS = {"PAD", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "MEAN"} | {
    kind.tflite for kind in KINDS.values() if kind.shares_input_scale}
# Operators with a quantisation of their own, other than the layers: TFLite operator -> kind.
_STANDALONE = {name: kind.name for kind in KINDS.values() if kind.tflite and not kind.weighted
               and not kind.shares_input_scale for name in (kind.tflite, *kind.tflite_aliases)}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class ExportedLayer:
    name: str
    kind: str
    weight_bits: int
    operator: int  # index of the TFLite operator
    weight_tensor: int
    bias_tensor: int  # -1 when the operator has none
    activation_bits: int = 8  # 16: TFLM's 16x8 kernel


@dataclass(frozen=True)
class ExportResult:
    tflite: bytes  # the mixed model (the policy's bits)
    tflite_int8: bytes  # the all-int8 reference, same layout and activation scales
    bits: dict[str, int]
    layers: list[ExportedLayer]
    mean_to_avgpool: int  # MEAN operators rewritten to AVERAGE_POOL_2D
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    softmax: bool = False  # a SOFTMAX follows the logits (the output is then its 1/256, -128)
    wide: frozenset[str] = frozenset()  # layers with int16 activations
    quantize_ops: int = 0  # QUANTIZE operators at int8/int16 boundaries
    notes: list[str] = field(default_factory=list)
    single_zero_point: bool = False  # weights and biases keep one zero point each (TFLM only)
    # onnx2tf's layout, matched to the graph: lets ``variant`` rewrite it for another policy.
    _layout: tuple = field(default=(), repr=False, compare=False)

    def variant(self, net: QuantNet, bits: dict[str, int], wide: frozenset[str] = frozenset()) -> bytes:
        """The same model under another policy (same layout and activation scales), no onnx2tf run."""
        template, matched, sources, columns = self._layout
        return _rewrite(template, net, bits, wide, matched, sources, columns, self.softmax,
                        self.single_zero_point).tflite

    def to_dict(self) -> dict:
        return {
            "bits": dict(self.bits),
            "int16_activations": sorted(self.wide),
            "quantize_ops": self.quantize_ops,
            "model_bytes": len(self.tflite),
            "model_int8_bytes": len(self.tflite_int8),
            "layers": [vars(layer) for layer in self.layers],
            "mean_to_avgpool": self.mean_to_avgpool,
            "input": {"scale": self.input_scale, "zero_point": self.input_zero_point},
            "output": {"scale": self.output_scale, "zero_point": self.output_zero_point},
            "softmax": self.softmax,
            "zero_points": "single" if self.single_zero_point else "per_channel",
            "notes": list(self.notes),
        }


class FloatGraphModule(nn.Module):
    """The traced graph in plain float torch ops, weights on the policy's integer grid (as floats),
    BatchNorm folded, fused ReLU kept, activations not quantised: what onnx2tf converts."""

    def __init__(self, net: QuantNet, bits: dict[str, int]):
        super().__init__()
        self.graph = net.graph
        self.layers = nn.ModuleDict()
        with torch.no_grad():
            for op in net.graph.layers:
                layer = net.layer(op.name)
                weight = layer.quantised_weight(bits[op.name]).detach().clone()
                if op.kind == "fc":
                    module = nn.Linear(weight.shape[1], weight.shape[0])
                else:
                    module = nn.Conv2d(weight.shape[1] * op.groups, weight.shape[0], tuple(weight.shape[2:]),
                                       stride=op.stride, padding=_export_padding(op), groups=op.groups)
                module.weight.copy_(weight)
                module.bias.copy_(layer.bias.detach())
                self.layers[QuantNet.key(op.name)] = module

    @property
    def onnx_conv_pads(self) -> list[tuple[int, ...] | None]:
        """Per convolution in graph order, TensorFlow SAME pads (top, left, bottom, right) the
        ONNX Conv must get instead of the symmetric stand-in it is exported with; None to keep."""
        return [op.same_pads or None for op in self.graph.layers if op.kind != "fc"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for op in self.graph.ops:
            inputs = [values[name] for name in op.inputs] if op.inputs else [x]
            y = self.layers[QuantNet.key(op.name)](inputs[0]) if op.weighted else KINDS[op.kind].run(op, inputs)
            values[op.name] = apply_activation(y, op.activation)
        return values[self.graph.output]


def _export_padding(op: Op) -> tuple[int, int]:
    """torch's padding for the exported Conv. An asymmetric SAME conv is exported with the
    symmetric padding that gives the same output size (the larger side), and its ONNX pads are
    then set to the real ones (``onnx_conv_pads``): onnx2tf turns those into TFLite's SAME."""
    if not op.same_pads:
        return op.padding
    top, left, bottom, right = op.same_pads
    return max(top, bottom), max(left, right)


def _tflite_layout(op: Op, torch_array: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """A torch weight (OIHW / C1HW / [out, in]) in TFLite's layout (OHWI / [1,H,W,C] / [out, in]),
    a fully connected layer's columns in ``columns`` order where ``_fold_flatten`` set one."""
    if op.kind == "conv":
        return torch_array.transpose(0, 2, 3, 1)
    if op.kind == "depthwise":
        return torch_array.transpose(1, 2, 3, 0)
    return torch_array if columns is None else torch_array[:, columns]


def _fold_flatten(tflite: bytes) -> tuple[bytes, dict[int, np.ndarray]]:
    """onnx2tf keeps torch's channels-first flatten in front of a FULLY_CONNECTED as a TRANSPOSE
    (NHWC to NCHW) and a RESHAPE. TFLM's FULLY_CONNECTED flattens its input itself, so both go,
    and the layer's weight columns are put in HWC order instead: the same sums without the two
    operators' cycles, arena tensor and flash (the cost model prices the model without them).
    Returns the model and, per FULLY_CONNECTED weight tensor, the new column order."""
    model = TfliteModel.from_bytes(tflite, source="onnx2tf output")
    operators = model.operators()
    producer = {op.outputs[0]: op for op in operators}
    readers = Counter([i for op in operators for i in op.inputs] + list(model.outputs))
    removed: set[int] = set()
    columns: dict[int, np.ndarray] = {}
    for fc in (op for op in operators if op.name == "FULLY_CONNECTED"):
        reshape = producer.get(fc.inputs[0])
        if reshape is None or reshape.name != "RESHAPE" or readers[reshape.outputs[0]] != 1:
            continue
        source = reshape.inputs[0]
        transpose = producer.get(source)
        if _is_nhwc_to_nchw(model, transpose) and readers[source] == 1:
            _, h, w, c = model.tensor(transpose.inputs[0]).shape
            order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
            weights = model.tensor(fc.inputs[1])
            model.set_tensor_data(fc.inputs[1], np.frombuffer(weights.data, np.int8).reshape(weights.shape)[:, order]
                                  .tobytes())
            columns[fc.inputs[1]] = order
            removed.add(transpose.index)
            source = transpose.inputs[0]
        model.set_operator_input(fc.index, 0, source)
        removed.add(reshape.index)
    model.remove_operators(removed)
    return model.to_bytes(), columns


def _is_nhwc_to_nchw(model: TfliteModel, op) -> bool:
    if op is None or op.name != "TRANSPOSE" or len(model.tensor(op.inputs[0]).shape) != 4:
        return False
    perm = model.tensor(op.inputs[1]).data
    return perm is not None and np.frombuffer(perm, np.int32).tolist() == [0, 3, 1, 2]


def _quant_axis(op: Op) -> int:
    return 3 if op.kind == "depthwise" else 0


def _match_layers(model: TfliteModel, graph: Graph, reference: FloatGraphModule,
                  columns: dict[int, np.ndarray]) -> list[tuple[Op, int, int, int]]:
    """(graph layer, operator index, weight tensor, bias tensor) in order, checked against onnx2tf."""
    weighted = [o for o in model.operators() if o.name in _WEIGHTED_OPS]
    layers = graph.layers
    if len(weighted) != len(layers):
        raise UserError(f"onnx2tf produced {len(weighted)} conv/depthwise/fully-connected operators for "
                        f"{len(layers)} layers ({', '.join(o.name for o in weighted)})")
    matched = []
    for op, tfl in zip(layers, weighted):
        if _WEIGHTED_OPS[tfl.name] != op.kind:
            raise UserError(f"layer '{op.name}' ({op.kind}) matched TFLite operator {tfl.index} {tfl.name}")
        w_index = tfl.inputs[1]
        b_index = tfl.inputs[2] if len(tfl.inputs) > 2 else -1
        w = model.tensor(w_index)
        if tuple(w.shape) != tuple(op.weight_shape):
            raise UserError(f"layer '{op.name}': TFLite weight shape {w.shape}, expected {op.weight_shape}")
        if w.type != "INT8" or w.data is None or w.quantization is None:
            raise UserError(f"layer '{op.name}': onnx2tf weights are not constant int8 ({w.type})")
        ours = _tflite_layout(op, reference.layers[QuantNet.key(op.name)].weight.detach().numpy().astype(np.float64),
                              columns.get(w_index))
        theirs = w.dequantised()
        tolerance = 0.51 * max(w.quantization.scales) + 1e-7
        error = float(np.abs(theirs - ours).max())
        if error > tolerance:
            raise UserError(f"layer '{op.name}': onnx2tf's weights differ from the network's by {error:.3g} "
                            f"(more than half a quantisation step); the layer order or layout does not match")
        matched.append((op, tfl.index, w_index, b_index))
    return matched


def _activation_sources(model: TfliteModel, net: QuantNet) -> dict[int, str]:
    """TFLite activation tensor index -> the graph op whose quantiser sets its scale (a tensor of
    an op that shares its input's scale gets its input's)."""
    params: dict[int, str] = {}
    of = net.quantiser_owner
    (input_index,) = model.inputs
    params[input_index] = of("input")
    queues = {kind: [op for op in net.graph.ops if op.kind == kind] for kind in set(_STANDALONE.values())}
    layers = iter(net.graph.layers)
    for tfl in model.operators():
        out = tfl.outputs[0]
        if tfl.name in _WEIGHTED_OPS:
            params[out] = of(next(layers).name)
        elif tfl.name in _STANDALONE:
            kind = _STANDALONE[tfl.name]
            if not queues[kind]:
                raise UserError(f"onnx2tf output: TFLite operator {tfl.index} {tfl.name} has no counterpart in the model")
            params[out] = of(queues[kind].pop(0).name)
        elif tfl.name in _SAME_SCALE_OPS:
            if tfl.inputs[0] not in params:
                raise UserError(f"onnx2tf output: operator {tfl.index} {tfl.name} reads a tensor of unknown scale")
            params[out] = params[tfl.inputs[0]]
        else:
            raise UserError(f"onnx2tf output: operator {tfl.index} {tfl.name} is not supported by the exporter")
    return params


def _mean_to_avgpool(model: TfliteModel) -> int:
    """Rewrite MEAN over H and W of an NHWC tensor (same scale in and out) to AVERAGE_POOL_2D."""
    raw = model._model  # the exporter owns this rewrite; TfliteModel exposes no opcode edit
    graph = raw.subgraphs[0]
    rewritten = 0
    for info in model.operators():
        if info.name != "MEAN":
            continue
        source, axes_t, out = model.tensor(info.inputs[0]), model.tensor(info.inputs[1]), model.tensor(info.outputs[0])
        if len(source.shape) != 4 or axes_t.data is None:
            continue
        axes = sorted(int(a) % 4 for a in np.frombuffer(axes_t.data, dtype=np.int32))
        if axes != [1, 2] or source.quantization != out.quantization:
            continue
        n, h, w, c = source.shape
        op = graph.operators[info.index]
        op.opcodeIndex = model.opcode_index(schema.BuiltinOperator.AVERAGE_POOL_2D)
        options = schema.Pool2DOptionsT()
        options.padding = schema.Padding.VALID
        options.strideW, options.strideH = w, h
        options.filterWidth, options.filterHeight = w, h
        options.fusedActivationFunction = schema.ActivationFunctionType.NONE
        op.builtinOptionsType = schema.BuiltinOptions.Pool2DOptions
        op.builtinOptions = options
        op.inputs = np.asarray([info.inputs[0]], dtype=np.int32)
        # AVERAGE_POOL_2D writes [N, 1, 1, C]; a consumer of MEAN's [N, C] output (RESHAPE or
        # FULLY_CONNECTED) reads the same bytes.
        graph.tensors[info.outputs[0]].shape = np.asarray([n, 1, 1, c], dtype=np.int32)
        rewritten += 1
    return rewritten


@dataclass(frozen=True)
class _Rewritten:
    tflite: bytes
    mean_to_avgpool: int  # MEAN operators rewritten to AVERAGE_POOL_2D
    quantize_ops: int  # QUANTIZE operators put at int8/int16 boundaries


def _rewrite(template: bytes, net: QuantNet, bits: dict[str, int], wide: frozenset[str], matched,
             sources: dict[int, str], columns: dict[int, np.ndarray], softmax: bool,
             single_zero_point: bool) -> _Rewritten:
    model = TfliteModel.from_bytes(template, source="onnx2tf output")
    types = activation_types(net.graph, wide)
    for index, name in sources.items():
        p = net.activation_quantiser(name).params(types[name])
        model.set_tensor_quantization(index, [float(p.scale)], [int(p.zero_point)])
        model.set_tensor_type(index, "INT16" if types[name] == 16 else "INT8")
    for op, op_index, w_index, b_index in matched:
        _write_layer(model, net, op, bits[op.name], types[op.name], op_index, w_index, b_index, sources, columns,
                     single_zero_point)
    rewritten = _mean_to_avgpool(model)
    quantize_ops = _type_boundaries(model, net, types, sources, {op_index: op.name for op, op_index, _, _ in matched})
    if softmax:
        model.append_softmax(BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT)
    model.compact()
    # The layers' weight tensors after compact() renumbered them (the weighted operators keep their order).
    weighted = [o for o in model.operators() if o.name in _WEIGHTED_OPS]
    lut = [(tfl.inputs[1], bits[op.name], _quant_axis(op) if net.layer(op.name).per_channel else None)
           for (op, _, _, _), tfl in zip(matched, weighted) if is_lut(bits[op.name])]
    return _Rewritten(_lut_compress(model, lut), rewritten, quantize_ops)


def _write_layer(model: TfliteModel, net: QuantNet, op: Op, bits: int, activation_bits: int, op_index: int,
                 w_index: int, b_index: int, sources: dict[int, str], columns: dict[int, np.ndarray],
                 single_zero_point: bool) -> None:
    """One layer's integer weights and scales, and its bias: int32, or int64 for a 16x8 layer, at
    the scale of the input it reads (int16 for a 16x8 layer, through a QUANTIZE if need be)."""
    layer = net.layer(op.name)
    q, scales = quantize_weight(layer.weight, bits, layer.per_channel)
    q = _tflite_layout(op, q.numpy().astype(np.int8), columns.get(w_index))
    scales = scales.detach().numpy().astype(np.float64)
    axis = _quant_axis(op)
    # One zero point per scale, as the TFLite schema wants: LiteRT refuses a tensor with fewer.
    # TFLM alone also reads one for all channels (``single_zero_point``, Board.zero_points).
    zeros = [0] if single_zero_point else [0] * len(scales)
    model.set_tensor_quantization(w_index, scales.tolist(), zeros, axis if len(scales) > 1 else 0)
    if bits == PACKED_INT4:
        model.set_tensor_type(w_index, "INT4")
        model.set_tensor_data(w_index, pack_int4(q))
    else:  # int8 values; on a b-bit grid for a LUT layer, whose indices ``_lut_compress`` writes
        model.set_tensor_type(w_index, "INT8")
        model.set_tensor_data(w_index, np.ascontiguousarray(q).tobytes())
    tfl = model.operators()[op_index]
    input_scale = float(net.activation_quantiser(sources[tfl.inputs[0]]).params(activation_bits).scale)
    bias = layer.bias.detach().numpy().astype(np.float64)
    bias_scales = input_scale * (scales if len(scales) > 1 else np.full(1, scales[0]))
    per_channel_scale = bias_scales if len(scales) > 1 else np.full(len(bias), bias_scales[0])
    q_bias = np.round(bias / per_channel_scale)
    if b_index < 0:
        if np.any(q_bias):
            raise UserError(f"layer '{op.name}': onnx2tf dropped a non-zero bias")
        return
    if activation_bits == 16:
        model.set_tensor_type(b_index, "INT64")
        model.set_tensor_data(b_index, q_bias.astype(np.int64).tobytes())
    else:
        model.set_tensor_type(b_index, "INT32")
        model.set_tensor_data(b_index, np.clip(q_bias, _INT32_MIN, _INT32_MAX).astype(np.int32).tobytes())
    model.set_tensor_quantization(b_index, bias_scales.tolist(), [0] if single_zero_point else [0] * len(bias_scales),
                                  0)


def _type_boundaries(model: TfliteModel, net: QuantNet, types: dict[str, int], sources: dict[int, str],
                     layer_of: dict[int, str]) -> int:
    """A QUANTIZE (TFLM's int8 <-> int16 requantisation) wherever an operator reads an activation
    of the other type, one per tensor and type, put before its first reader; and before the
    graph's output where that is int16. A layer reads its own type, an operator that shares its
    input's scale runs in that input's type, every other operator reads int8. Returns the count."""
    converted: dict[tuple[int, int], int] = {}
    inserts: list[tuple[int, int, int]] = []  # (before operator, from tensor, to tensor)

    def as_type(tensor: int, width: int, before: int) -> int:
        name = sources[tensor]
        if types[name] == width:
            return tensor
        if (tensor, width) not in converted:
            p = net.activation_quantiser(name).params(width)
            converted[tensor, width] = model.add_activation_tensor(
                tensor, "INT16" if width == 16 else "INT8", float(p.scale), int(p.zero_point))
            inserts.append((before, tensor, converted[tensor, width]))
        return converted[tensor, width]

    for info in model.operators():
        if info.name in _SAME_SCALE_OPS and info.index not in layer_of:
            continue
        width = types[layer_of[info.index]] if info.index in layer_of else 8
        for position, tensor in enumerate(info.inputs):
            if tensor in sources and (new := as_type(tensor, width, info.index)) != tensor:
                model.set_operator_input(info.index, position, new)
    (output,) = model.outputs
    model.set_output(as_type(output, 8, len(model.operators())))
    for before, source, target in sorted(inserts, reverse=True):  # the last first: earlier positions hold
        model.insert_operator(before, schema.BuiltinOperator.QUANTIZE, [source], [target])
    return len(inserts)


DECODE_OPERATOR = f"CUSTOM:{DECODE_OP}"


def _lut_compress(model: TfliteModel, layers: list[tuple[int, int, int | None]]) -> bytes:
    """The model with each listed layer's weights (weight tensor index, bits, per-channel axis or None)
    stored as ``bits``-bit indices into int8 value tables, and TFLM's DECODE operator before the
    layer, written by tflite-micro's own compression tool (its spec and DECODE insertion)."""
    from tflite_micro.tensorflow.lite.micro.compression import spec
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    if not layers:
        return model.to_bytes()
    specs = [spec.Tensor(subgraph=0, tensor=tensor, compression=[spec.LookUpTableCompression(
        index_bitwidth=b, mode=spec.PerTensor() if axis is None else spec.PerChannel(axis=axis))])
        for tensor, b, axis in layers]
    # Quiet: "resulted in expansion" for a small layer (the cost model prices it) and, on stderr,
    # "index_bitwidth larger than necessary" for a layer whose values use fewer levels than b bits.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        compressed = TfliteModel.from_bytes(bytes(compress(model.to_bytes(), specs)))
    # The tool leaves the weights' scales on the packed index tensor (UINT8, one value per byte):
    # DECODE reads them from its output, and LiteRT refuses a file whose scales do not match
    # their tensor's shape, so they are dropped (12 B per channel less flash).
    for operator in compressed.operators():
        if operator.name == DECODE_OPERATOR:
            compressed.clear_tensor_quantization(operator.inputs[0])
    return compressed.to_bytes()


# Readers of a graph input that take any shape of its size: TFLM's FULLY_CONNECTED reads its
# input as (elements / depth, depth), RESHAPE reads only the element count.
_SHAPE_BLIND_READERS = {"RESHAPE", "FULLY_CONNECTED"}


def _with_input_shape(tflite: bytes, input_shape: tuple[int, ...] | None) -> bytes:
    """onnx2tf's model taking ``(1, *input_shape)``, the input as the user's file declared it.

    The traced graph takes every sample as (C, H, W), so an (N, F) model reaches onnx2tf as
    (N, F, 1, 1); its first operator reads the input as a flat vector, so only the shape changes."""
    model = TfliteModel.from_bytes(tflite, source="onnx2tf output")
    (index,) = model.inputs
    shape = (1, *input_shape) if input_shape else None
    if shape is None or model.tensor(index).shape == shape:
        return tflite
    readers = {o.name for o in model.operators() if index in o.inputs}
    if not readers <= _SHAPE_BLIND_READERS:
        raise UserError(f"the exported model cannot take the input shape {list(shape)}: its first operators "
                        f"{sorted(readers)} read it as {list(model.tensor(index).shape)}")
    model.set_tensor_shape(index, shape)
    return model.to_bytes()


def export_model(net: QuantNet, bits: dict[str, int], calibration: np.ndarray, softmax: bool = False,
                 single_zero_point: bool = False, input_shape: tuple[int, ...] | None = None) -> ExportResult:
    """The mixed ``.tflite`` of ``net`` under ``bits`` (layer -> weight bits) and the network's
    int16-activation layers (``net.wide``), and its all-int8 reference, both ending in an int8
    SOFTMAX when ``softmax``; ``single_zero_point`` writes the TFLM-only form of per-channel
    weights and biases (one zero point each, which LiteRT refuses); ``input_shape`` (per sample)
    is the input's shape in the model file, where it is not (C, H, W).

    ``calibration`` (float32 NCHW) only lets onnx2tf finish its own int8 conversion; every scale
    in the result comes from ``net``.
    """
    graph = net.graph
    missing = [op.name for op in graph.layers if op.name not in bits]
    unknown = sorted(set(bits) - {op.name for op in graph.layers})
    if missing or unknown:
        raise UserError(f"policy does not match the model: missing layers {missing}, unknown layers {unknown}")
    bad = {name: b for name, b in bits.items() if b not in WEIGHT_BITS}
    if bad:
        raise UserError(f"TFLM runs weights of 2 to 8 bits; policy has {bad}")
    hybrid = sorted(name for name in net.wide if bits[name] != 8)
    if hybrid:
        raise UserError(f"layers {hybrid}: TFLM's 16x8 kernels take int8 weights only")
    net.eval()
    float_module = FloatGraphModule(net, bits).eval()
    int8 = export_int8(float_module, (1, *graph.input_shape), np.ascontiguousarray(calibration, dtype=np.float32),
                       conv_pads=float_module.onnx_conv_pads)
    layout, columns = _fold_flatten(_with_input_shape(int8.tflite, input_shape))
    template = TfliteModel.from_bytes(layout, source="onnx2tf output")
    matched = _match_layers(template, graph, float_module, columns)
    sources = _activation_sources(template, net)
    mixed = _rewrite(layout, net, bits, net.wide, matched, sources, columns, softmax, single_zero_point)
    reference = _rewrite(layout, net, {op.name: 8 for op in graph.layers}, frozenset(), matched, sources, columns,
                         softmax, single_zero_point)
    notes = []
    if any(o.name == "MEAN" for o in TfliteModel.from_bytes(mixed.tflite).operators()):
        notes.append("a MEAN operator could not be rewritten to AVERAGE_POOL_2D and was kept")
    (in_index,), (out_index,) = template.inputs, template.outputs
    given = net.activation_quantiser(sources[in_index]).params(8)
    logits = net.activation_quantiser(sources[out_index]).params(8)
    output = (OUTPUT_SCALE, OUTPUT_ZERO_POINT) if softmax else (float(logits.scale), int(logits.zero_point))
    return ExportResult(
        tflite=mixed.tflite, tflite_int8=reference.tflite, bits=dict(bits),
        layers=[ExportedLayer(op.name, op.kind, bits[op.name], i, w, b, 16 if op.name in net.wide else 8)
                for op, i, w, b in matched],
        mean_to_avgpool=mixed.mean_to_avgpool,
        input_scale=float(given.scale), input_zero_point=int(given.zero_point),
        output_scale=output[0], output_zero_point=output[1], softmax=softmax,
        wide=net.wide, quantize_ops=mixed.quantize_ops,
        notes=notes, single_zero_point=single_zero_point,
        _layout=(layout, matched, sources, columns),
    )
