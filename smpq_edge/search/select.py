"""Choose one candidate per layer under budgets: a multiple-choice knapsack, solved exactly.

Each layer l has candidates k, each with a score (its summed Shapley contribution, to maximise)
and a cost vector over d dimensions (e.g. flash bytes, RAM bytes, cycles). A dimension is
aggregated over layers either by ``sum`` (flash, cycles: additive) or by ``max`` (RAM: the peak
of the per-layer values; a budget then simply forbids every option above it). The problem is
written as an integer linear program with one binary per (layer, candidate) and solved with
``scipy.optimize.milp`` (HiGHS). ``k_best`` lists the K best selections by adding a no-good cut
after each one found.

A shared cost is paid once when any of its options is chosen (the code of a kernel that several
layers' candidates need, such as TFLM's DECODE for LUT layers): a binary per shared cost, at
least every one of its options' binaries, adds its cost to the summed dimensions.

HiGHS stops within an absolute objective gap of 1e-6, so a returned score is the optimum to
within 1e-6 (far below what a validation set can resolve); feasibility is checked exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from smpq_edge.common.errors import UserError

Aggregate = Literal["sum", "max"]


@dataclass(frozen=True)
class SharedCost:
    """A cost paid once if any of ``options`` is chosen: per dimension (0 in a "max" dimension),
    and per layer the candidate indices that incur it."""

    cost: tuple[float, ...]
    options: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Selection:
    """One candidate per layer, with its summed score and its cost per dimension."""

    choice: tuple[int, ...]  # candidate index per layer
    score: float
    cost: tuple[float, ...]  # per dimension, summed or maximised over layers as configured

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def select(
    scores: Sequence[Sequence[float]],
    costs: Sequence[np.ndarray],
    budgets: Sequence[float | None],
    *,
    aggregate: Sequence[Aggregate] | None = None,
    names: Sequence[str] | None = None,
    shared: Sequence[SharedCost] = (),
) -> Selection:
    """The highest-scoring selection within the budgets; see ``k_best`` for the arguments."""
    return k_best(scores, costs, budgets, 1, aggregate=aggregate, names=names, shared=shared)[0]


def k_best(
    scores: Sequence[Sequence[float]],
    costs: Sequence[np.ndarray],
    budgets: Sequence[float | None],
    k: int,
    *,
    aggregate: Sequence[Aggregate] | None = None,
    names: Sequence[str] | None = None,
    shared: Sequence[SharedCost] = (),
) -> list[Selection]:
    """The ``k`` best distinct selections within the budgets, best first.

    scores: per layer, one score per candidate.
    costs: per layer, an array (candidates, d) of costs.
    budgets: d limits, None = unconstrained.
    aggregate: per dimension "sum" (default) or "max".
    names: per dimension, for error messages (default "cost[j]").
    shared: costs paid once when any of their options is chosen.

    Returns fewer than k when fewer feasible selections exist. Raises UserError naming the
    smallest achievable value of each budgeted dimension when nothing fits.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    problem = _Problem.build(scores, costs, budgets, aggregate, names, shared)
    found: list[Selection] = []
    cuts: list[tuple[int, ...]] = []
    while len(found) < k:
        choice = problem.solve(cuts)
        if choice is None:
            break
        cuts.append(choice)
        # HiGHS accepts rows within its tolerances; a choice over a budget in exact arithmetic
        # is cut like any other and not reported.
        if problem.fits(choice):
            found.append(problem.selection(choice))
    if not found:
        raise UserError(problem.infeasible_message())
    # Each solve is optimal only to HiGHS's gap; sorting makes the order exactly non-increasing.
    return sorted(found, key=lambda selection: -selection.score)


