"""SMPQ: Shapley values of (layer, bit-width) players steer the supernet's alpha; the budgeted
selector then picks one bit-width per layer by summed Shapley contribution.

The value of a coalition is how close the supernet's outputs stay to the float model's (minus the
KL divergence; Shapley-NAS's top-1 accuracy is an option) on a held-out validation batch with only
that coalition's candidates active. Coalitions are evaluated in batches: C copies of the
validation batch run in one forward pass, each copy with its own active candidates.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from smpq_edge.inputs.data import Dataset
from smpq_edge.network.quant import QuantNet
from smpq_edge.common.distributed import SINGLE_PROCESS, Context
from smpq_edge.common.precision import Precision
from smpq_edge.common.progress import progress
from smpq_edge.search.shapley import ShapleyEstimate, exact_shapley, monte_carlo_shapley
from smpq_edge.common.vocabulary import CoalitionValueName, PlayerKind

# Coalitions per value_fn call: the more in one call, the more prefixes they share (memory
# does not grow with it, see QuantNet.coalition_logits).
_MAX_COALITIONS_PER_CALL = 4096
_TIE_BREAK = 1e-5


@dataclass(frozen=True)
class ShapleyConfig:
    permutations: int = 24  # per alpha update
    final_permutations: int = 96  # for the table the selection uses
    val_samples: int = 512
    truncation: float = 0.5
    # "top1": accuracy, as the paper; "soft": mean softmax probability of the true class, the
    # same quantity made continuous, so small changes of a coalition are not lost in rounding;
    # "neg_mse": minus the MSE, for reconstruction (set by the task, see ``task.coalition_batch``);
    # "kl" (the default): minus the KL divergence from the float model's output distribution
    # (continuous, and it needs no labels: a change that moves the outputs counts even where
    # top-1 does not flip).
    value: CoalitionValueName = "kl"
    # Players of the final table the selection sums: "candidates", Shapley-NAS's (layer, bit-width)
    # pairs over the mixed supernet; or "layers" (the default), the layers in one game per
    # candidate narrower than the widest (a layer in the coalition takes the widest, the others
    # that candidate: one game with two candidates, three with w2a8 w3a8 w4a8 w8a8), so that
    # every coalition is a real policy, run in TFLM's integer arithmetic. bench/real_tasks.py
    # measured kl + layers against top1 + candidates on ResNet-8 / CIFAR-10 and DS-CNN / FSDD
    # after post-training calibration (bench/RESULTS.md).
    final_players: PlayerKind = "layers"
    # Each game's L layers are enumerated exactly (all 2^L policies, no sampling error) when that
    # takes no more coalitions than the final permutations would: (L + 1) x final_permutations
    # >= 2^L, up to 10 layers at the default 96. Sampled otherwise (each permutation L + 1
    # coalitions, shared prefixes computed once by ``QuantNet.coalition_logits``), or always when
    # False. k candidates cost k - 1 games.
    exact_layers: bool = True
    # A wider bit-width's score is at least a narrower one's (see ``monotone_scores``).
    monotone: bool = True
    momentum: float = 0.8  # accum = momentum * accum + (1 - momentum) * phi
    step: float = 0.1  # alpha += step * accum


def score(logits: torch.Tensor, y: torch.Tensor, value: str) -> torch.Tensor:
    """Mean over the last-but-one axis: top-1 accuracy, true-class softmax probability, or minus
    the mean squared error to the targets ``y``."""
    if value == "top1":
        return (logits.argmax(-1) == y).double().mean(-1)
    if value == "neg_mse":  # reconstruction: y holds the targets, (samples, outputs)
        return -((logits.double() - y.double()) ** 2).mean(-1).mean(-1)
    if value == "kl":  # y holds the float model's probabilities, (samples, classes)
        y = y.double()
        return -(y * (torch.log(y.clamp_min(1e-12)) - torch.log_softmax(logits.double(), dim=-1))).sum(-1).mean(-1)
    if value == "soft":
        probabilities = torch.softmax(logits.double(), dim=-1)
        return probabilities.gather(-1, y.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)
    raise ValueError(f"unknown coalition value {value!r}")


class CoalitionValue:
    """value_fn for the Shapley estimator: the supernet's score under each coalition."""

    def __init__(self, net: QuantNet, x: np.ndarray, y: np.ndarray, context: Context = SINGLE_PROCESS,
                 value: str = "top1", progress: str | None = None):
        self.net = net
        self.progress = progress  # a name for the progress lines of each call, or None for none
        self.context = context
        self.value = value
        device = next(net.parameters()).device
        self.x = torch.from_numpy(x).to(device)
        self.y = torch.from_numpy(y).to(device)
        self.max_batch = _MAX_COALITIONS_PER_CALL

    @torch.no_grad()
    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Accuracy per coalition; under torchrun each rank scores its share of the coalitions.

        Each rank gets a contiguous run of the coalitions in sorted order, so the coalitions on
        one rank share as many layer prefixes as they can.
        """
        order = np.lexsort(masks.T[::-1])
        values = np.empty(len(masks))
        values[order] = self.context.gather_values(self._accuracies(masks[self.context.share(order)]), len(masks))
        return values

    def _accuracies(self, masks: np.ndarray) -> np.ndarray:
        self.net.eval()
        if len(masks) == 0:
            return np.zeros(0)
        bar = None

        def scored(total: int) -> None:
            nonlocal bar
            bar = bar or progress(total, self.progress, "policies")
            bar.update(1)

        blocks, index = self.net.coalition_logits(self.x, masks, scored if self.progress else None)
        if bar is not None:
            bar.close()
        return score(blocks, self.y, self.value)[index].cpu().numpy()

    @torch.no_grad()
    def one_at_a_time(self, masks: np.ndarray) -> np.ndarray:
        """The reference path: one ordinary forward per coalition (for the speed benchmark)."""
        self.net.eval()
        values = []
        k = len(self.net.candidates)
        for mask in masks:
            for i, layer in enumerate(self.net.mixed_layers()):
                layer.active.copy_(torch.from_numpy(mask[i * k:(i + 1) * k]).to(layer.active.device))
            values.append(float(score(self.net(self.x), self.y, self.value)))
        self.net.set_policy(None)
        return np.array(values)


def validation_batch(data: Dataset, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded subset of the validation split: the held-out batch coalitions are scored on."""
    n = min(samples, len(data.y_val))
    idx = np.sort(np.random.default_rng(seed).choice(len(data.y_val), n, replace=False))
    return data.x_val[idx], data.y_val[idx]


