"""int16 activations (issue 23, the export slice): a layer set to w8a16 in the policy runs TFLM's
16x8 kernels (int16 in and out, symmetric, int64 bias), the exporter puts TFLM's QUANTIZE at every
int8/int16 boundary (residual ADDs whose inputs differ included) and before the int8 output, and
the fake-quant network computes exactly what the TFLM interpreter computes from the file; the
cost model prices the QUANTIZE operators, the int16 tensors and the int64 biases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smpq_edge.common.errors import UserError
from smpq_edge.common.precision import Precision
from smpq_edge.export.exporter import export_model
from smpq_edge.inputs.boards import load_board
from smpq_edge.inputs.policy import load_policy
from smpq_edge.network.cost import estimate, tflite_operators
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.tflite.tflm import TflmRunner, quantise_input, smallest_arena

from test_export import trained_case
from test_integer_numerics import _int8_outputs, residual_case

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _export(net, data, bits: dict[str, int], wide: set[str]):
    """``net`` under ``bits`` with ``wide`` on int16 activations (their weights int8), exported."""
    bits = {name: 8 if name in wide else b for name, b in bits.items()}
    net.set_policy(bits)
    net.set_activation_bits(frozenset(wide))
    return bits, export_model(net, bits, data.x_train[:64])


@pytest.fixture
def residual():
    data, net, bits, _ = residual_case()
    yield data, net, bits
    net.set_policy(bits)
    net.set_activation_bits(frozenset())


@pytest.mark.parametrize("wide", [("conv",), ("depthwise",), ("pointwise",), ("fc",), ("conv", "depthwise"),
                                  ("conv", "depthwise", "pointwise", "fc")])
def test_int16_layers_compute_in_tflm_byte_for_byte_what_the_fake_quant_computes(residual, wide):
    data, net, bits = residual
    _, exported = _export(net, data, bits, set(wide))
    runner = TflmRunner(exported.tflite)
    expected = runner.run(quantise_input(data.x_test, runner.input))
    np.testing.assert_array_equal(_int8_outputs(net, data.x_test), expected)


def test_a_quantize_at_every_type_boundary(residual):
    """pointwise in int16 feeds the residual ADD (whose other input is the int8 conv) and a RELU:
    one QUANTIZE to int16 before it, one back to int8 shared by both readers."""
    data, net, bits = residual
    _, exported = _export(net, data, bits, {"pointwise"})
    model = TfliteModel.from_bytes(exported.tflite)
    ops = model.operators()
    types = [(o.name, model.tensor(o.inputs[0]).type, model.tensor(o.outputs[0]).type) for o in ops]
    assert types[:6] == [("CONV_2D", "INT8", "INT8"), ("DEPTHWISE_CONV_2D", "INT8", "INT8"),
                         ("QUANTIZE", "INT8", "INT16"), ("CONV_2D", "INT16", "INT16"), ("QUANTIZE", "INT16", "INT8"),
                         ("RELU", "INT8", "INT8")]
    assert exported.quantize_ops == 2 and [o.name for o in ops].count("QUANTIZE") == 2
    adds = [o for o in ops if o.name == "ADD"]
    assert all(model.tensor(i).type == "INT8" for o in adds for i in o.inputs)
    assert ops[4].outputs[0] in adds[0].inputs  # the residual ADD reads the int8 copy
    wide_layer = ops[3]
    bias = model.tensor(wide_layer.inputs[2])
    assert bias.type == "INT64"
    for index in (wide_layer.inputs[0], wide_layer.outputs[0]):
        assert set(model.tensor(index).quantization.zero_points) == {0}  # symmetric int16
    # The same layout under an int8 policy has no QUANTIZE; the int8 reference model never does.
    assert "QUANTIZE" not in [o.name for o in TfliteModel.from_bytes(exported.tflite_int8).operators()]


def test_an_int16_output_reaches_the_user_as_int8(residual):
    data, net, bits = residual
    _, exported = _export(net, data, bits, {"fc"})
    model = TfliteModel.from_bytes(exported.tflite)
    assert model.operators()[-1].name == "QUANTIZE" and model.tensor(model.outputs[0]).type == "INT8"
    scale, zero_point = model.tensor(model.outputs[0]).quantization.scales[0], \
        model.tensor(model.outputs[0]).quantization.zero_points[0]
    assert (np.float32(exported.output_scale), exported.output_zero_point) == (np.float32(scale), zero_point)


def test_tflm_runs_no_hybrid_or_int4_activation_candidate(residual, tmp_path):
    with pytest.raises(ValueError, match=r"^w4a16: TFLM's 16x8 kernels take int8 weights only"):
        Precision.parse("w4a16")
    with pytest.raises(ValueError, match=r"^w8a4: TFLM has no 4-bit activations"):
        Precision.parse("w8a4")
    assert Precision.parse("w8a16") == Precision(8, 16) and Precision.parse("w8a16").wide
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"board": "b", "model": "m", "layers": [
        {"name": "conv", "kind": "conv", "weight_bits": 4, "activation_bits": 16, "params": 72}]}))
    with pytest.raises(UserError, match=r"policy.json: layers.0: .*16x8 kernels take int8 weights only") as error:
        load_policy(policy)
    assert "\n" not in str(error.value)
    data, net, bits = residual
    net.set_activation_bits(frozenset({"conv"}))
    with pytest.raises(UserError, match=r"layers \['conv'\]: TFLM's 16x8 kernels take int8 weights only"):
        export_model(net, {**bits, "conv": 4}, data.x_train[:64])


@pytest.mark.parametrize("name", ["digits_cnn", "mnist1d_dscnn"])
def test_the_cost_model_prices_an_exported_int16_model(name):
    """Operators as written, flash within 1.5 % of the file and the host arena within 2 % of TFLM's
    smallest (measured: 0.1-0.9 % and 0.6-1.3 %), for one 16x8 layer and for all of them."""
    case = trained_case(name)
    net, data = case.net, case.data
    layers = [op.name for op in net.graph.layers]
    board = load_board("rpi-pico")  # reference kernels, as the host interpreter runs
    try:
        for wide in ({layers[1]}, set(layers)):
            bits, exported = _export(net, data, case.bits, wide)
            written = [o.name for o in TfliteModel.from_bytes(exported.tflite).operators()]
            assert [o.builtin for o in tflite_operators(net.graph, bits, frozenset(wide))] == written
            cost = estimate(net.graph, bits, board, host=True, wide=frozenset(wide))
            assert cost.model_flash_bytes == pytest.approx(len(exported.tflite), rel=0.015)
            assert cost.arena_bytes == pytest.approx(smallest_arena(exported.tflite), rel=0.02)
            assert all(layer.bias_bytes == (8 if layer.name in wide else 4) * net.graph.op(layer.name).out_channels
                       for layer in cost.layers)
    finally:
        net.set_policy(case.bits)
        net.set_activation_bits(frozenset())


def test_training_fake_quantises_int16_tensors_on_the_finer_grid(residual):
    """QAT through a 16x8 layer: its output lies on the symmetric int16 grid of the calibrated
    range, and the gradient reaches its weights."""
    import torch

    data, net, bits = residual
    bits, _ = _export(net, data, bits, {"depthwise"})
    quantiser = net.activation_quantiser("depthwise")
    seen = {}
    hook = quantiser.register_forward_hook(lambda module, args, out: seen.update(out=out))
    net.train()
    try:
        loss = net(torch.from_numpy(data.x_train[:32])).square().mean()
        loss.backward()
    finally:
        hook.remove()
        net.eval()
    gradient = net.layer("depthwise").weight.grad
    assert gradient is not None and float(gradient.abs().sum()) > 0
    p = quantiser.params(16)
    assert p.zero_point == 0 and quantiser.bits == 16
    steps = seen["out"].detach() / p.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert len(torch.unique(steps.round())) > 256  # finer than any int8 grid
    net.zero_grad()


def test_cost_prices_a_policy_files_int16_layers(tmp_path, capsys):
    from smpq_edge.cli import main

    layers = [("conv0", "conv"), ("depthwise3", "depthwise"), ("conv6", "conv"), ("fc11", "fc")]
    reports = {}
    for name, wide in (("int8", ()), ("wide", ("conv0",))):
        policy = tmp_path / f"{name}.json"
        policy.write_text(json.dumps({"board": "b", "model": "digits_cnn", "layers": [
            {"name": layer, "kind": kind, "weight_bits": 8, "activation_bits": 16 if layer in wide else 8, "params": 0}
            for layer, kind in layers]}))
        assert main(["cost", "--model", "digits_cnn", "--bits", str(policy), "--json"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    assert reports["wide"]["arena_bytes"] > reports["int8"]["arena_bytes"]
    assert reports["wide"]["cycles"] > reports["int8"]["cycles"]  # two QUANTIZE operators, the s16 conv
    assert main(["cost", "--model", "digits_cnn", "--bits", str(tmp_path / "wide.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "act bits" in table[0] and table[2].split()[:4] == ["conv0", "conv", "8", "16"]
