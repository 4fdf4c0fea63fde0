"""Monte Carlo Shapley estimator against exact values on small synthetic games."""

import itertools
import math
import json

import numpy as np
import pytest

from smpq_edge.search import shapley
from smpq_edge.search.shapley import exact_shapley, monte_carlo_shapley

N = 6
WEIGHTS = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
# Upper-triangular pairwise interactions, fixed so the test values never move.
PAIRS = np.triu(np.random.default_rng(7).normal(scale=1.0, size=(N, N)), k=1)
MAJORITY_WEIGHTS = np.array([4.0, 2.0, 1.0, 1.0, 3.0, 1.0])
MAJORITY_QUOTA = 7.0


def additive_pairwise(masks: np.ndarray) -> np.ndarray:
    present = masks.astype(np.float64)
    return present @ WEIGHTS + np.einsum("mi,ij,mj->m", present, PAIRS, present)


def game(masks: np.ndarray) -> np.ndarray:
    """Additive + pairwise interactions + a weighted-majority bonus: every kind of term."""
    present = masks.astype(np.float64)
    return additive_pairwise(masks) + 4.0 * (present @ MAJORITY_WEIGHTS >= MAJORITY_QUOTA)


def empty_and_full(value_fn, n):
    return value_fn(np.zeros((1, n), bool))[0], value_fn(np.ones((1, n), bool))[0]


# --- exact Shapley --------------------------------------------------------------------------


def test_exact_matches_closed_form_for_additive_plus_pairwise():
    # An interaction term c_ij is split equally between i and j.
    expected = WEIGHTS + 0.5 * (PAIRS.sum(axis=0) + PAIRS.sum(axis=1))
    np.testing.assert_allclose(exact_shapley(additive_pairwise, N).mean, expected, rtol=0, atol=1e-12)


def test_exact_matches_hand_computed_weighted_majority():
    # Weights [4, 2, 1, 1], quota 5: player 0 is pivotal unless it comes first (3/4); when it
    # comes first, whoever comes second is pivotal (1/12 each).
    def majority(masks):
        return (masks.astype(float) @ np.array([4.0, 2.0, 1.0, 1.0]) >= 5).astype(float)

    np.testing.assert_allclose(exact_shapley(majority, 4).mean, [3 / 4, 1 / 12, 1 / 12, 1 / 12], atol=1e-12)


def test_exact_is_efficient():
    empty, full = empty_and_full(game, N)
    assert exact_shapley(game, N).mean.sum() == pytest.approx(full - empty, abs=1e-12)


# --- Monte Carlo against exact ----------------------------------------------------------------


def test_estimate_within_three_standard_errors_of_exact():
    exact = exact_shapley(game, N).mean
    estimate = monte_carlo_shapley(game, N, 2000, seed=11)
    assert np.all(estimate.count == 2000)
    assert np.all(np.abs(estimate.mean - exact) <= 3 * estimate.stderr), (estimate.mean, exact, estimate.stderr)


def test_every_permutation_telescopes_to_full_minus_empty():
    # Without groups or truncation each permutation's samples sum to v(full) - v(empty), so the
    # means (all with the same count) sum to it too: efficiency holds for the estimate as well.
    empty, full = empty_and_full(game, N)
    estimate = monte_carlo_shapley(game, N, 50, seed=3)
    assert estimate.mean.sum() == pytest.approx(full - empty, abs=1e-9)
    assert estimate.full_value == full


def test_error_and_standard_error_shrink_with_samples():
    exact = exact_shapley(game, N).mean
    few = monte_carlo_shapley(game, N, 100, seed=5)
    many = monte_carlo_shapley(game, N, 4000, seed=5)
    assert np.mean(np.abs(many.mean - exact)) < np.mean(np.abs(few.mean - exact))
    # Standard errors go as 1/sqrt(samples): sqrt(4000 / 100) ~ 6.3.
    ratio = few.stderr / many.stderr
    assert np.all((ratio > 4.5) & (ratio < 9)), ratio


