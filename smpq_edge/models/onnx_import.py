"""ONNX file -> torch module, for the ops a TFLM int8/int4 model can hold.

Written here rather than taken from onnx2torch: onnx2torch depends on torchvision, and PyPI's
torchvision (CUDA-linked) fails to import beside the CPU build of torch this project pins. The
subset below is exactly what ``graph.trace`` accepts, so nothing is lost: any other op would be
refused later anyway, and here it is refused with the ONNX node's name.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smpq_edge.errors import UserError
from smpq_edge.models import ModelSource

SUPPORTED_ONNX = ("Conv, BatchNormalization, Relu, Clip(0, 6), Gemm, MatMul, Add, GlobalAveragePool, "
                  "AveragePool, MaxPool, Flatten, Reshape, Dropout, Identity")


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict, name: str) -> tuple[int, int]:
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise UserError(f"ONNX node '{name}': asymmetric padding {pads} is not supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UserError(f"ONNX node '{name}': auto_pad is not supported; export with explicit pads")
    return tuple(pads[:2])


class OnnxModule(nn.Module):
    """Runs the imported ONNX nodes in order; torch.fx traces it like any hand-written model."""

    def __init__(self, steps: list[tuple[str, str, tuple[str, ...], str]], layers: dict[str, nn.Module],
                 input_name: str, output_name: str):
        super().__init__()
        self.steps = steps  # (kind, target layer or "", input names, output name)
        self.layers = nn.ModuleDict(layers)
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x}
        for kind, layer, inputs, output in self.steps:
            args = [values[name] for name in inputs]
            if kind == "layer":
                values[output] = self.layers[layer](args[0])
            elif kind == "add":
                values[output] = operator.add(args[0], args[1])
            elif kind == "flatten":
                values[output] = torch.flatten(args[0], 1)
            else:  # alias (Identity, Dropout)
                values[output] = args[0]
        return values[self.output_name]


def _conv(attrs: dict, weight: np.ndarray, bias: np.ndarray | None, name: str) -> nn.Conv2d:
    if weight.ndim != 4:
        raise UserError(f"ONNX node '{name}': only 2-D convolution is supported (weight rank {weight.ndim})")
    if list(attrs.get("dilations", [1, 1])) != [1, 1]:
        raise UserError(f"ONNX node '{name}': dilated convolution is not supported")
    group = int(attrs.get("group", 1))
    out_ch, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * group, out_ch, (kh, kw), stride=tuple(attrs.get("strides", [1, 1])),
                     padding=_pads(attrs, name), groups=group, bias=bias is not None)
    conv.weight.data = torch.from_numpy(weight.copy())
    if bias is not None:
        conv.bias.data = torch.from_numpy(bias.copy())
    return conv


def load_onnx(path: Path) -> ModelSource:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: ONNX file not found") from None
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise UserError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in constants]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise UserError(f"{path}: the model must have one input and one output")
    dims = [d.dim_value for d in real_inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]):
        raise UserError(f"{path}: input must be (N, C, H, W) with static C, H, W; got {dims}")
    steps, layers = [], {}
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        # Layer names users recognise ("/features/conv1/Conv" -> "features_conv1_Conv"), kept unique.
        key = re.sub(r"\W+", "_", name).strip("_") or f"node{index}"
        key = key if key not in layers and not key[0].isdigit() else f"{key}_{index}"
        attrs = _attributes(node)
        op = node.op_type
        if op == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(attrs["value"]).astype(np.float32)
            continue
        if op == "Conv":
            bias = constants.get(node.input[2]) if len(node.input) > 2 else None
            layers[key] = _conv(attrs, constants[node.input[1]], bias, name)
        elif op == "BatchNormalization":
            scale, b, mean, var = (constants[n] for n in node.input[1:5])
            bn = nn.BatchNorm2d(len(scale), eps=float(attrs.get("epsilon", 1e-5)))
            bn.weight.data, bn.bias.data = torch.from_numpy(scale.copy()), torch.from_numpy(b.copy())
            bn.running_mean.data, bn.running_var.data = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
            layers[key] = bn.eval()
        elif op == "Relu":
            layers[key] = nn.ReLU()
        elif op == "Clip":
            bounds = [float(constants[n]) if n in constants else None for n in node.input[1:3]]
            if bounds != [0.0, 6.0] and (attrs.get("min"), attrs.get("max")) != (0.0, 6.0):
                raise UserError(f"ONNX node '{name}': only Clip(0, 6) (ReLU6) is supported")
            layers[key] = nn.ReLU6()
        elif op in ("Gemm", "MatMul"):
            weight = constants.get(node.input[1])
            if weight is None:
                raise UserError(f"ONNX node '{name}': {op} needs a constant weight")
            transposed = op == "Gemm" and attrs.get("transB", 0) == 1
            weight = weight if transposed else weight.T
            if op == "Gemm" and (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (1.0, 1.0, 0):
                raise UserError(f"ONNX node '{name}': Gemm with alpha/beta/transA is not supported")
            bias = constants.get(node.input[2]) if op == "Gemm" and len(node.input) > 2 else None
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
            if bias is not None:
                linear.bias.data = torch.from_numpy(bias.copy())
            layers[key] = linear
        elif op == "GlobalAveragePool":
            layers[key] = nn.AdaptiveAvgPool2d(1)
        elif op in ("AveragePool", "MaxPool"):
            if attrs.get("ceil_mode", 0):
                raise UserError(f"ONNX node '{name}': ceil_mode pooling is not supported")
            kernel = tuple(attrs["kernel_shape"])
            kwargs = dict(stride=tuple(attrs.get("strides", kernel)), padding=_pads(attrs, name))
            layers[key] = nn.AvgPool2d(kernel, **kwargs) if op == "AveragePool" else nn.MaxPool2d(kernel, **kwargs)
        elif op == "Add" and not any(n in constants for n in node.input):
            steps.append(("add", "", tuple(node.input), node.output[0]))
            continue
        elif op in ("Flatten", "Reshape"):
            shape = constants.get(node.input[1]) if op == "Reshape" else None
            if (op == "Flatten" and attrs.get("axis", 1) != 1) or (op == "Reshape" and (shape is None or len(shape) != 2)):
                raise UserError(f"ONNX node '{name}': only a flatten to (N, features) is supported")
            steps.append(("flatten", "", (node.input[0],), node.output[0]))
            continue
        elif op in ("Identity", "Dropout"):
            steps.append(("alias", "", (node.input[0],), node.output[0]))
            continue
        else:
            raise UserError(f"{path}: ONNX node '{name}' ({op}) is not supported; supported: {SUPPORTED_ONNX}")
        steps.append(("layer", key, (node.input[0],), node.output[0]))
    module = OnnxModule(steps, layers, real_inputs[0].name, graph.output[0].name).eval()
    return ModelSource(path.stem, module, tuple(dims[1:]), None, pretrained=True, origin=str(path))
