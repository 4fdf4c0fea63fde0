"""The search stage end to end: float training, supernet warm-up, SMPQ, baselines, finetune.

``run_search`` returns a ``SearchResult`` (plain data plus the finetuned ``QuantNet``);
``save_search`` writes ``policy.json``, ``search.json`` and the finetuned weights.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from smpq_edge.inputs.boards import Board
from smpq_edge.network.cost import zero_point_saving
from smpq_edge.inputs.data import Dataset
from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import write_bytes
from smpq_edge.network.graph import Graph, trace
from smpq_edge.inputs.models import ModelSource
from smpq_edge.inputs.policy import LayerChoice, Policy, save_policy
from smpq_edge.common.progress import progress as progress_bar
from smpq_edge.network.quant import QuantNet
from smpq_edge.common.records import (CostRecord, FloorAction, FloorCheck, KBestRecord, Measured, MethodRecord,
                               SearchRecord, ShapleyRecord)
from smpq_edge.search.baselines import DEFAULT_BASELINES, Baseline, BaselineInputs, baseline_named
from smpq_edge.search.budget import DIMENSIONS, Budgets, cost_of, knapsack
from smpq_edge.search.guard import Reference, StageGuard, check_floor, measure
from smpq_edge.common.distributed import SINGLE_PROCESS, Context
from smpq_edge.search.select import Selection, infeasible_message, smallest_achievable
from smpq_edge.search.smpq import (AlphaUpdater, ShapleyConfig, estimate_shapley, monotone_scores,
                                   pick_by_validation, shapley_scores, validation_batch, valued_at, value_target)
from smpq_edge.search.train import TrainConfig, per_sample, predictions, score, seed_everything, train
from smpq_edge.inputs.task import Task, check_outputs, task_of
from smpq_edge.common.versions import versions
from smpq_edge.common.vocabulary import RankedSource
from smpq_edge.common.precision import Precision, floor_precision, policy_text, weight_bits_of, wide_layers

CALIBRATION_BATCHES = 8
# Most revaluations of the scores at the pick (``at_operating_point``): a cap, since nothing
# makes the revalued pick converge (it can cycle between two policies).
_OPERATING_POINT_ROUNDS = 4


@dataclass(frozen=True)
class SearchConfig:
    float_train: TrainConfig = TrainConfig(epochs=30, lr=1e-2)
    warmup: TrainConfig = TrainConfig(epochs=8, lr=2e-3)
    search: TrainConfig = TrainConfig(epochs=6, lr=1e-3)
    finetune: TrainConfig = TrainConfig(epochs=6, lr=5e-4)
    shapley: ShapleyConfig = ShapleyConfig()
    k_best: int = 5  # summed-Shapley policies re-ranked by measured validation accuracy
    rerank_margin: float = 1.0  # standard errors a re-ranked policy must lead by (pick_by_validation)
    baselines: tuple[str, ...] = DEFAULT_BASELINES  # names of ``baselines.BASELINES`` or uniformN
    # No training at all: the policy is chosen on the calibrated network and exported as it is.
    post_training: bool = False

    @classmethod
    def quick(cls) -> SearchConfig:
        """A few epochs of everything: for tests and a first look, not for final accuracy."""
        return cls(float_train=TrainConfig(epochs=8, lr=1e-2), warmup=TrainConfig(epochs=2, lr=2e-3),
                   search=TrainConfig(epochs=2, lr=1e-3), finetune=TrainConfig(epochs=2, lr=5e-4),
                   shapley=ShapleyConfig(permutations=8, final_permutations=24, val_samples=256), k_best=3)

    def for_pretrained(self) -> SearchConfig:
        """The schedule for weights that arrive trained: a twentieth of the learning rates, at most
        2 / 2 / 3 epochs, and distillation from the float model's outputs instead of the labels.
        One QAT epoch at the from-scratch rate took a pretrained ResNet-8 from 89 % agreement
        with its float model to 11 % (DESIGN.md); each stage is also checked (``StageGuard``)."""
        def gentle(stage: TrainConfig, most: int) -> TrainConfig:
            return replace(stage, epochs=min(stage.epochs, most), lr=stage.lr / 20, distill=1.0)

        return replace(self, warmup=gentle(self.warmup, 2), search=gentle(self.search, 2),
                       finetune=gentle(self.finetune, 3))

    def post_training_only(self) -> SearchConfig:
        """No weight training anywhere (``--ptq``); DMPQ, which learns by gradient, is left out."""
        none = TrainConfig(epochs=0)
        return replace(self, warmup=none, search=none, finetune=none, post_training=True,
                       baselines=tuple(b for b in self.baselines if not baseline_named(b).learns))

    def with_shards(self, shards: int) -> SearchConfig:
        """Gradient shards for the quantised training stages (the float model trains on one rank)."""
        return replace(self, warmup=replace(self.warmup, shards=shards), search=replace(self.search, shards=shards),
                       finetune=replace(self.finetune, shards=shards))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    policy: Policy
    net: QuantNet  # SMPQ's finetuned network (its graph is net.graph), for the exporter
    record: SearchRecord  # everything search.json holds


def calibrate(net: QuantNet, data: Dataset, seed: int) -> None:
    """Initialise activation ranges from a few training batches before any QAT step."""
    rng = np.random.default_rng(seed)
    net.train()
    with torch.no_grad():
        for i, idx in enumerate(np.array_split(rng.permutation(len(data.y_train)), max(1, len(data.y_train) // 128))):
            if i == CALIBRATION_BATCHES:
                break
            net(torch.from_numpy(data.x_train[idx]).to(next(net.parameters()).device))
            net.commit_observations()


def calibrated_supernet(model: torch.nn.Module, graph: Graph, data: Dataset, candidates: tuple[int | Precision, ...],
                        seed: int, context: Context = SINGLE_PROCESS) -> QuantNet:
    """The supernet over ``model``'s layers with activation ranges calibrated, untrained."""
    net = QuantNet(graph, model, candidates).to(context.device)
    calibrate(net, data, seed)
    return net


