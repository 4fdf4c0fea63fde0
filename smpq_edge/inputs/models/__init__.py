"""Models: the built-in examples by name, or a user's model file in one of ``MODEL_FORMATS``:
a Python file (.py), ONNX, Keras (.keras, .h5), a SavedModel folder or a .tflite file. Every
format but .py goes through the one ONNX importer and counts as trained.

A model file defines ``build_model()`` (returning a ``torch.nn.Module``) and ``INPUT_SHAPE``
(channels, height, width); optionally ``DATASET`` (the data it is meant for) and
``PRETRAINED = True`` when ``build_model()`` returns trained weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models.source import ModelSource

if TYPE_CHECKING:  # torch is imported where a model is built, so that a bad argument fails fast
    from torch import nn

EXAMPLES_DIR = Path(str(resources.files("smpq_edge.examples")))  # examples/ in the repository


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: the user's exception, fit for a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0]}" if lines else exc.__class__.__name__


def _load_python(path: Path, num_classes: int | None) -> ModelSource:
    spec = importlib.util.spec_from_file_location(f"smpq_user_model_{path.stem}", path)
    namespace = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(namespace)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found") from None
    except SyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: syntax error in model file: {exc.msg}") from None
    except (Exception, SystemExit) as exc:  # the user's module code failed (or called sys.exit): one line
        raise UserError(f"{path}: loading the model file failed: {_one_line(exc)}") from None
    for required in ("build_model", "INPUT_SHAPE"):
        if not hasattr(namespace, required):
            raise UserError(f"{path}: model file must define {required}")
    try:
        shape = tuple(namespace.INPUT_SHAPE)
    except TypeError:
        raise UserError(f"{path}: INPUT_SHAPE must be (channels, height, width), got {namespace.INPUT_SHAPE!r:.60}") from None
    if len(shape) != 3 or not all(isinstance(d, int) and 0 < d <= 4096 for d in shape):
        raise UserError(f"{path}: INPUT_SHAPE must be (channels, height, width) of positive ints, got {shape}")
    try:
        module = namespace.build_model(num_classes) if num_classes is not None else namespace.build_model()
    except (Exception, SystemExit) as exc:
        raise UserError(f"{path}: build_model() failed: {_one_line(exc)}") from None
    from torch import nn

    if not isinstance(module, nn.Module):
        raise UserError(f"{path}: build_model() must return a torch.nn.Module, got {type(module).__name__}")
    module, softmax = _split_final_softmax(module)
    return ModelSource(path.stem, module, shape, getattr(namespace, "DATASET", None),
                       bool(getattr(namespace, "PRETRAINED", False)), str(path), output_softmax=softmax)


def _split_final_softmax(module: nn.Module) -> tuple[nn.Module, bool]:
    """An nn.Sequential ending in a Softmax over the classes, as its body and a flag (the one
    shape where this is cheap to see; a Softmax inside forward() is refused by the tracer)."""
    from torch import nn

    if isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[-1], nn.Softmax) \
            and module[-1].dim in (1, -1):
        return module[:-1], True  # slicing keeps the children's names, so a state_dict still loads
    return module, False


def _python(path: Path, num_classes: int | None) -> ModelSource:
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    return _load_python(path, num_classes)


def _onnx(path: Path, num_classes: int | None) -> ModelSource:
    from smpq_edge.inputs.models.onnx_import import load_onnx

    return load_onnx(path)


def _tensorflow(path: Path, num_classes: int | None) -> ModelSource:
    from smpq_edge.inputs.models.tf_import import load_tensorflow

    return load_tensorflow(path)


# File suffix -> loader; a folder is a SavedModel. A trained file fixes its own output width.
MODEL_FORMATS: dict[str, Callable[[Path, int | None], ModelSource]] = {
    ".py": _python, ".onnx": _onnx, ".keras": _tensorflow, ".h5": _tensorflow, ".tflite": _tensorflow,
}


def check_model_argument(name_or_path: str | Path) -> None:
    """The one-line errors of ``load_model`` for a missing file or an unknown name, without loading
    anything (so the CLI says them before importing torch or TensorFlow)."""
    text = str(name_or_path)
    path = Path(text)
    if text in example_names() or path.is_dir():
        return
    if path.suffix in MODEL_FORMATS:
        if not path.is_file():
            raise UserError(f"{path}: model file not found")
        return
    _unknown_model(text)


def _unknown_model(text: str):
    raise UserError(f"unknown model '{text}'; examples: {', '.join(example_names())} (or give a model file: "
                    f"{', '.join(MODEL_FORMATS)}, or a SavedModel folder)")


def load_model(name_or_path: str | Path, num_classes: int | None = None) -> ModelSource:
    """A built-in example by name (``digits_cnn``) or a model file of one of ``MODEL_FORMATS``.

    ``num_classes`` is passed to ``build_model`` so an example fits the data set it is paired with.
    """
    text = str(name_or_path)
    if text in example_names():
        return _load_python(EXAMPLES_DIR / f"{text}.py", num_classes)
    path = Path(text)
    if path.suffix in MODEL_FORMATS:
        return MODEL_FORMATS[path.suffix](path, num_classes)
    if path.is_dir():
        return _tensorflow(path, num_classes)
    _unknown_model(text)


def from_module(module: nn.Module, sample_shape: tuple[int, ...], pretrained: bool = True) -> ModelSource:
    """An in-memory ``torch.nn.Module`` (the Python API), for samples of ``sample_shape``: (C, H, W),
    or (F,) for a model that takes (N, F) (it then reads the data's (N, 1, F, 1) through a Flatten,
    and is exported taking [1, F], as an ONNX (N, F) model is)."""
    import hashlib

    from torch import nn

    if not isinstance(module, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module, a keras.Model, a file or an example name, got "
                        f"{type(module).__name__}")
    module, softmax = _split_final_softmax(module)
    name = type(module).__name__
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode() + tensor.detach().cpu().numpy().tobytes())
    file_shape = None
    if len(sample_shape) == 1:
        module, file_shape = nn.Sequential(nn.Flatten(), module), tuple(sample_shape)
        sample_shape = (1, sample_shape[0], 1)
    return ModelSource(name, module, tuple(sample_shape), None, pretrained, f"<in-memory {name}>",
                       output_softmax=softmax, file_input_shape=file_shape, content_key=f"sha256:{digest.hexdigest()}")


def is_keras_model(model: object) -> bool:
    """A Keras model object (Keras 3 or tf.keras), told apart without importing TensorFlow."""
    return type(model).__module__.split(".")[0] in ("keras", "tf_keras") and hasattr(model, "save")


def from_keras(model) -> ModelSource:
    """An in-memory Keras model (the Python API): saved as .keras and read as that file is."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(type(model).__qualname__.encode())
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        source = _tensorflow(path, None)
    return replace(source, name=model.name, origin=f"<in-memory keras.Model {model.name}>",
                   content_key=f"sha256:{digest.hexdigest()}")

