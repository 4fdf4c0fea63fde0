"""TFLM's int8 SOFTMAX, ported in ``smpq_edge.network.softmax``, against the tflite-micro interpreter."""

from __future__ import annotations

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from smpq_edge.common.errors import UserError
from smpq_edge.tflite.flatbuffer import FILE_IDENTIFIER, TfliteModel
from smpq_edge.network.softmax import BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT, softmax_int8, softmax_params
from smpq_edge.tflite.tflm import TflmRunner


def softmax_only_model(depth: int, scale: float, zero_point: int) -> bytes:
    """A model whose input feeds one SOFTMAX, appended as the exporter appends it."""
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer = np.asarray([1, depth], np.int32), schema.TensorType.INT8, 0
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = [tensor], [0], [0], []
    raw = schema.ModelT()
    raw.version, raw.subgraphs, raw.buffers, raw.operatorCodes = 3, [graph], [schema.BufferT()], []
    builder = flatbuffers.Builder(256)
    builder.Finish(raw.Pack(builder), file_identifier=FILE_IDENTIFIER)
    model = TfliteModel.from_bytes(bytes(builder.Output()))
    model.set_tensor_quantization(0, [scale], [zero_point])
    model.append_softmax(BETA, OUTPUT_SCALE, OUTPUT_ZERO_POINT)
    return model.to_bytes()


# Input scales from far below a logit's usual step (every exp near 1) to far above (one-hot).
SCALES = [2.0**-20, 1e-4, 3.1e-3, 0.0117, 0.05, 0.0921, 0.25, 0.6, 1.0, 3.7, 16.0, 200.0]


@pytest.mark.parametrize("depth", [1, 2, 10, 37])
def test_integer_softmax_is_tflms_byte_for_byte(depth):
    rng = np.random.default_rng(depth)
    for scale in SCALES:
        zero_point = int(rng.integers(-128, 128))
        runner = TflmRunner(softmax_only_model(depth, scale, zero_point))
        # Random rows, rows with ties and saturated extremes, and constant rows.
        x = rng.integers(-128, 128, size=(300, depth)).astype(np.int8)
        x[:40] = rng.choice(np.array([-128, -127, 0, 126, 127], np.int8), size=(40, depth))
        x[40:50] = rng.integers(-128, 128, size=(10, 1)).astype(np.int8)
        x[50:100] = np.clip(rng.integers(-4, 5, size=(50, depth)) + rng.integers(-120, 120, size=(50, 1)),
                            -128, 127).astype(np.int8)
        expected = runner.run(x)
        ours = softmax_int8(x, softmax_params(scale))
        assert ours.dtype == np.int8
        mismatched = int((ours != expected).any(axis=1).sum())
        assert mismatched == 0, f"scale {scale}: {mismatched} of {len(x)} rows differ"


def test_softmax_params_match_tflm_formulas():
    # scale 1/16: 2^-4 * 2^26 = 2^22 = 0.5 * 2^23 -> multiplier 2^30, left shift 23; radius 31 * 2^26 / 2^23 = 248.
    params = softmax_params(1.0 / 16)
    assert (params.multiplier, params.left_shift, params.diff_min) == (2**30, 23, -248)


def test_a_vanishing_input_scale_is_one_line():
    with pytest.raises(UserError, match="too small"):
        softmax_params(2.0**-27)
