"""Where int16 activations pay (issue 23, before the search chooses them): post-training test
accuracy of w8a16 layers set by hand, against all-int8, with what each costs on the board.

Per task (``bench/real_tasks.py``'s: DS-CNN on FSDD with speakers held out, ResNet-8 on the
CIFAR-10 folder) the float model is trained once and cached; each seed calibrates the activation
ranges as ``run_search`` does (a seed's own calibration samples), then scores, in TFLM's integer
arithmetic (the fake-quant network that the emulator matches byte for byte), the policies with
int8 weights everywhere and int16 activations on: no layer, every layer, each layer alone, the
first layer, the last, and both. Costs are the cost model's, fitted on the firmware by
``bench/cycles.py`` (16x8 kernels and QUANTIZE included): model bytes, arena and cycles on the
board, and the firmware's runtime flash (the s16 kernels and QUANTIZE it links).

    python bench/int16.py --tasks fsdd            # a task at a time; --merge keeps the others
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import paired, save_figure, task_axes, timed_log, write_section  # noqa: E402
from bench.real_tasks import TASKS, add_task_options, float_model  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.search.runner import calibrated_supernet  # noqa: E402
from smpq_edge.search.train import score, seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Where int16 activations pay: w8a16 layers by hand, post-training (bench/int16.py)"
# Written by hand from the run of 2026-12-07; rerunning the bench keeps it under the new tables.
READING = """**Reading (2026-12-07).** On both tasks int8 post-training quantisation of the activations is \
already within 0.07 points of the float model (FSDD DS-CNN 63.93 % against 64.00 %, ResNet-8 72.56 % \
against 72.60 %), so int16 activations have almost nothing to buy back, and they did not: the best \
single choice, the DS-CNN's first layer, gained +0.33 ± 0.34 points (2 seeds better, 1 equal) for \
+8.2 KB of arena (22.6 to 30.7 KB) and +6.5 % cycles; every ResNet-8 choice stayed within ±0.04 \
points, at +14 to +49 KB of arena. All-w8a16 costs +77 % (DS-CNN) and +86 % (ResNet-8) arena and \
+107 % and +24 % cycles. What int16 costs is large and now priced; where it pays has to be a model \
whose int8 activations lose accuracy (wide dynamic range, raw audio features, a classifier with \
outlying logits), which neither task here is. The search over w8a16 (the section "Precision space: \
w4a8 w8a8 w8a16" below) chooses int16 layers only where the RAM budget has room for them, and on \
these tasks they buy no measurable accuracy there either."""


def wide_sets(layers: list[str]) -> dict[str, frozenset[str]]:
    """The policies measured: name -> the layers on int16 activations (weights int8 everywhere)."""
    sets = {"int8": frozenset(), "all w8a16": frozenset(layers), f"first ({layers[0]})": frozenset(layers[:1]),
            f"last ({layers[-1]})": frozenset(layers[-1:]), "first + last": frozenset({layers[0], layers[-1]})}
    sets.update({f"only {name}": frozenset({name}) for name in layers[1:-1]})
    return sets


def measured(net, graph, board, wide: frozenset[str], data) -> dict:
    bits = uniform(graph, 8)
    net.set_policy(bits)
    net.set_activation_bits(wide)
    accuracy = score(net, data.x_test, data.y_test)
    net.set_activation_bits(frozenset())
    cost = estimate(graph, bits, board, wide=wide)
    return {"test_acc": accuracy, "model_flash": cost.model_flash_bytes, "arena": cost.arena_bytes,
            "cycles": cost.cycles, "runtime_flash": cost.runtime_flash_bytes}


