"""The int8 path: torch module -> ONNX (opset 17) -> onnx2tf -> full-integer int8 .tflite.

onnx2tf runs in a child process: it imports TensorFlow, changes global logging, prints from
Python and C++, may call ``sys.exit`` on bad input, and reads helper files from its working
directory. A child keeps all of that away from the caller and leaves one log to report from.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smpq_edge.common.errors import UserError
from smpq_edge.tflite.flatbuffer import TfliteModel

ONNX_OPSET = 17
_INPUT_NAME = "input"
_OUTPUT_NAME = "output"
_NCHW_TO_NHWC = (0, 2, 3, 1)

# When a model's input looks like an RGB image (3 channels, batch <= 20) onnx2tf loads this
# sample from its working directory or else downloads it, even with our own calibration data;
# offline that download fails. A file of that name holding our data stops the download.
_ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"

# -oiqt: also write the integer-quantised models; -qt per-channel: per-channel weight scales;
# -iqd/-oqd int8: int8 model input and output; -cind: calibrate on our data (already in the
# model's input range, hence mean 0 and std 1) instead of onnx2tf's MS-COCO sample.
_CHILD = """
import sys
import numpy as np
import onnx2tf
onnx_path, calibration_path, out_dir, input_name = sys.argv[1:5]
channels = np.load(calibration_path, mmap_mode="r").shape[-1]
onnx2tf.convert(
    input_onnx_file_path=onnx_path,
    output_folder_path=out_dir,
    output_integer_quantized_tflite=True,
    quant_type="per-channel",
    input_quant_dtype="int8",
    output_quant_dtype="int8",
    custom_input_op_name_np_data_path=[[
        input_name,
        calibration_path,
        np.zeros((1, 1, 1, channels), np.float32),
        np.ones((1, 1, 1, channels), np.float32),
    ]],
    non_verbose=True,
)
"""

# Lines in onnx2tf's log that never explain a failure (TensorFlow start-up chatter).
_NOISE = re.compile(r"^([WEI]\d{4} |WARNING: All log messages before absl|fully_quantize:)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Int8Tflite:
    """A full-integer .tflite and how to feed it."""

    tflite: bytes
    input_shape: tuple[int, ...]  # as the .tflite takes it
    input_layout: str  # "NHWC": onnx2tf moves channels last
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int


def export_int8(
    module: torch.nn.Module, input_shape: tuple[int, int, int, int], calibration: np.ndarray,
    conv_pads: list[tuple[int, ...] | None] | None = None,
) -> Int8Tflite:
    """Convert an eval-mode float ``module`` to an int8 .tflite calibrated on ``calibration``.

    ``input_shape`` is the model's (N, C, H, W) input with N = 1 (TFLM runs one sample at a
    time); ``calibration`` is float32 (K, C, H, W) in the exact range the model sees.
    ``conv_pads``, per ONNX Conv in order, replaces that Conv's pads (None keeps them).
    """
    _check_inputs(input_shape, calibration)
    with tempfile.TemporaryDirectory(prefix="smpq_onnx2tf_") as tmp:
        work = Path(tmp)
        onnx_path = work / "model.onnx"
        _torch_to_onnx(module, input_shape, onnx_path)
        if conv_pads and any(conv_pads):
            _set_conv_pads(onnx_path, conv_pads)
        calibration_nhwc = np.ascontiguousarray(calibration.transpose(_NCHW_TO_NHWC))
        calibration_path = work / "calibration.npy"
        np.save(calibration_path, calibration_nhwc)
        np.save(work / _ONNX2TF_SAMPLE_FILE, calibration_nhwc)
        tflite = _run_onnx2tf(onnx_path, calibration_path, work / "out")
    return _describe(tflite, input_shape)


def _check_inputs(input_shape: tuple[int, ...], calibration: np.ndarray) -> None:
    if len(input_shape) != 4 or input_shape[0] != 1:
        raise ValueError(f"input_shape must be (1, C, H, W), got {tuple(input_shape)}")
    if calibration.ndim != 4 or calibration.shape[1:] != tuple(input_shape[1:]) or not len(calibration):
        raise ValueError(
            f"calibration must be (K, {', '.join(map(str, input_shape[1:]))}), got {calibration.shape}"
        )
    if calibration.dtype != np.float32 or not np.isfinite(calibration).all():
        raise ValueError("calibration must be finite float32")


def _torch_to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings():
        # torch >= 2.9 defaults to the dynamo exporter and flags the TorchScript one as legacy;
        # onnx2tf is tested against the TorchScript exporter's graphs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (torch.zeros(input_shape),),
            str(path),
            opset_version=ONNX_OPSET,
            input_names=[_INPUT_NAME],
            output_names=[_OUTPUT_NAME],
            dynamo=False,
        )


def _set_conv_pads(path: Path, conv_pads: list[tuple[int, ...] | None]) -> None:
    """Give the k-th ONNX Conv the pads ``conv_pads[k]`` (top, left, bottom, right): torch cannot
    state TensorFlow's asymmetric SAME padding, ONNX can, and onnx2tf maps it to TFLite SAME."""
    import onnx

    model = onnx.load(str(path))
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if len(convs) != len(conv_pads):
        raise AssertionError(f"{len(convs)} ONNX Conv nodes for {len(conv_pads)} convolutions")
    for node, pads in zip(convs, conv_pads):
        if pads is None:
            continue
        top, left, bottom, right = pads
        kept = [a for a in node.attribute if a.name != "pads"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("pads", [top, left, bottom, right])])
    onnx.save(model, str(path))


def _run_onnx2tf(onnx_path: Path, calibration_path: Path, out_dir: Path) -> bytes:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(onnx_path), str(calibration_path), str(out_dir), _INPUT_NAME],
        cwd=onnx_path.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    produced = sorted(out_dir.glob("*_full_integer_quant.tflite"))
    if result.returncode != 0 or not produced:
        raise UserError(f"onnx2tf failed: {_last_meaningful_line(result.stdout + result.stderr)}")
    return produced[0].read_bytes()


def _last_meaningful_line(log: str) -> str:
    for line in reversed(log.splitlines()):
        line = _ANSI.sub("", line).strip()
        if line and not _NOISE.match(line):
            return line
    return "no message in its log"


def _describe(tflite: bytes, torch_shape: tuple[int, ...]) -> Int8Tflite:
    model = TfliteModel.from_bytes(tflite, source="onnx2tf output")
    (input_index,), (output_index,) = model.inputs, model.outputs
    inp, out = model.tensor(input_index), model.tensor(output_index)
    if inp.type != "INT8" or out.type != "INT8" or inp.quantization is None or out.quantization is None:
        raise UserError(f"onnx2tf output: expected int8 input and output, got {inp.type} and {out.type}")
    nhwc = tuple(torch_shape[i] for i in _NCHW_TO_NHWC)
    if inp.shape != nhwc:  # the calibration data was laid out on this assumption
        raise UserError(f"onnx2tf output: input shape {inp.shape}, expected NHWC {nhwc}")
    return Int8Tflite(
        tflite=tflite,
        input_shape=inp.shape,
        input_layout="NHWC",
        input_scale=inp.quantization.scales[0],
        input_zero_point=inp.quantization.zero_points[0],
        output_scale=out.quantization.scales[0],
        output_zero_point=out.quantization.zero_points[0],
    )
