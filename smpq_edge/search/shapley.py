"""Shapley values of players (here: (layer, bit-width candidate) pairs) by Monte Carlo permutations.

The estimator knows nothing about models: it gets a *batched* value function that maps a
boolean matrix of coalitions, one row per coalition and one column per player, to one value per
row (for the search: the supernet's validation accuracy with only those candidates active).

One sample per permutation: start from the full coalition and remove the players in the
permutation's order; a player's sample is the value drop its removal causes,
v(S) - v(S minus player). Walking removals from the full set is walking additions in reverse,
so without the options below the mean is an unbiased estimate of the Shapley value.

Two options follow Shapley-NAS (Xiao et al., CVPR 2022):

* ``groups`` (player -> group id, e.g. its layer) with the rule "never leave a group empty": a
  player whose removal would empty its group is skipped and gets no sample from that
  permutation. The skipped player is always the group member that comes last in the
  permutation, so each permutation removes exactly ``n - n_groups`` players. With groups,
  player (l, k)'s estimate is the expected drop from removing candidate k *while layer l keeps
  another candidate*, which is what a per-layer choice needs; it is no longer the classic
  Shapley value and the efficiency property does not hold.
* ``truncation`` (a fraction, e.g. 0.5): once a permutation's value falls below
  ``truncation * v(full)``, its remaining samples are 0 (TMC-Shapley, Ghorbani & Zou 2019):
  a network that is already broken teaches nothing about the next removal, and those
  coalitions need not be evaluated. A negative ``v(full)`` (minus an error, as reconstruction's
  minus MSE) truncates below ``v(full) / truncation`` instead: the error grown by 1 / truncation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

ValueFn = Callable[[np.ndarray], np.ndarray]

# With truncation on, each permutation's coalitions are evaluated in this many stages, and a
# stage is skipped for permutations that are already truncated: fewer wasted evaluations for a
# few more value_fn calls. Each call shares less (a value_fn may share work between the
# coalitions of one call): 4 stages cost 30-40 % more than 1 on a supernet that never truncates
# (bench/search_speed.py's supernets), 2 is the compromise.
_TRUNCATION_STAGES = 2
# Most coalitions (rows of the bool matrix) built in memory at once.
_CHUNK_COALITIONS = 65536
# exact_shapley enumerates 2**n coalitions: keep that to what fits a laptop.
_EXACT_MAX_PLAYERS = 20


@dataclass(frozen=True, eq=False)
class ShapleyEstimate:
    """Per-player statistics of the Monte Carlo samples; arrays have one entry per player.

    A player with no sample (a group of one, never removed) has mean NaN; a player with fewer
    than two samples has std NaN. ``std`` uses ddof=1.
    """

    mean: np.ndarray
    std: np.ndarray
    stderr: np.ndarray  # std / sqrt(count): the uncertainty of ``mean``
    count: np.ndarray  # samples per player
    mean_minus_std: np.ndarray  # Shapley-NAS's conservative estimate
    full_value: float  # v(all players)
    n_permutations: int
    n_coalitions: int  # coalitions passed to value_fn, the full one included
    n_calls: int  # value_fn calls
    # by_size[i, s]: player i's mean sample over the coalitions of s other players (NaN where it
    # has none). The Shapley value weighs every size alike; a budget that leaves a known number
    # of players out asks for the sizes near it (``smpq.scores_at``).
    by_size: np.ndarray | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data; NaN becomes None (JSON has no NaN)."""

        def floats(a: np.ndarray) -> list[float | None]:
            return [None if math.isnan(x) else float(x) for x in a]

        return {
            "mean": floats(self.mean),
            "std": floats(self.std),
            "stderr": floats(self.stderr),
            "count": [int(c) for c in self.count],
            "mean_minus_std": floats(self.mean_minus_std),
            "full_value": self.full_value,
            "n_permutations": self.n_permutations,
            "n_coalitions": self.n_coalitions,
            "n_calls": self.n_calls,
        }


class _CountingValueFn:
    """Calls value_fn, checks what it returns and counts calls and coalitions."""

    def __init__(self, value_fn: ValueFn):
        self.value_fn = value_fn
        self.calls = 0
        self.coalitions = 0

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        values = np.asarray(self.value_fn(masks), dtype=np.float64)
        if values.shape != (len(masks),):
            raise ValueError(f"value_fn returned shape {values.shape} for {len(masks)} coalitions")
        # A NaN would compare false against the truncation threshold and silently truncate.
        if not np.all(np.isfinite(values)):
            raise ValueError("value_fn returned a non-finite value")
        self.calls += 1
        self.coalitions += len(masks)
        return values


def truncation_threshold(full_value: float, truncation: float) -> float:
    """The value below which a permutation is truncated: ``truncation`` of a positive full value
    (accuracy), or a negative one (minus an error) divided by it."""
    return truncation * full_value if full_value >= 0 else full_value / truncation