def test_std_is_the_sample_standard_deviation():
    # Two players: player 0's sample is v({0,1}) - v({1}) = 3 when removed first, v({0}) = 1
    # when second, so its samples are k threes and P - k ones, with k read back from the mean.
    def two(masks):
        return masks[:, 0] + 2.0 * masks[:, 0] * masks[:, 1]

    p = 101
    estimate = monte_carlo_shapley(two, 2, p, seed=3)
    k = round((estimate.mean[0] - 1) * p / 2)
    assert 0 < k < p
    assert estimate.mean[0] == pytest.approx((3 * k + (p - k)) / p, abs=1e-12)
    assert estimate.std[0] == pytest.approx(np.std([3.0] * k + [1.0] * (p - k), ddof=1), abs=1e-12)


def test_reported_statistics_are_consistent():
    estimate = monte_carlo_shapley(game, N, 300, seed=2)
    np.testing.assert_array_equal(estimate.stderr, estimate.std / np.sqrt(estimate.count))
    np.testing.assert_array_equal(estimate.mean_minus_std, estimate.mean - estimate.std)
    assert np.all(estimate.std > 0)


# --- determinism and the two evaluation paths ---------------------------------------------------


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 1, 2], [5, 5, 5, 9, 9, 9]])
@pytest.mark.parametrize("truncation", [None, 0.5, 0.8])
@pytest.mark.parametrize("max_batch", [1, 7, 10_000])
def test_batched_and_one_at_a_time_are_bit_identical(groups, truncation, max_batch):
    calls = []

    def recording_game(masks):
        calls.append(len(masks))
        return game(masks)

    kwargs = dict(groups=groups, truncation=truncation, seed=4)
    batched = monte_carlo_shapley(recording_game, N, 150, max_batch=max_batch, **kwargs)
    assert max(calls) <= max_batch
    calls.clear()
    single = monte_carlo_shapley(recording_game, N, 150, batched=False, **kwargs)
    assert set(calls) == {1}
    assert single.n_calls == single.n_coalitions == len(calls)
    for field in ("mean", "std", "stderr", "count", "mean_minus_std"):
        np.testing.assert_array_equal(getattr(batched, field), getattr(single, field), err_msg=field)
    assert batched.full_value == single.full_value
    # Deduplication: the batched path never evaluates more coalitions than the walk does.
    assert batched.n_coalitions <= single.n_coalitions
    if max_batch == 10_000:
        assert batched.n_calls < single.n_calls


def test_batched_deduplicates_coalitions():
    # 6 players have 63 coalitions besides the full one: 3000 permutations must reuse them.
    estimate = monte_carlo_shapley(game, N, 3000, seed=0, max_batch=10_000)
    assert estimate.n_coalitions <= 64


def test_same_seed_same_result_other_seed_differs():
    a = monte_carlo_shapley(game, N, 200, seed=9, truncation=0.5)
    b = monte_carlo_shapley(game, N, 200, seed=9, truncation=0.5)
    c = monte_carlo_shapley(game, N, 200, seed=10, truncation=0.5)
    assert a.to_dict() == b.to_dict()
    assert not np.array_equal(a.mean, c.mean)


# --- the never-empty-group rule -------------------------------------------------------------------


GROUPS = np.array([0, 0, 1, 1, 1, 2])  # player 5 is alone in its group


def grouped_value_fn(masks):
    for g in np.unique(GROUPS):
        assert masks[:, GROUPS == g].any(axis=1).all(), f"a coalition left group {g} empty"
    return game(masks)


@pytest.mark.parametrize("batched", [True, False])
def test_group_rule_never_empties_a_group(batched):
    estimate = monte_carlo_shapley(grouped_value_fn, N, 300, groups=GROUPS, seed=1, batched=batched)
    # Each permutation removes all but one member of each group: 6 - 3 players.
    assert estimate.count.sum() == 300 * 3
    # The lone member is never removed: no sample, undefined value, still valid JSON.
    assert estimate.count[5] == 0 and np.isnan(estimate.mean[5])
    assert json.loads(json.dumps(estimate.to_dict(), allow_nan=False))["mean"][5] is None


def test_group_rule_estimates_drop_while_the_group_keeps_another_member():
    # Oracle: walk all 720 permutations, skipping a removal that would empty a group; the
    # estimator converges to total drop / number of removals, per player.
    total = np.zeros(N)
    removals = np.zeros(N)
    for order in itertools.permutations(range(N)):
        present = np.ones(N, bool)
        before = game(present[None])[0]
        for player in order:
            if present[GROUPS == GROUPS[player]].sum() == 1:
                continue
            present[player] = False
            after = game(present[None])[0]
            total[player] += before - after
            removals[player] += 1
            before = after
    with np.errstate(invalid="ignore"):
        expected = total / removals
    estimate = monte_carlo_shapley(grouped_value_fn, N, 4000, groups=GROUPS, seed=8)
    members = slice(0, 5)
    assert np.all(np.abs(estimate.mean[members] - expected[members]) <= 3 * estimate.stderr[members])
    # The grouped values differ from the plain Shapley values, so the check above has teeth.
    assert np.max(np.abs(expected[members] - exact_shapley(game, N).mean[members])) > 10 * estimate.stderr[members].max()


