"""Budgeted one-candidate-per-layer selection against brute-force enumeration."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smpq_edge.common.errors import UserError
from smpq_edge.search.select import Selection, k_best, select

# Scores are compared to the brute force within HiGHS's absolute objective gap.
GAP = 1e-6


def brute_force(scores, costs, budgets, aggregate):
    """Every feasible selection as (score, choice, cost), best first."""
    feasible = []
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        chosen = np.array([costs[l][k] for l, k in enumerate(choice)], dtype=float)
        total = [chosen[:, j].max() if how == "max" else chosen[:, j].sum() for j, how in enumerate(aggregate)]
        if all(b is None or t <= b for t, b in zip(total, budgets)):
            score = sum(scores[l][k] for l, k in enumerate(choice))
            feasible.append((score, choice, total))
    return sorted(feasible, key=lambda item: -item[0])


@st.composite
def instances(draw):
    n_layers = draw(st.integers(1, 4))
    n_dims = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 3)) for _ in range(n_layers)]
    # Integer costs make budgets land exactly on totals, the boundary where tolerances bite.
    scores = [[draw(st.integers(-20, 20)) / 4 for _ in range(k)] for k in sizes]
    costs = [
        np.array([[draw(st.integers(0, 50)) for _ in range(n_dims)] for _ in range(k)], dtype=float) for k in sizes
    ]
    aggregate = [draw(st.sampled_from(["sum", "max"])) for _ in range(n_dims)]
    budgets = [draw(st.none() | st.integers(0, 50 * n_layers)) for _ in range(n_dims)]
    return scores, costs, budgets, aggregate


def check_selection(selection, scores, costs, budgets, aggregate):
    """The selection is internally consistent and within every budget."""
    assert len(selection.choice) == len(scores)
    assert selection.score == pytest.approx(sum(scores[l][k] for l, k in enumerate(selection.choice)), abs=1e-12)
    chosen = np.array([costs[l][k] for l, k in enumerate(selection.choice)])
    for j, how in enumerate(aggregate):
        expected = chosen[:, j].max() if how == "max" else chosen[:, j].sum()
        assert selection.cost[j] == expected
        if budgets[j] is not None:
            assert selection.cost[j] <= budgets[j]


@settings(max_examples=150, deadline=None)
@given(instances())
def test_select_agrees_with_brute_force(instance):
    scores, costs, budgets, aggregate = instance
    feasible = brute_force(scores, costs, budgets, aggregate)
    if not feasible:
        with pytest.raises(UserError):
            select(scores, costs, budgets, aggregate=aggregate)
        return
    selection = select(scores, costs, budgets, aggregate=aggregate)
    check_selection(selection, scores, costs, budgets, aggregate)
    assert selection.score == pytest.approx(feasible[0][0], abs=GAP)


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(1, 6))
def test_k_best_matches_brute_force_top_k(instance, k):
    scores, costs, budgets, aggregate = instance
    feasible = brute_force(scores, costs, budgets, aggregate)
    if not feasible:
        return
    found = k_best(scores, costs, budgets, k, aggregate=aggregate)
    assert len(found) == min(k, len(feasible))
    assert len({s.choice for s in found}) == len(found)
    for selection in found:
        check_selection(selection, scores, costs, budgets, aggregate)
    found_scores = [s.score for s in found]
    assert found_scores == sorted(found_scores, reverse=True)
    # Ties may be broken either way, so compare the score sequence, not the choices.
    np.testing.assert_allclose(found_scores, [f[0] for f in feasible[: len(found)]], atol=GAP, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_fixed_random_instances_with_float_costs(seed):
    # Larger than the hypothesis instances, float scores and costs of realistic magnitudes.
    rng = np.random.default_rng(seed)
    n_layers = 6
    scores = [rng.normal(size=3) for _ in range(n_layers)]
    costs = [np.column_stack([rng.uniform(1e3, 5e4, 3), rng.uniform(1e2, 8e3, 3), rng.uniform(1e4, 1e6, 3)])
             for _ in range(n_layers)]
    aggregate = ["sum", "max", "sum"]
    # Budgets exactly at the totals of a random choice: feasible, binding, and on the boundary.
    reference = rng.integers(0, 3, size=n_layers)
    chosen = np.array([costs[l][k] for l, k in enumerate(reference)])
    budgets = [chosen[:, 0].sum(), chosen[:, 1].max(), chosen[:, 2].sum()]
    feasible = brute_force(scores, costs, budgets, aggregate)
    assert feasible, "the instance should be feasible by construction"
    selection = select(scores, costs, budgets, aggregate=aggregate)
    check_selection(selection, scores, costs, budgets, aggregate)
    assert selection.choice == feasible[0][1]
    top = k_best(scores, costs, budgets, 5, aggregate=aggregate)
    assert [s.choice for s in top] == [f[1] for f in feasible[:5]]


def test_unconstrained_picks_the_best_candidate_of_each_layer():
    scores = [[0.1, 0.3], [0.5, 0.2], [0.0, 0.4]]
    costs = [np.ones((2, 2))] * 3
    assert select(scores, costs, [None, None]).choice == (1, 0, 1)


def test_max_dimension_forbids_options_above_its_budget():
    # The best layer-0 candidate needs 100 RAM; the peak budget 60 must rule it out although the
    # sum of RAM over layers (60 + 50) does not matter for a peak; as a sum nothing fits.
    scores = [[1.0, 5.0], [1.0, 2.0]]
    costs = [np.array([[60.0], [100.0]]), np.array([[10.0], [50.0]])]
    selection = select(scores, costs, [60], aggregate=["max"])
    assert selection.choice == (0, 1)
    assert selection.cost == (60.0,)
    with pytest.raises(UserError):
        select(scores, costs, [60], aggregate=["sum"])


def test_budget_exactly_met_is_feasible():
    scores = [[1.0, 2.0], [1.0, 2.0]]
    costs = [np.array([[1.0], [3.0]]), np.array([[1.0], [3.0]])]
    assert select(scores, costs, [4]).choice in {(0, 1), (1, 0)}
    assert select(scores, costs, [6]).choice == (1, 1)


def test_k_best_returns_all_when_fewer_feasible_than_k():
    scores = [[1.0, 2.0], [0.0, 1.0]]
    costs = [np.array([[1.0], [2.0]]), np.array([[1.0], [2.0]])]
    found = k_best(scores, costs, [3], 10)
    assert [s.choice for s in found] == [(1, 0), (0, 1), (0, 0)]


def test_infeasible_names_the_smallest_achievable_values():
    scores = [[1.0, 2.0], [1.0, 2.0]]
    costs = [np.array([[10.0, 300.0], [20.0, 200.0]]), np.array([[15.0, 400.0], [5.0, 500.0]])]
    with pytest.raises(UserError) as error:
        select(scores, costs, [10, 350], aggregate=["sum", "max"], names=["flash", "RAM"])
    message = str(error.value)
    assert "\n" not in message
    # flash: 10 + 5 = 15 at least; RAM peak: max(200, 400) = 400 at least.
    assert "flash 15 (budget 10)" in message and "RAM 400 (budget 350)" in message


def test_infeasible_together_but_not_alone():
    # Flash alone: choose (1, 1) = 2; cycles alone: choose (0, 0) = 2; no choice does both.
    scores = [[0.0, 0.0], [0.0, 0.0]]
    costs = [np.array([[5.0, 1.0], [1.0, 5.0]]), np.array([[5.0, 1.0], [1.0, 5.0]])]
    with pytest.raises(UserError, match="reachable alone.*flash 2 \\(budget 3\\), cycles 2 \\(budget 3\\)"):
        select(scores, costs, [3, 3], names=["flash", "cycles"])


def test_selection_serialises():
    selection = Selection(choice=(1, 0), score=1.5, cost=(10.0, 2.0))
    assert selection.to_dict() == {"choice": [1, 0], "score": 1.5, "cost": [10.0, 2.0]}


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        select([[1.0, 2.0]], [np.ones((3, 1))], [None])
    with pytest.raises(ValueError, match="shape"):  # transposed: (dimensions, candidates)
        select([[1.0, 2.0]], [np.ones((3, 2))], [None, None, None])
    with pytest.raises(ValueError):
        select([[1.0]], [np.ones((1, 1))], [None], aggregate=["mean"])


@settings(max_examples=120, deadline=None)
@given(instances(), st.data())
def test_a_shared_cost_is_paid_once_when_any_of_its_options_is_chosen(instance, data):
    """As a kernel's code: the brute force adds it to the summed dimensions of every selection
    that picks one of its options, and the ILP finds the same best score."""
    from smpq_edge.search.select import SharedCost

    scores, costs, budgets, aggregate = instance
    amount = tuple(0.0 if how == "max" else float(data.draw(st.integers(0, 40))) for how in aggregate)
    options = tuple(tuple(k for k in range(len(s)) if data.draw(st.booleans())) for s in scores)
    shared = SharedCost(amount, options)
    feasible = []
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        chosen = np.array([costs[l][k] for l, k in enumerate(choice)], dtype=float)
        paid = any(k in options[l] for l, k in enumerate(choice))
        total = [chosen[:, j].max() if how == "max" else chosen[:, j].sum() + (amount[j] if paid else 0)
                 for j, how in enumerate(aggregate)]
        if all(b is None or t <= b for t, b in zip(total, budgets)):
            feasible.append(sum(scores[l][k] for l, k in enumerate(choice)))
    if not feasible:
        with pytest.raises(UserError):
            select(scores, costs, budgets, aggregate=aggregate, shared=[shared])
        return
    selection = select(scores, costs, budgets, aggregate=aggregate, shared=[shared])
    assert selection.score == pytest.approx(max(feasible), abs=GAP)
    paid = any(k in options[l] for l, k in enumerate(selection.choice))
    for j, how in enumerate(aggregate):
        if how == "sum":
            assert selection.cost[j] == sum(costs[l][k][j] for l, k in enumerate(selection.choice)) + \
                (amount[j] if paid else 0)


def test_the_infeasible_message_names_each_budget_in_the_callers_units():
    from smpq_edge.search.select import infeasible_message

    text = infeasible_message(["flash", "ram", "cycles"], [2048.0, 10.0, 5.0], [1024.0, None, 10.0],
                              lambda name, least, budget: f"{name} {least:g}/{budget:g}")
    assert text == "no per-layer choice fits the budgets (over budget); smallest achievable: flash 2048/1024, cycles 5/10"
    apart = infeasible_message(["flash"], [10.0], [20.0], lambda name, least, budget: name)
    assert "each budget is reachable alone but not all at once" in apart
