"""Export of a QuantNet + mixed policy to a TFLM-ready .tflite (issue 4).

The cases are quickly trained (a few float epochs, a short QAT finetune under the mixed policy,
no search) and exported once per test process; tests/test_emulator.py reuses them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from smpq_edge.inputs.data import Dataset, load_dataset
from smpq_edge.export.exporter import ExportResult, export_model
from smpq_edge.export.int4 import unpack_int4
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import load_model
from smpq_edge.network.quant import QuantNet, quantize_weight
from smpq_edge.search.runner import calibrate, weight_params
from smpq_edge.search.train import TrainConfig, seed_everything, train
from smpq_edge.tflite.tflm import TflmRunner

CASES = {"digits_cnn": ("digits", 12), "mnist1d_dscnn": ("mnist1d", 8)}  # model: (data, float epochs)


@dataclass(frozen=True)
class Case:
    name: str
    data: Dataset
    net: QuantNet  # set to ``bits``
    bits: dict[str, int]
    export: ExportResult


def mixed_policy(net: QuantNet) -> dict[str, int]:
    """int4 and int8 alternating, first layer int4: every kind gets both bit-widths across the cases."""
    return {op.name: 4 if i % 2 == 0 else 8 for i, op in enumerate(net.graph.layers)}


def calibrated_export(source, data: Dataset, samples: int) -> tuple[QuantNet, dict[str, int], ExportResult]:
    """The model's supernet calibrated on the data, set to ``mixed_policy`` and exported as it is."""
    net = QuantNet(trace(source.module, data.input_shape), source.module, (4, 8))
    calibrate(net, data, 0)
    bits = mixed_policy(net)
    net.set_policy(bits)
    net.eval()
    return net, bits, export_model(net, bits, data.x_train[:samples])


@functools.lru_cache(maxsize=None)
def trained_case(name: str) -> Case:
    data_name, epochs = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: intra-op threads only add contention
    try:
        seed_everything(0)
        data = load_dataset(data_name, seed=0)
        source = load_model(name, num_classes=data.num_classes)
        train(source.module, data, TrainConfig(epochs=epochs, lr=1e-2), 0, progress=False)
        source.module.eval()
        net = QuantNet(trace(source.module, data.input_shape), source.module, (4, 8))
        calibrate(net, data, 0)
        bits = mixed_policy(net)
        net.set_policy(bits)
        train(net, data, TrainConfig(epochs=2, lr=5e-4), 0, params=weight_params(net), progress=False)
        net.eval()
        export = export_model(net, bits, data.x_train[:128])
    finally:
        torch.set_num_threads(threads)
    return Case(name, data, net, bits, export)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request) -> Case:
    return trained_case(request.param)


def _weighted_ops(model: TfliteModel):
    return [o for o in model.operators() if o.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]


def test_model_loads_and_runs_in_tflm(case):
    for blob in (case.export.tflite, case.export.tflite_int8):
        runner = TflmRunner(blob)
        out = runner.run(np.zeros((3, *runner.input.shape[1:]), np.int8))
        assert out.shape == (3, case.data.num_classes)


def test_int4_tensors_hold_exactly_our_integers(case):
    model = TfliteModel.from_bytes(case.export.tflite)
    ops = _weighted_ops(model)
    assert len(ops) == len(case.net.graph.layers)
    seen = set()
    for op, tfl in zip(case.net.graph.layers, ops):
        layer = case.net.layer(op.name)
        bits = case.bits[op.name]
        q, scales = quantize_weight(layer.weight, bits, layer.per_channel)
        q = q.numpy()
        layout = {"conv": (0, 2, 3, 1), "depthwise": (1, 2, 3, 0), "fc": (0, 1)}[op.kind]
        expected = q.transpose(layout)
        w = model.tensor(tfl.inputs[1])
        raw = model._model.subgraphs[0].tensors[tfl.inputs[1]]
        assert w.shape == op.weight_shape
        if bits == 4:
            assert raw.type == 17 and w.type == "INT4"
            assert len(w.data) == (expected.size + 1) // 2
            np.testing.assert_array_equal(unpack_int4(w.data, expected.size).reshape(expected.shape), expected)
        else:
            assert w.type == "INT8"
            np.testing.assert_array_equal(np.frombuffer(w.data, np.int8).reshape(expected.shape), expected)
        np.testing.assert_allclose(w.quantization.scales, scales.numpy(), rtol=1e-6)
        assert set(w.quantization.zero_points) == {0}
        if op.kind == "fc":
            assert len(w.quantization.scales) == 1  # per tensor for int4 and int8
        else:
            assert w.quantization.quantized_dimension == (3 if op.kind == "depthwise" else 0)
        # Bias: int32 at input_scale x weight_scale[c].
        in_scale = model.tensor(tfl.inputs[0]).quantization.scales[0]
        bias = model.tensor(tfl.inputs[2])
        assert bias.type == "INT32"
        bias_scale = in_scale * scales.numpy().astype(np.float64)
        np.testing.assert_allclose(bias.quantization.scales, bias_scale, rtol=1e-6)
        per_channel = np.broadcast_to(bias_scale, (len(layer.bias),))
        np.testing.assert_array_equal(np.frombuffer(bias.data, np.int32),
                                      np.round(layer.bias.detach().numpy().astype(np.float64) / per_channel))
        seen.add((op.kind, bits))
    assert {b for _, b in seen} == {4, 8}