def warm_supernet(model: torch.nn.Module, graph: Graph, data: Dataset, candidates: tuple[int | Precision, ...],
                  warmup: TrainConfig, seed: int, progress: bool = False,
                  context: Context = SINGLE_PROCESS, guard: StageGuard | None = None) -> QuantNet:
    """The calibrated supernet with its weights trained for ``warmup`` (distilled from ``model``
    when ``warmup.distill``; undone if ``guard`` finds its int8 network worse): where SMPQ and
    every baseline start (and the benches' oracles)."""
    net = calibrated_supernet(model, graph, data, candidates, seed, context)
    int8 = {op.name: floor_precision(net.candidates) for op in graph.layers}
    return _guarded(guard, "warm-up", net, lambda n: train(
        n, data, warmup, seed, params=weight_params(n), desc="warm-up", progress=progress, teacher=model,
        context=context), warmup.epochs, measured_as=int8)


def _guarded(guard: StageGuard | None, stage: str, net: QuantNet, step: Callable[[QuantNet], object],
             epochs: int, measured_as: dict[str, Precision] | None = None) -> QuantNet:
    """``step(net)``, checked by ``guard`` when there is one and the stage trains at all."""
    if guard is None or epochs == 0:
        step(net)
        return net
    return guard.run(stage, net, step, measured_as)


def weight_params(net: QuantNet) -> list[torch.nn.Parameter]:
    return [p for name, p in net.named_parameters() if not name.endswith("alpha")]


def finetune(net: QuantNet, policy: dict[str, Precision], data: Dataset, config: TrainConfig, seed: int,
             progress: bool, desc: str, context: Context = SINGLE_PROCESS, guard: StageGuard | None = None,
             teacher: torch.nn.Module | None = None) -> tuple[QuantNet, float, float]:
    """A copy of ``net`` fixed to ``policy`` and QAT-trained; test score before and after."""
    tuned = copy.deepcopy(net)
    tuned.set_policy(policy)
    task = task_of(data)
    before = score(tuned, data.x_test, data.y_test, task)
    if not config.epochs:  # post-training: nothing changes, and a test pass of ResNet-8 costs seconds
        return tuned, before, before
    tuned = _guarded(guard, desc, tuned, lambda n: train(
        n, data, config, seed, params=weight_params(n), desc=desc, progress=progress, teacher=teacher,
        context=context), config.epochs)
    return tuned, before, score(tuned, data.x_test, data.y_test, task)


