"""The traced layer inventory against counts made here independently of the tracer: torch forward
hooks for shapes and call order, our own MAC formula, and the published MLPerf Tiny figures."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from smpq_edge.common.errors import UserError
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import example_names, load_model


@functools.lru_cache(maxsize=None)
def example(name):
    source = load_model(name)
    return source, trace(source.module, source.input_shape)


def hooked_inventory(module: nn.Module, input_shape) -> list[tuple[str, str, int, int]]:
    """(name, kind, weight count, MACs) of every Conv2d/Linear in the order forward() calls them."""
    names = {m: n for n, m in module.named_modules()}
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, tuple(out.shape))))
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    inventory = []
    for m, out in calls:
        if isinstance(m, nn.Linear):
            kind, macs = "fc", m.in_features * m.out_features
        else:
            kind = "depthwise" if m.groups == m.in_channels == m.out_channels > 1 else "conv"
            kh, kw = m.kernel_size
            macs = out[2] * out[3] * kh * kw * (m.in_channels // m.groups) * m.out_channels
        inventory.append((names[m], kind, m.weight.numel(), macs))
    return inventory


class CountReLU(TorchFunctionMode):
    """Counts ReLU applications, whether through nn.ReLU, F.relu, torch.relu or Tensor.relu."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.relu, torch.relu, torch.Tensor.relu, F.relu6):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_examples_registry():
    assert set(example_names()) >= {"digits_cnn", "mnist1d_dscnn", "resnet8", "dscnn_kws"}


@pytest.mark.parametrize("name", example_names())
def test_layer_inventory_matches_torch(name):
    source, graph = example(name)
    expected = hooked_inventory(source.module, source.input_shape)
    actual = [(op.module, op.kind, op.weight_count, op.macs) for op in graph.layers]
    assert actual == expected