def monte_carlo_shapley(
    value_fn: ValueFn,
    n_players: int,
    n_permutations: int,
    *,
    groups: np.ndarray | None = None,
    truncation: float | None = None,
    seed: int = 0,
    max_batch: int = 256,
    batched: bool = True,
) -> ShapleyEstimate:
    """Estimate each player's contribution from ``n_permutations`` random removal orders.

    value_fn: bool array (m, n_players), True = player present -> float array (m,).
    groups: group id per player (any integers), with the never-empty-group rule; None = none.
    truncation: a permutation's samples become 0 once its value is below
        ``truncation * v(full)``; None = never truncate.
    max_batch: most coalitions per value_fn call.
    batched: False calls value_fn with one coalition at a time in a sequential walk (the
        reference implementation); both ways give bit-identical estimates for a value_fn
        that is a pure function of each coalition.
    """
    if n_players < 1 or n_permutations < 1 or max_batch < 1:
        raise ValueError("n_players, n_permutations and max_batch must be positive")
    group_index = _group_index(groups, n_players)
    evaluate = _CountingValueFn(value_fn)
    full_value = float(evaluate(np.ones((1, n_players), dtype=bool))[0])
    threshold = -math.inf if truncation is None else truncation_threshold(full_value, truncation)

    rng = np.random.default_rng(seed)
    permutations = rng.permuted(np.tile(np.arange(n_players), (n_permutations, 1)), axis=1)
    if batched:
        samples = _samples_batched(evaluate, permutations, group_index, full_value, threshold, max_batch)
    else:
        samples = _samples_sequential(evaluate, permutations, group_index, full_value, threshold)
    return _summarise(samples, _coalition_sizes(permutations, group_index), full_value, evaluate)


def exact_shapley(value_fn: ValueFn, n_players: int, max_batch: int = 4096) -> ShapleyEstimate:
    """Shapley values by enumerating all 2**n coalitions (no groups, no truncation), as an
    estimate with no sampling error: std and stderr 0, ``count`` the 2**(n-1) marginal
    contributions each value weighs, ``n_permutations`` 0.

    Row i of the coalition matrix is the subset whose bit j says whether player j is present.
    """
    if not 1 <= n_players <= _EXACT_MAX_PLAYERS:
        raise ValueError(f"exact_shapley needs 1..{_EXACT_MAX_PLAYERS} players, got {n_players}")
    subsets = np.arange(2**n_players)
    masks = (subsets[:, None] >> np.arange(n_players)) & 1 == 1
    evaluate = _CountingValueFn(value_fn)
    values = np.concatenate([evaluate(masks[i : i + max_batch]) for i in range(0, len(masks), max_batch)])
    size = masks.sum(axis=1)
    # Weight of coalition S (without player i) in i's value: |S|! (n - |S| - 1)! / n!.
    weight = np.array(
        [math.factorial(s) * math.factorial(n_players - s - 1) for s in range(n_players)], dtype=np.float64
    ) / math.factorial(n_players)
    phi = np.empty(n_players)
    by_size = np.empty((n_players, n_players))
    for i in range(n_players):
        without = subsets[~masks[:, i]]
        marginal = values[without | (1 << i)] - values[without]
        phi[i] = np.sum(weight[size[without]] * marginal)
        by_size[i] = np.bincount(size[without], marginal, n_players) / np.bincount(size[without], minlength=n_players)
    zeros = np.zeros(n_players)
    return ShapleyEstimate(mean=phi, std=zeros, stderr=zeros, count=np.full(n_players, 2 ** (n_players - 1)),
                           mean_minus_std=phi, full_value=float(values[-1]), n_permutations=0,
                           n_coalitions=evaluate.coalitions, n_calls=evaluate.calls, by_size=by_size)


