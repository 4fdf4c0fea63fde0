"""int16 activations in the search (issue 23): w8a16 is a candidate like the weight widths. The
coalitions the Shapley tables score run each policy's activation types exactly as the exported
model will; the knapsack prices an int16 layer's QUANTIZE operators, tensors and kernel code; HAWQ
gains HAWQ-V2's activation term and DMPQ's alpha a gradient of its own; a build ships what the
search picked, priced and emulated as one file."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from smpq_edge.common.errors import UserError
from smpq_edge.common.precision import Precision, weight_bits_of, wide_layers
from smpq_edge.inputs.boards import load_board
from smpq_edge.inputs.policy import load_policy
from smpq_edge.search.baselines import hawq_scores
from smpq_edge.search.budget import Budgets, cost_of, knapsack

from test_integer_numerics import residual_case

W4, W8, W8A16 = Precision(4), Precision(8), Precision(8, 16)
CANDIDATES = (W4, W8, W8A16)


@pytest.fixture(scope="module")
def wide_net():
    """The residual net (conv+BN, depthwise, pointwise, two ADDs, RELU, avg pool, FC) with the
    candidates w4a8 w8a8 w8a16, calibrated."""
    data, net, _, _ = residual_case(CANDIDATES)
    net = copy.deepcopy(net)
    yield data, net
    net.set_policy(None)


def _one_hot(net, policy: dict[str, Precision]) -> np.ndarray:
    return np.concatenate([[c == policy[op.name] for c in net.candidates] for op in net.graph.layers])


def test_coalitions_run_each_policys_activation_types_exactly(wide_net):
    """Every one of the 81 policies scored in one prefix-tree walk gives the logits of that policy
    set on the network and run alone (int16 tensors and QUANTIZE where its int16 layers put them),
    to the bit; so do coalitions mixing several candidates of a layer."""
    data, net = wide_net
    names = [op.name for op in net.graph.layers]
    policies = [dict(zip(names, choice)) for choice in itertools.product(CANDIDATES, repeat=len(names))]
    x = torch.from_numpy(data.x_val[:48])
    rng = np.random.default_rng(0)
    mixed = rng.random((6, len(names) * len(CANDIDATES))) < 0.6
    mixed[:, ::len(CANDIDATES)] = True  # every layer keeps at least one candidate
    masks = np.concatenate([np.array([_one_hot(net, p) for p in policies]), mixed])
    net.set_policy(None)
    logits, index = net.coalition_logits(x, masks)
    with torch.no_grad():
        for row, policy in enumerate(policies):
            net.set_policy(policy)
            assert torch.equal(logits[index[row]], net(x)), policy
        net.set_policy(None)
        for row, mask in enumerate(mixed, start=len(policies)):
            for i, layer in enumerate(net.mixed_layers()):
                layer.active.copy_(torch.from_numpy(mask[i * len(CANDIDATES):(i + 1) * len(CANDIDATES)]))
            assert torch.equal(logits[index[row]], net(x))
    net.set_policy(None)
    assert net.wide == frozenset()  # the walk leaves the types as it found them


def test_the_knapsack_prices_an_int16_layer_as_the_cost_model_does(wide_net):
    """One int16 layer: the selector's flash and cycles are the full cost model's to the byte and
    the cycle (its QUANTIZE operators and kernel code included); several: never below them (a
    QUANTIZE between two int16 layers is charged though none is there). The s16 kernel code is
    paid once however many layers use it."""
    _, net = wide_net
    board = load_board("nucleo-l4r5zi").with_candidates(["w4a8", "w8a8", "w8a16"])
    budgets = Budgets.of_board(board)
    sack = knapsack(net.graph, board, budgets, board.precisions)
    assert board.precisions == CANDIDATES
    names = [op.name for op in net.graph.layers]
    assert any(shared.cost[0] > 0 for shared in sack.shared)  # s16 code outside the reserve
    for i in range(len(names)):
        choice = tuple(2 if j == i else 1 for j in range(len(names)))
        policy = {name: CANDIDATES[k] for name, k in zip(names, choice)}
        report = cost_of(net.graph, policy, board, budgets)
        flash, ram, cycles = sack.totals(choice)
        assert (flash, cycles) == (report.flash_total_bytes - (budgets.flash_bytes - sack.budgets[0]),
                                   report.cycles - (budgets.cycles - sack.budgets[2]))
        assert ram >= report.ram_total_bytes
    for choice in [(2, 2, 1, 1), (2, 2, 2, 2), (0, 2, 2, 1)]:
        policy = {name: CANDIDATES[k] for name, k in zip(names, choice)}
        report = cost_of(net.graph, policy, board, budgets)
        flash, _, cycles = sack.totals(choice)
        assert flash >= report.flash_total_bytes - (budgets.flash_bytes - sack.budgets[0])
        assert cycles >= report.cycles - (budgets.cycles - sack.budgets[2])
        assert report.extra_kernels and report.extra_kernel_flash_bytes == sum(report.extra_kernels.values())


def test_the_selector_takes_int16_where_the_ram_budget_has_room(wide_net):
    """Scores that prefer w8a16 everywhere: all four layers with room; none when the RAM budget is
    the int8 policy's own."""
    _, net = wide_net
    board = load_board("nucleo-l4r5zi").with_candidates(["w4a8", "w8a8", "w8a16"])
    names = [op.name for op in net.graph.layers]
    scores = [[0.0, 1.0, 2.0]] * len(names)
    loose = knapsack(net.graph, board, Budgets.of_board(board), board.precisions)
    assert loose.k_best(scores)[0].choice == (2,) * len(names)
    int8 = cost_of(net.graph, {name: W8 for name in names}, board, Budgets.of_board(board))
    tight = Budgets.of_board(board, ram_bytes=int8.ram_total_bytes)
    chosen = knapsack(net.graph, board, tight, board.precisions).k_best(scores)[0].choice
    assert 2 not in chosen and chosen == (1,) * len(names)