def test_activation_scales_are_the_networks(case):
    model = TfliteModel.from_bytes(case.export.tflite)
    (inp,), (out,) = model.inputs, model.outputs
    p_in = case.net.activation_quantiser("input").params()
    p_out = case.net.activation_quantiser(case.net.graph.output).params()
    assert model.tensor(inp).quantization.scales[0] == pytest.approx(p_in.scale, rel=1e-6)
    assert model.tensor(inp).quantization.zero_points[0] == p_in.zero_point
    assert model.tensor(out).quantization.scales[0] == pytest.approx(p_out.scale, rel=1e-6)
    assert model.tensor(out).quantization.zero_points[0] == p_out.zero_point
    for op, tfl in zip(case.net.graph.layers, _weighted_ops(model)):
        p = case.net.activation_quantiser(op.name).params()
        q = model.tensor(tfl.outputs[0]).quantization
        assert q.scales[0] == pytest.approx(p.scale, rel=1e-6) and q.zero_points[0] == p.zero_point


def test_global_pool_is_average_pool_not_mean(case):
    names = [o.name for o in TfliteModel.from_bytes(case.export.tflite).operators()]
    assert "MEAN" not in names and "AVERAGE_POOL_2D" in names
    assert case.export.mean_to_avgpool == 1 and not case.export.notes


def test_weights_and_biases_store_a_zero_point_per_scale(case):
    """Per-channel weight and bias tensors keep one zero point (0) per scale, as the TFLite schema
    wants: LiteRT refuses fewer (test_litert), though TFLM's allocator would expand a single one."""
    for tflite in (case.export.tflite, case.export.tflite_int8):
        model = TfliteModel.from_bytes(tflite)
        per_channel = [t for t in model.tensors() if t.quantization and len(t.quantization.scales) > 1]
        assert per_channel and all(t.quantization.zero_points == (0,) * len(t.quantization.scales)
                                   for t in per_channel)


def test_int8_reference_is_all_int8_and_larger(case):
    model = TfliteModel.from_bytes(case.export.tflite_int8)
    assert all(model.tensor(o.inputs[1]).type == "INT8" for o in _weighted_ops(model))
    assert len(case.export.tflite) < len(case.export.tflite_int8)


def test_policy_mismatch_is_a_user_error():
    from smpq_edge.common.errors import UserError

    c = trained_case("digits_cnn")
    with pytest.raises(UserError, match="missing layers"):
        export_model(c.net, {}, c.data.x_train[:8])
    with pytest.raises(UserError, match="2 to 8 bits"):
        export_model(c.net, {name: 16 for name in c.bits}, c.data.x_train[:8])


def test_cli_emulate_rejects_a_corrupt_file(tmp_path, capsys):
    from smpq_edge.cli import main

    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    assert main(["emulate", str(bad), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a TFLite model" in err[0]


def test_cli_export_then_emulate(tmp_path, capsys):
    import io
    import json

    from smpq_edge.cli import main
    from smpq_edge.inputs.policy import LayerChoice, Policy, save_policy

    c = trained_case("digits_cnn")
    layers = [LayerChoice(name=op.name, kind=op.kind, weight_bits=c.bits[op.name], params=op.weight_count,
                          flash_bytes=0, cycles=0, shapley={}) for op in c.net.graph.layers]
    save_policy(Policy(board="nucleo-l4r5zi", model="digits_cnn", method="smpq", layers=layers),
                tmp_path / "policy.json")
    buffer = io.BytesIO()
    torch.save({"quantnet": c.net.state_dict()}, buffer)
    (tmp_path / "quantnet.pt").write_bytes(buffer.getvalue())
    assert main(["export", "--out", str(tmp_path), "--model", "digits_cnn", "--data", "digits"]) == 0
    blob = (tmp_path / "model.tflite").read_bytes()
    assert (tmp_path / "model_int8.tflite").exists()
    # Same weights and scales as the in-process export (onnx2tf's calibration does not leak in).
    assert blob == c.export.tflite
    capsys.readouterr()
    assert main(["emulate", str(tmp_path / "model.tflite"), "--data", "digits", "--json"]) == 0
    record = json.loads((tmp_path / "emulation_model.json").read_text())
    assert record["samples"] == len(c.data.y_test) and record["accuracy"] > 0.5


def test_a_flatten_after_a_convolution_is_folded_into_the_dense_weights():
    """digits_dense flattens a 4x4x12 map into a dense layer. onnx2tf writes torch's channels-first
    flatten as TRANSPOSE + RESHAPE; the exporter puts the dense layer's columns in HWC order instead,
    so the model has the operators the cost model prices and TFLM's outputs stay the network's."""
    from smpq_edge.network.cost import tflite_operators
    from smpq_edge.emulator import emulate

    seed_everything(0)
    data = load_dataset("digits", seed=0)
    source = load_model("digits_dense", num_classes=data.num_classes)
    source.module.eval()
    net, bits, export = calibrated_export(source, data, 64)
    operators = [o.name for o in TfliteModel.from_bytes(export.tflite).operators()]
    assert operators == [o.builtin for o in tflite_operators(net.graph, bits)]
    assert "TRANSPOSE" not in operators and "RESHAPE" not in operators
    assert [o.name for o in TfliteModel.from_bytes(export.variant(net, bits)).operators()] == operators
    result = emulate(export.tflite, data.x_test[:120], data.y_test[:120], net)
    assert result.label_agreement == 1.0 and result.max_abs_output_delta < 1e-6
