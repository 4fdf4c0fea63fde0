"""The supernet's numerics, batched coalition evaluation, and a short search under a tight budget."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from smpq_edge.inputs.boards import load_board
from smpq_edge.network.cost import estimate, uniform
from smpq_edge.inputs.data import load_dataset
from smpq_edge.common.errors import UserError
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import load_model
from smpq_edge.network.fixedpoint import INT8_MIN
from smpq_edge.network.quant import ActQuant, QuantNet, fake_quant_weight, fold_batchnorm, quantize_weight
from smpq_edge.search.budget import Budgets
from smpq_edge.search.runner import SearchConfig, run_search, save_search
from smpq_edge.search.smpq import (CoalitionValue, estimate_shapley, pick_by_validation, score, validation_batch,
                                   value_target)
from smpq_edge.search.train import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained_digits_net(digits):
    torch.manual_seed(0)
    source = load_model("digits_cnn")
    train(source.module, digits, TrainConfig(epochs=4, lr=1e-2), seed=0, progress=False)
    source.module.eval()
    graph = trace(source.module, source.input_shape)
    net = QuantNet(graph, source.module, (4, 8))
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(digits.x_train[:256]))
    net.eval()
    return net


def test_batchnorm_folding_matches_conv_then_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=True), nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 3, 7, 7)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_weights_symmetric_per_channel_on_the_integer_grid(bits, qmax):
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    q, scale = quantize_weight(w, bits, per_channel=True)
    assert q.abs().max() == qmax and q.min() >= -qmax
    assert scale.shape == (6,)
    torch.testing.assert_close(scale, w.abs().flatten(1).amax(1) / qmax)
    torch.testing.assert_close(fake_quant_weight(w, bits, True), q.float() * scale.reshape(-1, 1, 1, 1))


def test_fc_weights_are_per_tensor(trained_digits_net):
    fc = trained_digits_net.layer("fc11")
    assert not fc.per_channel
    q = fc.quantised_weight(4)
    scale = fc.weight.abs().max() / 7
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)


def test_activation_quantiser_represents_zero_and_clamps():
    act = ActQuant()
    act.train()
    act(torch.linspace(0.5, 3.0, 100))  # range observed as [0, 3]: zero is always included
    act.eval()
    params = act.params()
    assert params.zero_point == -128
    out = act(torch.tensor([0.0, 1.0, 10.0, -1.0]))
    assert out[0] == 0.0 and out[2] == pytest.approx(3.0, abs=params.scale) and out[3] == 0.0
    grid = out / params.scale
    torch.testing.assert_close(grid, torch.round(grid))


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-3, 0.3), zero_point=st.integers(-128, 127), spread=st.floats(0.1, 50.0),
       activation=st.sampled_from(["none", "relu", "relu6"]), seed=st.integers(0, 2**16))
def test_inference_quantiser_equals_the_fused_kernel(scale, zero_point, spread, activation, seed):
    act = ActQuant()
    lo = (INT8_MIN - zero_point) * scale  # a range whose params() give this scale and zero point
    act.lo.fill_(lo), act.hi.fill_(lo + 255 * scale), act.initialised.fill_(True)
    act.eval()
    x = torch.randn(4000, generator=torch.Generator().manual_seed(seed)) * spread
    x[:3] = torch.tensor([0.0, 6.0, -0.0])
    with torch.no_grad():
        fast = act(x, activation)
    with torch.enable_grad():
        reference = act(x, activation)  # the training path: activation, then torch's fused kernel
    assert torch.equal(fast, reference.detach())


def test_coalition_tree_walk_gives_each_coalition_its_own_logits_on_a_residual_net():
    torch.manual_seed(0)
    source = load_model("resnet8", num_classes=10)
    source.module.eval()
    net = QuantNet(trace(source.module, source.input_shape), source.module, (4, 8))
    x = torch.randn(6, *source.input_shape)
    net.train()
    with torch.no_grad():
        net(x)  # calibrates the activation ranges
    net.eval()
    masks = np.random.default_rng(0).random((10, len(net.players()))) < 0.5
    masks[:, 1::2] |= ~masks[:, 0::2]  # never a layer without a candidate
    masks[7] = masks[2]
    logits, index = net.coalition_logits(x, masks)
    assert len(logits) == 9 and index[7] == index[2]
    with torch.no_grad():
        for mask, row in zip(masks, index):
            for layer, active in zip(net.mixed_layers(), mask.reshape(-1, 2)):
                layer.active.copy_(torch.from_numpy(active))
            assert torch.equal(logits[row], net(x))
    net.set_policy(None)


def test_batched_coalitions_equal_one_at_a_time(trained_digits_net, digits):
    x, y = validation_batch(digits, 128, seed=0)
    value = CoalitionValue(trained_digits_net, x, y)
    rng = np.random.default_rng(0)
    masks = rng.random((12, len(trained_digits_net.players()))) < 0.6
    masks[:, 1::2] |= ~masks[:, 0::2]  # never a layer without a candidate
    np.testing.assert_array_equal(value(masks), value.one_at_a_time(masks))


def test_coalition_with_one_candidate_equals_that_policy(trained_digits_net, digits):
    x, y = validation_batch(digits, 128, seed=0)
    value = CoalitionValue(trained_digits_net, x, y)
    only_int4 = np.tile([True, False], len(trained_digits_net.graph.layers))
    trained_digits_net.set_policy({op.name: 4 for op in trained_digits_net.graph.layers})
    with torch.no_grad():
        expected = float((trained_digits_net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    trained_digits_net.set_policy(None)
    assert value(only_int4[None, :])[0] == expected


def _tight_flash_budget(board, graph) -> Budgets:
    """Halfway between all-int4 and all-int8 flash: a budget that forces a mixed policy."""
    int8 = estimate(graph, uniform(graph, 8), board).flash_total_bytes
    int4 = estimate(graph, uniform(graph, 4), board).flash_total_bytes
    return Budgets.of_board(board, flash_bytes=(int8 + int4) // 2)


def test_quick_search_fits_a_tight_budget_and_writes_outputs(digits, tmp_path):
    board = load_board("nucleo-l4r5zi")
    source = load_model("digits_cnn")
    graph = trace(source.module, source.input_shape)
    budgets = _tight_flash_budget(board, graph)
    result = run_search(source, digits, board, budgets=budgets, config=SearchConfig.quick(), seed=0,
                        progress=False, log=lambda _: None)
    bits = result.policy.bits
    assert set(bits.values()) == {4, 8}, "halfway budget: some layers must be int4, the best fit keeps some int8"
    assert estimate(graph, bits, board).flash_total_bytes <= budgets.flash_bytes
    methods = {m["method"]: m for m in result.record.model_dump(mode="json")["methods"]}
    assert {"smpq", "dmpq", "hawq", "uniform4"} <= set(methods), "uniform8 is over this budget"
    assert "uniform8" not in methods
    for m in methods.values():
        assert m["cost"]["flash_total_bytes"] <= budgets.flash_bytes
        assert 0.5 < m["test_acc"] <= 1.0
    for name in ("smpq", "dmpq", "hawq", "uniform4"):  # a floor fallback ("smpq #2") has no shared finetune
        assert 0.5 < methods[name]["test_acc_same_finetune"] <= 1.0
    assert result.policy.method == result.record.model_dump(mode="json")["shipped_method"]
    # SMPQ's and HAWQ's own training is the shared one (from the warm-up, same epochs), so the two
    # agree; and a pick shared by two methods scores the same under the shared finetune.
    assert methods["smpq"]["test_acc_same_finetune"] == methods["smpq"]["test_acc"]
    assert methods["hawq"]["test_acc_same_finetune"] == methods["hawq"]["test_acc"]
    for other in ("dmpq", "hawq", "uniform4"):
        if methods[other]["bits"] == methods["smpq"]["bits"]:
            assert methods[other]["test_acc_same_finetune"] == methods["smpq"]["test_acc_same_finetune"]
    save_search(result, tmp_path)
    saved = json.loads((tmp_path / "policy.json").read_text())
    assert {layer["name"]: layer["weight_bits"] for layer in saved["layers"]} == bits
    record = json.loads((tmp_path / "search.json").read_text())
    assert len(record["shapley"]["players"]) == 2 * len(graph.layers)
    assert record["seed"] == 0 and record["versions"]["torch"]
    chosen = [entry["bits"] for entry in record["k_best"] if entry["chosen"]]
    assert chosen == [methods["smpq"]["bits"]], "exactly one of the K best is SMPQ's pick"
    if record["floor_action"] is None:
        assert bits == methods["smpq"]["bits"], "SMPQ's pick ships unless the floor replaced it"


def test_budget_no_policy_meets_names_the_smallest(digits):
    board = load_board("nucleo-l4r5zi")
    source = load_model("digits_cnn")
    config = SearchConfig.quick()
    budgets = Budgets.of_board(board, flash_bytes=int(board.reserve.flash_kb * 1024) + 100)
    with pytest.raises(UserError, match=r"smallest achievable: flash \d+"):
        run_search(source, digits, board, budgets=budgets, config=config, seed=0, progress=False, log=lambda _: None)


def test_monotone_scores_never_rank_a_narrower_width_above_a_wider_one():
    from smpq_edge.search.smpq import monotone_scores

    scores = np.array([[0.30, 0.10], [0.00, 0.20], [-0.10, -0.30]])  # columns: int4, int8
    out = monotone_scores(scores, (4, 8))
    assert np.all(out[:, 1] > out[:, 0]), "int8 wins every tie"
    np.testing.assert_allclose(out[:, 0], scores[:, 0])
    np.testing.assert_allclose(out[:, 1], [0.30, 0.20, -0.10], atol=1e-4)
    swapped = monotone_scores(scores[:, ::-1].copy(), (8, 4))  # column order follows the candidates
    np.testing.assert_allclose(swapped, out[:, ::-1])

def test_validation_rerank_keeps_the_shapley_optimum_unless_clearly_beaten():
    rng = np.random.default_rng(0)
    optimum = rng.random(500) < 0.9
    noisy = optimum.copy()  # 42 disagreements, a lead of 2 samples
    noisy[np.flatnonzero(optimum)[:20]] = False
    noisy[np.flatnonzero(~optimum)[:22]] = True
    clearly = optimum | (rng.random(500) < 0.5)  # only gains
    more_clearly = optimum | (rng.random(500) < 0.9)
    assert pick_by_validation([optimum, optimum.copy()], margin=1.0) == 0
    assert pick_by_validation([optimum, noisy], margin=1.0) == 0
    assert pick_by_validation([optimum, noisy], margin=0.0) == 1  # any lead wins without a margin
    assert pick_by_validation([optimum, noisy, clearly, more_clearly], margin=1.0) == 3


def test_kl_value_is_zero_for_the_float_outputs_and_negative_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    probabilities = torch.softmax(logits.double(), dim=-1)
    assert float(score(logits, probabilities, "kl")) == pytest.approx(0.0, abs=1e-12)
    other = logits + torch.randn(64, 10)
    expected = (probabilities * (probabilities.log() - torch.log_softmax(other.double(), -1))).sum(-1).mean()
    assert float(score(other, probabilities, "kl")) == pytest.approx(-float(expected))
    assert float(score(other, probabilities, "kl")) < 0


def test_kl_target_is_the_float_models_probabilities(digits):
    source = load_model("digits_cnn")
    x, y = validation_batch(digits, 32, seed=0)
    target = value_target("kl", x, y, source.module)
    assert target.shape == (32, 10)
    np.testing.assert_allclose(target.sum(1), 1.0)
    assert value_target("top1", x, y, None) is y


def test_layer_players_score_real_policies_and_credit_the_widest_candidate(trained_digits_net, digits):
    """With players "layers" every coalition scored is a policy (one candidate per layer), and its
    values equal those policies' accuracies; the narrowest candidates get no sample."""
    net = trained_digits_net
    x, y = validation_batch(digits, 128, seed=0)
    seen = []
    original = CoalitionValue.__call__

    def recording(self, masks):
        seen.append(masks.copy())
        return original(self, masks)

    CoalitionValue.__call__ = recording
    try:
        table = estimate_shapley(net, x, y, 6, 0.5, seed=0, players="layers")
    finally:
        CoalitionValue.__call__ = original
    masks = np.concatenate(seen)
    n_layers = len(net.graph.layers)
    assert (masks.reshape(len(masks), n_layers, 2).sum(-1) == 1).all()
    assert np.isnan(table.mean[0::2]).all() and (table.count[0::2] == 0).all()
    assert (table.count[1::2] == 6).all()
    # Efficiency holds for layer players (no groups, no truncation): the values sum to
    # v(all int8) - v(all int4).
    value = CoalitionValue(net, x, y)
    all8, all4 = np.tile([False, True], n_layers), np.tile([True, False], n_layers)
    assert table.mean[1::2].sum() == pytest.approx(value(all8[None])[0] - value(all4[None])[0])


