"""The floor a build must keep, and the check every training stage passes.

A model that arrives trained must never come out worse than plain int8 quantisation of it: the
calibration-only int8 network (every layer at its widest candidate, activation ranges from a
few training batches, no training) is the floor. Each training stage is measured on the whole
validation split before and after; a stage that loses more than one paired standard error is
undone (its starting weights are kept), and the record says so. The same figures for the float
model, the floor and the shipped network go into search.json, the summary and the report.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from smpq_edge.search.train import batches, device_of


@torch.no_grad()
def predictions(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Top-1 class per sample."""
    model.eval()
    device = device_of(model)
    out = [model(torch.from_numpy(x[idx]).to(device)).argmax(1).cpu().numpy()
           for idx in batches(x, np.zeros(len(x)), batch_size, None)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def paired_standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over paired per-sample scores."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    return float(difference.std(ddof=1) / np.sqrt(len(difference))) if len(difference) > 1 else float("inf")


@dataclass(frozen=True)
class Reference:
    """Labels of the float model on the validation and test splits, and the true labels."""

    y_val: np.ndarray
    y_test: np.ndarray
    float_val: np.ndarray
    float_test: np.ndarray


@dataclass(frozen=True)
class Measured:
    """One network on the validation and test splits: accuracy, and agreement with float."""

    val_acc: float
    test_acc: float
    val_agreement: float
    test_agreement: float

    @staticmethod
    def of(val: np.ndarray, test: np.ndarray, reference: Reference) -> Measured:
        return Measured(float((val == reference.y_val).mean()), float((test == reference.y_test).mean()),
                        float((val == reference.float_val).mean()), float((test == reference.float_test).mean()))


@dataclass(frozen=True)
class StageCheck:
    stage: str
    val_acc_before: float
    val_acc_after: float
    standard_error: float
    undone: bool


@dataclass
class StageGuard:
    """Runs training stages on a network and undoes those that make it worse on validation."""

    x_val: np.ndarray
    y_val: np.ndarray
    log: Callable[[str], None] = print
    checks: list[StageCheck] = field(default_factory=list)

    def run(self, stage: str, net: nn.Module, step: Callable[[nn.Module], object]) -> nn.Module:
        """``step(net)`` trains ``net`` in place; returns it, or its state before the step if the
        step lost more than one paired standard error of validation accuracy."""
        start = copy.deepcopy(net)
        before = predictions(net, self.x_val) == self.y_val
        step(net)
        after = predictions(net, self.x_val) == self.y_val
        error = paired_standard_error(after, before)
        undone = bool(after.mean() < before.mean() - error)
        self.checks.append(StageCheck(stage, float(before.mean()), float(after.mean()), error, undone))
        if undone:
            self.log(f"{stage}: validation accuracy fell from {before.mean():.4f} to {after.mean():.4f} "
                     f"(more than one standard error, {error:.4f}); stage undone, its starting weights kept")
            return start
        return net

    def to_list(self) -> list[dict]:
        return [asdict(check) for check in self.checks]


@dataclass(frozen=True)
class FloorCheck:
    """The shipped network against the calibration-only int8 floor, on validation."""

    floor_val_acc: float
    shipped_val_acc: float
    standard_error: float
    below_floor: bool

    @staticmethod
    def of(shipped: np.ndarray, floor: np.ndarray, y_val: np.ndarray) -> FloorCheck:
        shipped_hits, floor_hits = shipped == y_val, floor == y_val
        error = paired_standard_error(shipped_hits, floor_hits)
        return FloorCheck(float(floor_hits.mean()), float(shipped_hits.mean()), error,
                          bool(shipped_hits.mean() < floor_hits.mean() - error))

    def warning(self) -> str | None:
        if not self.below_floor:
            return None
        return (f"WARNING: the shipped model is below plain int8 quantisation: validation accuracy "
                f"{self.shipped_val_acc:.4f} against {self.floor_val_acc:.4f} for calibration-only int8 "
                f"(more than one standard error, {self.standard_error:.4f}); the budget needs int4 where it hurts")
