"""Baselines that pick per-layer bit-widths under the same budgets as SMPQ.

* DMPQ (DNAS / EdMIPS style): alpha trained by gradient together with the weights, with a
  differentiable penalty on the expected flash over budget; the per-layer probabilities are then
  the scores of the same budgeted selector (which repairs an argmax that does not fit).
* HAWQ-style: Hessian trace of each layer (Hutchinson's estimator) times the quantisation
  perturbation ||Q_b(W) - W||^2 as the expected increase of the task's loss; same selector,
  minimising it. Where int16 activations are a candidate, HAWQ-V2's activation term is added: the
  Hessian trace over the layer's output activations times the rounding noise of its grid
  (scale^2 / 12 per element, int8 or int16).
* Uniform policies (every layer at one width): int8 and int4 by default.

``BASELINES`` holds one record per method; ``baseline_named`` also makes the uniform ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from smpq_edge.common.precision import floor_precision
from smpq_edge.inputs.data import Dataset
from smpq_edge.network.quant import QuantNet
from smpq_edge.search.budget import Knapsack
from smpq_edge.common.distributed import SINGLE_PROCESS, Context
from smpq_edge.search.train import TrainConfig, batches, device_of, train
from smpq_edge.inputs.task import task_of


# Architecture parameters learn at the rate DNAS methods give them (EdMIPS and FBNet: 1e-2 with
# Adam), not at the weights' rate. Adam moves a parameter by about its rate per step, so at the
# pretrained schedule's 5e-5 one epoch of DS-CNN / FSDD (32 steps) moves alpha by ~0.002: the
# scores tie and the selector's pick is arbitrary (all-int4 where the budget had room for int8
# layers, in bench/real_tasks.py).
ALPHA_LR = 1e-2


def dmpq_scores(net: QuantNet, data: Dataset, config: TrainConfig, knapsack: Knapsack, seed: int,
                penalty: float = 1.0, progress: bool = True,
                context: Context = SINGLE_PROCESS) -> tuple[np.ndarray, list[dict]]:
    """Train weights and alpha by gradient (alpha at ``ALPHA_LR`` at least); return log softmax(alpha)
    per layer as scores."""
    layers = net.mixed_layers()
    flash = [torch.from_numpy(cost[:, 0]).float().to(device_of(net)) for cost in knapsack.costs]
    flash_budget = float(knapsack.budgets[0])

    def expected_flash_over_budget() -> torch.Tensor:
        expected = sum(torch.softmax(layer.alpha, 0) @ f for layer, f in zip(layers, flash))
        return penalty * torch.relu(expected / flash_budget - 1.0)

    alphas = [layer.alpha for layer in layers]
    weights = [p for p in net.parameters() if p.requires_grad and all(p is not a for a in alphas)]
    groups = [{"params": weights}, {"params": alphas, "lr": max(config.lr, ALPHA_LR)}]
    history = train(net, data, config, seed, desc="DMPQ search", params=groups, extra_loss=expected_flash_over_budget,
                    progress=progress, context=context)
    scores = np.array([torch.log_softmax(layer.alpha.detach(), 0).cpu().numpy() for layer in layers])
    return scores, history


def hawq_scores(net: QuantNet, data: Dataset, seed: int, batches_used: int = 4, probes: int = 8) -> np.ndarray:
    """Minus the expected loss increase per (layer, candidate): trace/n x ||Q_b(W) - W||^2 of the
    weights, plus with int16 candidates trace x scale^2 / 12 of the layer's output activations."""
    layers = net.mixed_layers()
    with_activations = any(c.wide for c in net.candidates)
    net.set_policy({layer.op.name: floor_precision(net.candidates) for layer in layers})
    net.eval()
    traces = _hessian_traces(net, data, seed, batches_used, probes, with_activations)
    net.set_policy(None)
    # Hutchinson's estimate of a small trace can come out negative; a negative trace would turn
    # "fewer bits cost more loss" around and prefer int4 for the most sensitive layers. HAWQ-V3
    # assumes a positive semi-definite Hessian: clamp at zero.
    traces = np.maximum(traces, 0.0)
    scores = np.zeros((len(layers), len(net.candidates)))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mean_trace = traces[i] / layer.weight.numel()
            quantiser = net.activation_quantiser(layer.op.name)
            for k, c in enumerate(net.candidates):
                perturbation = float(((layer.quantised_weight(c.weights) - layer.weight) ** 2).sum())
                scores[i, k] = -mean_trace * perturbation
                if with_activations:
                    scores[i, k] -= traces[len(layers) + i] * quantiser.params(c.activations).scale ** 2 / 12
    return scores