def test_layer_players_are_enumerated_exactly_when_that_costs_no_more(trained_digits_net, digits):
    """With exact_layers and (L + 1) x permutations >= 2^L, the table is the exact Shapley value of
    the 2^L policies: no sampling error, so every seed gives the same table, and each layer's value
    is the weighted mean of its int4 -> int8 moves over all policies of the other layers."""
    net = trained_digits_net
    x, y = validation_batch(digits, 128, seed=0)
    n_layers = len(net.graph.layers)
    permutations = 2**n_layers // (n_layers + 1) + 1
    tables = [estimate_shapley(net, x, y, permutations, 0.5, seed=seed, players="layers", exact_layers=True)
              for seed in (0, 1)]
    np.testing.assert_array_equal(tables[0].mean, tables[1].mean)
    assert tables[0].n_permutations == 0 and (tables[0].stderr[1::2] == 0).all()
    assert tables[0].n_coalitions == 2**n_layers

    value = CoalitionValue(net, x, y)
    subsets = np.arange(2**n_layers)
    int8 = (subsets[:, None] >> np.arange(n_layers)) & 1 == 1
    masks = np.stack([~int8, int8], axis=-1).reshape(len(subsets), -1)
    values = value(masks)
    for layer in range(n_layers):
        without = subsets[~int8[:, layer]]
        size = int8[without].sum(axis=1)
        weight = np.array([math.factorial(s) * math.factorial(n_layers - s - 1) for s in size]) / math.factorial(n_layers)
        expected = np.sum(weight * (values[without | (1 << layer)] - values[without]))
        assert tables[0].mean[2 * layer + 1] == pytest.approx(expected, abs=1e-12)
    # One permutation fewer than the rule needs, and the table is sampled again.
    sampled = estimate_shapley(net, x, y, 2**n_layers // (n_layers + 1) - 1 or 1, 0.5, seed=0, players="layers",
                               exact_layers=True)
    assert sampled.n_permutations > 0


