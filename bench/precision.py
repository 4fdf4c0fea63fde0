"""The precision spaces of issues 21 and 23: SMPQ against HAWQ, DMPQ and the uniform policies when
every layer chooses among w2a8 w3a8 w4a8 w8a8 (LUT-2, LUT-3, packed INT4, int8) or any other
candidates (``--candidates``, e.g. w4a8 w8a8 w8a16 with TFLM's 16x8 kernels), post-training.

Per task (``bench/real_tasks.py``'s: DS-CNN on FSDD with speakers held out, ResNet-8 on the
CIFAR-10 folder) the float model is trained once and cached; each seed calibrates the supernet
with the four candidates as ``run_search`` does, scores it once per method (SMPQ's final Shapley
table with the search's players, HAWQ-V3's Hessian criterion, DMPQ's alpha by gradient) and picks,
at each flash budget, with the same exact selector: SMPQ as the search does (the K best valued at
the budget, re-ranked on the validation split: "smpq"), by summed Shapley alone ("smpq/sum") and
valued at the budget alone ("smpq/op"). Each pick's test accuracy is measured on that calibrated
network in TFLM's integer arithmetic, post-training; at the budgets of ``--qat-fractions`` each
method's pick and all-int8 are also QAT-trained from the same calibrated weights with
bench/qat_target.py's schedule (``--qat-epochs`` on the first ``--qat-samples`` training images,
distilled from the float model) and measured again.

Budgets are model bytes, a fraction of the all-int8 model's (30, 40, 50, 65 %): the board's reserve
is taken to hold DECODE's code (``reserve.decode``), which a LUT policy otherwise pays once, about
22 KB; bench/RESULTS.md says what that does to the comparison. With ``--ram`` each flash budget
is also run under RAM budgets: the board's, the all-int8 policy's own RAM (``int8``: tight, an int16
layer fits only where it does not raise the arena's peak) or the all-w8a16 policy's (``w8a16``:
room for every int16 layer); the int16 code (s16 kernels, QUANTIZE) is counted in flash.

    python bench/precision.py --tasks fsdd            # a task at a time; --merge keeps the others
    python bench/precision.py --tasks cifar --qat-fractions 0.4 0.5 --merge
    python bench/precision.py --candidates w4a8 w8a8 w8a16 --ram int8 w8a16 --out bench/int16_search.json
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
from bench.real_tasks import TASKS, add_task_options, float_model, selected, smpq_table  # noqa: E402
from smpq_edge.common.precision import Precision, floor_precision, weight_bits_of, wide_layers  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.common.distributed import SINGLE_PROCESS  # noqa: E402
from smpq_edge.common.errors import UserError  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.search.baselines import dmpq_scores, hawq_scores  # noqa: E402
from smpq_edge.search.budget import Budgets, cost_of  # noqa: E402
from smpq_edge.search.runner import (SearchConfig, at_operating_point, calibrated_supernet, finetune,  # noqa: E402
                                    pick_policy, prepare_run)
from smpq_edge.search.train import TrainConfig, score, seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent
CANDIDATES = ["w2a8", "w3a8", "w4a8", "w8a8"]
RAM_LEVELS = ("board", "int8", "w8a16")  # whose RAM bounds the policies (see the module docstring)
QAT_METHODS = ("smpq", "hawq", "dmpq")  # and the uniform policies; SMPQ's variants stay post-training
_QAT_DONE: dict[tuple, float] = {}  # (seed, policy) -> test accuracy after QAT


def section(candidates: list[str]) -> str:
    return f"## Precision space: {' '.join(candidates)} (bench/precision.py)"


def model_budget(graph, board, fraction: float, ram: str = "board") -> tuple[Budgets, dict]:
    """A whole-firmware budget whose model part is ``fraction`` of the all-int8 model's bytes, and
    whose RAM is the board's or the ``ram`` policy's own (all layers int8, or all w8a16)."""
    int8 = estimate(graph, uniform(graph, 8), board)
    model = int(fraction * int8.model_flash_bytes)
    info = {"fraction": fraction, "model_budget": model, "int8_model": int8.model_flash_bytes, "ram": ram}
    ram_bytes = None
    if ram != "board":
        everywhere = {op.name: Precision(8) if ram == "int8" else Precision.parse(ram) for op in graph.layers}
        ram_bytes = cost_of(graph, everywhere, board, Budgets.of_board(board)).ram_total_bytes
        info["ram_budget"] = ram_bytes
    return Budgets.of_board(board, flash_bytes=model + int8.reserve_flash_bytes, ram_bytes=ram_bytes), info


def measured(net, graph, board, policy: dict[str, Precision], data) -> dict:
    """A policy's post-training test accuracy (TFLM-exact integers) and its predicted costs."""
    net.set_policy(policy)
    accuracy = score(net, data.x_test, data.y_test)
    net.set_policy(None)
    cost = estimate(graph, weight_bits_of(policy), board, wide=wide_layers(policy))
    return {"bits": [policy[op.name].name for op in graph.layers], "test_acc": accuracy,
            "model_flash": cost.model_flash_bytes, "arena": cost.arena_bytes, "cycles": cost.cycles,
            "int16_layers": len(wide_layers(policy))}


