"""The precision space of issue 21: SMPQ against HAWQ-V3, DMPQ and the uniform policies when every
layer chooses among w2a8 w3a8 w4a8 w8a8 (LUT-2, LUT-3, packed INT4, int8), post-training.

Per task (``bench/real_tasks.py``'s: DS-CNN on FSDD with speakers held out, ResNet-8 on the
CIFAR-10 folder) the float model is trained once and cached; each seed calibrates the supernet
with the four candidates as ``run_search`` does, scores it once per method (SMPQ's final Shapley
table with the search's players, HAWQ-V3's Hessian criterion, DMPQ's alpha by gradient) and picks,
at each flash budget, with the same exact selector: SMPQ as the search does (the K best re-ranked
on the validation split) and by summed Shapley alone. Each pick's test accuracy is measured on
that calibrated network in TFLM's integer arithmetic: post-training, no QAT (the QAT regime is
not run here yet).

Budgets are model bytes, a fraction of the all-int8 model's (30, 40, 50, 65 %): the board's reserve
is taken to hold DECODE's code (``reserve.decode``), which a LUT policy otherwise pays once, about
22 KB; bench/RESULTS.md says what that does to the comparison.

    python bench/precision.py --tasks fsdd            # a task at a time; --merge as real_tasks.py
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import paired, save_figure, task_axes, timed_log, write_section  # noqa: E402
from bench.real_tasks import TASKS, add_task_options, float_model, selected, smpq_scores  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.common.distributed import SINGLE_PROCESS  # noqa: E402
from smpq_edge.common.errors import UserError  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.search.baselines import dmpq_scores, hawq_scores  # noqa: E402
from smpq_edge.search.budget import Budgets  # noqa: E402
from smpq_edge.search.runner import SearchConfig, pick_policy, prepare_run, calibrated_supernet  # noqa: E402
from smpq_edge.search.train import TrainConfig, score, seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Precision space: w2a8 w3a8 w4a8 w8a8 (bench/precision.py)"
CANDIDATES = ["w2a8", "w3a8", "w4a8", "w8a8"]


def model_budget(graph, board, fraction: float) -> tuple[Budgets, dict]:
    """A whole-firmware budget whose model part is ``fraction`` of the all-int8 model's bytes."""
    int8 = estimate(graph, uniform(graph, 8), board)
    model = int(fraction * int8.model_flash_bytes)
    info = {"fraction": fraction, "model_budget": model, "int8_model": int8.model_flash_bytes}
    return Budgets.of_board(board, flash_bytes=model + int8.reserve_flash_bytes), info


def measured(net, graph, board, bits: dict[str, int], data) -> dict:
    """A policy's post-training test accuracy (TFLM-exact integers) and its predicted costs."""
    net.set_policy(bits)
    accuracy = score(net, data.x_test, data.y_test)
    net.set_policy(None)
    cost = estimate(graph, bits, board)
    return {"bits": [bits[op.name] for op in graph.layers], "test_acc": accuracy,
            "model_flash": cost.model_flash_bytes, "arena": cost.arena_bytes, "cycles": cost.cycles}


def picks(fraction: float, seed: int, source, data, board, config, net, scores: dict, args) -> dict:
    budgets, info = model_budget(net.graph, board, fraction)
    try:
        run = prepare_run(source, data, board, budgets, config, seed, False, lambda m: None, SINGLE_PROCESS)
    except UserError as e:  # no policy is that small: recorded, not a crash
        return {"budget": info, "methods": {}, "infeasible": str(e)}
    bits = {"smpq": pick_policy(run, net, scores["smpq"])[2], "smpq/sum": selected(run, scores["smpq"]),
            "hawq": selected(run, scores["hawq"])}
    n = min(args.dmpq_samples, len(data.y_train))
    subset = replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
    dmpq, _ = dmpq_scores(copy.deepcopy(net), subset, TrainConfig(epochs=args.dmpq_epochs, lr=args.dmpq_lr,
                                                                  distill=1.0), run.sack, seed + 2, progress=False)
    bits["dmpq"] = selected(run, dmpq)
    for b in board.weight_bits:
        policy = uniform(net.graph, b)
        if all(run.cost(policy).fits.values()):
            bits[f"uniform{b}"] = policy
    return {"budget": info, "methods": {m: measured(net, net.graph, board, b, data) for m, b in bits.items()}}