def test_hawq_prices_int16_activations_by_their_hessian_trace(wide_net):
    """HAWQ-V2's activation term: w8a16 differs from w8a8 (same weights) by trace x (s8^2 - s16^2)
    / 12, a gain for every layer whose output moves the loss."""
    data, net = wide_net
    scores = hawq_scores(net, data, seed=0, batches_used=1, probes=2)
    assert scores.shape == (len(net.graph.layers), 3)
    gain = scores[:, 2] - scores[:, 1]
    assert (gain >= 0).all() and (gain > 0).sum() >= 3
    assert (scores[:, 1] >= scores[:, 0]).all()  # int8 weights lose less than int4's


def test_mixed_training_gives_int16_its_own_alpha_gradient(wide_net):
    """With w8a8 and w8a16 both active their weights are the same: only mixing the int8 and int16
    quantised outputs by their softmax mass lets alpha tell them apart (DMPQ learns from it)."""
    data, net = wide_net
    tuned = copy.deepcopy(net)
    tuned.set_policy(None)
    tuned.train()
    loss = tuned(torch.from_numpy(data.x_train[:64])).logsumexp(-1).mean()
    loss.backward()
    tuned.eval()
    grads = [layer.alpha.grad for layer in tuned.mixed_layers()]
    assert all(g is not None for g in grads)
    assert any(abs(float(g[2] - g[1])) > 1e-9 for g in grads)
    # Scoring the mixed network (DMPQ's validation pass): its layers' outputs stay on the int8 grid
    # that the integer ADD after them reads (a mix of both grids sent it out of its table).
    with torch.no_grad():
        for layer in tuned.mixed_layers():
            layer.alpha.copy_(torch.tensor([0.0, 0.0, 3.0]))
        logits = tuned(torch.from_numpy(data.x_val[:64]))
    p = tuned.activation_quantiser(tuned.graph.output).params(8)
    steps = logits / p.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_board_candidates_need_an_int8_activation_floor():
    board = load_board("nucleo-l4r5zi")
    assert board.with_candidates(["w4a8", "w8a16"]).precisions == (W4, W8A16)
    with pytest.raises(UserError, match=r"^--candidates: needs an int8-activation candidate") as error:
        board.with_candidates(["w8a16"])
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"w4a16: TFLM's 16x8 kernels take int8 weights only"):
        board.with_candidates(["w4a16", "w8a8"])


def test_a_build_ships_the_int16_layers_the_search_picked(tmp_path):
    """With w8a8 and w8a16 to choose among and budgets with room, the summed-Shapley optimum runs
    int16 activations (the monotone prior breaks ties towards the wider); whatever is shipped,
    policy.json, search.json, export.json and the emulator agree on it, and TFLM computes what the
    fake-quant network computes."""
    from smpq_edge import build

    result = build("digits_cnn", out=tmp_path / "b", quick=True, candidates=["w8a8", "w8a16"], log=lambda _: None)
    search = json.loads((tmp_path / "b" / "search.json").read_text())
    assert search["candidates"] == ["w8a8", "w8a16"]
    assert search["k_best"][0]["int16"]
    shipped = next(m for m in search["methods"] if m["method"] == search["shipped_method"])
    policy = load_policy(tmp_path / "b" / "policy.json").precisions
    assert result.policy == {name: c.name for name, c in policy.items()}
    wide = wide_layers(policy)
    assert sorted(wide) == shipped["int16"] and weight_bits_of(policy) == shipped["bits"]
    exported = json.loads((tmp_path / "b" / "export.json").read_text())
    assert exported["int16_activations"] == sorted(wide)
    emulation = json.loads((tmp_path / "b" / "emulation.json").read_text())
    assert emulation["label_agreement"] == 1.0
    hawq = next(m for m in search["methods"] if m["method"] == "hawq")
    assert set(hawq["int16"]) <= set(hawq["bits"])
