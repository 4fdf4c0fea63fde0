"""Versions of what made an artefact, recorded in every JSON output."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("smpq_edge", "torch", "numpy", "scipy", "onnx", "onnx2tf", "tensorflow", "tflite-micro")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