@dataclass(frozen=True, eq=False)
class _Problem:
    """The knapsack flattened: variable j is candidate ``candidate[j]`` of layer ``layer[j]``."""

    score: np.ndarray  # (n,)
    cost: np.ndarray  # (n, d)
    layer: np.ndarray  # (n,)
    candidate: np.ndarray  # (n,)
    budgets: tuple[float | None, ...]
    aggregate: tuple[Aggregate, ...]
    names: tuple[str, ...]
    shared_cost: np.ndarray  # (m, d)
    shared_options: np.ndarray  # (m, n) bool: variable j incurs shared cost i

    @classmethod
    def build(cls, scores, costs, budgets, aggregate, names, shared=()) -> _Problem:
        if len(scores) == 0 or len(scores) != len(costs):
            raise ValueError(f"need scores and costs for the same layers, got {len(scores)} and {len(costs)}")
        d = len(budgets)
        aggregate = tuple(aggregate) if aggregate is not None else ("sum",) * d
        names = tuple(names) if names is not None else tuple(f"cost[{j}]" for j in range(d))
        if len(aggregate) != d or len(names) != d:
            raise ValueError(f"budgets, aggregate and names need one entry per dimension ({d})")
        if any(a not in ("sum", "max") for a in aggregate):
            raise ValueError(f"aggregate entries must be 'sum' or 'max', got {aggregate}")
        layer_scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
        layer_costs = [np.asarray(c, dtype=np.float64) for c in costs]
        for l, (s, c) in enumerate(zip(layer_scores, layer_costs)):
            if len(s) == 0 or c.shape != (len(s), d):
                raise ValueError(f"layer {l}: need costs of shape (candidates, {d}) = ({len(s)}, {d}), got {c.shape}")
        score = np.concatenate(layer_scores)
        cost = np.concatenate(layer_costs)
        if not (np.all(np.isfinite(score)) and np.all(np.isfinite(cost))):
            raise ValueError("scores and costs must be finite")
        layer = np.concatenate([np.full(len(s), l) for l, s in enumerate(layer_scores)])
        candidate = np.concatenate([np.arange(len(s)) for s in layer_scores])
        shared_cost = np.array([np.asarray(c.cost, dtype=np.float64) for c in shared]).reshape(len(shared), d)
        if np.any(shared_cost < 0) or np.any(shared_cost[:, [how == "max" for how in aggregate]] != 0):
            raise ValueError("shared costs must be non-negative and 0 in 'max' dimensions")
        shared_options = np.array([[k in c.options[l] for l, k in zip(layer, candidate)] for c in shared],
                                  dtype=bool).reshape(len(shared), len(score))
        return cls(
            score=score,
            cost=cost,
            layer=layer,
            candidate=candidate,
            budgets=tuple(None if b is None else float(b) for b in budgets),
            aggregate=aggregate,
            names=names,
            shared_cost=shared_cost,
            shared_options=shared_options,
        )

    @property
    def n_layers(self) -> int:
        return int(self.layer[-1]) + 1

    def solve(self, cuts: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The best choice that is none of ``cuts``, or None if none is feasible."""
        n, m = len(self.score), len(self.shared_cost)
        one_per_layer = (self.layer[None, :] == np.arange(self.n_layers)[:, None]).astype(np.float64)
        constraints = [LinearConstraint(self._padded(one_per_layer), 1, 1)]
        upper = np.ones(n + m)
        for j, (budget, how) in enumerate(zip(self.budgets, self.aggregate)):
            if budget is None:
                continue
            if how == "max":
                upper[:n][self.cost[:, j] > budget] = 0
            else:
                # Scaled to O(1) so HiGHS's absolute tolerances mean the same in every dimension.
                row = np.concatenate([self.cost[:, j], self.shared_cost[:, j]])
                scale = max(abs(budget), np.abs(row).max()) or 1.0
                constraints.append(LinearConstraint(row / scale, -np.inf, budget / scale))
        if m:
            # x_j <= z_i for every option j of shared cost i.
            pairs = np.argwhere(self.shared_options)
            link = np.zeros((len(pairs), n + m))
            link[np.arange(len(pairs)), pairs[:, 1]] = 1
            link[np.arange(len(pairs)), n + pairs[:, 0]] = -1
            constraints.append(LinearConstraint(link, -np.inf, 0))
        if cuts:
            # No-good cut: at most L - 1 of a found choice's binaries may be 1 again.
            rows = np.array([self._indicator(choice) for choice in cuts])
            constraints.append(LinearConstraint(self._padded(rows), -np.inf, self.n_layers - 1))
        result = milp(
            c=np.concatenate([-self.score, np.zeros(m)]),
            integrality=np.ones(n + m),
            bounds=Bounds(0, upper),
            constraints=constraints,
            options={"mip_rel_gap": 0},
        )
        if result.status == 2:  # infeasible
            return None
        if not result.success:
            raise RuntimeError(f"the selection ILP failed: {result.message}")
        chosen = result.x[:n] > 0.5
        return tuple(int(c) for c in self.candidate[chosen])

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        """Constraint rows over the options, with zeros for the shared costs' binaries."""
        return np.hstack([rows, np.zeros((len(rows), len(self.shared_cost)))])

    def _indicator(self, choice: tuple[int, ...]) -> np.ndarray:
        return (self.candidate == np.asarray(choice)[self.layer]).astype(np.float64)

    def totals(self, choice: tuple[int, ...]) -> np.ndarray:
        picked = self._indicator(choice) == 1
        chosen = self.cost[picked]
        incurred = self.shared_cost[self.shared_options[:, picked].any(axis=1)].sum(axis=0)
        return np.array(
            [chosen[:, j].max() if how == "max" else chosen[:, j].sum() for j, how in enumerate(self.aggregate)]
        ) + incurred

    def fits(self, choice: tuple[int, ...]) -> bool:
        totals = self.totals(choice)
        return all(budget is None or total <= budget for total, budget in zip(totals, self.budgets))

    def selection(self, choice: tuple[int, ...]) -> Selection:
        score = float(self.score[self._indicator(choice) == 1].sum())
        return Selection(choice=choice, score=score, cost=tuple(float(t) for t in self.totals(choice)))

    def infeasible_message(self) -> str:
        """One line: per budgeted dimension, its smallest achievable value on its own."""
        minima = smallest_achievable([self.cost[self.layer == l] for l in range(self.n_layers)], self.aggregate)
        return infeasible_message(self.names, minima, self.budgets,
                                  lambda name, least, budget: f"{name} {_number(least)} (budget {_number(budget)})")


def infeasible_message(names: Sequence[str], minima: Sequence[float], budgets: Sequence[float | None],
                       describe: Callable[[str, float, float], str]) -> str:
    """One line saying why no selection fits: each budgeted dimension's smallest achievable total
    (``describe``d in the caller's units) against its budget."""
    parts, alone_ok = [], True
    for name, least, budget in zip(names, minima, budgets):
        if budget is None:
            continue
        alone_ok &= least <= budget
        parts.append(describe(name, least, budget))
    reason = "each budget is reachable alone but not all at once" if alone_ok else "over budget"
    return f"no per-layer choice fits the budgets ({reason}); smallest achievable: " + ", ".join(parts)


def smallest_achievable(costs: Sequence[np.ndarray], aggregate: Sequence[Aggregate]) -> list[float]:
    """Per dimension, the least total any selection reaches (each dimension on its own): each
    layer's cheapest candidate minimises a sum and a peak alike."""
    cheapest = np.array([np.asarray(c, dtype=np.float64).min(axis=0) for c in costs])
    return [float(cheapest[:, j].max() if how == "max" else cheapest[:, j].sum()) for j, how in enumerate(aggregate)]


def _number(value: float) -> str:
    """Whole numbers (bytes, cycles) without a decimal point or exponent."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.6g}"