def _policy_of(graph: Graph, candidates: tuple[Precision, ...], selection: Selection) -> dict[str, Precision]:
    return {op.name: candidates[k] for op, k in zip(graph.layers, selection.choice)}


@dataclass
class SearchRun:
    """What the steps of one search share: its inputs, the traced graph and the budget problem."""

    source: ModelSource
    data: Dataset
    board: Board
    budgets: Budgets
    config: SearchConfig
    seed: int
    progress: bool
    log: Callable[[str], None]
    context: Context
    graph: Graph
    sack: object
    guard: StageGuard
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    # (network, split) -> its predictions: the floor and the shipped network are measured by the
    # floor check and again for the record, each a full pass over a split (seconds on ResNet-8).
    predicted: dict = field(default_factory=dict)

    def predict(self, net: torch.nn.Module, split: str) -> np.ndarray:
        """``net``'s predictions on the "val" or "test" split; ``net`` must not change afterwards."""
        if (net, split) not in self.predicted:
            x = self.data.x_val if split == "val" else self.data.x_test
            self.predicted[net, split] = predictions(net, x, self.task)
        return self.predicted[net, split]

    def per_sample(self, net: torch.nn.Module) -> np.ndarray:
        """``net``'s per-sample validation scores (``Task.per_sample``)."""
        return self.task.per_sample(self.predict(net, "val"), self.data.x_val, self.data.y_val)

    @property
    def candidates(self) -> tuple[Precision, ...]:
        return self.board.precisions

    @property
    def task(self) -> Task:
        return task_of(self.data)

    def lap(self, name: str) -> None:
        """Record the seconds since the last lap as ``name``."""
        self.timings[name] = time.perf_counter() - self.started - sum(self.timings.values())

    def cost(self, policy: dict[str, Precision]):
        return cost_of(self.graph, policy, self.board, self.budgets)

    def budget_use(self, policy: dict[str, Precision]) -> dict:
        cost = self.cost(policy)
        return {"flash": f"{cost.flash_total_bytes / cost.flash_budget_bytes:.0%}",
                "RAM": f"{cost.ram_total_bytes / cost.ram_budget_bytes:.0%}",
                "cycles": f"{cost.cycles / cost.cycle_budget:.0%}"}


def run_search(source: ModelSource, data: Dataset, board: Board, *, budgets: Budgets | None = None,
               config: SearchConfig = SearchConfig(), seed: int = 0, progress: bool = True,
               log: Callable[[str], None] = print, context: Context = SINGLE_PROCESS) -> SearchResult:
    """Every rank of a ``torchrun`` job calls this with the same arguments; see ``distributed``."""
    if not context.is_main:
        progress, log = False, (lambda _: None)
    run = prepare_run(source, data, board, budgets or Budgets.of_board(board), config, seed, progress, log, context)
    model, reference, float_measured = _float_model(run)
    floor = calibrated_supernet(model, run.graph, data, run.candidates, seed, context)
    floor.set_policy({op.name: floor_precision(run.candidates) for op in run.graph.layers})

    log(f"supernet warm-up ({config.warmup.epochs} epochs, {len(run.graph.layers)} layers x "
        f"{len(run.candidates)} candidates)")
    warm = warm_supernet(model, run.graph, data, run.candidates, config.warmup, seed, progress, context, run.guard)
    run.lap("warmup_s")
    net, table, value, scores, history = _smpq_search(run, copy.deepcopy(warm), model)
    # From here on ``scores`` are the ones the selection summed (valued at the budget).
    at_budget = valued_at(table, run.candidates, config.shapley)
    ranked, chosen, chosen_bits, scores = pick_policy(run, net, scores, at_budget)
    tuned, methods = _train_methods(run, warm, model, chosen, chosen_bits)
    tuned, floor_check, floor_action = _keep_floor(run, floor, tuned, chosen_bits, ranked, methods, model)
    shipped = next(m for m in methods if m.method == (floor_action.shipped_method if floor_action else "smpq"))
    run.timings["total_s"] = time.perf_counter() - run.started

    task = run.task
    measured = {name: measure(run.predict(n, "val"), run.predict(n, "test"), reference)
                for name, n in (("ptq_int8", floor), ("shipped", tuned))}
    policy = _policy(run, shipped, scores)
    record = SearchRecord(
        model=source.name, task=task.name, data=data.summary(), board=board.name, kernels=board.kernels, seed=seed,
        zero_points=board.zero_points, zero_point_saving_bytes=zero_point_saving(run.graph, shipped.bits, board),
        pretrained=source.pretrained, budgets=run.budgets.to_dict(),
        knapsack_budgets=dict(zip(DIMENSIONS, run.sack.budgets)),
        config=config.to_dict(), float_test_acc=float_measured.test_acc,
        reference={"float": float_measured, **measured}, stage_checks=run.guard.checks, floor_check=floor_check,
        shapley=ShapleyRecord(players=[f"{name}:{c.name}" for name, c in net.players()], value=value,
                              **table.to_dict()),
        # After the monotone prior: what the selection summed (the raw means are in "shapley").
        shapley_scores=scores.tolist(), candidates=[c.name for c in run.candidates],
        layer_shapes={op.name: list(op.weight_shape) for op in run.graph.layers},
        rerank_margin=config.rerank_margin, shipped_method=shipped.method, floor_action=floor_action,
        alpha_history=history,
        k_best=[KBestRecord(bits=weight_bits_of(r.policy), int16=sorted(wide_layers(r.policy)),
                            summed_shapley=r.selection.score, val_acc=float(r.hits.mean()), cost=list(r.selection.cost),
                            chosen=r.selection is chosen, source=r.source)
                for r in ranked],
        methods=methods, timings=run.timings, versions=versions(),
    )
    return SearchResult(policy=policy, net=tuned, record=record)