def test_hawq_never_prefers_fewer_bits_on_a_negative_trace_estimate(digits):
    """One Hutchinson probe on an untrained network's indefinite Hessian comes out negative for some
    layers; unclamped, their score favoured int4 over int8 (and every layer's score went positive)."""
    from smpq_edge.search.baselines import hawq_scores
    from smpq_edge.search.runner import calibrate

    torch.manual_seed(0)
    source = load_model("digits_cnn")
    source.module.eval()
    net = QuantNet(trace(source.module, digits.input_shape), source.module, (4, 8))
    calibrate(net, digits, 0)
    scores = hawq_scores(net, digits, 0, batches_used=1, probes=1)
    assert (scores <= 0).all() and (scores[:, 1] >= scores[:, 0]).all()


def test_uniform_policies_within_the_budgets_join_the_rerank():
    """A uniform policy that fits is a re-rank challenger with its summed score and costs; one over a
    budget is not."""
    from types import SimpleNamespace

    from smpq_edge.search.budget import Knapsack
    from smpq_edge.search.runner import _uniform_challengers

    costs = [np.array([[10.0, 5.0, 1.0], [20.0, 5.0, 2.0]])] * 3  # per layer: candidate 0 small, 1 large
    sack = Knapsack(costs, (45.0, 100.0, 100.0))
    run = SimpleNamespace(candidates=(4, 8), graph=SimpleNamespace(layers=[None] * 3), sack=sack)
    scores = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    challengers = _uniform_challengers(run, scores)
    assert [c.choice for c in challengers] == [(0, 0, 0)]  # all-8 needs 60 > 45
    assert challengers[0].score == 0.0 and challengers[0].cost == (30.0, 5.0, 3.0)