def picks(fraction: float, ram: str, seed: int, source, data, board, config, net, scores: dict, args) -> dict:
    budgets, info = model_budget(net.graph, board, fraction, ram)
    try:
        run = prepare_run(source, data, board, budgets, config, seed, False, lambda m: None, SINGLE_PROCESS)
    except UserError as e:  # no policy is that small: recorded, not a crash
        return {"budget": info, "methods": {}, "infeasible": str(e)}
    smpq, at = scores["smpq"]
    bits = {"smpq": pick_policy(run, net, smpq, at)[2], "smpq/sum": selected(run, smpq),
            "smpq/op": dict(zip([op.name for op in net.graph.layers],
                                (run.candidates[k] for k in at_operating_point(run, smpq, at)[0][0].choice))),
            "hawq": selected(run, scores["hawq"])}
    n = min(args.dmpq_samples, len(data.y_train))
    subset = replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
    dmpq, _ = dmpq_scores(copy.deepcopy(net), subset, TrainConfig(epochs=args.dmpq_epochs, lr=args.dmpq_lr,
                                                                  distill=1.0), run.sack, seed + 2, progress=False)
    bits["dmpq"] = selected(run, dmpq)
    for c in board.precisions:
        policy = {op.name: c for op in net.graph.layers}
        if all(run.cost(policy).fits.values()):
            bits[f"all {c.name}" if c.wide else f"uniform{c.weights}"] = policy
    methods = {m: measured(net, net.graph, board, b, data) for m, b in bits.items()}
    if fraction in args.qat_fractions:
        for m, policy in bits.items():
            if m in QAT_METHODS or m.startswith("uniform"):
                methods[m]["qat_acc"] = qat(net, policy, data, source, seed, args)
    return {"budget": info, "methods": methods}


def qat(net, policy: dict[str, Precision], data, source, seed: int, args) -> float:
    """Test accuracy after the QAT of ``bench/qat_target.py`` (``--qat-epochs`` on the first
    ``--qat-samples`` training images, distilled from the float model) from the calibrated weights;
    a policy already trained for this seed is not trained again (the same seed trains it the same)."""
    key = (seed, tuple(policy[op.name].name for op in net.graph.layers))
    if key not in _QAT_DONE:
        subset = replace(data, x_train=data.x_train[:args.qat_samples], y_train=data.y_train[:args.qat_samples])
        schedule = TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, distill=1.0)
        _QAT_DONE[key] = finetune(net, policy, subset, schedule, seed, False, "QAT", teacher=source.module)[2]
    return _QAT_DONE[key]


def task_runs(name: str, board, args, log, save) -> dict:
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
        net = calibrated_supernet(copy.deepcopy(source.module), graph, data, board.precisions, seed)
        run = prepare_run(source, data, board, model_budget(graph, board, 1.0)[0], config, seed, False,
                       lambda m: None, SINGLE_PROCESS)
        scores = {"smpq": smpq_table(run, net, f"{config.shapley.value}:{config.shapley.final_players}",
                                      source.module),
                  "hawq": hawq_scores(net, data, seed)}
        log(f"{name} seed {seed}: scores in {time.perf_counter() - t0:.0f} s")
        out["seeds"][str(seed)] = {budget_key(f, ram): picks(f, ram, seed, source, data, board, config, net, scores, args)
                                   for f in args.fractions for ram in args.ram}
        if args.qat_fractions:
            int8 = {op.name: floor_precision(board.precisions) for op in graph.layers}
            out.setdefault("int8_qat", {})[str(seed)] = qat(net, int8, data, source, seed, args)
        for key, result in out["seeds"][str(seed)].items():
            log(f"{name} seed {seed} budget {key}: " + ", ".join(
                f"{m} {' '.join(r['bits'])} {r['test_acc']:.4f}" + (f" QAT {r['qat_acc']:.4f}" if "qat_acc" in r else "")
                for m, r in result["methods"].items()))
        save(out)
    return out