def task_runs(name: str, board, args, log) -> dict:
    task = TASKS[name]
    data = task.dataset()
    source = float_model(name, task, data, Path(args.work), log)
    graph = trace(source.module, data.input_shape)
    config = SearchConfig().post_training_only()
    out = {"task": name, "model": task.model, "data": data.summary(), "seeds": {},
           "float_test_acc": score(source.module, data.x_test, data.y_test)}
    for seed in args.seeds:
        t0 = time.perf_counter()
        seed_everything(seed)
        net = calibrated_supernet(copy.deepcopy(source.module), graph, data, board.weight_bits, seed)
        run = prepare_run(source, data, board, model_budget(graph, board, 1.0)[0], config, seed, False,
                       lambda m: None, SINGLE_PROCESS)
        scores = {"smpq": smpq_scores(run, net, f"{config.shapley.value}:{config.shapley.final_players}",
                                      source.module),
                  "hawq": hawq_scores(net, data, seed)}
        log(f"{name} seed {seed}: scores in {time.perf_counter() - t0:.0f} s")
        out["seeds"][str(seed)] = {str(f): picks(f, seed, source, data, board, config, net, scores, args)
                                   for f in args.fractions}
        for f, result in out["seeds"][str(seed)].items():
            log(f"{name} seed {seed} budget {float(f):.0%}: " + ", ".join(
                f"{m} {''.join(map(str, r['bits']))} {r['test_acc']:.4f}" for m, r in result["methods"].items()))
    return out


def tables(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}` ({payload['date']}, {payload['machine']}; {payload['wall_s']:.0f} s). "
             f"Board {payload['board']} (CMSIS-NN), its reserve taken to hold DECODE's code. Post-training only: "
             "each seed's calibrated supernet, every pick's test accuracy in TFLM's integer arithmetic, no QAT. "
             "Bits per layer as 2/3/4/8."]
    for name, task in payload["tasks"].items():
        seeds = task["seeds"]
        fractions = list(next(iter(seeds.values())))
        methods = list(dict.fromkeys(m for s in seeds.values() for f in s.values() for m in f["methods"]))
        lines += ["", f"### {name}: {task['model']}, float test accuracy {task['float_test_acc']:.2%}", "",
                  "| budget (of int8 model) | method | test accuracy, mean ± std | model bytes | arena | cycles | "
                  "SMPQ − method, paired |", "|---|---|---|---|---|---|---|"]
        for f in fractions:
            first = next(iter(seeds.values()))[f]
            if "infeasible" in first:
                lines.append(f"| {float(f):.0%} ({first['budget']['model_budget']:,} B) | no policy fits | | | | | |")
            for m in methods:
                rows = [s[f]["methods"][m] for s in seeds.values() if m in s[f]["methods"]]
                if not rows:
                    continue
                acc = np.array([r["test_acc"] for r in rows])
                difference = ""
                if m != "smpq" and len(rows) == len(seeds):
                    difference = paired(np.array([s[f]["methods"]["smpq"]["test_acc"] - s[f]["methods"][m]["test_acc"]
                                                  for s in seeds.values()]) * 100)
                budget = next(iter(seeds.values()))[f]["budget"]["model_budget"]
                lines.append(f"| {float(f):.0%} ({budget:,} B) "
                             f"| {m} ({len(rows)} seeds) | {acc.mean():.2%} ± {acc.std():.2%} "
                             f"| {np.mean([r['model_flash'] for r in rows]):,.0f} | "
                             f"{np.mean([r['arena'] for r in rows]):,.0f} | {np.mean([r['cycles'] for r in rows]):,.0f} "
                             f"| {difference} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    tasks = payload["tasks"]
    figure, axes = task_axes(len(tasks))
    for axis, (name, task) in zip(axes, tasks.items()):
        for m in dict.fromkeys(m for s in task["seeds"].values() for f in s.values() for m in f["methods"]):
            points = [(r["model_flash"], r["test_acc"] * 100) for s in task["seeds"].values() for f in s.values()
                      for mm, r in f["methods"].items() if mm == m]
            axis.scatter(*zip(*points), label=m, s=18, alpha=0.7)
        axis.set_title(f"{name} ({task['model']}): post-training, every seed and budget")
        axis.set_xlabel("model bytes (predicted)")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_options(p, HERE / "precision.json")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.65])
    p.add_argument("--dmpq-epochs", type=int, default=2)
    p.add_argument("--dmpq-lr", type=float, default=1e-3)
    p.add_argument("--dmpq-samples", type=int, default=10000)
    p.add_argument("--tables-only", action="store_true")
    args = p.parse_args()
    log = timed_log(args.threads)
    started = time.perf_counter()
    if args.tables_only:
        payload = json.loads(Path(args.out).read_text())
    else:
        base = load_board(args.board)
        board = base.with_candidates(CANDIDATES).model_copy(
            update={"reserve": base.reserve.model_copy(update={"decode": True})})
        Path(args.work).mkdir(parents=True, exist_ok=True)
        payload = {"command": ("python bench/precision.py " + " ".join(sys.argv[1:])).strip(),
                   "date": datetime.date.today().isoformat(),
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   "board": board.name, "tasks": {}}
        for name in args.tasks:
            payload["tasks"][name] = task_runs(name, board, args, log)
            payload["wall_s"] = time.perf_counter() - started
            Path(args.out).write_text(json.dumps(payload))
    text = tables(payload)
    plot(payload, Path(args.out).with_suffix(".png"))
    print(text)
    if not args.no_write:
        write_section(SECTION, text + f"\n\n![accuracy against model bytes]({Path(args.out).with_suffix('.png').name})")


if __name__ == "__main__":
    main()