def value_target(value: str, x: np.ndarray, y: np.ndarray, teacher: torch.nn.Module | None) -> np.ndarray:
    """What coalitions' outputs are scored against: the labels (or targets), or for "kl" the float
    model's output probabilities on ``x``."""
    if value != "kl":
        return y
    if teacher is None:
        raise ValueError("the 'kl' coalition value needs the float model")
    teacher.eval()
    with torch.no_grad():
        logits = teacher(torch.from_numpy(x).to(next(teacher.parameters()).device))
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()


def estimate_shapley(net: QuantNet, x: np.ndarray, y: np.ndarray, permutations: int, truncation: float,
                     seed: int, context: Context = SINGLE_PROCESS, value: str = "top1",
                     players: str = "candidates", exact_layers: bool = False,
                     show_progress: bool = False) -> ShapleyEstimate:
    """One entry per (layer, candidate) player, whichever the players: with "layers" the widest
    candidate holds the layer's value and the others have no sample (see ``ShapleyConfig`` for
    ``exact_layers``)."""
    value = CoalitionValue(net, x, y, context, value, "Shapley table" if show_progress else None)
    net.set_policy(None)
    if players == "layers":
        return _layer_upgrades(value, net, permutations, seed, context, exact_layers)
    if players != "candidates":
        raise ValueError(f"unknown Shapley players {players!r}")
    groups = np.repeat(np.arange(len(net.graph.layers)), len(net.candidates))
    return monte_carlo_shapley(value, len(net.players()), permutations, groups=groups, truncation=truncation,
                               seed=seed, max_batch=value.max_batch * context.world)