def _hessian_traces(net: QuantNet, data: Dataset, seed: int, batches_used: int, probes: int,
                    with_activations: bool) -> np.ndarray:
    """Hutchinson's estimates of the loss Hessian's trace over each layer's weights, then (with
    ``with_activations``) over each layer's quantised output activations, on the policy set."""
    generator = torch.Generator().manual_seed(seed)
    layers = net.mixed_layers()
    weights = [layer.weight for layer in layers]
    # Each layer's output as its quantiser first gives it in a forward (the scale-sharing ops after
    # it, such as pooling, call the same quantiser again).
    outputs: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Callable:
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            outputs.setdefault(i, out)
        return hook

    hooks = [net.activation_quantiser(layer.op.name).register_forward_hook(keep(i)) for i, layer in enumerate(layers)] \
        if with_activations else []
    traces = np.zeros(len(layers) * (2 if with_activations else 1))
    rng = np.random.default_rng(seed)
    device = device_of(net)
    task = task_of(data)
    try:
        for step, idx in enumerate(batches(data.x_train, data.y_train, 128, rng)):
            if step == batches_used:
                break
            xb, yb = torch.from_numpy(data.x_train[idx]).to(device), torch.from_numpy(data.y_train[idx]).to(device)
            outputs.clear()
            loss = task.loss(net(xb), xb, yb, reduction="mean")
            acts = [outputs[i] for i in range(len(layers))] if with_activations else []
            grads = torch.autograd.grad(loss, weights + acts, create_graph=True)
            for _ in range(probes):
                vs = [_rademacher(w, generator) for w in weights]
                hvs = torch.autograd.grad(grads[:len(weights)], weights, grad_outputs=vs, retain_graph=True)
                traces[:len(weights)] += np.array([float((hv * v).sum()) for hv, v in zip(hvs, vs)]) / (probes * batches_used)
                # One layer's activations at a time: the block of the Hessian for that tensor alone,
                # whose probes never go negative through piecewise-linear layers (a joint probe of
                # all of them added cross terms that did).
                for i, act in enumerate(acts):
                    v = _rademacher(act, generator)
                    (hv,) = torch.autograd.grad(grads[len(weights) + i], act, grad_outputs=v, retain_graph=True,
                                                allow_unused=True)
                    traces[len(weights) + i] += (0.0 if hv is None else float((hv * v).sum())) / (probes * batches_used)
    finally:
        for hook in hooks:
            hook.remove()
    return traces


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, like.shape, generator=generator).float() * 2 - 1).to(like.device)


@dataclass(frozen=True)
class BaselineInputs:
    """What a baseline reads: the warmed-up supernet, the data, the search schedule and the budget problem."""

    warm: QuantNet
    data: Dataset
    search: TrainConfig
    knapsack: Knapsack
    seed: int
    progress: bool
    context: Context


@dataclass(frozen=True)
class Baseline:
    """A method SMPQ is compared with under the same budgets and selector: one record each."""

    name: str
    # Learns its scores by gradient, so a post-training search (``--ptq``) leaves it out.
    learns: bool = False
    # Finetunes the network its own search trained, for the finetune's epochs (and is trained once
    # more from the warm-up like SMPQ, for a same-schedule figure); the others start from the warm-up.
    own_network: bool = False
    # Per (layer, candidate) scores for the selector, and the network the finetune starts from.
    scores: Callable[[BaselineInputs], tuple[np.ndarray, QuantNet]] | None = None
    uniform_bits: int | None = None  # a uniform policy: every layer at these bits, no selector

    @property
    def description(self) -> str:
        return f"uniform int{self.uniform_bits}" if self.uniform_bits else self.name.upper()


def _dmpq(inputs: BaselineInputs) -> tuple[np.ndarray, QuantNet]:
    net = copy.deepcopy(inputs.warm)
    scores, _ = dmpq_scores(net, inputs.data, inputs.search, inputs.knapsack, inputs.seed + 2,
                            progress=inputs.progress, context=inputs.context)
    return scores, net


def _hawq(inputs: BaselineInputs) -> tuple[np.ndarray, QuantNet]:
    return hawq_scores(inputs.warm, inputs.data, inputs.seed), inputs.warm


BASELINES: dict[str, Baseline] = {
    "dmpq": Baseline("dmpq", learns=True, own_network=True, scores=_dmpq),
    "hawq": Baseline("hawq", scores=_hawq),
}
DEFAULT_BASELINES = ("dmpq", "hawq", "uniform8", "uniform4")


def uniform_name(bits: int) -> str:
    return f"uniform{bits}"


def baseline_named(name: str) -> Baseline:
    """A registered baseline, or ``uniformN`` for the uniform N-bit policy."""
    if name in BASELINES:
        return BASELINES[name]
    width = name.removeprefix("uniform")
    if name.startswith("uniform") and width.isdigit():
        return Baseline(name, uniform_bits=int(width))
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}, uniformN")
