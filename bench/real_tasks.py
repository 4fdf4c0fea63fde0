"""Real tasks: how well SMPQ picks layers on ResNet-8 / CIFAR-10 and DS-CNN / FSDD (speakers held
out), against DMPQ, HAWQ and the uniform policies, at three flash budgets between all-int4 and
all-int8 and several seeds.

Two regimes:

* **Post-training** (``--ptq-tasks``, both by default). The float model is trained once per task
  (seed 0, cached in ``--work``); each seed then calibrates the supernet as ``run_search`` does and
  picks as the post-training search (``SearchConfig.post_training_only()``: no weight training)
  would: SMPQ's final Shapley table for each ``--variants`` (coalition value : players), not
  re-ranked ("/sum"), or with the K best re-ranked on the whole validation split ("/val-all",
  what the search does); HAWQ's and the uniform picks. DMPQ
  learns alpha by gradient, so its pick comes from ``dmpq_scores`` on a copy of the same
  calibrated network (``--dmpq-epochs`` over ``--dmpq-samples`` training samples). The **oracle** scores every policy (2^10 for both models)
  on that calibrated network, with TFLM-exact integer arithmetic for the chosen bit-widths, on the
  first ``--oracle-samples`` held-out test samples: each method's regret is the best feasible
  oracle accuracy minus its pick's, and its rank is 1 + the feasible policies strictly better.
* **QAT** (``--qat-tasks``, FSDD by default): ``run_search`` from the cached float model with SMPQ
  and every baseline trained identically (``SearchConfig.quick()``'s schedule x ``--epochs-scale``,
  as ``build --quick`` trains an example model), mean ± std over seeds and paired differences.

    python bench/real_tasks.py                                  # every part, in one process
    python bench/real_tasks.py --ptq-tasks fsdd --qat-tasks     # a quick look
    python bench/real_tasks.py --merge a.json b.json            # parts run side by side, as in RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import timed_log, write_section  # noqa: E402
from bench.search_quality import flash_budget, pretrained  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.common.distributed import SINGLE_PROCESS  # noqa: E402
from smpq_edge.search.baselines import dmpq_scores, hawq_scores  # noqa: E402
from smpq_edge.search.runner import SearchConfig, pick_policy, prepare_run, calibrated_supernet, run_search  # noqa: E402
from smpq_edge.search.smpq import (CoalitionValue, estimate_shapley, monotone_scores, shapley_scores, valued_at,  # noqa: E402
                                   validation_batch, value_target)
from smpq_edge.search.train import TrainConfig, score, seed_everything, train  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"
SECTION = "## Real tasks (bench/real_tasks.py)"


@dataclass(frozen=True)
class RealTask:
    model: str
    data: Path
    load: dict = field(default_factory=dict)  # load_dataset's folder options
    float_epochs: int = 12
    float_lr: float = 3e-3

    def dataset(self):
        return load_dataset(self.data, 0, **self.load)


TASKS = {
    "cifar": RealTask("resnet8", DATA / "cifar10" / "train", float_epochs=8),
    "fsdd": RealTask("dscnn_kws", DATA / "fsdd" / "recordings",
                     {"name_pattern": "{label}_{group}_{index}", "split_by": "group"}, float_epochs=40),
}


def add_task_options(p, out: Path, tasks: tuple[str, ...] = ("fsdd", "cifar")) -> None:
    """The options the real-task benches share: tasks, seeds, board, threads, cache and output."""
    p.add_argument("--tasks", nargs="+", default=list(tasks), choices=sorted(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--board", default="nucleo-l4r5zi")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work", default="/tmp/smpq_real_tasks", help="float models are cached here")
    p.add_argument("--out", default=str(out))
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")


def float_model(name: str, task: RealTask, data, work: Path, log):
    """The float model, trained once (seed 0) and cached: every seed's search starts from it."""
    path = work / f"{name}_float_{task.float_epochs}ep.pt"
    source = load_model(task.model, num_classes=data.num_classes)
    if path.exists():
        source.module.load_state_dict(torch.load(path))
    else:
        t0 = time.perf_counter()
        seed_everything(0)
        train(source.module, data, TrainConfig(epochs=task.float_epochs, lr=task.float_lr), 0, desc="float",
              progress=False)
        torch.save(source.module.state_dict(), path)
        log(f"{name}: float model trained in {time.perf_counter() - t0:.0f} s")
    source.module.eval()
    return pretrained(source)


