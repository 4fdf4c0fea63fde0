"""Trained TensorFlow models: Keras (.keras, .h5), SavedModel folders and .tflite files.

Each is converted to ONNX by tf2onnx and then read by ``onnx_import``, so every format reaches
the search, the export and the checks through one importer. tf2onnx rather than reading the
Keras or TFLite graph directly: it is the maintained converter for all three, installs beside
the pinned tensorflow / onnx / protobuf with ``pip check`` clean, folds BatchNorm and
dequantises "dynamic-range" int8 weights of a .tflite, and its output is an op set the ONNX
importer already knows; a direct reader would be a second importer per format.

A .keras or .h5 model (functional or ``Sequential``, Keras 3 or legacy tf.keras) is loaded by
Keras itself and traced as a ``tf.function`` of ``model(x, training=False)`` (inference:
BatchNorm's moving statistics, no Dropout) for ``tf2onnx.convert.from_function``, as a
SavedModel's serving signature is. tf2onnx's ``from_keras`` traces the same function but then
looks the outputs up by Keras tensor names, which fails on a Keras 3 ``Sequential``
(``KeyError: 'keras_tensor_NN'``). A .keras or .h5 file holds a custom class's name, not its
code (a ``keras.Model`` subclass, a custom layer), so nothing can rebuild it here: that is one
line asking for ``model.export(PATH)`` (a SavedModel folder, which holds the traced graph and
imports like any other) or a .tflite instead.

The conversion runs in a child process: it imports TensorFlow (slow, noisy, global state), and
legacy tf.keras .h5 files that Keras 3 cannot deserialise (a DepthwiseConv2D config carrying
``groups``) load only with TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models.source import ModelSource

ONNX_OPSET = 17
_ERROR = "smpq-error: "
_CUSTOM = "is a custom Keras class"  # in the child's refusal; no legacy tf.keras retry for it
_KERAS3 = "smpq-keras3-scopes"  # the child traced a Keras 3 model (see onnx_import._keras_layer)

_CHILD = f"""
import os, re, sys
kind, source, target = sys.argv[1:4]


class Refusal(Exception):
    pass


try:
    import tensorflow as tf
    import tf2onnx

    def from_function(call, shape):
        spec = (tf.TensorSpec(shape, tf.float32, name="input"),)
        return tf2onnx.convert.from_function(tf.function(call), input_signature=spec, opset={ONNX_OPSET})[0]

    def keras_model():
        import os
        if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
            import tf_keras as keras
        else:
            import keras
        try:
            return keras.models.load_model(source, compile=False)
        except Exception as exc:
            custom = re.search(r"(?:Could not locate class|Unknown layer:?) '([^']+)'", str(exc))
            if custom is None:
                raise
            raise Refusal(f"'{{custom[1]}}' {_CUSTOM}: the file holds its name, not its code, so it cannot be "
                          "rebuilt; save the model with model.export(PATH) (a SavedModel folder) "
                          "or as .tflite") from None

    def input_shape(model):
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):  # a model never built has none
            inputs = None
        if not inputs:
            raise Refusal("the model has no input shape: it was saved before it was built or called")
        if len(inputs) != 1:
            raise Refusal(f"the model has {{len(inputs)}} inputs; one is supported")
        return (None, *tuple(inputs[0].shape)[1:])  # any batch, whatever batch it was called with

    if kind == "tflite":  # its input keeps its name, keras_tensor_N where Keras 3 made it
        proto, _ = tf2onnx.convert.from_tflite(source, opset={ONNX_OPSET})
    elif kind == "saved_model":
        loaded = tf.saved_model.load(source)  # kept alive: the signature refers to its variables
        signature = loaded.signatures["serving_default"]
        (key, spec), = signature.structured_input_signature[1].items()
        proto = from_function(lambda x: next(iter(signature(**{{key: x}}).values())), spec.shape)
        if key.startswith("keras_tensor"):  # Keras 3's model.export
            print("{_KERAS3}")
    else:
        model = keras_model()
        proto = from_function(lambda x: model(x, training=False), input_shape(model))
        if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
            print("{_KERAS3}")
    with open(target, "wb") as f:
        f.write(proto.SerializeToString())
