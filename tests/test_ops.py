"""The op-kind registry (ops.KINDS): consistent with the boards and the firmware, and a new kind
added there alone is traced, run by the quantised network and priced by the cost model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smpq_edge.network import ops
from smpq_edge.inputs.boards import KERNEL_VARIANTS, load_board
from smpq_edge.network.cost import estimate, operator_costs, uniform
from smpq_edge.common.errors import UserError
from smpq_edge.firmware.kernels import ADD_METHODS
from smpq_edge.network.graph import trace
from smpq_edge.network.quant import QuantNet


def test_every_kind_is_priced_by_a_board_formula_and_registered_by_the_firmware():
    for kind in ops.KINDS.values():
        if not kind.weighted:
            for kernels, variants in KERNEL_VARIANTS.items():
                assert kind.cycles in variants, (kind.name, kernels)
        for operator in filter(None, (kind.tflite, *kind.tflite_aliases)):
            assert operator in ADD_METHODS, kind.name


def test_kinds_sharing_their_input_scale_have_one_tensor_operand():
    for kind in ops.KINDS.values():
        if kind.shares_input_scale:
            assert kind.torch is not None and kind.torch.arity == 1, kind.name


class _WithSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))


def test_sigmoid_is_not_a_kind_today():
    with pytest.raises(UserError, match="'sigmoid'"):
        trace(_WithSigmoid(), (1, 8, 8))


def test_a_kind_added_to_the_registry_alone_is_traced_run_and_priced(monkeypatch):
    # What a new op needs beyond its record: nothing in graph, quant or cost.
    sigmoid = ops.OpKind("sigmoid", "LOGISTIC", run=lambda op, x: torch.sigmoid(x[0]),
                         torch=ops.TorchForm("Sigmoid", modules=(nn.Sigmoid,), functions=(torch.sigmoid,)))
    monkeypatch.setitem(ops.KINDS, "sigmoid", sigmoid)
    model = _WithSigmoid().eval()
    graph = trace(model, (1, 8, 8))
    assert [op.kind for op in graph.ops] == ["input", "conv", "sigmoid", "reshape", "fc"]
    assert "Sigmoid" in ops.supported_torch()

    net = QuantNet(graph, model, (4, 8))
    net.set_policy(uniform(graph, 8))
    x = torch.randn(16, 1, 8, 8)
    net.train()
    with torch.no_grad():
        net(x)  # calibrates every quantiser
    net.eval()
    with torch.no_grad():
        out, reference = net(x), model(x)
    # int8 activations and weights: close to the float model, not equal to it
    assert out.shape == reference.shape
    assert float((out - reference).abs().max()) < 0.1 * float(reference.abs().max()) + 0.05

    board = load_board("nucleo-l4r5zi")
    costs = {c.name: c for c in operator_costs(graph, uniform(graph, 8), board)}
    sigmoid_op = next(op for op in graph.ops if op.kind == "sigmoid")
    assert costs[sigmoid_op.name].op == "LOGISTIC" and costs[sigmoid_op.name].kernel == "other"
    assert costs[sigmoid_op.name].cycles > 0
    assert estimate(graph, uniform(graph, 8), board).cycles > 0


def test_the_vocabulary_of_op_kinds_is_ops_kinds():
    from smpq_edge.network.ops import KINDS, WEIGHTED_KINDS
    from smpq_edge.common.vocabulary import OpKindName, WeightedKind, values

    assert values(OpKindName) == tuple(KINDS) and values(WeightedKind) == WEIGHTED_KINDS