def policy_masks(n_layers: int, n_candidates: int) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Every policy (one candidate index per layer) and its coalition mask (one player per layer)."""
    choices = list(itertools.product(range(n_candidates), repeat=n_layers))
    masks = np.zeros((len(choices), n_layers * n_candidates), dtype=bool)
    for row, choice in enumerate(choices):
        masks[row, [i * n_candidates + k for i, k in enumerate(choice)]] = True
    return choices, masks


def oracle(net, graph, board, x: np.ndarray, y: np.ndarray, chunk: int = 1000) -> list[dict]:
    """Test accuracy of every policy on the calibrated network, and its layers' and model's flash."""
    candidates = net.candidates
    choices, masks = policy_masks(len(graph.layers), len(candidates))
    hits = np.zeros(len(masks))
    for start in range(0, len(y), chunk):  # chunks bound the prefix tree's activations in memory
        part = slice(start, start + chunk)
        hits += CoalitionValue(net, x[part], y[part])(masks) * len(y[part])
    net.set_policy(None)
    rows = []
    for choice, correct in zip(choices, hits):
        bits = {op.name: candidates[k] for op, k in zip(graph.layers, choice)}
        report = estimate(graph, bits, board)
        rows.append({"bits": [candidates[k] for k in choice], "acc": correct / len(y),
                     "layer_flash": sum(layer.flash_bytes for layer in report.layers),
                     "model_flash": report.model_flash_bytes})
    return rows


def smpq_table(run, net, variant: str, teacher):
    """SMPQ's selection scores for coalition value and players ``variant`` ("top1:candidates",
    "kl:layers", "kl:layers:sampled" for layer players always sampled, never enumerated): the
    search's final Shapley table on ``net`` with the monotone prior, and the same scores valued at
    a policy (``smpq.valued_at``, None for candidate players), as ``pick_policy`` takes them. They
    do not depend on the budget, so each seed computes them once."""
    value, players, *how = variant.split(":")
    shapley = run.config.shapley
    x_val, y_val = validation_batch(run.data, shapley.val_samples, run.seed)
    table = estimate_shapley(net, x_val, value_target(value, x_val, y_val, teacher), shapley.final_permutations,
                             shapley.truncation, run.seed, value=value, players=players,
                             exact_layers=shapley.exact_layers and how != ["sampled"])
    scores = monotone_scores(shapley_scores(table, len(run.graph.layers), len(net.candidates)), net.candidates)
    return scores, valued_at(table, net.candidates, replace(shapley, value=value, final_players=players))


def selected(run, scores: np.ndarray) -> dict[str, int]:
    """The budgeted selector's policy for per-(layer, candidate) scores, as every baseline uses it."""
    sack = run.sack
    choice = sack.k_best(scores.tolist())[0].choice
    return {op.name: run.candidates[k] for op, k in zip(run.graph.layers, choice)}


def picks_at(fraction: float, seed: int, source, data, board, config, net, scores: dict, args) -> dict:
    """Every method's policy at one budget: SMPQ's variants (K best re-ranked on validation, as the
    search does), HAWQ's and the uniform ones on the calibrated net, DMPQ's from its own search."""
    budgets, info = flash_budget(net.graph, board, fraction)
    run = prepare_run(source, data, board, budgets, config, seed, False, lambda m: None, SINGLE_PROCESS)
    bits, seconds = {}, {}
    for method, method_scores in scores.items():
        t0 = time.perf_counter()
        if method.startswith("smpq"):
            # As the search picks (the K best valued at the budget, re-ranked on the whole
            # validation split), and the best summed Shapley alone.
            table, at = method_scores
            bits[f"{method}/sum"] = selected(run, table)
            bits[f"{method}/val-all"] = pick_policy(run, net, table, at)[2]
        else:
            bits[method] = selected(run, method_scores)
        seconds[method] = time.perf_counter() - t0
    for method in ("uniform8", "uniform4"):
        policy = uniform(net.graph, int(method[-1]))
        if all(run.cost(policy).fits.values()):
            bits[method] = policy
    t0 = time.perf_counter()
    n = min(args.dmpq_samples, len(data.y_train))
    subset = replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
    search = TrainConfig(epochs=args.dmpq_epochs, lr=args.dmpq_lr, distill=1.0)
    dmpq, _ = dmpq_scores(copy.deepcopy(net), subset, search, run.sack, run.seed + 2, progress=False)
    bits["dmpq"], seconds["dmpq"] = selected(run, dmpq), time.perf_counter() - t0
    return {"budget": info, "bits": {m: [b[op.name] for op in net.graph.layers] for m, b in bits.items()},
            "seconds": seconds}


