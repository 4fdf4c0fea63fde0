"""The int8 export path's contract (the success path is the shared digits fixture)."""

import numpy as np
import pytest
from export_fixtures import digits_int8  # noqa: F401  (fixture)
from torch import nn

from smpq_edge.common.errors import UserError
from smpq_edge.export import onnx_to_tflite
from smpq_edge.export.onnx_to_tflite import export_int8
from smpq_edge.tflite.flatbuffer import TfliteModel


def test_export_is_int8_nhwc_and_calibrated_on_our_data(digits_int8):
    export = digits_int8.export
    assert (export.input_shape, export.input_layout) == ((1, 8, 8, 1), "NHWC")
    # Calibrated on digits in [0, 1]: the int8 input range spans exactly that.
    assert export.input_zero_point == -128
    assert export.input_scale == pytest.approx(digits_int8.calibration.max() / 255, rel=1e-3)
    assert TfliteModel.from_bytes(export.tflite).tensor(0).type == "INT8"


@pytest.mark.parametrize(
    "shape, calibration, message",
    [
        ((2, 1, 8, 8), np.zeros((4, 1, 8, 8), np.float32), "input_shape"),
        ((1, 1, 8, 8), np.zeros((4, 8, 8, 1), np.float32), "calibration must be"),
        ((1, 1, 8, 8), np.zeros((4, 1, 8, 8), np.float64), "float32"),
        ((1, 1, 8, 8), np.full((4, 1, 8, 8), np.nan, np.float32), "finite"),
    ],
)
def test_rejects_bad_arguments(shape, calibration, message):
    with pytest.raises(ValueError, match=message):
        export_int8(nn.Conv2d(1, 2, 3).eval(), shape, calibration)


def test_onnx2tf_failure_is_one_line(monkeypatch):
    monkeypatch.setattr(onnx_to_tflite, "_torch_to_onnx", lambda module, shape, path: path.write_bytes(b"junk"))
    with pytest.raises(UserError, match="^onnx2tf failed: .*DecodeError") as info:
        export_int8(nn.Conv2d(1, 2, 3).eval(), (1, 1, 8, 8), np.zeros((4, 1, 8, 8), np.float32))
    assert "\n" not in str(info.value)