def budget_key(fraction: float, ram: str) -> str:
    return str(fraction) if ram == "board" else f"{fraction} RAM {ram}"


def budget_text(info: dict) -> str:
    """A budget for the tables: "70% (30,115 B)", with "RAM of int8 (61,440 B)" where one is set."""
    text = f"{info['fraction']:.0%} ({info['model_budget']:,} B)"
    return text if info.get("ram", "board") == "board" else text + f", RAM of {info['ram']} ({info['ram_budget']:,} B)"


def tables(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}` ({payload['date']}, {payload['machine']}; {payload['wall_s']:.0f} s). "
             f"Board {payload['board']} (CMSIS-NN), its reserve taken to hold DECODE's code. Each seed's calibrated "
             "supernet; every pick's test accuracy in TFLM's integer arithmetic, post-training and, where a column "
             "says so, after the QAT of bench/qat_target.py from the same calibrated weights. "
             f"Candidates {' '.join(payload.get('candidates', CANDIDATES))}."]
    for name, task in payload["tasks"].items():
        seeds = task["seeds"]
        fractions = list(next(iter(seeds.values())))
        methods = list(dict.fromkeys(m for s in seeds.values() for f in s.values() for m in f["methods"]))
        lines += ["", f"### {name}: {task['model']}, float test accuracy {task['float_test_acc']:.2%}", ""]
        if task.get("int8_qat"):
            qat8 = np.array(list(task["int8_qat"].values()))
            lines += [f"All-int8 after the same QAT: {qat8.mean():.2%} ± {qat8.std():.2%} ({len(qat8)} seeds).", ""]
        lines += ["| budget (of int8 model) | method | test accuracy, mean ± std | after QAT | model bytes | arena | "
                  "cycles | int16 layers | SMPQ − method, paired | after QAT |", "|---|---|---|---|---|---|---|---|---|---|"]
        for f in fractions:
            first = next(iter(seeds.values()))[f]
            if "infeasible" in first:
                lines.append(f"| {budget_text(first['budget'])} | no policy fits | | | | | | | | |")
            for m in methods:
                lines += method_row(seeds, f, m, budget_text(first["budget"]))
    return "\n".join(lines)


def method_row(seeds: dict, f: str, m: str, budget: str) -> list[str]:
    """One table row: method ``m`` at budget ``f`` over the seeds, and SMPQ's paired lead over it."""
    rows = [s[f]["methods"][m] for s in seeds.values() if m in s[f]["methods"]]
    if not rows:
        return []

    def spread(key: str) -> str:
        acc = np.array([r[key] for r in rows if key in r])
        return f"{acc.mean():.2%} ± {acc.std():.2%}" if len(acc) else ""

    def lead(key: str) -> str:
        both = [s[f]["methods"] for s in seeds.values() if m in s[f]["methods"]]
        if m == "smpq" or len(rows) < len(seeds) or not all(key in b[m] and key in b["smpq"] for b in both):
            return ""
        return paired(np.array([b["smpq"][key] - b[m][key] for b in both]) * 100)

    return [f"| {budget} | {m} ({len(rows)} seeds) | {spread('test_acc')} | {spread('qat_acc')} "
            f"| {np.mean([r['model_flash'] for r in rows]):,.0f} | {np.mean([r['arena'] for r in rows]):,.0f} "
            f"| {np.mean([r['cycles'] for r in rows]):,.0f} | {np.mean([r.get('int16_layers', 0) for r in rows]):.1f} "
            f"| {lead('test_acc')} | {lead('qat_acc')} |"]


def plot(payload: dict, path: Path) -> None:
    """Per task, each method's front: its mean test accuracy over the seeds at each budget against
    its picks' mean cost (solid: post-training; dashed, hollow: after QAT where it was run)."""
    tasks = payload["tasks"]
    # What int16 activations spend is arena; what fewer weight bits save is model bytes.
    wide = any(Precision.parse(c).wide for c in payload.get("candidates", CANDIDATES))
    x, x_label = ("arena", "arena bytes (predicted)") if wide else ("model_flash", "model bytes (predicted)")
    figure, axes = task_axes(len(tasks))
    for axis, (name, task) in zip(axes, tasks.items()):
        seeds = list(task["seeds"].values())
        methods = dict.fromkeys(m for s in seeds for f in s.values() for m in f["methods"])
        for number, m in enumerate(methods):
            colour = f"C{number % 10}"
            for key, style in (("test_acc", dict(marker="o", linestyle="-")),
                               ("qat_acc", dict(marker="s", linestyle="--", markerfacecolor="none"))):
                points = sorted((np.mean([s[f]["methods"][m][x] for s in seeds]),
                                 100 * np.mean([s[f]["methods"][m][key] for s in seeds]))
                                for f in seeds[0] if all(key in s[f]["methods"].get(m, {}) for s in seeds))
                if points:
                    axis.plot(*zip(*points), color=colour, markersize=5, alpha=0.85,
                              label=m if key == "test_acc" else f"{m}, after QAT", **style)
        if task.get("int8_qat"):
            axis.axhline(100 * np.mean(list(task["int8_qat"].values())), color="grey", linestyle=":",
                         label="all-int8 after QAT")
        axis.axhline(100 * task["float_test_acc"], color="black", linestyle="--", linewidth=0.8, label="float")
        axis.set_title(f"{name} ({task['model']}): mean over {len(seeds)} seeds at each budget")
        axis.set_xlabel(x_label)
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(top=min(100, axis.get_ylim()[1]))
        axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_options(p, HERE / "precision.json")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.65])
    p.add_argument("--candidates", nargs="+", default=CANDIDATES)
    p.add_argument("--ram", nargs="+", default=["board"], choices=RAM_LEVELS)
    p.add_argument("--dmpq-epochs", type=int, default=2)
    p.add_argument("--dmpq-lr", type=float, default=1e-3)
    p.add_argument("--dmpq-samples", type=int, default=10000)
    p.add_argument("--qat-fractions", nargs="*", type=float, default=[],
                   help="budgets whose picks (and all-int8) are also QAT-trained, as bench/qat_target.py does")
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--qat-samples", type=int, default=10000)
    p.add_argument("--qat-lr", type=float, default=SearchConfig().for_pretrained().finetune.lr)
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--merge", action="store_true", help="keep the other tasks of an earlier --out (same candidates)")
    args = p.parse_args()
    log = timed_log(args.threads)
    started = time.perf_counter()
    if args.tables_only:
        payload = json.loads(Path(args.out).read_text())
    else:
        base = load_board(args.board)
        board = base.with_candidates(args.candidates).model_copy(
            update={"reserve": base.reserve.model_copy(update={"decode": True})})
        Path(args.work).mkdir(parents=True, exist_ok=True)
        command = ("python bench/precision.py " + " ".join(sys.argv[1:])).strip()
        earlier = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else None
        if earlier and earlier.get("candidates") != args.candidates:
            sys.exit(f"--merge: {args.out} holds candidates {earlier.get('candidates')}, not {args.candidates}")
        payload = {"command": f"{earlier['command']}; {command}" if earlier else command,
                   "date": datetime.date.today().isoformat(),
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                   "board": board.name, "candidates": args.candidates,
                   "tasks": {name: task for name, task in (earlier or {}).get("tasks", {}).items()
                             if name not in args.tasks}}
        started -= earlier["wall_s"] if earlier else 0.0
        def save(task: dict) -> None:  # after every seed, so that a long run's seeds so far are kept
            payload["tasks"][task["task"]] = task
            payload["wall_s"] = time.perf_counter() - started
            Path(args.out).write_text(json.dumps(payload))

        for name in args.tasks:
            save(task_runs(name, board, args, log, save))
    text = tables(payload)
    plot(payload, Path(args.out).with_suffix(".png"))
    print(text)
    if not args.no_write:
        write_section(section(payload.get("candidates", CANDIDATES)), text + f"\n\n![accuracy against cost]({Path(args.out).with_suffix('.png').name})")


if __name__ == "__main__":
    main()