def ptq_runs(name: str, task: RealTask, source, data, board, args, log) -> dict:
    graph = trace(source.module, data.input_shape)
    n = min(args.oracle_samples, len(data.y_test))
    out = {"task": name, "model": task.model, "data": data.summary(), "oracle_samples": n, "seeds": {},
           "float_acc": score(source.module, data.x_test[:n], data.y_test[:n]), "variants": args.variants}
    config = SearchConfig().post_training_only()
    config = replace(config, shapley=replace(config.shapley, val_samples=args.val_samples,
                                             final_permutations=args.final_permutations))
    for seed in args.seeds:
        t0 = time.perf_counter()
        seed_everything(seed)
        net = calibrated_supernet(copy.deepcopy(source.module), graph, data, board.weight_bits, seed)
        rows = oracle(net, graph, board, data.x_test[:n], data.y_test[:n])
        log(f"{name} seed {seed}: oracle over {len(rows)} policies in {time.perf_counter() - t0:.0f} s")
        run = prepare_run(source, data, board, flash_budget(graph, board, 1.0)[0], config, seed, False, lambda m: None,
                       SINGLE_PROCESS)
        scores, seconds = {}, {}
        for method in [f"smpq[{v}]" for v in args.variants] + ["hawq"]:
            t1 = time.perf_counter()
            scores[method] = (smpq_table(run, net, method[5:-1], source.module) if method.startswith("smpq")
                              else hawq_scores(net, data, seed))
            seconds[method] = time.perf_counter() - t1
            log(f"{name} seed {seed}: {method} scores in {seconds[method]:.0f} s")
        picks = {}
        for fraction in args.fractions:
            picks[str(fraction)] = picks_at(fraction, seed, source, data, board, config, net, scores, args)
            log(f"{name} seed {seed} f={fraction}: " + ", ".join(
                f"{m} {''.join(str(b // 4) for b in v)}" for m, v in picks[str(fraction)]["bits"].items()))
        out["seeds"][str(seed)] = {"oracle": rows, "picks": picks, "score_seconds": seconds}
    return out