def check_config(source: ModelSource, config: SearchConfig) -> None:
    """Refuse a schedule the model cannot take (before any output folder is made)."""
    if config.post_training and not source.pretrained:
        raise UserError(f"--ptq: model {source.name} is not trained (a .py model without PRETRAINED = True); "
                        "post-training quantisation needs trained weights")


def traced_for(source: ModelSource, data: Dataset) -> Graph:
    """The model's graph, after one-line checks that it takes the data and that its output is what
    the data's task scores (the CLI runs them before it makes an output folder)."""
    source.check_input(data.input_shape, data.name)  # before tracing: one line, not torch's shape error
    graph = trace(source.module, data.input_shape, output_softmax=source.output_softmax)
    check_outputs(task_of(data), source.name, graph.op(graph.output).out_shape, data)
    return graph


def prepare_run(source: ModelSource, data: Dataset, board: Board, budgets: Budgets, config: SearchConfig, seed: int,
             progress: bool, log: Callable[[str], None], context: Context) -> SearchRun:
    """Trace the model and set up the budget problem; stop before any training when no policy fits."""
    seed_everything(seed)
    check_config(source, config)
    graph = traced_for(source, data)
    sack = knapsack(graph, board, budgets, board.precisions)
    try:
        sack.k_best([[0.0] * len(board.precisions)] * len(graph.layers))
    except UserError:
        raise UserError(_infeasible_message(sack, budgets, board)) from None
    return SearchRun(source, data, board, budgets, config, seed, progress, log, context, graph, sack,
                StageGuard(data.x_val, data.y_val, log, task_of(data)))


def _float_model(run: SearchRun) -> tuple[torch.nn.Module, Reference, Measured]:
    """The float model (trained here unless it arrived trained), its labels on val and test, and
    its accuracy."""
    model = run.source.module.to(run.context.device)
    if not run.source.pretrained:
        run.log(f"training the float model ({run.config.float_train.epochs} epochs)")
        # BatchNorm statistics depend on the batch, so one rank trains the float model and shares it.
        if run.context.is_main:
            train(model, run.data, run.config.float_train, run.seed, desc="float", progress=run.progress)
        run.context.broadcast_module(model)
    model.eval()
    data, task = run.data, run.task
    reference = Reference(task, data.x_val, data.y_val, data.x_test, data.y_test, predictions(model, data.x_val, task),
                          predictions(model, data.x_test, task))
    measured = measure(reference.float_val, reference.float_test, reference)
    run.lap("float_train_s")
    run.log(f"float test {task.metric} {task.show(measured.test_acc)}")
    return model, reference, measured