@pytest.mark.parametrize("name", example_names())
def test_params_are_the_torch_weights(name):
    source, graph = example(name)
    weights = sum(m.weight.numel() for m in source.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(op.weight_count for op in graph.layers) == weights


# Published: MLPerf Tiny (Banbury et al., 2021) ResNet-8 12.5 M MACs, DS-CNN 2.66 M MACs.
# The exact figures were counted by hand from the architectures (and by hooks above).
PUBLISHED_MACS = {"resnet8": (12_501_632, 12.5e6), "dscnn_kws": (2_656_768, 2.66e6),
                  "digits_cnn": (51_520, None), "mnist1d_dscnn": (70_720, None)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_total_macs(name):
    exact, published = PUBLISHED_MACS[name]
    _, graph = example(name)
    total = sum(op.macs for op in graph.layers)
    assert total == exact
    if published:
        assert total == pytest.approx(published, rel=0.01)


def test_digits_cnn_by_hand():
    # conv 3x3 1->16 on 8x8 "same", depthwise 3x3 16, pointwise 16->32, global pool, FC 32->10.
    _, graph = example("digits_cnn")
    assert [(op.kind, op.weight_shape, op.out_shape, op.macs) for op in graph.layers] == [
        ("conv", (16, 3, 3, 1), (16, 8, 8), 64 * 9 * 16),
        ("depthwise", (1, 3, 3, 16), (16, 8, 8), 64 * 9 * 16),
        ("conv", (32, 1, 1, 16), (32, 8, 8), 64 * 16 * 32),
        ("fc", (10, 32), (10,), 320),
    ]
    assert [(op.bn_module, op.activation) for op in graph.layers] == [
        ("1", "relu"), ("4", "relu"), ("7", "relu"), ("", "none")]
    # An nn.Sequential's children are numbers: the layers are named with their kind in front.
    assert [op.name for op in graph.layers] == ["conv0", "depthwise3", "conv6", "fc11"]
    assert [op.module for op in graph.layers] == ["0", "3", "6", "11"]
    assert [op.kind for op in graph.ops if not op.weighted] == ["input", "global_avgpool", "reshape"]


@pytest.mark.parametrize("name", example_names())
def test_batchnorm_folded_into_the_convolution_before_it(name):
    source, graph = example(name)
    batchnorms = {n for n, m in source.module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    folded = [op.bn_module for op in graph.ops if op.bn_module]
    assert sorted(folded) == sorted(batchnorms)
    assert all(graph.op(op.name).kind in ("conv", "depthwise") for op in graph.ops if op.bn_module)


@pytest.mark.parametrize("name", example_names())
def test_every_relu_is_fused(name):
    source, graph = example(name)
    counter = CountReLU()
    with counter, torch.no_grad():
        source.module.eval()(torch.zeros(1, *source.input_shape))
    assert counter.count > 0
    assert not [op for op in graph.ops if op.kind == "relu"]
    assert sum(op.activation != "none" for op in graph.ops) == counter.count


@pytest.mark.parametrize("name", example_names())
def test_graph_is_well_formed(name):
    source, graph = example(name)
    assert graph.ops[0].kind == "input" and graph.input_shape == tuple(source.input_shape)
    seen = set()
    for op in graph.ops:
        assert all(s in seen for s in op.inputs), f"{op.name} reads a tensor produced later"
        seen.add(op.name)
    assert graph.output == graph.ops[-1].name
    assert len(graph.op(graph.output).out_shape) == 1
    json.dumps(graph.to_dict())


def test_resnet8_residual_adds_carry_the_relu():
    _, graph = example("resnet8")
    adds = [op for op in graph.ops if op.kind == "add"]
    assert len(adds) == 3 and all(op.activation == "relu" for op in adds)
    # The first stack's shortcut is the identity: its add reads the stem's output directly.
    assert adds[0].inputs == ("3.conv2", "conv0")
    # The projecting shortcuts are 1x1 stride-2 convolutions without BatchNorm.
    shortcuts = [op for op in graph.layers if op.name.endswith("shortcut")]
    assert [(op.weight_shape, op.stride, op.bn_module) for op in shortcuts] == [
        ((32, 1, 1, 16), (2, 2), ""), ((64, 1, 1, 32), (2, 2), "")]


def test_depthwise_detected_only_when_groups_equal_channels():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1, groups=1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    graph = trace(model, (4, 6, 6))
    assert [op.kind for op in graph.layers] == ["depthwise", "conv", "fc"]
    assert graph.layers[0].weight_shape == (1, 3, 3, 4)


def test_unfusable_relu_stays_an_op():
    # The convolution's output also feeds the add unactivated, so the ReLU cannot be folded into it.
    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((torch.relu(y) + y).flatten(1))

    graph = trace(PreActivation(), (2, 4, 4))
    assert graph.op("conv").activation == "none"
    assert [op.kind for op in graph.ops] == ["input", "conv", "relu", "add", "reshape", "fc"]


class SharedThroughDropout(nn.Module):
    """conv's output is read twice, once through a Dropout (an alias in the traced graph)."""

    def __init__(self, after_dropout: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.drop = nn.Dropout()
        self.after = after_dropout
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.after(self.drop(y)) + y).flatten(1))


def test_relu_behind_an_alias_is_not_fused_into_a_shared_output():
    # Fusing would make the add read relu(conv) twice instead of relu(conv) + conv.
    graph = trace(SharedThroughDropout(nn.ReLU()), (1, 8, 8))
    assert graph.op("conv").activation == "none"
    relu = next(op for op in graph.ops if op.kind == "relu")
    assert graph.op("add").inputs == (relu.name, "conv")


def test_batchnorm_behind_an_alias_on_a_shared_output_is_refused():
    with pytest.raises(UserError, match="layer 'after': BatchNorm2d must directly follow a convolution"):
        trace(SharedThroughDropout(nn.BatchNorm2d(2)), (1, 8, 8))


def test_relu_after_folded_batchnorm_and_dropout_still_fuses():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(), nn.ReLU(), nn.Flatten(),
                          nn.Linear(128, 3))
    conv = trace(model, (1, 8, 8)).layers[0]
    assert (conv.bn_module, conv.activation) == ("1", "relu")


def test_trace_restores_training_mode():
    source = load_model("digits_cnn")
    source.module.train()
    trace(source.module, source.input_shape)
    assert source.module.training


# --- what TFLM cannot run stops with the layer's name -------------------------------------------

class Net(nn.Module):
    """A tiny net whose ``bad`` part is the layer under test; ``forward`` is supplied per case."""

    def __init__(self, bad: nn.Module, forward):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bad = bad
        self.head = nn.Linear(4 * 8 * 8, 3)
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


def _after_stem(self, x):
    return self.head(self.bad(self.stem(x)).flatten(1))


UNSUPPORTED = [
    ("conv1d", nn.Conv1d(1, 4, 3, padding=1), lambda s, x: s.head(s.bad(x.flatten(2)).flatten(1)[:, :256]),
     "layer 'bad' (Conv1d)"),
    ("grouped-conv", nn.Conv2d(4, 4, 3, padding=1, groups=2), _after_stem, "layer 'bad': grouped convolution"),
    ("depthwise-multiplier", nn.Conv2d(4, 8, 3, padding=1, groups=4),
     lambda s, x: s.head(s.bad(s.stem(x))[:, :4].flatten(1)), "layer 'bad': grouped convolution"),
    ("dilated-conv", nn.Conv2d(4, 4, 3, padding=2, dilation=2), _after_stem, "layer 'bad': dilated"),
    ("reflect-padding", nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), _after_stem, "layer 'bad': padding"),
    ("lstm", nn.LSTM(64, 8, batch_first=True),
     lambda s, x: s.head(s.bad(x.flatten(2))[0].repeat(1, 1, 32).flatten(1)), "layer 'bad' (LSTM)"),
    ("sigmoid-module", nn.Sigmoid(), _after_stem, "layer 'bad' (Sigmoid)"),
    ("sigmoid-function", nn.Identity(), lambda s, x: s.head(torch.sigmoid(s.stem(x)).flatten(1)), "'sigmoid'"),
    ("batchnorm-first", nn.BatchNorm2d(1), lambda s, x: s.head(s.stem(s.bad(x)).flatten(1)), "layer 'bad': BatchNorm2d"),
    ("batchnorm-after-relu", nn.BatchNorm2d(4), lambda s, x: s.head(s.bad(torch.relu(s.stem(x))).flatten(1)),
     "layer 'bad': BatchNorm2d"),
]


