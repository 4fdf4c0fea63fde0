"""Parsing, validating and rewriting the .tflite that the onnx2tf path produces."""

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from export_fixtures import digits_int8, quantise_input  # noqa: F401  (fixture)

from smpq_edge.common.errors import UserError
from smpq_edge.tflite.flatbuffer import BUFFER_ALIGNMENT, TfliteModel
from smpq_edge.tflite.tflm import TflmRunner

CORRUPTIONS = 300  # random single-byte corruptions tried; each parses in about a millisecond


def _ops(model):
    return [op.name for op in model.operators()]


def _weights(model, op_index):
    return model.tensor(model.operators()[op_index].inputs[1])


def _pack(model_t) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_operators_in_execution_order(digits_int8):
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    ops = model.operators()
    # BatchNorm folded into the conv, ReLU fused, global average pooling exported as MEAN.
    assert _ops(model) == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "MEAN", "FULLY_CONNECTED"]
    assert [op.fused_activation for op in ops] == ["RELU", "RELU", "RELU", None, "NONE"]
    assert ops[1].options["depthMultiplier"] == 1
    # Each op consumes the previous op's output; the graph starts and ends at the model I/O.
    assert ops[0].inputs[0] == model.inputs[0]
    for before, after in zip(ops, ops[1:]):
        assert after.inputs[0] == before.outputs[0]
    assert ops[-1].outputs == model.outputs


def test_tensor_views(digits_int8):
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    module = digits_int8.module
    conv, depthwise, pointwise, fc = (_weights(model, i) for i in (0, 1, 2, 4))
    assert conv.shape == (8, 3, 3, 1)  # OHWI
    assert depthwise.shape == (1, 3, 3, 8)  # [1, H, W, C]
    assert pointwise.shape == (16, 1, 1, 8)
    assert fc.shape == (10, 16)  # [out, in]
    for tensor, axis, channels in [(conv, 0, 8), (depthwise, 3, 8), (pointwise, 0, 16), (fc, 0, 10)]:
        assert tensor.type == "INT8"
        assert len(tensor.data) == np.prod(tensor.shape)
        q = tensor.quantization
        assert (q.quantized_dimension, len(q.scales)) == (axis, channels)
        assert set(q.zero_points) == {0}  # symmetric weights
    # The pointwise weights dequantise to the torch layer's weights (OIHW -> OHWI).
    q = np.frombuffer(pointwise.data, np.int8).reshape(pointwise.shape)
    restored = q * np.array(pointwise.quantization.scales).reshape(-1, 1, 1, 1)
    expected = module.pointwise.weight.detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(restored, expected, atol=max(pointwise.quantization.scales))
    bias = model.tensor(model.operators()[2].inputs[2])
    assert bias.type == "INT32" and len(bias.data) == 4 * 16
    io = model.tensor(model.inputs[0])
    assert (io.type, io.shape) == ("INT8", (1, 8, 8, 1))
    assert io.quantization.scales[0] == pytest.approx(digits_int8.export.input_scale)
    activation = model.tensor(model.operators()[0].outputs[0])
    assert activation.data is None and activation.quantization.scales


def test_round_trip_keeps_model_and_numerics(digits_int8):
    original = digits_int8.export.tflite
    model = TfliteModel.from_bytes(original)
    rewritten = model.to_bytes()
    reparsed = TfliteModel.from_bytes(rewritten)
    assert reparsed.operators() == model.operators()
    assert reparsed.tensors() == model.tensors()
    assert (reparsed.inputs, reparsed.outputs) == (model.inputs, model.outputs)
    x = quantise_input(digits_int8, digits_int8.x_test[:20])
    np.testing.assert_array_equal(TflmRunner(rewritten).run(x), TflmRunner(original).run(x))


def test_rewritten_buffers_are_aligned(digits_int8):
    rewritten = TfliteModel.from_bytes(digits_int8.export.tflite).to_bytes()
    root = schema.Model.GetRootAsModel(rewritten, 0)
    base = np.frombuffer(rewritten, np.uint8).ctypes.data
    offsets = [
        root.Buffers(i).DataAsNumpy().ctypes.data - base
        for i in range(root.BuffersLength())
        if root.Buffers(i).DataLength()
    ]
    assert offsets and all(offset % BUFFER_ALIGNMENT == 0 for offset in offsets)


