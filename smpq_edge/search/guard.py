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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.preprocess import COMMON, Preprocessing
from smpq_edge.common.records import FloorCheck, Measured, StageCheck, percent
from smpq_edge.search.train import per_sample, predictions
from smpq_edge.inputs.task import CLASSIFICATION, Task


def paired_standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over paired per-sample scores."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    return float(difference.std(ddof=1) / np.sqrt(len(difference))) if len(difference) > 1 else float("inf")


@dataclass(frozen=True)
class Reference:
    """The validation and test splits, and the float model's predictions on them."""

    task: Task
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    float_val: np.ndarray
    float_test: np.ndarray


def measure(val: np.ndarray, test: np.ndarray, reference: Reference) -> Measured:
    """A network's ``Measured`` record from its validation and test predictions."""
    task, r = reference.task, reference
    return Measured(val_acc=task.score(val, r.x_val, r.y_val), test_acc=task.score(test, r.x_test, r.y_test),
                    val_agreement=task.agreement(val, r.float_val), test_agreement=task.agreement(test, r.float_test),
                    test_auc=task.auc(test, r.x_test, r.y_test))


@dataclass
class StageGuard:
    """Runs training stages on a network and undoes those that make it worse on validation."""

    x_val: np.ndarray
    y_val: np.ndarray
    log: Callable[[str], None] = print
    task: Task = CLASSIFICATION
    checks: list[StageCheck] = field(default_factory=list)

    def run(self, stage: str, net: nn.Module, step: Callable[[nn.Module], object],
            measured_as: dict[str, int] | None = None) -> nn.Module:
        """``step(net)`` trains ``net`` in place; returns it, or its state before the step if the
        step lost more than one paired standard error of the validation score. A supernet is
        measured under the policy ``measured_as`` (the warm-up as the int8 network it must not
        make worse than the floor), then set back to mixing its candidates."""
        start = copy.deepcopy(net)
        before = self._scores(net, measured_as)
        step(net)
        after = self._scores(net, measured_as)
        error = paired_standard_error(after, before)
        undone = bool(after.mean() < before.mean() - error)
        self.checks.append(StageCheck(stage=stage, val_acc_before=float(before.mean()),
                                      val_acc_after=float(after.mean()), standard_error=error, undone=undone))
        if undone:
            show = self.task.show
            self.log(f"{stage}: validation {self.task.metric} went from {show(before.mean())} to "
                     f"{show(after.mean())}, worse by more than one standard error "
                     f"({self.task.show_spread(error)}); stage undone, its starting weights kept")
            return start
        return net

    def _scores(self, net: nn.Module, policy: dict[str, int] | None) -> np.ndarray:
        if policy is None:
            return per_sample(net, self.x_val, self.y_val, self.task)
        net.set_policy(policy)
        try:
            return per_sample(net, self.x_val, self.y_val, self.task)
        finally:
            net.set_policy(None)



def check_floor(shipped: np.ndarray, floor: np.ndarray) -> FloorCheck:
    """The floor check from the two networks' per-sample validation scores (``train.per_sample``)."""
    error = paired_standard_error(shipped, floor)
    return FloorCheck(floor_val_acc=float(floor.mean()), shipped_val_acc=float(shipped.mean()), standard_error=error,
                      below_floor=bool(shipped.mean() < floor.mean() - error))


# The sanity gate: a trained model that scores at chance on its data is fed the wrong numbers (or
# the wrong data), and everything after would quantise noise, so it stops before any search.
GATE_SAMPLES = 1000  # enough to tell chance (10 % +- 1 %) from a working model within a second or two
PROBE_SAMPLES = 300


@dataclass(frozen=True)
class ChanceCheck:
    """A trained model's float accuracy on a validation sample against the largest class's share."""

    accuracy: float
    samples: int
    chance: float  # the largest class's share of the sample: what always guessing it scores
    standard_error: float

    @property
    def at_chance(self) -> bool:
        """Within two standard errors of the largest class's share (or below it)."""
        return self.accuracy <= self.chance + 2 * self.standard_error

    @staticmethod
    def of(model: nn.Module, x: np.ndarray, y: np.ndarray) -> ChanceCheck:
        with torch.no_grad():
            accuracy = float((predictions(model, x) == y).mean())
        chance = float(np.bincount(y).max() / len(y))
        return ChanceCheck(accuracy, len(y), chance, float(np.sqrt(chance * (1 - chance) / len(y))))


def _sample(data, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    take = np.random.default_rng(seed).permutation(len(data.y_val))[:count]
    return data.x_val[take], data.y_val[take]


def _probe(source, data, seed: int) -> tuple[Preprocessing, ChanceCheck] | None:
    """The common preprocessing that scores best on a few hundred validation samples, if it beats
    chance (each followed by the model's own input scaling, which ``data.pixels`` includes)."""
    x, y = _sample(data, PROBE_SAMPLES, seed)
    pixels = data.pixels.invert(x)
    affine = source.input_affine

    def fed(p: Preprocessing) -> Preprocessing:
        return affine.after(p) if affine is not None else p

    tried = [(p, ChanceCheck.of(source.module, fed(p).apply(pixels), y)) for p in COMMON
             if fed(p) != data.pixels and (p.mean is None or len(p.mean) == pixels.shape[1])]
    best = max(tried, key=lambda pair: pair[1].accuracy, default=None)
    return best if best is not None and not best[1].at_chance else None


def check_trained(source, data, allow: bool, seed: int = 0, log: Callable[[str], None] = print) -> ChanceCheck | None:
    """Stop (one line) when a model that arrives trained scores no better than chance on the data;
    with ``allow`` say so loudly and go on. None where it does not apply (a model trained here,
    or a task without classes)."""
    if not source.pretrained or data.task != "classification":
        return None
    check = ChanceCheck.of(source.module.eval(), *_sample(data, GATE_SAMPLES, seed))
    if not check.at_chance:
        return check
    fed = data.pixels.describe() if data.pixels is not None else f"data {data.name} as stored"
    message = (f"model {source.name} scores {percent(check.accuracy)} on {check.samples} validation samples of "
               f"{data.name}, no better than chance (the largest class is {percent(check.chance)}); inputs were "
               f"{fed}")
    if data.pixels is not None:
        found = _probe(source, data, seed)
        message += (f"; with {found[0].options()} it scores {percent(found[1].accuracy)} on {found[1].samples} "
                    "samples, so try that" if found else
                    f"; none of the common preprocessings did better on {PROBE_SAMPLES} samples")
        message += " (options: --input-range, --mean, --std, --channel-order)"
    else:
        message += " (is the model trained for this data?)"
    if not allow:
        raise UserError(message + "; --allow-chance-accuracy goes on anyway")
    log(f"WARNING: {message}; going on because of --allow-chance-accuracy")
    return check