def _group_index(groups: np.ndarray | None, n_players: int) -> np.ndarray | None:
    """Group ids renumbered 0..G-1, so they can index a count array."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n_players,):
        raise ValueError(f"groups must have one entry per player ({n_players}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _removal_steps(permutations: np.ndarray, group_index: np.ndarray | None) -> np.ndarray:
    """The players each permutation removes, in order, after the never-empty-group rule.

    The rule skips exactly each group's member that comes last in the permutation (the other
    members are gone by then), so every row keeps the same length n - n_groups.
    """
    if group_index is None:
        return permutations
    n_perm, n_players = permutations.shape
    position = np.argsort(permutations, axis=1)  # position[p, i]: where player i sits in row p
    rows = np.arange(n_perm)
    removed = np.ones((n_perm, n_players), dtype=bool)
    for g in range(group_index.max() + 1):
        members = np.flatnonzero(group_index == g)
        last = members[np.argmax(position[:, members], axis=1)]
        removed[rows, position[rows, last]] = False
    return permutations[removed].reshape(n_perm, -1)


def _coalition_sizes(permutations: np.ndarray, group_index: np.ndarray | None) -> np.ndarray:
    """(permutation, player): how many other players were present when the player's sample was
    taken (the t-th removal leaves n - t - 1 others), -1 where it was never removed."""
    n_perm, n_players = permutations.shape
    steps = _removal_steps(permutations, group_index)
    sizes = np.full((n_perm, n_players), -1)
    np.put_along_axis(sizes, steps, n_players - 1 - np.arange(steps.shape[1])[None, :], axis=1)
    return sizes


def _samples_batched(
    evaluate: _CountingValueFn,
    permutations: np.ndarray,
    group_index: np.ndarray | None,
    full_value: float,
    threshold: float,
    max_batch: int,
) -> np.ndarray:
    """Samples (permutation, player), NaN where a player got none; coalitions built in bulk.

    Every permutation's coalitions are known in advance (full set minus a growing prefix of its
    removal steps), so they are built and evaluated together; truncation is applied to the
    values afterwards, which gives exactly what the sequential walk gives.
    """
    n_perm, n_players = permutations.shape
    steps = _removal_steps(permutations, group_index)
    n_steps = steps.shape[1]
    samples = np.full((n_perm, n_players), np.nan)
    if n_steps == 0:
        return samples
    # removed_at[p, i]: the step at which row p removes player i (n_steps: never), so coalition
    # t of row p (after step t) holds exactly the players with removed_at > t.
    removed_at = np.full((n_perm, n_players), n_steps)
    np.put_along_axis(removed_at, steps, np.arange(n_steps)[None, :], axis=1)
    stage = n_steps if threshold == -math.inf else math.ceil(n_steps / _TRUNCATION_STAGES)
    chunk = max(1, _CHUNK_COALITIONS // n_steps)

    values = np.full((n_perm, n_steps), np.nan)  # NaN: past truncation, never evaluated
    for first in range(0, n_perm, chunk):
        rows = np.arange(first, min(first + chunk, n_perm))
        for start in range(0, n_steps, stage):
            # Only rows whose values so far all stay above the threshold need further steps.
            done = np.concatenate([np.full((len(rows), 1), full_value), values[rows, :start]], axis=1)
            rows_left = rows[np.all(done >= threshold, axis=1)]
            if rows_left.size == 0:
                break
            t = np.arange(start, min(start + stage, n_steps))
            masks = removed_at[rows_left, None, :] > t[None, :, None]
            found = _evaluate_unique(evaluate, masks.reshape(-1, n_players), max_batch)
            values[rows_left, start : start + len(t)] = found.reshape(len(rows_left), len(t))

    before = np.concatenate([np.full((n_perm, 1), full_value), values[:, :-1]], axis=1)
    # A step counts while every value before it (the full one included) is above the threshold.
    live = np.logical_and.accumulate(before >= threshold, axis=1)
    np.put_along_axis(samples, steps, np.where(live, before - values, 0.0), axis=1)
    return samples


def _evaluate_unique(evaluate: _CountingValueFn, masks: np.ndarray, max_batch: int) -> np.ndarray:
    """Values of the rows of ``masks``, each distinct coalition evaluated once."""
    packed = np.packbits(masks, axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    unique = masks[first]
    values = np.concatenate([evaluate(unique[i : i + max_batch]) for i in range(0, len(unique), max_batch)])
    return values[inverse.reshape(-1)]


def _samples_sequential(
    evaluate: _CountingValueFn,
    permutations: np.ndarray,
    group_index: np.ndarray | None,
    full_value: float,
    threshold: float,
) -> np.ndarray:
    """The same samples as ``_samples_batched``, by walking each permutation one removal at a time."""
    n_perm, n_players = permutations.shape
    samples = np.full((n_perm, n_players), np.nan)
    group_size = None if group_index is None else np.bincount(group_index)
    for p, permutation in enumerate(permutations):
        coalition = np.ones(n_players, dtype=bool)
        left = None if group_size is None else group_size.copy()
        value = full_value
        for player in permutation:
            if left is not None:
                if left[group_index[player]] == 1:
                    continue
                left[group_index[player]] -= 1
            coalition[player] = False
            if value < threshold:
                samples[p, player] = 0.0
                continue
            removed_value = evaluate(coalition[None, :].copy())[0]
            samples[p, player] = value - removed_value
            value = removed_value
    return samples


def _summarise(samples: np.ndarray, sizes: np.ndarray, full_value: float,
               evaluate: _CountingValueFn) -> ShapleyEstimate:
    taken = ~np.isnan(samples)
    count = taken.sum(axis=0)
    filled = np.where(taken, samples, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, filled.sum(axis=0) / count, np.nan)
        squares = np.where(taken, (samples - mean) ** 2, 0.0).sum(axis=0)
        std = np.where(count > 1, np.sqrt(squares / (count - 1)), np.nan)
        stderr = std / np.sqrt(count)
    n_players = samples.shape[1]
    by_size = np.full((n_players, n_players), np.nan)
    for i in range(n_players):
        at = taken[:, i]
        counts = np.bincount(sizes[at, i], minlength=n_players)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_size[i] = np.bincount(sizes[at, i], samples[at, i], n_players) / counts
    return ShapleyEstimate(
        mean=mean,
        std=std,
        stderr=stderr,
        count=count,
        mean_minus_std=mean - std,
        full_value=full_value,
        n_permutations=len(samples),
        n_coalitions=evaluate.coalitions,
        n_calls=evaluate.calls,
        by_size=by_size,
    )
