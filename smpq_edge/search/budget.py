"""The board's budgets as a knapsack: per (layer, candidate) costs and the budgets left for layers.

Flash and cycles are additive over layers plus a policy-independent part (tables, activations'
quantisation, pooling, adds); that part is taken off the budget. RAM is the arena's peak: an
option's RAM is the arena of the policy that gives this layer this candidate and every other
layer its least-scratch candidate, and the budget bounds each option (a "max" dimension). The
code of TFLM's DECODE, which no board's reserve holds, is flash paid once if any layer takes a
LUT candidate (a ``SharedCost``). The chosen policy is always re-checked with the full cost model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from smpq_edge.inputs.boards import Board
from smpq_edge.network.cost import CostReport, arena_extra_bytes, decode_kernel_bytes, estimate
from smpq_edge.network.graph import Graph
from smpq_edge.common.precision import is_lut
from smpq_edge.search.select import Selection, SharedCost, k_best

DIMENSIONS = ("flash", "RAM", "cycles")


@dataclass(frozen=True)
class Budgets:
    """Whole-firmware limits: flash and RAM including the board's reserve; cycles per inference."""

    flash_bytes: int
    ram_bytes: int
    cycles: int

    @classmethod
    def of_board(cls, board: Board, flash_bytes: int | None = None, ram_bytes: int | None = None,
                 cycles: int | None = None) -> Budgets:
        return cls(
            flash_bytes if flash_bytes is not None else int(board.budgets.flash_kb * 1024),
            ram_bytes if ram_bytes is not None else int(board.budgets.ram_kb * 1024),
            cycles if cycles is not None else board.cycle_budget,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Knapsack:
    costs: list[np.ndarray]  # per layer: (candidates, 3) flash bytes, arena+reserve bytes, cycles
    budgets: tuple[int, int, int]  # what is left for the layers in each dimension
    aggregate: tuple[str, str, str] = ("sum", "max", "sum")
    names: tuple[str, str, str] = DIMENSIONS
    shared: tuple[SharedCost, ...] = ()

    def k_best(self, scores, k: int = 1) -> list[Selection]:
        """The ``k`` best selections within the budgets for per-(layer, candidate) ``scores``."""
        return k_best(scores, self.costs, self.budgets, k, aggregate=self.aggregate, names=self.names,
                      shared=self.shared)

    def totals(self, choice: tuple[int, ...]) -> list[float]:
        """Each dimension's total for one candidate index per layer, shared costs included."""
        chosen = np.array([cost[k] for cost, k in zip(self.costs, choice)])
        out = [chosen[:, j].max() if how == "max" else chosen[:, j].sum() for j, how in enumerate(self.aggregate)]
        for shared in self.shared:
            if any(k in options for k, options in zip(choice, shared.options)):
                out = [total + extra for total, extra in zip(out, shared.cost)]
        return out


def cost_of(graph: Graph, bits: dict[str, int], board: Board, budgets: Budgets) -> CostReport:
    return estimate(graph, bits, board, budgets.flash_bytes, budgets.ram_bytes, budgets.cycles)


def knapsack(graph: Graph, board: Board, budgets: Budgets, candidates: tuple[int, ...]) -> Knapsack:
    base_bits = {op.name: max(candidates) for op in graph.layers}
    base = cost_of(graph, base_bits, board, budgets)
    flash_fixed = base.flash_total_bytes - sum(layer.flash_bytes for layer in base.layers)
    cycles_fixed = base.cycles - sum(layer.cycles for layer in base.layers)
    # Each layer's candidate adding the least to the arena (scratch, decoded LUT weights), so an
    # option's RAM reflects that option's own.
    least_scratch = {op.name: min(candidates, key=lambda b: (arena_extra_bytes(op, b, board), -b))
                     for op in graph.layers}
    costs = []
    for i, op in enumerate(graph.layers):
        rows = []
        for b in candidates:
            report = cost_of(graph, {**least_scratch, op.name: b}, board, budgets)
            rows.append((report.layers[i].flash_bytes, report.ram_total_bytes, report.layers[i].cycles))
        costs.append(np.array(rows, dtype=np.float64))
    lut = tuple(k for k, b in enumerate(candidates) if is_lut(b))
    code = decode_kernel_bytes(board)
    shared = (SharedCost((code, 0, 0), (lut,) * len(graph.layers)),) if lut and code else ()
    return Knapsack(costs, (budgets.flash_bytes - flash_fixed, budgets.ram_bytes, budgets.cycles - cycles_fixed),
                    shared=shared)