def test_edits_show_in_views_and_bytes(digits_int8):
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    index = model.operators()[2].inputs[1]
    model.set_tensor_type(index, "INT4")
    model.set_tensor_data(index, b"\x12" * 64)
    model.set_tensor_quantization(index, [0.5] * 16, [0] * 16, 0)
    for view in (model, TfliteModel.from_bytes(model.to_bytes())):
        tensor = view.tensor(index)
        assert (tensor.type, tensor.data) == ("INT4", b"\x12" * 64)
        assert tensor.quantization.scales == (0.5,) * 16


def test_edit_of_a_shared_buffer_leaves_the_other_tensor_alone(digits_int8):
    # Converters store identical constants once; make two biases share a buffer.
    model_t = schema.ModelT.InitFromPackedBuf(digits_int8.export.tflite, 0)
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    conv_bias, dw_bias = (model.operators()[i].inputs[2] for i in (0, 1))  # both 8 x int32
    tensors = model_t.subgraphs[0].tensors
    tensors[dw_bias].buffer = tensors[conv_bias].buffer
    shared = TfliteModel.from_bytes(_pack(model_t))
    before = shared.tensor(conv_bias).data
    shared.set_tensor_data(dw_bias, bytes(len(before)))
    assert shared.tensor(conv_bias).data == before
    assert shared.tensor(dw_bias).data == bytes(len(before))
    assert shared.tensor(dw_bias).buffer != shared.tensor(conv_bias).buffer


def test_reads_buffers_stored_after_the_flatbuffer(digits_int8):
    # Files over 2 GB keep buffer data past the flatbuffer, addressed by offset and size.
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    weights = _weights(model, 0)
    model_t = schema.ModelT.InitFromPackedBuf(digits_int8.export.tflite, 0)
    buffer = model_t.buffers[weights.buffer]
    buffer.data, buffer.size = None, len(weights.data)
    # Measure the flatbuffer with a placeholder offset (any non-default value takes the same
    # bytes), then point the buffer just past it.
    buffer.offset = 1 << 40
    buffer.offset = len(_pack(model_t))
    external = _pack(model_t) + weights.data
    assert TfliteModel.from_bytes(external).tensor(weights.index).data == weights.data


def test_edit_argument_checks(digits_int8):
    model = TfliteModel.from_bytes(digits_int8.export.tflite)
    with pytest.raises(ValueError, match="INT3"):
        model.set_tensor_type(0, "INT3")
    with pytest.raises(ValueError, match="one zero point or one per scale"):
        model.set_tensor_quantization(0, [1.0, 2.0, 3.0], [0, 0])
    with pytest.raises(ValueError, match="non-empty"):
        model.set_tensor_quantization(0, [], [])



@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "no 'TFL3' identifier"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "no 'TFL3' identifier"),
        (b"\x10\x00\x00\x00TFL3", "corrupt"),
        (b"\xff\xff\xff\x7fTFL3" + bytes(32), "corrupt"),
    ],
)
def test_non_tflite_bytes_are_user_errors(data, reason):
    with pytest.raises(UserError, match=f"^model.tflite: .*{reason}") as info:
        TfliteModel.from_bytes(data, source="model.tflite")
    assert "\n" not in str(info.value)


def test_truncated_file_is_a_user_error(digits_int8, tmp_path):
    path = tmp_path / "cut.tflite"
    path.write_bytes(digits_int8.export.tflite[: len(digits_int8.export.tflite) // 3])
    with pytest.raises(UserError, match=f"^{path}: corrupt"):
        TfliteModel.from_file(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing.tflite: cannot read"):
        TfliteModel.from_file(tmp_path / "missing.tflite")


def test_random_corruption_parses_or_is_a_user_error(digits_int8):
    # Flip bytes in the flatbuffer's tables (not in weight data): never a raw exception.
    original = digits_int8.export.tflite
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(CORRUPTIONS):
        damaged = bytearray(original)
        position = int(rng.integers(8, len(original)))
        damaged[position] = int(rng.integers(256))
        try:
            TfliteModel.from_bytes(bytes(damaged), source="damaged.tflite")
        except UserError as exc:
            assert str(exc).startswith("damaged.tflite: ") and "\n" not in str(exc)
            failures += 1
    assert failures > 0  # the damage did reach the structure
