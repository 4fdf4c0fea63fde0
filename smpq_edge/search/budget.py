"""The board's budgets as a knapsack: per (layer, candidate) costs and the budgets left for layers.

Flash and cycles are additive over layers plus a policy-independent part (tables, activations'
quantisation, pooling, adds); that part is taken off the budget. RAM is the arena's peak: an
option's RAM is the arena of the policy that gives this layer this candidate and every other
layer its least-scratch candidate, and the budget bounds each option (a "max" dimension). Kernel
code no board's reserve holds (TFLM's DECODE for LUT layers, the s16 code and QUANTIZE for int16
layers) is flash paid once if any layer takes a candidate that needs it (a ``SharedCost`` per
kernel). The chosen policy is always re-checked with the full cost model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from smpq_edge.inputs.boards import Board
from smpq_edge.network.cost import CostReport, arena_extra_bytes, estimate
from smpq_edge.network.graph import Graph
from smpq_edge.common.precision import Precision, floor_precision, weight_bits_of, wide_layers
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


def cost_of(graph: Graph, policy: Mapping[str, Precision], board: Board, budgets: Budgets) -> CostReport:
    return estimate(graph, weight_bits_of(policy), board, budgets.flash_bytes, budgets.ram_bytes, budgets.cycles,
                    wide=wide_layers(policy))


def _non_layer(report: CostReport) -> tuple[int, int]:
    """Model flash and cycles outside the layers' own (QUANTIZE, pooling, adds, tables)."""
    return (report.model_flash_bytes - sum(layer.flash_bytes for layer in report.layers),
            report.cycles - sum(layer.cycles for layer in report.layers))


def knapsack(graph: Graph, board: Board, budgets: Budgets, candidates: tuple[Precision, ...]) -> Knapsack:
    floor = floor_precision(candidates)
    base = cost_of(graph, {op.name: floor for op in graph.layers}, board, budgets)
    flash_fixed = base.flash_total_bytes - sum(layer.flash_bytes for layer in base.layers)
    base_flash, base_cycles = _non_layer(base)  # base_cycles: all the cycles outside the layers
    # Each layer's candidate adding the least to the arena (scratch, decoded LUT weights, int16
    # tensors), so an option's RAM reflects that option's own.
    least_scratch = {op.name: min(candidates, key=lambda c: (arena_extra_bytes(op, c.weights, board), c.wide, -c.weights))
                     for op in graph.layers}
    costs, kernels, code = [], {}, {}
    for i, op in enumerate(graph.layers):
        rows = []
        for k, c in enumerate(candidates):
            policy = {**least_scratch, op.name: c}
            report = cost_of(graph, policy, board, budgets)
            # An int16 layer's QUANTIZE operators are charged to it, both sides (conservative where
            # two int16 layers meet: the full cost model re-checks the pick).
            flash, cycles = _non_layer(report)
            layer = report.layers[i]
            rows.append((layer.flash_bytes + flash - base_flash, report.ram_total_bytes, layer.cycles + cycles - base_cycles))
            for kernel, size in report.extra_kernels.items():
                kernels.setdefault(kernel, [() for _ in graph.layers])[i] += (k,)
                code[kernel] = size
        costs.append(np.array(rows, dtype=np.float64))
    shared = tuple(SharedCost((code[kernel], 0, 0), tuple(options)) for kernel, options in sorted(kernels.items())
                   if code[kernel])
    return Knapsack(costs, (budgets.flash_bytes - flash_fixed, budgets.ram_bytes, budgets.cycles - base_cycles),
                    shared=shared)
