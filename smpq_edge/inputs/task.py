"""Task kinds: what a model's output means, what it is trained on and how it is scored.

Every stage that trains or measures a network asks the data's task (``task_of(data)``), so a task
is one entry here, not branches spread over the search, the guard, the emulator and the report:

* ``classification``: one output per class, cross-entropy, top-1 accuracy, agreement of the top-1
  class with the float model.
* ``reconstruction``: an autoencoder whose output has as many values as its input, MSE to the
  input (flattened channels first, as ``torch.flatten`` orders it), MSE to the float model's
  outputs as its agreement, and the ROC AUC of the per-sample error where normal (0) and
  anomalous (1) labels are given. The MSE is over the normal samples only: the model is meant
  to reconstruct those and not the anomalies, whose large error is what detects them.

A score is higher-is-better for every task (accuracy; minus the MSE), so the stage guard, the floor
check and the re-ranking compare scores one way; ``show`` turns a score back into the figure a user
reads ("97.50 %", "MSE 0.0123").

The value a Shapley coalition is scored by (``smpq.score``) is higher-is-better too, but it is not
always the task's score. For classification ``coalition_batch`` leaves it to the search's
``ShapleyConfig.value``: by default "kl", minus the KL divergence KL(p_float || p_coalition) between
the float model's softmax outputs and the coalition network's on the validation batch (no labels
needed); "top1" (top-1 accuracy on the labels, Shapley-NAS's value) and "soft" (mean true-class
probability) are options. For reconstruction it is always "neg_mse": minus the MSE to the input,
over the batch's normal samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from smpq_edge.common.errors import UserError
from smpq_edge.common.records import percent


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # what ``show`` prints: "accuracy", "MSE"
    heading: str  # the report's section on it
    agreement_metric: str  # the agreement with the float model, as a table heading
    emulator_agreement: str  # TFLM's against the fake-quant network's, as a table row
    axis: str  # the axis ``plotted`` values go on
    value_name: str  # the report's name for a coalition's value other than "kl" (Shapley values are contributions to it)
    has_classes: bool  # outputs are class scores, the labels are classes (firmware prints top-1 hits)

    def loss(self, outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        raise NotImplementedError

    def distill_loss(self, outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> torch.Tensor:
        """Summed over the batch: the loss to the float model's outputs (knowledge distillation)."""
        raise NotImplementedError

    def predict(self, outputs):
        """What is kept of a network's outputs (an array or a tensor, (N, outputs)) per sample."""
        raise NotImplementedError

    def per_sample(self, predicted: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per scored sample, higher is better; the score is their mean."""
        raise NotImplementedError

    def agreement(self, predicted: np.ndarray, reference: np.ndarray) -> float:
        """How close ``predicted`` is to the float model's ``reference`` (higher is closer)."""
        raise NotImplementedError

    def auc(self, predicted: np.ndarray, x: np.ndarray, y: np.ndarray) -> float | None:
        """ROC AUC of anomaly detection, where the task and the labels allow one."""
        return None

    def coalition_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
        """Inputs, targets and ``smpq.score`` value for the Shapley coalitions; a value of None
        keeps the search's configured ``ShapleyConfig.value`` ("kl", minus the KL divergence from
        the float model's outputs, by default; "top1" or "soft" as options)."""
        raise NotImplementedError

    def show(self, score: float | None) -> str:
        """A score as the user reads it."""
        raise NotImplementedError

    def show_spread(self, spread: float) -> str:
        """A standard error (or difference) of scores, in the metric's units."""
        raise NotImplementedError

    def plotted(self, score: float) -> float:
        """A score on the report's plot axis."""
        raise NotImplementedError

    def score(self, predicted: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.per_sample(predicted, x, y).mean())


class Classification(Task):
    def loss(self, outputs, x, y, reduction="sum"):
        return F.cross_entropy(outputs, y, reduction=reduction)

    def distill_loss(self, outputs, teacher_outputs):
        return F.cross_entropy(outputs, torch.softmax(teacher_outputs, dim=1), reduction="sum")

    def predict(self, outputs):
        return outputs.argmax(1)

    def per_sample(self, predicted, x, y):
        return predicted == y

    def agreement(self, predicted, reference):
        return float((predicted == reference).mean())

    def coalition_batch(self, x, y):
        return x, y, None

    def show(self, score):
        return percent(score)

    def show_spread(self, spread):
        return percent(spread)

    def plotted(self, score):
        return 100 * score


class Reconstruction(Task):
    @staticmethod
    def _squared_error(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per sample: the mean over the output values."""
        return ((outputs - target.reshape(outputs.shape)) ** 2).mean(1)

    def loss(self, outputs, x, y, reduction="sum"):
        error = self._squared_error(outputs, x)
        return error.sum() if reduction == "sum" else error.mean()

    def distill_loss(self, outputs, teacher_outputs):
        return self._squared_error(outputs, teacher_outputs).sum()

    def predict(self, outputs):
        return outputs.reshape(len(outputs), -1)

    @staticmethod
    def errors(predicted: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per-sample MSE of the reconstruction: the anomaly score."""
        return ((predicted.astype(np.float64) - x.reshape(len(x), -1)) ** 2).mean(1)

    def per_sample(self, predicted, x, y):
        return -self.errors(predicted, x)[y == 0]

    def agreement(self, predicted, reference):
        return -float(((predicted.astype(np.float64) - reference) ** 2).mean())

    def auc(self, predicted, x, y):
        if len(np.unique(y)) < 2:
            return None
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, self.errors(predicted, x)))

    def coalition_batch(self, x, y):
        normal = x[y == 0]
        return normal, normal.reshape(len(normal), -1), "neg_mse"

    def show(self, score):
        return "-" if score is None else f"{-score:.4g}"

    def show_spread(self, spread):
        return f"{abs(spread):.3g}"

    def plotted(self, score):
        return -score


CLASSIFICATION = Classification("classification", "accuracy", "Accuracy", "agreement with float",
                                "label agreement with the fake-quant network", "test accuracy (%)", "accuracy", True)
RECONSTRUCTION = Reconstruction("reconstruction", "MSE", "Reconstruction error (MSE of the normal samples)",
                                "MSE to float", "MSE to the fake-quant network's outputs", "test MSE", "minus MSE", False)
TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, RECONSTRUCTION)}


def task_of(data) -> Task:
    """The task of a ``Dataset`` (its ``task`` field)."""
    return TASKS[data.task]


def check_outputs(task: Task, model: str, outputs: tuple[int, ...], data) -> None:
    """One line when the model's output cannot be what the task scores."""
    if task is CLASSIFICATION and outputs != (data.num_classes,):
        raise UserError(f"model {model} has {outputs[0]} outputs but data {data.name} has {data.num_classes} "
                        "classes; a classifier needs one output per class")
    values = int(np.prod(data.input_shape))
    if task is RECONSTRUCTION and int(np.prod(outputs)) != values:
        raise UserError(f"model {model} has {int(np.prod(outputs))} outputs but data {data.name} has {values} "
                        "values per sample; a reconstruction (autoencoder) model outputs as many values as it takes")
