"""ONNX graph -> torch module, for the ops a TFLM int8/int4 model can hold.

Every model format ends here: an ``.onnx`` file directly, Keras, SavedModel and ``.tflite``
files through tf2onnx (see ``tf_import``). Written here rather than taken from onnx2torch:
onnx2torch depends on torchvision, and PyPI's torchvision (CUDA-linked) fails to import beside
the CPU build of torch this project pins. The ops below are what ``graph.trace`` accepts, in the
shapes torch.onnx and tf2onnx write them (NHWC inputs behind a Transpose, TensorFlow's SAME
padding, MatMul + bias Add, a final Softmax (kept as ``ModelSource.output_softmax``), Reshapes
that change nothing), so nothing is lost: any other op would be refused later anyway, and here it
is refused with the ONNX node's name.
"""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models.layers import SameConv2d, same_padding
from smpq_edge.inputs.models.source import ModelSource
from smpq_edge.inputs.preprocess import InputAffine

NCHW_FROM_NHWC = [0, 3, 1, 2]
NHWC_FROM_NCHW = [0, 2, 3, 1]


class OnnxModule(nn.Module):
    """Runs the imported ONNX nodes in order; torch.fx traces it like any hand-written model."""

    def __init__(self, steps: list[tuple[str, str, tuple[str, ...], str]], layers: dict[str, nn.Module],
                 input_name: str, output_name: str):
        super().__init__()
        self.steps = steps  # (kind, target layer or "", input names, output name)
        for key, module in layers.items():  # as attributes, so layer names read "conv2d_1", not "layers.conv2d_1"
            self.add_module(key, module)
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x}
        for kind, layer, inputs, output in self.steps:
            args = [values[name] for name in inputs]
            if kind == "layer":
                values[output] = getattr(self, layer)(args[0])
            elif kind == "add":
                values[output] = operator.add(args[0], args[1])
            elif kind == "flatten":
                values[output] = torch.flatten(args[0], 1)
            else:  # alias (Identity, Dropout, a Reshape or Transpose that changes nothing)
                values[output] = args[0]
        return values[self.output_name]


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _Importer:
    """Walks the ONNX nodes once; each op type has one handler (``HANDLERS``)."""

    origin: str
    constants: dict[str, np.ndarray]
    shapes: dict[str, list[int]]  # tensor -> static shape, from ONNX shape inference
    readers: dict[str, int]  # tensor -> how many nodes read it
    graph_output: str
    steps: list = field(default_factory=list)
    layers: dict[str, nn.Module] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)  # tensor -> layer key that wrote it
    aliases: dict[str, str] = field(default_factory=dict)  # tensor -> the tensor it equals
    output_softmax: bool = False  # a final Softmax was seen (kept out of the module: see ModelSource)
    nhwc_views: set[str] = field(default_factory=set)  # tensors that are channels-last views
    # Flattened channels-last maps larger than 1x1 -> their (C, H, W): TensorFlow's features are in
    # H, W, C order and torch's in C, H, W, so the dense layer reading one has its columns reordered.
    hwc_flattened: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def fail(self, node, message: str) -> UserError:
        return UserError(f"{self.origin}: ONNX node '{node.name or node.op_type}' ({node.op_type}): {message}")

    def source(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def shape(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def constant(self, node, index: int, what: str) -> np.ndarray:
        if len(node.input) <= index or node.input[index] not in self.constants:
            raise self.fail(node, f"needs a constant {what}")
        return self.constants[node.input[index]]

    def inputs(self, node, count: int) -> tuple[str, ...]:
        names = tuple(self.source(n) for n in node.input[:count])
        if any(name in self.nhwc_views for name in names):
            raise self.fail(node, "takes a channels-last tensor, which only a flatten may")
        if any(name in self.hwc_flattened for name in names):
            raise self.fail(node, "reads a flattened channels-last feature map, which only a dense layer may")
        return names

    def emit(self, node, key: str, module: nn.Module, output: str | None = None) -> None:
        output = output or node.output[0]
        self.layers[key] = module
        self.steps.append(("layer", key, self.inputs(node, 1), output))
        self.producer[output] = key

    def alias(self, node) -> None:
        self.aliases[node.output[0]] = node.input[0]
        if self.source(node.input[0]) in self.nhwc_views:
            self.nhwc_views.add(node.output[0])

    def relayout(self, node, channels_last: bool) -> None:
        """A Transpose between NHWC and NCHW: the torch tensor stays NCHW; only the ONNX layout of
        the name changes (tracked in ``nhwc_views``)."""
        self.steps.append(("alias", "", (self.source(node.input[0]),), node.output[0]))
        if channels_last:
            self.nhwc_views.add(node.output[0])

    def step(self, kind: str, node, count: int) -> None:
        self.steps.append((kind, "", self.inputs(node, count), node.output[0]))

    def sole_layer_before(self, node, tensor: str) -> nn.Module | None:
        """The conv or dense layer that wrote ``tensor`` if ``node`` is its only reader (so a
        BatchNorm, bias or scale can fold into it without changing another reader)."""
        chain = [tensor]
        while chain[-1] in self.aliases:
            chain.append(self.aliases[chain[-1]])
        layer = self.layers.get(self.producer.get(chain[-1], ""))
        if any(self.readers.get(name, 0) != 1 for name in chain):
            return None
        return layer if isinstance(layer, (nn.Linear, nn.Conv2d)) else None


def _pads_2d(imp: _Importer, node, attrs: dict, kernel: tuple[int, int], strides: tuple[int, int]):
    """(symmetric padding, TF SAME pads or ()) of a Conv or pooling node."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    shape = imp.shape(node.input[0])
    if auto in ("SAME_UPPER", "SAME_LOWER") or (auto == "NOTSET" and "pads" in attrs):
        if auto == "NOTSET":
            top, left, bottom, right = (list(attrs["pads"]) + [0] * 4)[:4]
            if (top, left) == (bottom, right):
                return (top, left), ()
        if shape is None or len(shape) != 4:
            raise imp.fail(node, "needs a static input shape to place its padding")
        same = [same_padding(n, k, s) for n, k, s in zip(shape[2:], kernel, strides)]
        if auto == "NOTSET" and [(top, bottom), (left, right)] != same:
            raise imp.fail(node, f"padding {list(attrs['pads'])} is neither symmetric nor TensorFlow's SAME; "
                                 "TFLite has no other padding without a PAD op")
        (top, bottom), (left, right) = same
        return ((top, left), ()) if (top, left) == (bottom, right) else ((0, 0), (top, left, bottom, right))
    if auto not in ("NOTSET", "VALID"):
        raise imp.fail(node, f"auto_pad {auto} is not supported")
    return (0, 0), ()


def _conv(imp: _Importer, node, key: str, attrs: dict) -> None:
    weight = imp.constant(node, 1, "weight")
    if weight.ndim != 4:
        raise imp.fail(node, f"only 2-D convolution is supported (weight rank {weight.ndim})")
    if list(attrs.get("dilations", [1, 1])) != [1, 1]:
        raise imp.fail(node, "dilated convolution is not supported")
    group = int(attrs.get("group", 1))
    out_ch, in_per_group, kh, kw = weight.shape
    strides = tuple(attrs.get("strides", [1, 1]))
    padding, same = _pads_2d(imp, node, attrs, (kh, kw), strides)
    bias = imp.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    kwargs = dict(stride=strides, groups=group, bias=bias is not None)
    conv = SameConv2d(in_per_group * group, out_ch, (kh, kw), same_pads=same, **kwargs) if same else \
        nn.Conv2d(in_per_group * group, out_ch, (kh, kw), padding=padding, **kwargs)
    conv.weight.data = torch.from_numpy(weight.copy())
    if bias is not None:
        conv.bias.data = torch.from_numpy(bias.copy())
    imp.emit(node, key, conv)


def _linear(imp: _Importer, node, key: str, attrs: dict) -> None:
    weight = imp.constant(node, 1, "weight")
    if node.op_type == "Gemm":
        if (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (1.0, 1.0, 0):
            raise imp.fail(node, "Gemm with alpha, beta or transA is not supported")
        weight = weight if attrs.get("transB", 0) == 1 else weight.T
    else:
        weight = weight.T  # MatMul: x @ W with W (in, out)
    if weight.ndim != 2:
        raise imp.fail(node, f"only a 2-D weight is supported (rank {weight.ndim})")
    flattened = imp.hwc_flattened.pop(imp.source(node.input[0]), None)
    if flattened is not None:  # the columns in torch's C, H, W order, not TensorFlow's H, W, C
        channels, height, width = flattened
        weight = weight.reshape(-1, height, width, channels).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
    bias = imp.constants.get(node.input[2]) if node.op_type == "Gemm" and len(node.input) > 2 else None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    linear.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
    linear.bias.data = torch.from_numpy(bias.copy() if bias is not None else np.zeros(weight.shape[0], np.float32))
    imp.emit(node, key, linear)


def _batchnorm(imp: _Importer, node, key: str, attrs: dict) -> None:
    scale, shift, mean, var = (imp.constant(node, i, "BatchNorm parameter") for i in range(1, 5))
    eps = float(attrs.get("epsilon", 1e-5))
    layer = imp.sole_layer_before(node, node.input[0])
    if isinstance(layer, nn.Linear):  # after a dense layer, as TFLite folds it: into its weights
        factor = scale / np.sqrt(var + eps)
        _fold_affine(layer, factor, shift - mean * factor)
        imp.alias(node)
        return
    bn = nn.BatchNorm2d(len(scale), eps=eps)
    bn.weight.data, bn.bias.data = torch.from_numpy(scale.copy()), torch.from_numpy(shift.copy())
    bn.running_mean.data, bn.running_var.data = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
    imp.emit(node, key, bn.eval())


def _fold_affine(layer: nn.Linear | nn.Conv2d, factor: np.ndarray, offset: np.ndarray) -> None:
    """layer(x) * factor + offset, per output channel, folded into the layer's weight and bias."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    with torch.no_grad():
        f = torch.from_numpy(np.broadcast_to(factor, (layer.weight.shape[0],)).astype(np.float32))
        layer.weight.mul_(f.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        layer.bias.mul_(f).add_(torch.from_numpy(np.broadcast_to(offset, f.shape).astype(np.float32)))


def _add_or_mul(imp: _Importer, node, key: str, attrs: dict) -> None:
    constant = [n for n in node.input if n in imp.constants]
    if node.op_type == "Add" and not constant:
        imp.step("add", node, 2)
        return
    tensor = next((n for n in node.input if n not in imp.constants), None)
    layer = imp.sole_layer_before(node, tensor) if tensor else None
    if layer is None or len(constant) != 1:
        raise imp.fail(node, "a constant operand is supported only as the bias or scale of the layer before it")
    value = imp.constants[constant[0]]
    if value.ndim == 4 and value.shape[2:] != (1, 1) or value.ndim > 4:
        raise imp.fail(node, f"constant of shape {list(value.shape)} is not per channel")
    value = value.reshape(-1)
    out = layer.weight.shape[0]
    if value.size not in (1, out):
        raise imp.fail(node, f"constant of {value.size} values for {out} outputs")
    ones, zeros = np.ones(out, np.float32), np.zeros(out, np.float32)
    _fold_affine(layer, ones, value) if node.op_type == "Add" else _fold_affine(layer, value, zeros)
    imp.alias(node)


def _clip(imp: _Importer, node, key: str, attrs: dict) -> None:
    bounds = [float(imp.constants[n]) if n in imp.constants else None for n in node.input[1:3]]
    if bounds != [0.0, 6.0] and (attrs.get("min"), attrs.get("max")) != (0.0, 6.0):
        raise imp.fail(node, "only Clip(0, 6) (ReLU6) is supported")
    imp.emit(node, key, nn.ReLU6())


def _pool(imp: _Importer, node, key: str, attrs: dict) -> None:
    if attrs.get("ceil_mode", 0):
        raise imp.fail(node, "ceil_mode pooling is not supported")
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", kernel))
    padding, same = _pads_2d(imp, node, attrs, kernel, strides)
    if same:
        raise imp.fail(node, "asymmetric SAME padding of pooling is not supported")
    if node.op_type == "AveragePool" and padding != (0, 0) and not attrs.get("count_include_pad", 0):
        raise imp.fail(node, "padded average pooling that excludes the padding is not supported")
    kwargs = dict(stride=strides, padding=padding)
    imp.emit(node, key, nn.AvgPool2d(kernel, **kwargs) if node.op_type == "AveragePool" else nn.MaxPool2d(kernel, **kwargs))


def _reshape(imp: _Importer, node, key: str, attrs: dict) -> None:
    """Flatten, Reshape and Squeeze: to (N, features), or a change of nothing."""
    before, after = imp.shape(node.input[0]), imp.shape(node.output[0])
    if imp.source(node.input[0]) in imp.nhwc_views and _is_channel_move(before, after):
        imp.relayout(node, channels_last=False)  # like the NHWC -> NCHW Transpose
    elif before is not None and after is not None and before[1:] == after[1:]:
        imp.alias(node)
    elif after is not None and len(after) == 2 and before is not None and int(np.prod(before[1:])) == after[1]:
        source = imp.source(node.input[0])
        if source not in imp.nhwc_views:
            imp.step("flatten", node, 1)
            return
        _, height, width, channels = before
        if (height, width) != (1, 1):
            if imp.readers.get(node.output[0], 0) != 1:
                raise imp.fail(node, "a flattened channels-last feature map must be read by one dense layer only")
            imp.hwc_flattened[node.output[0]] = (channels, height, width)
        imp.steps.append(("flatten", "", (source,), node.output[0]))
    else:
        raise imp.fail(node, f"only a flatten to (N, features) is supported (shape {before} -> {after})")


def _is_channel_move(before: list[int] | None, after: list[int] | None) -> bool:
    """A Reshape of (N, H, W, 1) to (N, 1, H, W): tf2onnx writes the NHWC -> NCHW Transpose of
    a single channel this way."""
    return bool(before and after and len(before) == 4 and before[3] == 1 and after[1:] == [1, *before[1:3]])


def _transpose(imp: _Importer, node, key: str, attrs: dict) -> None:
    """NHWC <-> NCHW transposes around a graph converted from TensorFlow: the importer works in
    NCHW, so each is a view; a channels-last view is only flattened where that changes nothing."""
    perm = list(attrs.get("perm", []))
    viewed = imp.source(node.input[0]) in imp.nhwc_views
    if (perm == NCHW_FROM_NHWC and viewed) or (perm == NHWC_FROM_NCHW and not viewed):
        imp.relayout(node, channels_last=perm == NHWC_FROM_NCHW)
    else:
        raise imp.fail(node, f"transpose {perm} is not supported")


def _softmax(imp: _Importer, node, key: str, attrs: dict) -> None:
    if node.output[0] != imp.graph_output:
        raise imp.fail(node, "Softmax is supported only as the model's last op")
    shape = imp.shape(node.input[0])
    if shape is None or len(shape) != 2 or int(attrs.get("axis", -1)) not in (1, -1):
        raise imp.fail(node, f"Softmax is supported only over the classes of an (N, classes) output (shape {shape})")
    imp.alias(node)
    imp.output_softmax = True


def _reduce_mean(imp: _Importer, node, key: str, attrs: dict) -> None:
    """A mean over H and W (torch.onnx's dynamo exporter writes global pooling so): global
    average pooling, flattened when the axes are not kept."""
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in imp.constants:
        axes = imp.constants[node.input[1]].astype(int).tolist()
    shape = imp.shape(node.input[0])
    if axes is None or shape is None or len(shape) != 4 or sorted(int(a) % 4 for a in axes) != [2, 3]:
        raise imp.fail(node, "only a mean over the spatial axes (global average pooling) is supported")
    if attrs.get("keepdims", 1):
        imp.emit(node, key, nn.AdaptiveAvgPool2d(1))
        return
    pooled = f"{node.output[0]}/pooled"
    imp.emit(node, key, nn.AdaptiveAvgPool2d(1), output=pooled)
    imp.steps.append(("flatten", "", (pooled,), node.output[0]))


def _module(factory: Callable[[], nn.Module]):
    return lambda imp, node, key, attrs: imp.emit(node, key, factory())


HANDLERS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _linear,
    "MatMul": _linear,
    "BatchNormalization": _batchnorm,
    "Relu": _module(nn.ReLU),
    "Clip": _clip,
    "Add": _add_or_mul,
    "Mul": _add_or_mul,
    "GlobalAveragePool": _module(lambda: nn.AdaptiveAvgPool2d(1)),
    "ReduceMean": _reduce_mean,
    "AveragePool": _pool,
    "MaxPool": _pool,
    "Flatten": _reshape,
    "Reshape": _reshape,
    "Squeeze": _reshape,
    "Transpose": _transpose,
    "Softmax": _softmax,
    "Identity": lambda imp, node, key, attrs: imp.alias(node),
    "Dropout": lambda imp, node, key, attrs: imp.alias(node),
}
SUPPORTED_ONNX = ", ".join(HANDLERS) + ", Constant, DequantizeLinear (of constant weights)"


def _dequantize(node, constants: dict[str, np.ndarray], attrs: dict) -> np.ndarray:
    """DequantizeLinear of a constant ("dynamic-range" weights) folded to float."""
    q = constants[node.input[0]].astype(np.float64)
    scale = constants[node.input[1]].astype(np.float64)
    zero = constants[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    if np.ndim(scale) == 1 and scale.size > 1:
        view = [1] * q.ndim
        view[int(attrs.get("axis", 1))] = -1
        scale, zero = scale.reshape(view), np.reshape(zero, view) if np.ndim(zero) else zero
    return ((q - zero) * scale).astype(np.float32)


def _static_shapes(model) -> tuple[dict[str, list[int]], str | None]:
    """Every tensor's static shape (0 for an unknown dimension), and a note for the user when
    onnx's shape inference failed and only the file's own shapes are known."""
    import onnx

    # A batch of one and data propagation: a Reshape whose target is computed from Shape (see
    # ``_shape_arithmetic``) then gets its static result shape too; the importer reads no batch size.
    model = copy.deepcopy(model)
    for info in model.graph.input:
        dims = info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - a graph onnx cannot infer is still importable where no shape is needed
        inferred = model
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        note = (f"ONNX shape inference failed ({type(exc).__name__}: {reason}); only the shapes the file "
                "declares are known, and a layer that needs another one is refused by name")
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
        shapes[info.name] = dims
    return shapes, note


def _shape_arithmetic(graph) -> set[int]:
    """Indices of the nodes that only compute a Reshape's target shape: ``x.view(x.size(0), -1)``
    under a dynamic batch axis, or a Keras Flatten that TensorFlow's constant folding left
    unfolded, is Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape. ``_reshape`` takes the
    result shape from shape inference, so these nodes are not part of the network."""
    readers: dict[str, list[tuple[int, int]]] = {}  # tensor -> (node index, input position)
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((index, position))
    skipped: set[int] = set()

    def shape_only(name: str) -> bool:
        return bool(readers.get(name)) and all(
            (graph.node[r].op_type == "Reshape" and position == 1) or r in skipped for r, position in readers[name])

    for index in reversed(range(len(graph.node))):  # topological order: a node's readers come later
        node = graph.node[index]
        if node.op_type != "Reshape" and node.output and all(shape_only(name) for name in node.output if name):
            skipped.add(index)
    return skipped


def _input_layout(dims: list[int], origin: str) -> tuple[tuple[int, ...], bool]:
    """The model's per-sample NCHW input shape, and whether the file's input is (N, features)."""
    if len(dims) == 2 and dims[1]:
        return (1, dims[1], 1), True
    if len(dims) != 4 or not all(dims[1:]):
        raise UserError(f"{origin}: input must be (N, C, H, W), (N, H, W, C) or (N, features) with static sizes; "
                        f"got {dims}")
    return (dims[1], dims[2], dims[3]), False


def onnx_source(model, origin: str, name: str, keras3_scopes: bool | None = None) -> ModelSource:
    """The torch module of an ONNX ``ModelProto`` (counted as trained). ``keras3_scopes``: whether
    tf2onnx traced a Keras 3 model (see ``_keras_layer``); None tells it from the input's name."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(_attributes(n)["value"]).astype(np.float32)
                      for n in graph.node if n.op_type == "Constant" and "value" in _attributes(n)})
    readers: dict[str, int] = {}
    for node in graph.node:
        for tensor in node.input:  # not ``name``: that is the model's, from its file name
            readers[tensor] = readers.get(tensor, 0) + 1
    # tf2onnx can leave a folded constant behind as an input that nothing reads.
    real_inputs = [i for i in graph.input if i.name not in constants and i.name in readers]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise UserError(f"{origin}: the model must have one input and one output")
    shapes, shape_note = _static_shapes(model)
    imp = _Importer(origin, constants, shapes, readers, graph.output[0].name)
    input_name = real_inputs[0].name
    keras = None
    if model.producer_name == "tf2onnx":
        keras = _traced_by_keras3(graph, input_name) if keras3_scopes is None else keras3_scopes
    dims = imp.shape(input_name) or []
    scaling = _input_scaling(graph, input_name, constants, readers)
    body_start = scaling[-1][0].output[0] if scaling else input_name
    for node, _, _ in scaling:
        imp.aliases[node.output[0]] = input_name
    channels_last = _channels_last(graph, imp, dims, body_start)
    affine = _input_affine(scaling, dims, channels_last, origin, bool(keras))
    if channels_last:
        imp.nhwc_views.add(input_name)  # channels last, as TensorFlow models take it
        dims = [dims[0], dims[3], dims[1], dims[2]]
    input_shape, flat = _input_layout(dims, origin)
    body = "flat_input" if flat else input_name
    if flat:  # the data loader gives (N, 1, F, 1); the dense model reads (N, F)
        imp.steps.append(("flatten", "", (body,), input_name))
    skipped = _shape_arithmetic(graph) | {index for index, node in enumerate(graph.node)
                                          if any(node is taken for taken, _, _ in scaling)}
    keys = _layer_keys(graph.node, keras)
    for index, node in enumerate(graph.node):
        attrs = _attributes(node)
        if index in skipped:
            continue
        if node.op_type == "Constant":
            continue  # read with the initializers, above
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            constants[node.output[0]] = _dequantize(node, constants, attrs)
        elif node.op_type in HANDLERS:
            HANDLERS[node.op_type](imp, node, keys[index], attrs)
        else:
            raise UserError(f"{origin}: ONNX node '{node.name or node.op_type}' ({node.op_type}) is not supported; "
                            f"supported: {SUPPORTED_ONNX}")
    module = OnnxModule(imp.steps, imp.layers, body, imp.source(imp.graph_output)).eval()
    return ModelSource(name, module, input_shape, None, pretrained=True, origin=origin,
                       output_softmax=imp.output_softmax, file_input_shape=(dims[1],) if flat else None,
                       input_affine=affine, notes=(shape_note,) if shape_note else ())


def _channels_last(graph, imp: _Importer, dims: list[int], body_start: str) -> bool:
    """Whether the 4-D input is NHWC: TensorFlow graphs start by moving channels first."""
    first = next((n for n in graph.node if body_start in n.input), None)
    return len(dims) == 4 and first is not None and (
        (first.op_type == "Transpose" and list(_attributes(first).get("perm", [])) == NCHW_FROM_NHWC)
        or (first.op_type == "Reshape" and _is_channel_move(dims, imp.shape(first.output[0]))))


_WRAPPERS = re.compile(r"^(functional|model|sequential|StatefulPartitionedCall)(_\d+)*$")
# The TensorFlow op that a Keras layer's weights feed: the scope part before it is the layer's.
_TF_LAYER_OPS = {"convolution", "depthwise", "MatMul", "Conv2D", "DepthwiseConv2dNative", "BiasAdd"}
_UNIQUIFIER = re.compile(r"_\d+$")
_WEIGHTED_ONNX_OPS = {"Conv", "Gemm", "MatMul"}


def _keras_layer(node, keras3_scopes: bool) -> str | None:
    """The Keras layer a TensorFlow-made node computes, from the scopes in its name or its weight's.

    A converter names a fused node after all the ops it fused ("relu/Relu;bn/add_1;conv2d/convolution"),
    or "Conv__31" with the conv's scope only on its weight. Keras 3 opens each layer's TF name scope
    twice per call (once to build, once to call), and the ops land in the second, which TF always
    uniquifies with one "_N": "conv2d" runs in "conv2d_1", "conv2d_1" in "conv2d_1_2"."""
    for name in (node.name, *node.input[1:2]):
        for segment in name.split(";"):
            parts = [p for p in segment.split("/") if not _WRAPPERS.match(p)]
            found = next((i for i, part in enumerate(parts) if i and part in _TF_LAYER_OPS), None)
            if found is not None:
                layer = parts[found - 1]
                return _UNIQUIFIER.sub("", layer) if keras3_scopes else layer
    return None


def _layer_key(node, index: int, taken: set[str], keras: bool | None) -> str:
    """A layer name users recognise: the Keras layer of a tf2onnx graph (``keras``: None for other
    graphs, else whether the names come from a Keras 3 trace) or the torch module path
    ("/features/conv1/Conv" -> "features_conv1"), unique, never clashing with an nn.Module
    attribute; else the op and its index."""
    parts = [p for p in node.name.split(";")[-1].split("/") if p and not _WRAPPERS.match(p)][:-1]
    layer = None if keras is None else _keras_layer(node, keras)
    key = layer or re.sub(r"\W+", "_", "_".join(parts)).strip("_")
    key = key or f"{node.op_type.lower()}{index}"
    if key in taken or key[0].isdigit() or hasattr(nn.Module, key) or key in ("steps", "input_name", "output_name"):
        key = f"{key}_{index}"
    return key


_SCALING_OPS = {"Mul", "Div", "Add", "Sub"}


def _input_scaling(graph, input_name: str, constants: dict, readers: dict) -> list[tuple[object, str, np.ndarray]]:
    """The chain of (node, op, constant) that scales the graph input before anything else reads it:
    a Keras Rescaling (Mul, Add) or Normalization (Sub, Div), or a torch ``x * s + b``."""
    chain, current = [], input_name
    while readers.get(current) == 1:
        node = next(n for n in graph.node if current in n.input)
        if node.op_type not in _SCALING_OPS or len(node.input) != 2:
            break
        data_first = node.input[0] == current
        constant = constants.get(node.input[1] if data_first else node.input[0])
        if constant is None or (not data_first and node.op_type in ("Sub", "Div")):
            break
        chain.append((node, node.op_type, constant))
        current = node.output[0]
    return chain


def _input_affine(scaling, dims: list[int], channels_last: bool, origin: str, keras3: bool) -> InputAffine | None:
    """``scaling`` as one ``x * scale + offset`` on samples laid out channels first, (C, H, W); a
    constant must be one number, one per channel, or (for an (N, F) input) one per feature."""
    if not scaling:
        return None
    if len(dims) == 2:
        shape, axis_size = (1, dims[1], 1), dims[1]
    else:
        channels = dims[3] if channels_last else dims[1]
        shape, axis_size = (channels, 1, 1), channels
    scale, offset = np.ones(shape), np.zeros(shape)
    for node, op, constant in scaling:
        trailing = constant.shape[-3:] if not channels_last and len(dims) == 4 else constant.shape[-1:]
        wanted = (axis_size, 1, 1) if not channels_last and len(dims) == 4 else (axis_size,)
        if constant.size != 1 and (constant.size != axis_size or tuple(trailing) != wanted):
            raise UserError(f"{origin}: ONNX node '{node.name or op}' ({op}) scales the input by a constant of shape "
                            f"{list(constant.shape)}; one number, one per channel or one per feature is supported")
        c = constant.reshape(-1)[0] if constant.size == 1 else constant.reshape(shape)
        if op == "Mul":
            scale, offset = scale * c, offset * c
        elif op == "Div":
            scale, offset = scale / c, offset / c
        else:
            offset = offset + (c if op == "Add" else -c)
    return InputAffine(scale.astype(np.float32), offset.astype(np.float32),
                       tuple(dict.fromkeys(_scope(node, keras3) for node, _, _ in scaling)))


def _scope(node, keras3: bool) -> str:
    """A scaling node's layer as the model names it ('sequential_1/rescaling_1/mul' -> 'rescaling')."""
    parts = [p for p in node.name.split("/") if p and not _WRAPPERS.match(p)]
    if len(parts) < 2:
        return node.name or node.op_type
    return _UNIQUIFIER.sub("", parts[-2]) if keras3 else parts[-2]


def _traced_by_keras3(graph, input_name: str) -> bool:
    """Whether tf2onnx's graph came from a Keras 3 model: Keras 3 names its inputs keras_tensor_N
    and a functional model "functional" (tf.keras 2 says "model"). A Keras 3 Sequential traced with
    an input of another name is not told apart, and keeps the scope names as they are."""
    scopes = {node.name.split("/")[0] for node in graph.node}
    return "keras_tensor" in input_name or any(re.match(r"^functional(_\d+)*$", scope) for scope in scopes)


def _layer_keys(nodes, keras: bool | None) -> list[str]:
    """Every node's module key, the weighted ones chosen first: a ReLU or pool named after the
    same Keras layer ("dense/Relu") must not take the name a layer's weights are known by."""
    order = sorted(range(len(nodes)), key=lambda i: nodes[i].op_type not in _WEIGHTED_ONNX_OPS)
    keys, taken = [""] * len(nodes), set()
    for index in order:
        keys[index] = _layer_key(nodes[index], index, taken, keras)
        taken.add(keys[index])
    return keys


def load_onnx(path: Path) -> ModelSource:
    import onnx

    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: ONNX file not found") from None
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise UserError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
    return onnx_source(model, str(path), path.stem)