def _smpq_search(run: SearchRun, net: QuantNet, teacher: torch.nn.Module):
    """Shapley-steered alpha during the search epochs, then the final Shapley table, the coalition
    value it was scored by (the task's, where it has one) and the selection's scores."""
    config = run.config
    # The task's inputs and targets for the coalitions' value (labels, or the normal inputs themselves).
    x_val, target, value = run.task.coalition_batch(*validation_batch(run.data, config.shapley.val_samples, run.seed))
    shapley = replace(config.shapley, value=value) if value else config.shapley
    target = value_target(shapley.value, x_val, target, teacher)
    updater = AlphaUpdater(net, x_val, target, shapley, run.seed, run.context, describe_policy=run.budget_use)
    run.log(f"SMPQ search ({config.search.epochs} epochs, {config.shapley.permutations} permutations per update)")
    net = _guarded(run.guard, "SMPQ search", net, lambda n: train(
        n, run.data, config.search, run.seed + 1, params=weight_params(n), after_epoch=updater, desc="SMPQ search",
        progress=run.progress, teacher=teacher, context=run.context), config.search.epochs)
    table = estimate_shapley(net, x_val, target, config.shapley.final_permutations, config.shapley.truncation,
                             run.seed, run.context, shapley.value, shapley.final_players, shapley.exact_layers,
                             show_progress=run.progress)
    scores = shapley_scores(table, len(run.graph.layers), len(run.candidates))
    if config.shapley.monotone:
        scores = monotone_scores(scores, run.candidates)
    run.lap("smpq_search_s")
    return net, table, shapley.value, scores, updater.history


def _uniform_challengers(run: SearchRun, scores: np.ndarray) -> list[Selection]:
    """The uniform policies within the budgets, as challengers in the re-rank: the summed Shapley
    value misjudges layers that interact strongly (two 2-bit layers leave DS-CNN near chance),
    so that its K best all held such layers where all-int4 fitted and scored 7 points more
    (bench/precision.py, FSDD at 85 %)."""
    out = []
    for k in range(len(run.candidates)):
        choice = (k,) * len(run.graph.layers)
        totals = run.sack.totals(choice)
        if all(total <= budget for total, budget in zip(totals, run.sack.budgets)):
            out.append(Selection(choice, float(sum(row[k] for row in scores)), tuple(float(t) for t in totals)))
    return out


class Ranked(NamedTuple):
    """A policy the re-rank measured: its per-sample validation scores, and where it came from."""

    hits: np.ndarray
    selection: Selection
    policy: dict[str, Precision]
    source: RankedSource


def at_operating_point(run: SearchRun, scores: np.ndarray,
                       at: Callable[[tuple[int, ...]], np.ndarray]) -> tuple[list[Selection], np.ndarray]:
    """The K best by the scores valued at the policy they pick (``smpq.scores_at``), and those
    scores: from the summed-Shapley pick, revalue at each new pick until it stays put or comes back."""
    choice = run.sack.k_best(scores.tolist())[0].choice
    seen = {choice}
    for _ in range(_OPERATING_POINT_ROUNDS):
        local = at(choice)
        choice = run.sack.k_best(local.tolist())[0].choice
        if choice in seen:
            break
        seen.add(choice)
    return run.sack.k_best(local.tolist(), run.config.k_best), local


def pick_policy(run: SearchRun, net: QuantNet, scores: np.ndarray,
                at: Callable[[tuple[int, ...]], np.ndarray] | None = None):
    """The K best by summed Shapley, or (given ``at``) by the Shapley values taken at the budget's
    policy (``at_operating_point``), and the uniform policies (``_uniform_challengers``), those that
    fit the full cost model re-ranked on the whole validation split: on the Shapley batch alone
    (512 samples) a challenger's lead of one standard error was noise often enough to cost
    ResNet-8 / CIFAR-10 1.3 points of held-out accuracy (bench/RESULTS.md). Also returns the
    scores the selection summed."""
    x_val, y_val = run.data.x_val, run.data.y_val
    found: dict[tuple[int, ...], tuple[Selection, RankedSource]] = {}
    if at:
        best, scores = at_operating_point(run, scores, at)
    else:
        best = run.sack.k_best(scores.tolist(), run.config.k_best)
    first: RankedSource = "Shapley at the budget" if at else "Shapley"
    for source, selections in ((first, best), ("uniform", _uniform_challengers(run, scores))):
        for selection in selections:
            found.setdefault(selection.choice, (selection, source))
    ranked = []
    bar = progress_bar(len(found), f"re-rank on {len(y_val):,} validation samples", "policies", run.progress)
    for selection, source in found.values():
        policy = _policy_of(run.graph, run.candidates, selection)
        if all(run.cost(policy).fits.values()):
            net.set_policy(policy)
            ranked.append(Ranked(per_sample(net, x_val, y_val, run.task), selection, policy, source))
        bar.update(1)
    bar.close()
    net.set_policy(None)
    if not ranked:
        raise UserError("no policy among the best by Shapley fits every budget under the full cost model")
    chosen = ranked[pick_by_validation([r.hits for r in ranked], run.config.rerank_margin)]
    return ranked, chosen.selection, chosen.policy, scores


