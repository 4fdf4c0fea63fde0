"""ONNX input: the built-in importer reproduces each example's outputs and refuses what TFLM can't run."""

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

from smpq_edge.common.errors import UserError
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import example_names, load_model


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


class _ViewByBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_flatten_computed_from_a_dynamic_batch_size_imports(tmp_path):
    """x.view(x.size(0), -1) under a dynamic batch axis is Shape -> Gather -> Unsqueeze -> Concat
    -> Reshape (tf2onnx leaves the same when TensorFlow does not fold a Keras Flatten): the shape
    arithmetic is not the network, and the Reshape is the flatten it computes."""
    import onnx

    torch.manual_seed(0)
    module = _ViewByBatchSize().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "d.onnx"), dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    assert "Shape" in [node.op_type for node in onnx.load(str(tmp_path / "d.onnx")).graph.node]
    imported = load_model(tmp_path / "d.onnx")
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(imported.module(x), module(x), rtol=1e-4, atol=1e-5)
    assert [op.kind for op in trace(imported.module, imported.input_shape).ops] == ["input", "conv", "reshape", "fc"]


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


def test_final_softmax_is_a_flag_and_a_softmax_elsewhere_is_refused(tmp_path):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    _export(nn.Sequential(body, nn.Softmax(dim=1)), (1, 8, 8), tmp_path / "s.onnx")
    source = load_model(tmp_path / "s.onnx")
    assert source.output_softmax and not source.notes
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(source.module(x), body(x))  # the module gives the logits
    _export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(dim=1), nn.Flatten(), nn.Linear(72, 2)), (1, 8, 8),
            tmp_path / "inside.onnx")
    with pytest.raises(UserError, match="only as the model's last op"):
        load_model(tmp_path / "inside.onnx")
    _export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(dim=1)), (1, 8, 8), tmp_path / "map.onnx")
    with pytest.raises(UserError, match=r"only over the classes of an \(N, classes\) output"):
        load_model(tmp_path / "map.onnx")


def test_python_sequential_ending_in_softmax_is_a_flag(tmp_path):
    path = tmp_path / "soft.py"
    path.write_text("from torch import nn\nINPUT_SHAPE = (1, 8, 8)\n"
                    "def build_model():\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))\n")
    source = load_model(path)
    assert source.output_softmax and not isinstance(source.module[-1], nn.Softmax)
    assert list(source.module.state_dict()) == ["1.weight", "1.bias"]  # the children keep their names
    assert [op.kind for op in trace(source.module, source.input_shape).layers] == ["fc"]


def test_failed_shape_inference_is_said_in_a_note(tmp_path, monkeypatch):
    """A graph onnx cannot infer still imports where no inferred shape is needed, and the user is
    told that inference failed (it used to pass silently)."""
    import onnx

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    _export(module, (64,), tmp_path / "m.onnx")
    assert load_model(tmp_path / "m.onnx").notes == ()

    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] broken\nsecond line")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    imported = load_model(tmp_path / "m.onnx")
    (note,) = imported.notes
    assert note.startswith("ONNX shape inference failed (InferenceError: [ShapeInferenceError] broken)")
    x = torch.randn(3, 64)
    torch.testing.assert_close(imported.module(x.reshape(3, *imported.input_shape)), module(x), rtol=1e-4, atol=1e-5)
