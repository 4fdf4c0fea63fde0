"""QuantNet's inference path against TFLM's integer arithmetic (issue 13 item 5): the fixed-point
requantiser on hand-computed values, and a small exported model's int8 outputs byte for byte
against the TFLM interpreter."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from smpq_edge.inputs.data import load_dataset
from smpq_edge.export.exporter import export_model
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.network.fixedpoint import Requantiser, quantize_multiplier
from smpq_edge.network.graph import trace
from smpq_edge.network.quant import QuantNet
from smpq_edge.search.runner import calibrate
from smpq_edge.tflite.tflm import TflmRunner, quantise_input

# (x, multiplier, shift, MultiplyByQuantizedMultiplier(x, multiplier, shift)) worked by hand from
# gemmlowp's SaturatingRoundingDoublingHighMul (x * m / 2^31, half up) and RoundingDivideByPOT
# (half away from zero); 2^30 is the multiplier 0.5.
HAND_CASES = [
    (3, 2**30, 0, 2),  # 1.5 -> 2
    (-3, 2**30, 0, -1),  # -1.5 -> -1: the high multiply rounds ties up, not away
    (5, 2**30, 0, 3),
    (-5, 2**30, 0, -2),
    (6, 2**30, -1, 2),  # h = 3, 3 / 2 = 1.5 -> 2
    (-6, 2**30, -1, -2),  # h = -3, -1.5 -> -2: the division rounds ties away from zero
    (-1, 2**30, -1, 0),  # h = round(-0.5) = 0
    (11, 2**30, -2, 2),  # 11 / 8 = 1.375, yet h = round(5.5) = 6 and 6 / 4 = 1.5 -> 2 (one rounding gives 1)
    (-11, 2**30, -2, -1),  # h = -5, -1.25 -> -1
    (-13, 2**30, -2, -2),  # h = -6, -1.5 -> -2
    (1000, 1518500250, -3, 88),  # 1000 * 0.70711 / 8 = 88.39: h = 707, 707 / 8 = 88.4
    (-1000, 1518500250, -3, -88),
    (7, 2**30, 1, 7),  # left shift: 14 * 0.5
    (0, 2**31 - 1, -5, 0),
    (123456, 0, 0, 0),  # a multiplier flushed to zero
]


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def tflm_multiply(x: int, multiplier: int, shift: int) -> int:
    """common.cc's double-rounding MultiplyByQuantizedMultiplier, transcribed on Python integers."""
    left, right = max(shift, 0), max(-shift, 0)
    product = x * (1 << left) * multiplier
    high = _c_div(product + ((1 << 30) if product >= 0 else 1 - (1 << 30)), 1 << 31)
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if (high & mask) > threshold else 0)


@pytest.mark.parametrize("x, multiplier, shift, expected", HAND_CASES)
def test_requantiser_on_hand_computed_values(x, multiplier, shift, expected):
    assert tflm_multiply(x, multiplier, shift) == expected
    out = Requantiser(np.array([multiplier]), np.array([shift]))(torch.tensor([x]))
    assert out.tolist() == [expected]


def test_requantiser_with_bias_equals_tflm_on_ties_and_random_values():
    rng = np.random.default_rng(0)
    channels = 6
    multiplier = rng.integers(2**30, 2**31, channels)
    multiplier[:2] = 2**30, 2**31 - 1
    shift = np.array([0, -1, -3, -8, -12, 1])
    bias = rng.integers(-5000, 5000, channels)
    # Around zero (where the roundings' tie rules differ by sign) and spread over int32/2.
    x = np.concatenate([np.arange(-40, 40), rng.integers(-(2**29), 2**29, 400)])[:, None] - bias
    got = Requantiser(multiplier, shift, (-1,), bias)(torch.from_numpy(x.copy())).numpy()
    expected = [[tflm_multiply(int(v + b), int(m), int(s)) for v, m, s, b in zip(row, multiplier, shift, bias)]
                for row in x]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("real, multiplier, shift", [
    (0.5, 2**30, 0), (0.75, 3 * 2**29, 0), (1.0, 2**30, 1), (0.1, 1717986918, -3),
    (1 - 2.0**-33, 2**30, 1),  # the mantissa rounds up to 2^31: halved, shift + 1
    (2.0**-40, 0, 0), (0.0, 0, 0),  # below 2^-31: flushed to zero
])
def test_quantize_multiplier(real, multiplier, shift):
    m, s = quantize_multiplier(np.array([real]))
    assert (int(m[0]), int(s[0])) == (multiplier, shift)