def _train_methods(run: SearchRun, warm: QuantNet, teacher: torch.nn.Module, chosen: Selection,
                   chosen_bits: dict[str, Precision]) -> tuple[QuantNet, list[MethodRecord]]:
    """SMPQ's pick and each baseline's, each QAT-trained; SMPQ's network is the one shipped."""
    config, data, seed, progress, context = run.config, run.data, run.seed, run.progress, run.context
    # The chosen policy is QAT-trained from the warm-up weights for the search's and the
    # finetune's epochs, not finetuned from the search's weights: bench/search_quality.py measured
    # +0.13 +- 0.27 test points for this (11 of 15 runs better) on mnist1d at near-default effort.
    # The search moved the weights while alpha shifted between candidates; a policy's own training
    # does better from the plainer start. HAWQ and the uniform policies train the same way.
    long_finetune = replace(config.finetune, epochs=config.finetune.epochs + config.search.epochs)

    def tune(start: QuantNet, bits: dict[str, Precision], schedule: TrainConfig, desc: str, guard=run.guard):
        return finetune(start, bits, data, schedule, seed, progress, desc, context, guard, teacher)

    tuned, before, after = tune(warm, chosen_bits, long_finetune, "finetune SMPQ")
    run.log(f"SMPQ: {_trained_text(run, before, after)}")
    run.lap("smpq_score_s" if config.post_training else "smpq_finetune_s")  # --ptq trains nothing
    methods = [_method_record(run, "smpq", chosen_bits, chosen.score, before, after,
                            after if config.baselines else None)]
    for method in config.baselines:
        baseline = baseline_named(method)
        t0 = time.perf_counter()
        try:
            bits, score, start = _baseline(baseline, run, warm)
        except UserError as exc:  # e.g. uniform int4 over budget: recorded, not fatal
            run.log(f"{method}: {exc}")
            continue
        # Baselines are trained unguarded: only the shipped network's stages are undone.
        _, before, after = tune(start, bits, config.finetune if baseline.own_network else long_finetune,
                                f"finetune {method}", None)
        # The others already finetune from the warm-up for the long schedule.
        same = tune(warm, bits, long_finetune, "same finetune", None)[2] if baseline.own_network else after
        methods.append(_method_record(run, method, bits, score, before, after, same))
        run.log(f"{method}: {_trained_text(run, before, after)}")
        run.timings[f"{method}_s"] = time.perf_counter() - t0
    return tuned, methods


def _trained_text(run: SearchRun, before: float, after: float) -> str:
    show, metric = run.task.show, run.task.metric
    if run.config.post_training:
        return f"test {metric} {show(after)} (post-training, nothing trained)"
    return f"test {metric} {show(before)} before finetune, {show(after)} after"