def task_runs(name: str, board, args, log) -> dict:
    task = TASKS[name]
    data = task.dataset()
    source = float_model(name, task, data, Path(args.work), log)
    graph = trace(source.module, data.input_shape)
    layers = [op.name for op in graph.layers]
    out = {"task": name, "model": task.model, "data": data.summary(), "layers": layers, "seeds": {},
           "float_test_acc": score(source.module, data.x_test, data.y_test)}
    for seed in args.seeds:
        t0 = time.perf_counter()
        seed_everything(seed)
        net = calibrated_supernet(copy.deepcopy(source.module), graph, data, (8,), seed).eval()
        out["seeds"][str(seed)] = {policy: measured(net, graph, board, wide, data)
                                   for policy, wide in wide_sets(layers).items()}
        log(f"{name} seed {seed}: {len(out['seeds'][str(seed)])} policies in {time.perf_counter() - t0:.0f} s; "
            + ", ".join(f"{p} {r['test_acc']:.4f}" for p, r in out["seeds"][str(seed)].items()))
    return out


def tables(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}` ({payload['date']}, {payload['machine']}; {payload['wall_s']:.0f} s). "
             f"Board {payload['board']} (CMSIS-NN kernels; cycles, arena and flash from the cost model fitted on "
             "QEMU, bench/cycles.py). Post-training: each seed's calibration, int8 weights everywhere, the "
             "listed layers on int16 activations (TFLM's 16x8 kernels, a QUANTIZE at each int8/int16 boundary), "
             "test accuracy in TFLM's integer arithmetic. Differences are paired over seeds against int8 "
             "(mean ± std, seeds better/equal/worse)."]
    for name, task in payload["tasks"].items():
        seeds = list(task["seeds"].values())
        lines += ["", f"### {name}: {task['model']}, float test accuracy {task['float_test_acc']:.2%}, "
                      f"{len(seeds)} seeds", "",
                  "| int16 activations on | test accuracy | − int8, paired (points) | model bytes | arena | "
                  "cycles | runtime flash |", "|---|---|---|---|---|---|---|"]
        for policy in seeds[0]:
            acc = np.array([s[policy]["test_acc"] for s in seeds]) * 100
            diff = acc - np.array([s["int8"]["test_acc"] for s in seeds]) * 100
            first = seeds[0][policy]
            difference = "" if policy == "int8" else paired(diff)
            lines.append(f"| {policy} | {acc.mean():.2f} % ± {acc.std():.2f} | {difference} | {first['model_flash']:,} | "
                         f"{first['arena']:,} | {first['cycles']:,} | {first['runtime_flash']:,} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    tasks = payload["tasks"]
    figure, axes = task_axes(len(tasks))
    for axis, (name, task) in zip(axes, tasks.items()):
        seeds = list(task["seeds"].values())
        colours = matplotlib.colormaps["tab20"]
        for i, policy in enumerate(seeds[0]):  # a colour and a marker each: 13 policies outrun one cycle
            gain = np.array([(s[policy]["test_acc"] - s["int8"]["test_acc"]) * 100 for s in seeds])
            arena = seeds[0][policy]["arena"]
            axis.errorbar(arena, gain.mean(), yerr=gain.std(), fmt="osD^v<>ph*"[i % 10], color=colours(i % 20),
                          capsize=3, label=policy)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_title(f"{name} ({task['model']}): int16 activations, post-training")
        axis.set_xlabel("arena bytes (cost model, CMSIS-NN)")
        axis.set_ylabel("test accuracy − int8 (points, mean ± std over seeds)")
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_options(p, HERE / "int16.json")
    p.add_argument("--merge", action="store_true", help="keep the other tasks of an earlier --out")
    p.add_argument("--tables-only", action="store_true", help="run nothing: tables and plot from --out")
    args = p.parse_args()
    if args.tables_only:
        payload = json.loads(Path(args.out).read_text())
    else:
        payload = run(args)
    body = tables(payload)
    print(body)
    if not args.no_write:
        plot(payload, HERE / "int16.png")
        write_section(SECTION, body + "\n\n![int16](int16.png)\n\n" + READING)


def run(args) -> dict:
    log = timed_log(args.threads)
    started = time.perf_counter()
    board = load_board(args.board)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    earlier = json.loads(Path(args.out).read_text())["tasks"] if args.merge and Path(args.out).exists() else {}
    payload = {"command": ("python bench/int16.py " + " ".join(sys.argv[1:])).strip(),
               "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "board": args.board,
               "tasks": {**earlier, **{name: task_runs(name, board, args, log) for name in args.tasks}}}
    payload["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