@pytest.mark.parametrize("bad,forward,expected", [pytest.param(b, f, e, id=i) for i, b, f, e in UNSUPPORTED])
def test_unsupported_layer_names_the_layer(bad, forward, expected):
    with pytest.raises(UserError) as info:
        trace(Net(bad, forward), (1, 8, 8))
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


@pytest.mark.parametrize("flatten", [lambda x: x.view(x.size(0), -1), lambda x: x.reshape(x.shape[0], -1),
                                     lambda x: torch.flatten(x, 1), lambda x: x.view(x.size()[0], -1)],
                         ids=["view-size", "reshape-shape", "torch.flatten", "view-size()[0]"])
def test_flatten_idioms_trace(flatten):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(flatten(torch.relu(self.conv(x))))

    graph = trace(Flat(), (1, 8, 8))
    assert [(op.kind, op.out_shape) for op in graph.ops] == [
        ("input", (1, 8, 8)), ("conv", (4, 8, 8)), ("reshape", (256,)), ("fc", (3,))]
    assert graph.op("conv").activation == "relu", "the size query must not count as a second reader"


def test_first_unsupported_layer_is_named_not_the_reshape_feeding_it():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            out, _ = self.lstm(self.conv(x).mean(1, keepdim=True).squeeze(1))
            return self.fc(out[:, -1].unsqueeze(1).squeeze(1))

    with pytest.raises(UserError, match=r"^layer 'lstm' \(LSTM\) is not supported"):
        trace(Recurrent(), (1, 8, 8))
    with pytest.raises(UserError, match=r"^layer 'lstm' \(LSTM\)"):
        trace(Recurrent(), (1, 5, 5))  # and before any shape error it would run into


def test_batchnorm_on_a_conv_output_used_twice_is_refused():
    # Folding would change the other consumer's input, so it must not happen silently.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((self.bn(y) + y).flatten(1))

    with pytest.raises(UserError, match="layer 'bn': BatchNorm2d must directly follow a convolution"):
        trace(Shared(), (1, 8, 8))


def test_output_must_be_logits():
    with pytest.raises(UserError, match=r"\(N, classes\) logits"):
        trace(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 8, 8))


def test_model_without_weights_is_refused():
    with pytest.raises(UserError, match="no Conv2d or Linear"):
        trace(nn.Sequential(nn.Flatten()), (1, 8, 8))


# --- the model file protocol (build_model, INPUT_SHAPE, DATASET, PRETRAINED) ---------------------

GOOD_MODEL = """
from torch import nn
INPUT_SHAPE = (1, 4, 4)
DATASET = "digits"
PRETRAINED = True
def build_model(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))
"""


def test_model_file_protocol(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(GOOD_MODEL, encoding="utf-8")
    source = load_model(str(path), num_classes=4)
    assert (source.name, source.input_shape, source.default_data, source.pretrained) == ("net", (1, 4, 4), "digits", True)
    assert [op.out_shape for op in trace(source.module, source.input_shape).layers] == [(4,)]


@pytest.mark.parametrize("text,expected", [
    (GOOD_MODEL.replace("def build_model", "def make_model"), "must define build_model"),
    (GOOD_MODEL.replace("INPUT_SHAPE = (1, 4, 4)", ""), "must define INPUT_SHAPE"),
    (GOOD_MODEL.replace("(1, 4, 4)", "(16,)"), "INPUT_SHAPE must be (channels, height, width)"),
    (GOOD_MODEL.replace("return nn.Sequential", "return 3 or nn.Sequential"), "must return a torch.nn.Module"),
    (GOOD_MODEL.replace("(num_classes=10):", "(num_classes=10)"), "syntax error"),
    (GOOD_MODEL + "raise RuntimeError('no weights')\n", "RuntimeError: no weights"),
])
def test_bad_model_file(tmp_path, text, expected):
    path = tmp_path / "net.py"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message


def test_missing_model_file(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        load_model(str(tmp_path / "absent.py"))