def _keep_floor(run: SearchRun, floor: QuantNet, tuned: QuantNet, chosen_bits: dict[str, Precision],
                ranked: list[Ranked], methods: list[MethodRecord],
                teacher: torch.nn.Module) -> tuple[QuantNet, FloorCheck, FloorAction | None]:
    """The network to ship, never below the calibration-only int8 floor by more than a paired
    standard error on validation when anything within the budgets keeps it: SMPQ's pick; else
    uniform int8 (the floor itself) where it fits; else the next of the K best, each trained from
    the floor's weights; else the best of those, loudly. Methods tried are added to ``methods``."""
    task = run.task
    floor_scores = run.per_sample(floor)
    check = check_floor(run.per_sample(tuned), floor_scores)
    if not check.below_floor:
        return tuned, check, None
    show = task.show
    missed = (f"SMPQ's pick ({policy_text(chosen_bits)}) scored validation {task.metric} "
              f"{show(check.shipped_val_acc)} against the int8 floor's {show(check.floor_val_acc)}")
    int8 = {op.name: floor_precision(run.candidates) for op in run.graph.layers}
    int8_cost = run.cost(int8)
    if all(int8_cost.fits.values()):
        net = floor  # the floor's own network: its measurements so far are its
        test = task.score(run.predict(net, "test"), run.data.x_test, run.data.y_test)
        methods.append(_method_record(run, "floor int8", int8, None, test, test, None))
        action = FloorAction(action="uniform int8", shipped_method="floor int8",
                             message=f"{missed}; uniform int8 fits the budgets, so the calibration-only int8 network "
                                     "(the floor itself) is shipped")
        run.log(f"note: {action.message}")
        return net, check_floor(floor_scores, floor_scores), action
    schedule = replace(run.config.finetune, epochs=run.config.finetune.epochs + run.config.search.epochs)
    best, tried = (check, tuned, "smpq", chosen_bits), []
    for rank, candidate in enumerate(ranked, start=1):
        selection, bits = candidate.selection, candidate.policy
        if bits == chosen_bits:
            continue
        name = f"smpq #{rank}"
        net, before, after = finetune(floor, bits, run.data, schedule, run.seed, run.progress, f"finetune {name}",
                                      run.context, None, teacher)
        trial = check_floor(run.per_sample(net), floor_scores)
        methods.append(_method_record(run, name, bits, selection.score, before, after, None))
        tried.append({"method": name, "bits": policy_text(bits), "val_acc": trial.shipped_val_acc,
                      "below_floor": trial.below_floor})
        if not trial.below_floor:
            action = FloorAction(action="next policy", shipped_method=name,
                                 message=f"{missed}; int8 is over budget, so the K-best policy {name} "
                                         f"({policy_text(bits)}), trained from the floor's weights, is shipped: "
                                         f"{show(trial.shipped_val_acc)}", tried=tried)
            run.log(f"note: {action.message}")
            return net, trial, action
        if trial.shipped_val_acc > best[0].shipped_val_acc:
            best = (trial, net, name, bits)
    trial, net, name, bits = best
    over = ", ".join(k for k, ok in int8_cost.fits.items() if not ok)
    action = FloorAction(action="best below floor", shipped_method=name,
                         message=f"WARNING: {missed}; int8 is over the {over} budget and none of the {len(tried)} next "
                                 f"best policies keeps the floor; shipped {name} at {show(trial.shipped_val_acc)}, below "
                                 f"the floor, with {_int4_cost(run, bits, int8_cost)}", tried=tried)
    run.log(action.message)
    return net, trial, action


def _method_record(run: SearchRun, method: str, policy: dict[str, Precision], score: float | None, before: float,
                   after: float, same: float | None) -> MethodRecord:
    """A method's pick, its predicted cost and its test scores (before and after its finetune, and
    after the finetune every method gets; None where it was not run)."""
    return MethodRecord(method=method, bits=weight_bits_of(policy), int16=sorted(wide_layers(policy)),
                        cost=CostRecord.model_validate(run.cost(policy).to_dict()), score=score,
                        test_acc_before_finetune=before, test_acc=after, test_acc_same_finetune=same)


def _int4_cost(run: SearchRun, bits: dict[str, Precision], int8_cost) -> str:
    """The layers below int8 in ``bits`` and the flash each saves: why the budget needs them."""
    cost = run.cost(bits)
    saved = [f"{low.name} int{low.weight_bits} (saves {high.flash_bytes - low.flash_bytes:,} B)"
             for low, high in zip(cost.layers, int8_cost.layers) if low.weight_bits < high.weight_bits]
    return "fewer bits in " + ", ".join(saved)


