"""The project's vocabularies in one place, as ai-edge-quantizer's ``qtyping`` does: names that
records, configs and boards take from a fixed set. A value outside its set is refused where a
record or board is read (pydantic checks ``Literal``s), and a new value is added here first."""

from __future__ import annotations

from typing import Literal, get_args

# Operator kinds of the traced graph: the keys of ``ops.KINDS`` (a test keeps the two equal).
OpKindName = Literal["input", "conv", "depthwise", "fc", "add", "avgpool", "global_avgpool", "maxpool", "reshape",
                     "relu", "softmax", "quantize"]
WeightedKind = Literal["conv", "depthwise", "fc"]
Activation = Literal["none", "relu", "relu6"]  # fused into the op before it
KernelSet = Literal["cmsis_nn", "reference"]  # the TFLM kernels a board's firmware registers
TaskName = Literal["classification", "reconstruction"]  # keys of ``task.TASKS``
# What a coalition is scored by (``search.smpq.score``): minus KL to float, top-1 accuracy, the
# true class's softmax probability, or minus the MSE (reconstruction).
CoalitionValueName = Literal["kl", "top1", "soft", "neg_mse"]
# The final Shapley table's players: layers (one game per narrower candidate) or (layer, candidate) pairs.
PlayerKind = Literal["layers", "candidates"]
# Where a re-ranked policy came from (``runner.pick_policy``): the K best by summed Shapley, the
# same with the games valued at the budget's policy (``smpq.scores_at``), or a uniform policy.
RankedSource = Literal["Shapley", "Shapley at the budget", "uniform"]


def values(vocabulary) -> tuple[str, ...]:
    """The names a vocabulary allows."""
    return get_args(vocabulary)