class ResidualNet(nn.Module):
    """conv + BatchNorm, depthwise, pointwise, residual ADD with ReLU, a standalone RELU (its input
    has two readers) and a second ADD, 2x2 average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        y = self.pointwise(torch.relu(self.depthwise(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(x + y) + torch.relu(y)), 1))


@functools.lru_cache(maxsize=None)
def residual_case(candidates: tuple = (4, 8)):
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    module = ResidualNet()
    with torch.no_grad():  # a BatchNorm with statistics to fold
        module.bn.running_mean.uniform_(-0.2, 0.2), module.bn.running_var.uniform_(0.5, 2.0)
        module.bn.weight.uniform_(0.5, 1.5), module.bn.bias.uniform_(-0.2, 0.2)
    module.eval()
    net = QuantNet(trace(module, data.input_shape), module, candidates)
    calibrate(net, data, 0)
    net.eval()
    bits = {op.name: 4 if i % 2 == 0 else 8 for i, op in enumerate(net.graph.layers)}
    return data, net, bits, export_model(net, bits, data.x_train[:64])


def _int8_outputs(net: QuantNet, x: np.ndarray) -> np.ndarray:
    quantiser = net.activation_quantiser(net.graph.output)
    with torch.no_grad():
        out = net(torch.from_numpy(x))
    return (quantiser.integers(out, 8) + quantiser.params(8).zero_point).to(torch.int8).numpy()  # the int8 output


@pytest.mark.parametrize("policy", ["mixed", "int8"])
def test_integer_forward_equals_tflm_byte_for_byte(policy):
    data, net, bits, export = residual_case()
    kinds = {op.kind for op in net.graph.ops}
    assert {"conv", "depthwise", "fc", "add", "relu", "avgpool"} <= kinds
    tflite = export.tflite if policy == "mixed" else export.tflite_int8
    net.set_policy(bits if policy == "mixed" else {name: 8 for name in bits})
    try:
        runner = TflmRunner(tflite)
        expected = runner.run(quantise_input(data.x_test, runner.input))
        np.testing.assert_array_equal(_int8_outputs(net, data.x_test), expected)
    finally:
        net.set_policy(bits)


def test_exported_activation_quantisation_is_the_integer_paths():
    """The float32 scale and zero point TFLM reads are the ones the integer path computes with."""
    _, net, _, export = residual_case()
    model = TfliteModel.from_bytes(export.tflite)
    weighted = [o for o in model.operators() if o.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    tensors = {"input": model.inputs[0]} | {op.name: tfl.outputs[0] for op, tfl in zip(net.graph.layers, weighted)}
    for name, index in tensors.items():
        p = net.activation_quantiser(name).params()
        quantization = model.tensor(index).quantization
        assert (quantization.scales[0], quantization.zero_points[0]) == (p.tflite_scale, p.zero_point), name


def test_split_float32_accumulation_equals_float64():
    """A layer whose sums could pass 2^24 runs as two float32 convolutions of the inputs' high
    and low parts (quant.SPLIT): exactly the float64 accumulator, where one float32 sum is not."""
    from dataclasses import replace

    from smpq_edge.inputs.data import Dataset
    from smpq_edge.network.quant import FLOAT32_EXACT

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(256, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)).eval()
    with torch.no_grad():  # every weight at the channel's largest magnitude: the largest sums there are
        module[0].weight.copy_(torch.sign(torch.randn_like(module[0].weight)))
    x = torch.rand(64, 256, 4, 4) * 4 - 1  # a zero point away from the middle: inputs up to 255 from it
    data = Dataset("big-sums", x.numpy(), np.zeros(64, np.int64), x.numpy(), np.zeros(64, np.int64), x.numpy(),
                   np.zeros(64, np.int64), num_classes=1)
    net = QuantNet(trace(module, (256, 4, 4)), module, (4, 8))
    calibrate(net, data, 0)
    net.eval()
    op = net.graph.layers[0]
    layer = net.layer(op.name).integer(8, net.activation_quantiser(op.inputs[0]), net.activation_quantiser(op.name))
    assert layer.split and layer.weight.dtype == torch.float32
    assert 256 * 9 * 127 * 255 > FLOAT32_EXACT, "one float32 sum would not be exact here"
    wide = replace(layer, weight=layer.weight.to(torch.float64), split=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), wide(x), rtol=0, atol=0)