def _policy(run: SearchRun, shipped: MethodRecord, scores: np.ndarray) -> Policy:
    policy, cost = shipped.policy, shipped.cost
    return Policy(board=run.board.name, model=run.source.name, method=shipped.method, layers=[
        LayerChoice(name=op.name, kind=op.kind, weight_bits=policy[op.name].weights,
                    activation_bits=policy[op.name].activations, params=op.weight_count,
                    flash_bytes=layer_cost.flash_bytes, cycles=layer_cost.cycles,
                    shapley={c.name: float(scores[i, k]) for k, c in enumerate(run.candidates)})
        for i, (op, layer_cost) in enumerate(zip(run.graph.layers, cost.layers))])


def _infeasible_message(sack, budgets: Budgets, board: Board) -> str:
    """One line, in the units of the budget options, of the smallest whole-firmware figure each
    budget could reach on its own. The knapsack's own budgets are net of the policy-independent
    part (reserve, tables, pooling), which would read as a negative flash budget to a user."""
    whole = (budgets.flash_bytes, budgets.ram_bytes, budgets.cycles)
    # The policy-independent part (budget - what the knapsack has left) added back to each minimum.
    minima = [least + (budget - left) for least, left, budget in
              zip(smallest_achievable(sack.costs, sack.aggregate), sack.budgets, whole)]
    per_ms = board.clock_mhz * 1e3

    def describe(name: str, least: float, budget: float) -> str:
        if name == "cycles":
            return f"latency {least / per_ms:.4g} ms = {int(least)} cycles (budget {budget / per_ms:.4g} ms)"
        return f"{name} {least / 1024:.1f} KB (budget {budget / 1024:.1f} KB)"

    return (infeasible_message(sack.names, minima, whole, describe)
            + f" (whole firmware on {board.name}, reserve included)")


def _baseline(baseline: Baseline, run: SearchRun, warm: QuantNet) -> tuple[dict[str, Precision], float | None, QuantNet]:
    """A baseline's policy, its selection score and the network its finetune starts from."""
    graph, candidates, sack = run.graph, run.candidates, run.sack
    if baseline.uniform_bits is not None:
        uniform = Precision(baseline.uniform_bits)
        if uniform not in candidates:
            raise UserError(f"{uniform.name} is not a candidate on this board")
        choice = tuple(candidates.index(uniform) for _ in graph.layers)
        over = [name for name, total, budget in zip(sack.names, sack.totals(choice), sack.budgets) if total > budget]
        if over:
            raise UserError(f"{baseline.description} is over the {', '.join(over)} budget")
        return {op.name: uniform for op in graph.layers}, None, warm
    scores, start = baseline.scores(BaselineInputs(warm, run.data, run.config.search, sack, run.seed, run.progress,
                                                   run.context))
    selection = sack.k_best(scores.tolist())[0]
    return _policy_of(graph, candidates, selection), selection.score, start


def save_search(result: SearchResult, out_dir: Path) -> None:
    save_policy(result.policy, out_dir / "policy.json")
    result.record.write(out_dir / "search.json")
    save_quantnet(result.net, result.policy.bits, out_dir)


def save_quantnet(net: QuantNet, bits: dict[str, int], out_dir: Path) -> None:
    """``quantnet.pt``: the weights and the policy they were finetuned for, so that an export of an
    edited ``policy.json`` can tell that the network was not trained for it."""
    buffer = io.BytesIO()
    torch.save({"quantnet": net.state_dict(), "trained_bits": dict(bits)}, buffer)
    write_bytes(out_dir / "quantnet.pt", buffer.getvalue())


@dataclass
class Checkpoint:
    net: QuantNet
    trained_bits: dict[str, int] | None  # None in a checkpoint written before the policy was recorded


def load_quantnet(folder: Path, source: ModelSource, board: Board, data: Dataset) -> Checkpoint:
    """The finetuned network ``save_quantnet`` wrote, rebuilt for ``source`` on ``board``."""
    source.check_input(data.input_shape, data.name)
    path = folder / "quantnet.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["quantnet"]
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `search --out {folder}` first") from None
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a quantnet checkpoint ({exc.__class__.__name__})") from None
    graph = trace(source.module, data.input_shape, output_softmax=source.output_softmax)
    net = QuantNet(graph, source.module, board.precisions)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: does not match model {source.name} on board {board.name} "
                        f"({str(exc).splitlines()[0]})") from None
    return Checkpoint(net.eval(), saved.get("trained_bits"))
