"""Trained TensorFlow models in every format users hold import faithfully: Keras 3 .keras and .h5,
a legacy tf.keras .h5, SavedModel, float and dynamic-range .tflite, and tf2onnx's ONNX, for
functional, Sequential and subclassed Keras models. The imported float network computes what
TensorFlow computes; TF's SAME padding survives export as TFLite's own SAME (no PAD op); what
TFLM cannot run, or a file that cannot be read, stops with one line naming the node or the way out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smpq_edge.common.errors import UserError
from smpq_edge.export.exporter import export_model
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import load_model
from smpq_edge.network.quant import QuantNet
from smpq_edge.network.softmax import softmax_int8, softmax_params
from smpq_edge.tflite.tflm import TflmRunner, quantise_input

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory) -> Path:
    """Every model of tests/tf_models.py in every format, made by TensorFlow in child processes."""
    out = tmp_path_factory.mktemp("tf_models")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    for extra, more_env in (([], {}), (["--legacy"], {"TF_USE_LEGACY_KERAS": "1"})):
        result = subprocess.run([sys.executable, str(HERE / "tf_models.py"), str(out), *extra],
                                env={**env, **more_env}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    return out


def _nchw(x: np.ndarray) -> torch.Tensor:
    """The reference inputs (NHWC images or (N, F) vectors) as the imported network takes them."""
    if x.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return torch.from_numpy(x[:, None, :, None].copy())


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# Every construction (functional "cnn", Sequential, subclassed) in every format Keras 3 writes for it
# (.keras, .h5, model.export's SavedModel, TFLiteConverter's .tflite): a subclassed model's .keras
# and .h5 name its class without its code, so those are refused (see the test below).
FAITHFUL = [(name, suffix) for name in ("cnn", "sequential")
            for suffix in (".keras", ".h5", "_savedmodel", ".tflite")] + \
    [("subclassed", "_savedmodel"), ("subclassed", ".tflite"), ("cnn", "_tf2onnx.onnx")] + \
    [("kws", suffix) for suffix in (".keras", ".tflite", "_legacy.h5")] + \
    [("autoencoder", suffix) for suffix in (".keras", "_tf2onnx.onnx")] + \
    [(name, suffix) for name in ("rescaled", "flatten_dense") for suffix in (".keras", ".h5", "_savedmodel", ".tflite")]


@pytest.mark.parametrize("name,suffix", FAITHFUL)
def test_imported_network_computes_what_tensorflow_computes(tf_files, name, suffix):
    source = load_model(tf_files / f"{name}{suffix}")
    reference = np.load(tf_files / f"{name}{'_legacy' if 'legacy' in suffix else ''}.npz")
    assert source.pretrained
    # Named after its file (or SavedModel folder), not a graph tensor such as 'functional_1/dense_1/BiasAdd:0'.
    assert source.name == Path(f"{name}{suffix}").stem
    x = _nchw(reference["x"])
    # A Rescaling / Normalization the model starts with is taken out and applied to the data.
    assert (source.input_affine is not None) == (name == "rescaled")
    if source.input_affine is not None:
        assert source.input_affine.nodes == ("rescaling", "normalization")
        x = torch.from_numpy(source.input_affine.apply(x.numpy()))
    with torch.no_grad():
        got = source.module.eval()(x).numpy()
    assert _relative_error(got, reference["logits"]) < 1e-5
    # The final Softmax is kept as a flag, outside the module (whose outputs are the logits above).
    assert source.output_softmax == (name in ("cnn", "sequential", "subclassed", "kws")) and not source.notes
    # Layers carry the Keras layers' names in every format, not TF's scopes ('conv2d_1_2' for
    # conv2d_1) or a fused BatchNorm's. A Keras 3 subclassed model's graph is not told from a
    # tf.keras 2 one, and keeps TF's scope names (README, "Layer names").
    names = [op.name for op in trace(source.module, source.input_shape).layers]
    keras_names = [str(n) for n in reference["layers"]]
    if name == "subclassed":
        keras_names = [f"{n}_1" for n in keras_names]
    elif suffix == ".tflite" and not source.output_softmax:  # the output layer's name is lost (test below)
        keras_names[-1] = names[-1]
    assert names == keras_names


def test_a_layer_a_tflite_kept_no_name_for_is_named_by_its_op_and_position(tf_files):
    """TFLite names an output layer's tensors after the signature ('StatefulPartitionedCall_1:0')
    and its weights 'arith.constantN': the Keras name is gone, so the op and its node index stand in."""
    source = load_model(tf_files / "autoencoder.tflite")
    names = [op.name for op in trace(source.module, source.input_shape).layers]
    assert names[:2] == ["dense_3", "dense_4"] and re.fullmatch(r"matmul\d+", names[2])


def test_kws_same_padding_is_kept_asymmetric(tf_files):
    graph = trace(*(lambda s: (s.module, s.input_shape))(load_model(tf_files / "kws.keras")))
    first = graph.layers[0]
    assert first.kind == "conv" and first.same_pads == (4, 1, 5, 1) and first.out_shape == (16, 25, 5)
    assert graph.layers[-1].kind == "fc"


def test_dynamic_range_weights_are_dequantised(tf_files):
    source = load_model(tf_files / "cnn_dynamic_range.tflite")
    dense = [m for m in source.module.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 1024]
    assert dense, "the 2,048-weight dense layer"
    # int8 weights, symmetric per tensor or per channel: at most 255 levels per output row.
    assert max(len(np.unique(row)) for row in dense[0].weight.detach().numpy()) <= 255
    reference = np.load(tf_files / "cnn.npz")
    with torch.no_grad():
        got = source.module.eval()(_nchw(reference["x"])).numpy()
    assert _relative_error(got, reference["logits"]) < 0.05  # int8 weights, not the float ones


def test_export_keeps_tensorflow_same_padding_without_pad_ops(tf_files):
    source = load_model(tf_files / "kws.tflite")
    graph = trace(source.module, source.input_shape)
    net = QuantNet(graph, source.module, (4, 8)).eval()
    calibration = np.random.default_rng(0).normal(size=(32, *source.input_shape)).astype(np.float32)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(calibration))
        net.commit_observations()
    bits = {op.name: 8 for op in graph.layers}
    net.set_policy(bits)
    model = TfliteModel.from_bytes(export_model(net.eval(), bits, calibration).tflite_int8)
    names = [op.name for op in model.operators()]
    assert "PAD" not in names and "PADV2" not in names
    convs = [op for op in model.operators() if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert [op.options["padding"] for op in convs][:2] == [0, 0]  # SAME (the 1x1 after it pads nothing)
    assert (convs[0].options["strideH"], convs[0].options["strideW"]) == (2, 2)


def _calibrated_net(source) -> tuple[QuantNet, np.ndarray]:
    graph = trace(source.module, source.input_shape)
    net = QuantNet(graph, source.module, (4, 8))
    calibration = np.random.default_rng(0).normal(size=(32, *source.input_shape)).astype(np.float32)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(calibration))
        net.commit_observations()
    return net.eval(), calibration


@pytest.mark.parametrize("suffix", [".keras", ".tflite"])
def test_final_softmax_is_exported_as_tflms_int8_softmax(tf_files, suffix):
    source = load_model(tf_files / f"cnn{suffix}")
    net, calibration = _calibrated_net(source)
    bits = {op.name: 4 if i % 2 else 8 for i, op in enumerate(net.graph.layers)}
    net.set_policy(bits)
    with_softmax = export_model(net, bits, calibration, softmax=True)
    logits = export_model(net, bits, calibration)
    for tflite in (with_softmax.tflite, with_softmax.tflite_int8, with_softmax.variant(net, bits)):
        model = TfliteModel.from_bytes(tflite)
        last, before = model.operators()[-1], model.operators()[-2]
        assert last.name == "SOFTMAX" and last.options["beta"] == 1.0 and last.inputs == before.outputs
        output = model.tensor(model.outputs[0])
        assert output.type == "INT8" and output.quantization.scales == (1 / 256,)
        assert output.quantization.zero_points == (-128,)
    assert (with_softmax.output_scale, with_softmax.output_zero_point, with_softmax.softmax) == (1 / 256, -128, True)
    assert "SOFTMAX" not in [op.name for op in TfliteModel.from_bytes(logits.tflite).operators()]
    # End to end: TFLM's output of the softmax model is our integer softmax of its logits model's.
    x = np.random.default_rng(1).normal(size=(200, *source.input_shape)).astype(np.float32)
    runner, logits_runner = TflmRunner(with_softmax.tflite), TflmRunner(logits.tflite)
    inputs = quantise_input(x, runner.input)
    probabilities = runner.run(inputs).reshape(len(x), -1)
    ours = softmax_int8(logits_runner.run(inputs).reshape(len(x), -1), softmax_params(logits_runner.output.scale))
    assert np.array_equal(ours, probabilities) and len(np.unique(probabilities)) > 2


@pytest.mark.parametrize("suffix", [".keras", ".tflite"])
def test_export_keeps_a_flat_input_shape(tf_files, suffix):
    """A Keras model that takes (N, 20) is exported taking [1, 20], not the traced graph's [1, 20, 1, 1],
    and computes in TFLM what the same model computes in that 4-D form."""
    source = load_model(tf_files / f"autoencoder{suffix}")
    assert source.file_input_shape == (20,) and source.input_shape == (1, 20, 1)
    net, calibration = _calibrated_net(source)
    bits = {op.name: 4 if i % 2 else 8 for i, op in enumerate(net.graph.layers)}
    net.set_policy(bits)
    kept = export_model(net, bits, calibration, input_shape=source.file_input_shape)
    traced = export_model(net, bits, calibration)
    for tflite in (kept.tflite, kept.tflite_int8, kept.variant(net, bits)):
        model = TfliteModel.from_bytes(tflite)
        assert model.tensor(model.inputs[0]).shape == (1, 20) and model.tensor(model.outputs[0]).shape == (1, 20)
    traced_model = TfliteModel.from_bytes(traced.tflite)
    assert traced_model.tensor(traced_model.inputs[0]).shape == (1, 20, 1, 1)
    x = np.random.default_rng(1).normal(size=(50, *source.input_shape)).astype(np.float32)
    runner, traced_runner = TflmRunner(kept.tflite), TflmRunner(traced.tflite)
    assert runner.input.shape == (1, 20)
    flat = quantise_input(x, runner.input)
    assert flat.shape == (50, 20)
    assert np.array_equal(runner.run(flat), traced_runner.run(quantise_input(x, traced_runner.input)))


def test_a_dense_layer_on_a_flattened_feature_map_exports_and_runs_in_tflm(tf_files):
    """Keras flattens (N, H, W, C) in H, W, C order, torch in C, H, W: the dense layer's columns are
    reordered on import, and the exported model computes in TFLM what the fake-quant network does."""
    source = load_model(tf_files / "flatten_dense.keras")
    net, calibration = _calibrated_net(source)
    bits = {op.name: 8 for op in net.graph.layers}
    net.set_policy(bits)
    runner = TflmRunner(export_model(net, bits, calibration).tflite)
    x = np.random.default_rng(2).normal(size=(64, *source.input_shape)).astype(np.float32)
    out = runner.run(quantise_input(x, runner.input)).reshape(len(x), -1).astype(np.float64)
    tflm = (out - runner.output.zero_point) * runner.output.scale
    with torch.no_grad():
        fake_quant = net(torch.from_numpy(x)).numpy()
    assert np.abs(tflm - fake_quant).max() <= 1.01 * runner.output.scale


def test_logits_drops_the_softmax_with_one_notice(tf_files):
    source = load_model(tf_files / "cnn.keras").as_logits()
    assert not source.output_softmax
    assert len(source.notes) == 1 and "final Softmax dropped (--logits)" in source.notes[0]
    assert source.as_logits() is source  # nothing more to drop, no second notice


def test_unsupported_op_is_one_line_naming_file_node_and_op(tf_files):
    path = tf_files / "sigmoid.keras"
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "(Sigmoid) is not supported" in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_subclassed_model_file_is_one_line_asking_for_model_export(tf_files, suffix):
    path = tf_files / f"subclassed{suffix}"
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "'Subclassed' is a custom Keras class" in message
    assert "model.export(PATH)" in message and "legacy tf.keras" not in message and "\n" not in message


def test_corrupt_keras_and_tflite_files_are_one_line(tmp_path):
    for name in ("broken.keras", "broken.tflite", "broken.h5"):
        path = tmp_path / name
        path.write_bytes(b"not a model")
        with pytest.raises(UserError) as info:
            load_model(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    with pytest.raises(UserError, match="not a SavedModel"):
        load_model(tmp_path)