def qat_runs(name: str, task: RealTask, source, data, board, args, log) -> dict:
    graph = trace(source.module, data.input_shape)
    config = SearchConfig.quick()  # the float model was trained here, on this data: the quick build's rates

    def scaled(c: TrainConfig) -> TrainConfig:
        return replace(c, epochs=max(1, round(c.epochs * args.epochs_scale)))

    config = replace(config, warmup=scaled(config.warmup), search=scaled(config.search),
                     finetune=scaled(config.finetune),
                     shapley=replace(config.shapley, value=args.value or config.shapley.value,
                                     val_samples=args.val_samples))
    runs = []
    for seed in args.seeds:
        for fraction in args.fractions:
            budgets, info = flash_budget(graph, board, fraction)
            t0 = time.perf_counter()
            record = run_search(source, data, board, budgets=budgets, config=config, seed=seed, progress=False,
                                log=lambda m: None).record.model_dump(mode="json")
            methods = {m["method"]: {"bits": [m["bits"][op.name] for op in graph.layers],
                                     "test_acc": m["test_acc"], "model_flash": m["cost"]["model_flash_bytes"]}
                       for m in record["methods"]}
            runs.append({"seed": seed, "fraction": fraction, "budget": info, "methods": methods,
                         "float_test_acc": record["reference"]["float"]["test_acc"],
                         "ptq_int8_test_acc": record["reference"]["ptq_int8"]["test_acc"],
                         "seconds": time.perf_counter() - t0})
            log(f"{name} QAT seed {seed} f={fraction}: " + ", ".join(
                f"{m} {v['test_acc']:.4f}" for m, v in methods.items()) + f" ({runs[-1]['seconds']:.0f} s)")
    return {"task": name, "model": task.model, "config": config.to_dict(), "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ptq-tasks", nargs="*", default=["fsdd", "cifar"], choices=sorted(TASKS))
    p.add_argument("--qat-tasks", nargs="*", default=["fsdd"], choices=sorted(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.5, 0.8])
    p.add_argument("--oracle-samples", type=int, default=2500, help="held-out test samples the oracle scores on")
    p.add_argument("--variants", nargs="+", default=["kl:layers", "top1:candidates"],
                   help="post-training SMPQ variants, VALUE:PLAYERS[:sampled] (ShapleyConfig.value and "
                        ".final_players; ':sampled' never enumerates layer players exactly)")
    p.add_argument("--dmpq-epochs", type=int, default=2)
    p.add_argument("--dmpq-lr", type=float, default=1e-3, help="DMPQ's alpha search (weights and alpha)")
    p.add_argument("--dmpq-samples", type=int, default=10000, help="training samples of DMPQ's alpha search")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="QAT: multiplies the quick schedule's epochs")
    p.add_argument("--value", choices=("top1", "soft", "kl"), help="QAT: SMPQ's coalition value (default: the search's)")
    p.add_argument("--val-samples", type=int, default=512, help="validation samples SMPQ scores coalitions on")
    p.add_argument("--final-permutations", type=int, default=96, help="post-training: permutations of SMPQ's table")
    p.add_argument("--board", default="nucleo-l4r5zi")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work", default="/tmp/smpq_real_tasks", help="float models are cached here")
    p.add_argument("--out", default=str(HERE / "real_tasks.json"))
    p.add_argument("--tables-only", action="store_true", help="run nothing: tables and plots from --out")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine these outputs (e.g. tasks run in parallel) into --out, tables and plot")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args()
    started = time.perf_counter()
    log = timed_log(args.threads)

    if args.merge:
        payload = merged([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge])
        Path(args.out).write_text(json.dumps(payload), encoding="utf-8")
    elif args.tables_only:
        payload = json.loads(Path(args.out).read_text(encoding="utf-8"))
    else:
        payload = measure(args, log)
        payload["wall_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(payload), encoding="utf-8")
    from bench.real_tasks_report import plot, tables

    text = tables(payload)
    plot(payload, Path(args.out).with_suffix(".png"))
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


def merged(parts: list[dict]) -> dict:
    """Runs made in parallel (a task, a regime or a seed each) as one payload: their commands and
    dates, the longest wall time, and the union of their tasks and seeds (a later part's seeds of a
    task replace an earlier part's)."""
    payload = {**parts[0], "command": " ; ".join(part["command"] for part in parts),
               "date": " and ".join(sorted({part["date"] for part in parts})),
               "wall_s": max(part.get("wall_s", 0) for part in parts), "ptq": {}, "qat": {}, "merged": len(parts)}
    for part in parts:
        for name, task in part["ptq"].items():  # one task's seeds may come from several parts
            seeds = {**payload["ptq"].get(name, {}).get("seeds", {}), **task["seeds"]}
            payload["ptq"][name] = {**task, "seeds": dict(sorted(seeds.items(), key=lambda kv: int(kv[0])))}
        payload["qat"].update(part["qat"])
    return payload


def measure(args, log) -> dict:
    board = load_board(args.board)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = ("python bench/real_tasks.py " + " ".join(sys.argv[1:])).strip()
    payload = {"command": command, "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "board": board.name, "args": vars(args), "ptq": {}, "qat": {}}
    for name in dict.fromkeys(args.ptq_tasks + args.qat_tasks):
        task = TASKS[name]
        data = task.dataset()
        log(f"{name}: {data.summary()['train']} / {data.summary()['val']} / {data.summary()['test']} samples")
        source = float_model(name, task, data, work, log)
        if name in args.ptq_tasks:
            payload["ptq"][name] = ptq_runs(name, task, source, data, board, args, log)
        if name in args.qat_tasks:
            payload["qat"][name] = qat_runs(name, task, source, data, board, args, log)
        Path(args.out).write_text(json.dumps(payload), encoding="utf-8")  # what is done so far
    return payload


if __name__ == "__main__":
    main()