except Refusal as exc:
    print("{_ERROR}" + str(exc), file=sys.stderr)
    sys.exit(3)
except Exception as exc:
    lines = str(exc).strip().splitlines()
    print("{_ERROR}" + type(exc).__name__ + (": " + lines[0][:300] if lines else ""), file=sys.stderr)
    sys.exit(3)
"""


def _kind(path: Path) -> str:
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UserError(f"{path}: a folder, but not a SavedModel (no saved_model.pb)")
        return "saved_model"
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    return {".tflite": "tflite", ".keras": "keras", ".h5": "keras"}[path.suffix]


def _float_weights(path: Path, target: Path) -> Path:
    """A .tflite whose int8 "dynamic-range" weights feeding float ops are float32 again (written
    to ``target``): tf2onnx would otherwise emit its hybrid DynamicQuantizeLinear/MatMulInteger
    pattern, which is not a float model. Weights behind a DEQUANTIZE op are left to it."""
    from smpq_edge.tflite.flatbuffer import TfliteModel

    model = TfliteModel.from_file(path)
    operators = model.operators()
    float_readers = {i for op in operators if op.name != "DEQUANTIZE"
                     and any(o >= 0 and model.tensor(o).type == "FLOAT32" for o in op.outputs) for i in op.inputs}
    changed = False
    for tensor in model.tensors():
        if tensor.index in float_readers and tensor.type == "INT8" and tensor.data and tensor.quantization:
            model.set_tensor_data(tensor.index, tensor.dequantised().astype("<f4").tobytes())
            model.set_tensor_type(tensor.index, "FLOAT32")
            model.clear_tensor_quantization(tensor.index)
            changed = True
    if not changed:
        return path
    for op in operators:  # float weights: the ops are plain float ops again, not hybrid ones
        if op.options.get("asymmetricQuantizeInputs"):
            model.set_operator_option(op.index, "asymmetricQuantizeInputs", False)
    target.write_bytes(model.to_bytes())
    return target


def _convert(kind: str, path: Path, target: Path, legacy_keras: bool) -> tuple[str | None, bool | None]:
    """tf2onnx in a child: None on success, else its one-line error; and whether it traced a
    Keras 3 model (None for a .tflite, whose input name tells)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    result = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), str(target)], env=env,
                            capture_output=True, text=True, check=False)
    keras3 = None if kind == "tflite" else _KERAS3 in result.stdout.splitlines()
    if result.returncode == 0 and target.is_file():
        return None, keras3
    errors = [line[len(_ERROR):] for line in result.stderr.splitlines() if line.startswith(_ERROR)]
    return (errors[-1] if errors else f"converter exited with code {result.returncode}"), keras3


def load_tensorflow(path: Path) -> ModelSource:
    """A Keras, SavedModel or .tflite model as a trained ``ModelSource`` (via tf2onnx and ONNX)."""
    import onnx

    from smpq_edge.inputs.models.onnx_import import onnx_source

    kind = _kind(path)
    with tempfile.TemporaryDirectory(prefix="smpq_tf2onnx_") as tmp:
        target = Path(tmp) / "model.onnx"
        if kind == "tflite":
            path_read = _float_weights(path, Path(tmp) / "float_weights.tflite")
        else:
            path_read = path
        error, keras3 = _convert(kind, path_read, target, legacy_keras=False)
        if error is not None and kind == "keras" and _CUSTOM not in error:  # a tf.keras 2 file Keras 3 cannot read
            legacy, keras3 = _convert(kind, path, target, legacy_keras=True)
            error = None if legacy is None else f"{error} (and with legacy tf.keras: {legacy})"
        if error is not None:
            label = {"saved_model": "SavedModel", "keras": "Keras model", "tflite": ".tflite model"}[kind]
            raise UserError(f"{path}: cannot read this {label}: {error}")
        model = onnx.load(str(target))
    return onnx_source(model, str(path), path.stem if path.is_file() else path.name, keras3_scopes=keras3)
