"""ONNX input: the built-in importer reproduces each example's outputs and refuses what TFLM can't run."""

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

from smpq_edge.errors import UserError
from smpq_edge.graph import trace
from smpq_edge.models import example_names, load_model


def _export(module: nn.Module, shape, path, dynamo: bool = False):
    """torch.onnx with the TorchScript exporter, or the default dynamo one (needs onnxscript)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *shape),), str(path), dynamo=dynamo,
                          **({} if dynamo else {"opset_version": 17, "input_names": ["input"]}))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", example_names())
def test_imported_example_matches_torch_and_traces_to_the_same_layers(name, dynamo, tmp_path):
    torch.manual_seed(0)
    source = load_model(name)
    for module in source.module.modules():  # non-trivial BatchNorm statistics, so folding matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    _export(source.module, source.input_shape, tmp_path / "m.onnx", dynamo)
    imported = load_model(tmp_path / "m.onnx")
    assert imported.input_shape == source.input_shape and imported.pretrained
    x = torch.randn(3, *source.input_shape)
    torch.testing.assert_close(imported.module(x), source.module.eval()(x), rtol=1e-4, atol=1e-5)
    expected = [(op.kind, op.weight_shape) for op in trace(source.module, source.input_shape).layers]
    got = [(op.kind, op.weight_shape) for op in trace(imported.module, imported.input_shape).layers]
    assert got == expected


def test_unsupported_onnx_op_names_the_node(tmp_path):
    _export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(72, 2)), (1, 8, 8),
            tmp_path / "s.onnx")
    with pytest.raises(UserError, match=r"Sigmoid.*not supported"):
        load_model(tmp_path / "s.onnx")


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", bytes(range(256)) * 4])
def test_corrupt_onnx_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