# --- truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(("truncation", "live_steps"), [(0.5, 4), (2 / 3, 3)])
def test_truncation_zeroes_contributions_after_threshold(batched, truncation, live_steps):
    # v(S) = |S|: values walk 6, 5, 4, 3, 2, 1, 0. A removal counts while the value before it is
    # at least truncation * 6 (3, or exactly 4); every permutation then gives `live_steps` 1s and
    # 0s after. The walk evaluates no coalition past the first one below the threshold; the
    # batched path evaluates whole stages of steps, but no stage after that one.
    sizes = []

    def count_players(masks):
        sizes.extend(masks.sum(axis=1))
        return masks.sum(axis=1).astype(float)

    estimate = monte_carlo_shapley(count_players, N, 500, truncation=truncation, seed=0, batched=batched)
    assert np.all(estimate.count == 500)
    assert np.sum(estimate.mean * estimate.count) == pytest.approx(live_steps * 500, abs=1e-9)
    first_below = next(t for t in range(N) if N - 1 - t < truncation * N)
    stage = math.ceil(N / shapley._TRUNCATION_STAGES)
    last_evaluated = min(N, stage * (first_below // stage + 1)) - 1 if batched else first_below
    assert min(sizes) == N - 1 - last_evaluated
    untruncated = monte_carlo_shapley(count_players, N, 500, seed=0, batched=batched)
    np.testing.assert_allclose(untruncated.mean, 1.0)


def test_truncation_stops_each_walk_at_the_breaking_removal():
    # Removing player 0 drops v from >= 11 to <= 5, below 0.5 * v(full) = 8: player 0's sample is
    # always 11; a player removed before it gives 1, one after it gives 0 and is not evaluated.
    def fragile(masks):
        return 10.0 * masks[:, 0] + masks.sum(axis=1)

    estimate = monte_carlo_shapley(fragile, N, 400, truncation=0.5, seed=6, batched=False)
    assert estimate.mean[0] == 11 and estimate.std[0] == 0
    removed_before_zero = np.sum(estimate.mean[1:] * estimate.count[1:])
    assert removed_before_zero == pytest.approx(np.round(removed_before_zero), abs=1e-9)
    # Each walk evaluates the removals up to and including player 0, plus the full coalition once.
    assert estimate.n_coalitions == 1 + 400 + removed_before_zero
    # Player 0 sits uniformly in the permutation, so on average 2.5 players precede it.
    assert removed_before_zero / 400 == pytest.approx(2.5, abs=0.3)


def test_value_fn_with_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        monte_carlo_shapley(lambda masks: np.zeros(len(masks) + 1), N, 5)


class _AdditivePolicies:
    """A coalition value over (layer, candidate) choices that is a sum of per-layer utilities:
    every upgrade step's Shapley value is its utility gain, whatever the other layers do."""

    max_batch = 512

    def __init__(self, utility: np.ndarray):
        self.utility = utility  # (layers, candidates)

    def __call__(self, choice: np.ndarray) -> np.ndarray:
        chosen = choice.reshape(len(choice), *self.utility.shape)
        assert (chosen.sum(axis=2) == 1).all(), "every coalition must be one candidate per layer"
        return (chosen * self.utility).sum(axis=(1, 2))


@pytest.mark.parametrize("candidates", [(4, 8), (2, 3, 4, 8), (8, 2, 4)])
def test_layer_players_price_each_candidate_by_its_gain_over_the_narrowest(candidates):
    """Layer players with more than two candidates play one game per wider candidate against the
    narrowest: for an additive value each (layer, candidate) entry is exactly its utility above
    the layer's narrowest candidate (which has no entry), exact enumeration or sampled."""
    from types import SimpleNamespace

    from smpq_edge.common.distributed import SINGLE_PROCESS
    from smpq_edge.search.smpq import _layer_upgrades

    rng = np.random.default_rng(0)
    layers, k = 5, len(candidates)
    utility = rng.normal(size=(layers, k))
    net = SimpleNamespace(graph=SimpleNamespace(layers=[None] * layers), candidates=candidates)
    narrowest = int(np.argmin(candidates))
    expected = utility - utility[:, [narrowest]]
    expected[:, narrowest] = np.nan
    for exact in (True, False):
        estimate = _layer_upgrades(_AdditivePolicies(utility), net, 16, 0, SINGLE_PROCESS, exact=exact)
        np.testing.assert_allclose(estimate.mean.reshape(layers, k), expected, atol=1e-12)
        assert (estimate.count.reshape(layers, k)[:, narrowest] == 0).all()
        assert (estimate.count.reshape(layers, k)[:, np.arange(k) != narrowest] > 0).all()


def test_marginals_are_kept_by_coalition_size():
    """by_size[i, s] is player i's mean marginal over coalitions of s other players: for
    v(S) = |S|^2 that is 2s + 1 exactly, enumerated or sampled; the Shapley value is its mean
    over sizes; a sampled player has no entry at a size none of its samples had."""
    def squared(masks: np.ndarray) -> np.ndarray:
        return masks.sum(axis=1).astype(np.float64) ** 2

    expected = np.tile(2.0 * np.arange(N) + 1, (N, 1))
    exact = exact_shapley(squared, N)
    np.testing.assert_allclose(exact.by_size, expected)
    np.testing.assert_allclose(exact.by_size.mean(axis=1), exact.mean)
    sampled = monte_carlo_shapley(squared, N, 3, seed=0)
    seen = np.isfinite(sampled.by_size)
    np.testing.assert_allclose(sampled.by_size[seen], expected[seen])
    assert seen.sum(axis=1).max() <= 3 and seen.any(axis=1).all()


class _NarrowPair:
    """Six layers, w4a8 or w8a8: each layer at int4 costs its own loss, and layer 0's int4 also
    costs 1.0 for every other int4 layer (it feeds them). Alone, layer 0 at int4 costs least;
    averaged over every coalition, its interactions make it look the worst."""

    max_batch = 512
    alone = np.array([0.3, 1.0, 0.8, 1.2, 1.5, 2.0])

    def __call__(self, choice: np.ndarray) -> np.ndarray:
        narrow = choice.reshape(len(choice), len(self.alone), 2)[:, :, 0].astype(np.float64)
        return -(narrow @ self.alone + narrow[:, 0] * narrow[:, 1:].sum(axis=1))


def test_scores_valued_at_the_budgets_policy_pick_the_layer_that_costs_least_there():
    """With room for one int4 layer, summed Shapley puts layer 2 at int4 (it costs 0.8); valued at
    the policies with one int4 layer the selector puts layer 0 there (0.3), the better policy."""
    from types import SimpleNamespace

    from smpq_edge.common.distributed import SINGLE_PROCESS
    from smpq_edge.common.precision import Precision
    from smpq_edge.search.budget import Knapsack
    from smpq_edge.search.runner import at_operating_point
    from smpq_edge.search.smpq import ShapleyConfig, _layer_upgrades, shapley_scores, valued_at

    game = _NarrowPair()
    layers, candidates = len(game.alone), (Precision(4), Precision(8))
    net = SimpleNamespace(graph=SimpleNamespace(layers=[None] * layers), candidates=candidates)
    table = _layer_upgrades(game, net, 16, 0, SINGLE_PROCESS, exact=True)
    scores = shapley_scores(table, layers, 2)
    flash = [np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])] * layers  # int4 1 byte, int8 2
    run = SimpleNamespace(sack=Knapsack(flash, (2 * layers - 1, 100.0, 100.0)), config=SimpleNamespace(k_best=3))
    assert run.sack.k_best(scores.tolist())[0].choice == (1, 1, 0, 1, 1, 1)
    best, _ = at_operating_point(run, scores, valued_at(table, candidates, ShapleyConfig()))
    assert best[0].choice == (0, 1, 1, 1, 1, 1)
    assert game(np.eye(2, dtype=bool)[[0] + [1] * 5].reshape(1, -1)) > game(
        np.eye(2, dtype=bool)[[1, 1, 0, 1, 1, 1]].reshape(1, -1))
    assert valued_at(table, candidates, ShapleyConfig(final_players="candidates")) is None