def _layer_upgrades(value: CoalitionValue, net: QuantNet, permutations: int, seed: int,
                    context: Context, exact: bool) -> ShapleyEstimate:
    """Shapley values of the layers, one game per candidate c narrower than the widest: in c's
    game a coalition's layers take the widest candidate and the others c, so every coalition is a
    working policy, run in TFLM's integer arithmetic (no truncation), and a layer's value is what
    raising it from c to the widest is worth, averaged over which other layers stay at c.

    Layer l's entry for candidate c is its value in the narrowest's game less its value in c's:
    what raising it from the narrowest to c is worth (exactly u(l, c) - u(l, narrowest) where the
    value adds up over layers). With two candidates there is one game and the widest's entry is
    the layer's value in it, as before. The entries' differences, which the selector compares, are
    each candidate's shortfall from the widest measured around the widest: lowering one layer to
    2 bits among int8 and 2-bit ones, not raising one among 2-bit layers that leave the network at
    chance whatever it does. The narrowest candidate has no entry (NaN)."""
    n_layers, k = len(net.graph.layers), len(net.candidates)
    order = narrow_to_wide(net.candidates)
    narrow, wide = int(order[0]), int(order[-1])
    max_batch = value.max_batch * context.world
    games = {}
    for j, c in enumerate(order[:-1].tolist()):  # the narrowest's game keeps the seed (as with two candidates)
        def policies(masks: np.ndarray, c: int = c) -> np.ndarray:
            choice = np.zeros((len(masks), n_layers, k), dtype=bool)
            choice[..., wide] = masks
            choice[..., c] |= ~masks
            return value(choice.reshape(len(masks), -1))

        if exact and 2**n_layers <= (n_layers + 1) * permutations:
            games[c] = exact_shapley(policies, n_layers, max_batch=max_batch)
        else:
            games[c] = monte_carlo_shapley(policies, n_layers, permutations, seed=seed + j, max_batch=max_batch)

    base = games[narrow]

    def per_candidate(mean: bool, field: str) -> np.ndarray:
        out = np.full((n_layers, k), np.nan)
        for c in order[1:].tolist():
            a, b = getattr(base, field), getattr(games[c], field) if c != wide else None
            out[:, c] = a if b is None else (a - b if mean else np.sqrt(a ** 2 + b ** 2))
        return out.reshape(-1)

    count = np.zeros((n_layers, k), dtype=int)
    for c in order[1:].tolist():
        count[:, c] = base.count if c == wide else np.minimum(base.count, games[c].count)
    # Row (l, c) of by_size: layer l's marginals by size in c's game (the widest plays no game).
    by_size = np.full((n_layers, k, n_layers), np.nan)
    for c, game in games.items():
        by_size[:, c] = game.by_size
    entries = per_candidate(True, "mean")
    std = per_candidate(False, "std")
    return replace(base, mean=entries, std=std, stderr=per_candidate(False, "stderr"), count=count.reshape(-1),
                   mean_minus_std=entries - std, n_coalitions=sum(g.n_coalitions for g in games.values()),
                   n_calls=sum(g.n_calls for g in games.values()), by_size=by_size.reshape(n_layers * k, n_layers))


def scores_at(estimate: ShapleyEstimate, candidates: tuple[Precision, ...], choice: tuple[int, ...],
              window: int = 1) -> np.ndarray:
    """(layers, candidates) scores as ``_layer_upgrades`` sums them, but with each game's
    marginals taken at the coalition sizes of the policy ``choice`` (candidate index per layer)
    instead of averaged over every size: in c's game, layer l's value as one of as many layers at
    c or narrower as the policy has (sizes within ``window`` of it, equally weighted).

    The Shapley value weighs a coalition of nine 2-bit layers as much as one of none; at a budget
    that leaves one layer at 2 bits, what decides is what 2 bits cost that layer among wider ones,
    and the marginals among mostly 2-bit networks (near chance, their KL large and erratic) only
    add noise to it. ResNet-8 at 65 % of the int8 bytes: the plain sum put a layer at 2 bits among
    int8 ones and lost 13.8 points to this valuation (bench/RESULTS.md, "Precision space")."""
    n_layers, k = len(choice), len(candidates)
    order = narrow_to_wide(candidates)
    rank = np.argsort(order)  # rank[c]: c's place from the narrowest
    chosen = rank[np.asarray(choice)]
    by_size = estimate.by_size.reshape(n_layers, k, n_layers)
    at = np.zeros((n_layers, k))
    for c in order[:-1].tolist():
        # Every layer is valued as one of the policy's layers at c or narrower (one of them even
        # where the policy has none): the others above c are raised in c's game.
        raised = min(n_layers - int((chosen <= rank[c]).sum()), n_layers - 1)
        near = by_size[:, c, max(0, raised - window):raised + window + 1]
        with warnings.catch_warnings():  # a layer with no sample at these sizes falls back to all sizes
            warnings.simplefilter("ignore", RuntimeWarning)
            at[:, c] = np.where(np.isfinite(near).any(axis=1), np.nanmean(near, axis=1),
                                np.nanmean(by_size[:, c], axis=1))
    narrow = order[0]
    out = np.zeros((n_layers, k))
    for c in order[1:].tolist():
        out[:, c] = at[:, narrow] - (at[:, c] if c != order[-1] else 0.0)
    return out


def valued_at(estimate: ShapleyEstimate, candidates: tuple[Precision, ...],
              config: ShapleyConfig) -> Callable[[tuple[int, ...]], np.ndarray] | None:
    """The selection's scores valued at a policy (``scores_at``, with the monotone prior where the
    config has it), or None where the table has no layer games to take sizes from."""
    if config.final_players != "layers" or estimate.by_size is None:
        return None

    def at(choice: tuple[int, ...]) -> np.ndarray:
        scores = scores_at(estimate, candidates, choice)
        return monotone_scores(scores, candidates) if config.monotone else scores

    return at


def shapley_scores(estimate: ShapleyEstimate, n_layers: int, n_candidates: int) -> np.ndarray:
    """(layers, candidates) contributions; a player never sampled (a one-candidate layer) counts 0."""
    return np.nan_to_num(estimate.mean, nan=0.0).reshape(n_layers, n_candidates)


def narrow_to_wide(candidates: tuple[Precision, ...]) -> np.ndarray:
    """Candidate indices from the narrowest (fewest weight bits, then activation bits) to the widest."""
    return np.array(sorted(range(len(candidates)), key=candidates.__getitem__), dtype=int)


def monotone_scores(scores: np.ndarray, candidates: tuple[Precision, ...]) -> np.ndarray:
    """Per layer, a candidate's score raised to at least that of every narrower candidate.

    Int8 weights sit on a grid 18x finer than int4's, so in expectation they are never the worse
    choice for accuracy; a smaller measured contribution for int8 is sampling noise (or the
    shared-weight supernet favouring one branch). Left as measured, such noise makes the selector
    pick int4 where the budget has room for int8 (seen in bench/search_quality.py). Likewise int16
    activations (a grid 256x finer than int8's over the same range) for w8a16 over w8a8.
    """
    order = narrow_to_wide(candidates)
    # Ties go to the wider candidate: a step far below what a validation batch can resolve, but
    # above the ILP solver's optimality gap.
    ordered = np.maximum.accumulate(scores[:, order], axis=1) + _TIE_BREAK * np.arange(len(order))
    out = np.empty_like(scores)
    out[:, order] = ordered
    return out


def pick_by_validation(correct: list[np.ndarray], margin: float) -> int:
    """Which of the K best policies by summed Shapley to keep, given each one's per-sample
    correctness on the validation batch, in order of summed Shapley (0: the best that fits).

    Another policy replaces policy 0 only if it is better on the validation samples by more
    than ``margin`` standard errors of the paired difference: a smaller lead is noise, and
    taking it would trade int8 for int4 where the budget has room for int8.
    """
    best, best_gain = 0, 0.0
    base = correct[0].astype(np.float64)
    for i, hits in enumerate(correct[1:], start=1):
        difference = hits.astype(np.float64) - base
        gain = difference.mean()
        stderr = difference.std(ddof=1) / np.sqrt(len(difference)) if len(difference) > 1 else np.inf
        if gain > margin * stderr and gain > best_gain:
            best, best_gain = i, gain
    return best


class AlphaUpdater:
    """Shapley-NAS's alpha update: standardised Shapley values, accumulated with momentum."""

    def __init__(self, net: QuantNet, x: np.ndarray, y: np.ndarray, config: ShapleyConfig, seed: int,
                 context: Context = SINGLE_PROCESS, describe_policy: Callable[[dict[str, Precision]], dict] | None = None):
        self.net, self.x, self.y, self.config, self.seed, self.context = net, x, y, config, seed, context
        self.describe_policy = describe_policy  # the argmax-alpha policy's cost, for the progress bar
        self.accum = np.zeros((len(net.graph.layers), len(net.candidates)))
        self.history: list[dict] = []

    def __call__(self, epoch: int) -> dict:
        estimate = estimate_shapley(self.net, self.x, self.y, self.config.permutations, self.config.truncation,
                                    self.seed * 1000 + epoch, self.context, self.config.value)
        phi = shapley_scores(estimate, *self.accum.shape)
        standardised = (phi - phi.mean()) / (phi.std() + 1e-12)
        self.accum = self.config.momentum * self.accum + (1 - self.config.momentum) * standardised
        with torch.no_grad():
            for layer, delta in zip(self.net.mixed_layers(), self.accum):
                layer.alpha.add_(torch.from_numpy(self.config.step * delta).float().to(layer.alpha.device))
        alphas = [layer.alpha.detach().cpu().tolist() for layer in self.net.mixed_layers()]
        self.history.append({"epoch": epoch, "alpha": alphas, "shapley_mean": phi.tolist(),
                             "full_value": estimate.full_value, "coalitions": estimate.n_coalitions})
        shown = {"coalition_value": estimate.full_value}
        if self.describe_policy is not None:
            argmax = {layer.op.name: layer.candidates[int(np.argmax(a))] for layer, a in zip(self.net.mixed_layers(), alphas)}
            shown.update(self.describe_policy(argmax))
        return shown
