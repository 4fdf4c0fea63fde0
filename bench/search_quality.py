"""Search quality: SMPQ against every baseline (dmpq, hawq, uniform8, uniform4) at several flash budgets,
plus an exhaustive oracle on mnist1d_dscnn (8 layers, 2 candidates: 256 policies).

Flash budget at fraction f: the layers' flash (weights + bias + quantisation parameters,
``LayerCost.flash_bytes``) may use at most f x the all-int8 layers' flash; the whole-firmware
``Budgets(flash_bytes=...)`` adds the policy-independent part of the model (activation quant
parameters, flatbuffer overhead: what ``knapsack()`` takes off as ``flash_fixed``) and the board's
flash reserve. RAM and cycle budgets stay the board's.

For each (dataset, seed) the float model is trained once and handed to ``run_search`` as a
pretrained model for each budget (the float model does not depend on the budget); ``run_search``
runs warm-up, SMPQ and every baseline and returns all of them in ``record["methods"]``.

Oracle (mnist1d only, for each of ``--oracle-seeds``): the supernet warm-up is rebuilt exactly as
run_search does it (same seed, same float model, same calibration and warm-up), then every one of the 256 policies
is finetuned from those warm-up weights for ``--oracle-epochs`` epochs and its test accuracy
measured. The finetune does not depend on the budget, so each policy is trained once and every
budget just filters the feasible ones. A method's regret at a budget = best feasible oracle
accuracy minus the oracle accuracy of the method's pick (same short finetune from the same
warm-up weights, not the method's own longer finetune). The best of 256 short finetunes is itself
lifted by their noise, so the rank of the pick among the feasible policies is reported too.

    python bench/search_quality.py                                   # the configuration in RESULTS.md
    python bench/search_quality.py --seeds 0 1 2 3 4 --epochs-scale 3 # bigger
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402
from bench.real_tasks_report import layer_effects  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.common.errors import UserError  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import ModelSource, load_model  # noqa: E402
from smpq_edge.network.quant import QuantNet  # noqa: E402
from smpq_edge.search.budget import Budgets  # noqa: E402
from smpq_edge.search.runner import SearchConfig, finetune, run_search, warm_supernet  # noqa: E402
from smpq_edge.search.train import TrainConfig, score, seed_everything, train  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Search quality (bench/search_quality.py)"
MODELS = {"digits": "digits_cnn", "mnist1d": "mnist1d_dscnn"}
METHODS = ("smpq", "dmpq", "hawq", "uniform8", "uniform4")


def bench_config(scale: float, permutations: int, final_permutations: int, value: str = "top1") -> SearchConfig:
    """SearchConfig.quick()'s shape, epochs multiplied by ``scale`` (at least 1 each)."""
    q = SearchConfig.quick()

    def s(c: TrainConfig) -> TrainConfig:
        return replace(c, epochs=max(1, round(c.epochs * scale)))

    return replace(q, float_train=s(q.float_train), warmup=s(q.warmup), search=s(q.search), finetune=s(q.finetune),
                   shapley=replace(q.shapley, permutations=permutations, final_permutations=final_permutations,
                                   value=value))


def flash_budget(graph, board, fraction: float, mode: str = "between") -> tuple[Budgets, dict]:
    """Whole-firmware flash budget for a layer-flash budget at ``fraction``.

    mode "int8-fraction": layers get fraction x the all-int8 layers' flash. mode "between" (default):
    fraction of the way from all-int4 to all-int8 layers' flash, int4 + fraction x (int8 - int4); with
    per-channel quantisation parameters (24 B per output channel) and int32 biases the all-int4
    layers already need ~85-90 % of the all-int8 bytes on these models, so "int8-fraction" at
    0.5-0.8 leaves no policy feasible."""
    int8 = estimate(graph, uniform(graph, 8), board)
    int4 = estimate(graph, uniform(graph, 4), board)
    layers8 = sum(layer.flash_bytes for layer in int8.layers)
    layers4 = sum(layer.flash_bytes for layer in int4.layers)
    fixed = int8.model_flash_bytes - layers8  # policy-independent, as knapsack()'s flash_fixed
    layer_budget = int(fraction * layers8) if mode == "int8-fraction" else int(layers4 + fraction * (layers8 - layers4))
    total = layer_budget + fixed + int8.reserve_flash_bytes
    info = {"fraction": fraction, "mode": mode, "layer_flash_budget": layer_budget, "int8_layer_flash": layers8,
            "int4_layer_flash": layers4, "int4_fraction": layers4 / layers8, "fixed_model_flash": fixed,
            "reserve_flash": int8.reserve_flash_bytes, "flash_bytes": total}
    return Budgets.of_board(board, flash_bytes=total), info


def train_float(model_name: str, data, config: SearchConfig, seed: int):
    seed_everything(seed)
    source = load_model(model_name, num_classes=data.num_classes)
    train(source.module, data, config.float_train, seed, desc="float", progress=False)
    source.module.eval()
    return source


def pretrained(source: ModelSource) -> ModelSource:
    return replace(source, module=copy.deepcopy(source.module), pretrained=True)


def warm_start(source: ModelSource, data, board, config: SearchConfig, seed: int) -> QuantNet:
    """The warm-up weights run_search starts SMPQ and the baselines from: its seeding, then its
    own ``warm_supernet`` on a copy of the pretrained float model."""
    seed_everything(seed)
    model = copy.deepcopy(source.module).eval()
    return warm_supernet(model, trace(model, data.input_shape), data, board.weight_bits, config.warmup, seed)


def oracle(source: ModelSource, data, board, config: SearchConfig, seed: int, epochs: int, log) -> list[dict]:
    warm = warm_start(source, data, board, config, seed)
    graph = warm.graph
    tune = replace(config.finetune, epochs=epochs)
    rows = []
    t0 = time.perf_counter()
    for i, choice in enumerate(itertools.product(board.weight_bits, repeat=len(graph.layers))):
        bits = {op.name: b for op, b in zip(graph.layers, choice)}
        _, before, after = finetune(warm, bits, data, tune, seed, False, "oracle")
        report = estimate(graph, bits, board)
        rows.append({"bits": bits, "acc_before": before, "acc": after,
                     "layer_flash": sum(layer.flash_bytes for layer in report.layers),
                     "flash_total": report.flash_total_bytes})
        if i % 32 == 31:
            log(f"oracle {i + 1} policies, {time.perf_counter() - t0:.0f} s")
    return rows


def key(bits: dict) -> tuple:
    return tuple(sorted(bits.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=sorted(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.65, 0.8])
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiplies SearchConfig.quick()'s epochs")
    p.add_argument("--budget-mode", choices=("between", "int8-fraction"), default="between",
                   help="between: layer flash = int4 + f x (int8 - int4); int8-fraction: f x int8 (see flash_budget)")
    p.add_argument("--float-epochs", type=int, default=8, help="float pre-training epochs (not scaled)")
    p.add_argument("--permutations", type=int, default=8, help="Shapley permutations per alpha update")
    p.add_argument("--final-permutations", type=int, default=24, help="Shapley permutations for the final table")
    p.add_argument("--board", default="nucleo-l4r5zi")
    p.add_argument("--value", choices=("top1", "soft"), default="top1",
                   help="SMPQ's coalition value: top-1 accuracy (the paper) or true-class probability")
    p.add_argument("--oracle-seeds", nargs="+", type=int, default=[0], help="seeds (of --seeds) with an oracle")
    p.add_argument("--oracle-epochs", type=int, default=1)
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "search_quality.json"))
    p.add_argument("--plot", default=str(HERE / "search_quality.png"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: combine these search_quality JSON files (e.g. seeds run in parallel) into the "
                        "tables, plot and --out")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ("python bench/search_quality.py " + " ".join(sys.argv[1:])).strip()
    config = bench_config(args.epochs_scale, args.permutations, args.final_permutations, args.value)
    config = replace(config, float_train=replace(config.float_train, epochs=args.float_epochs))
    board = load_board(args.board)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {msg}", flush=True)

    runs, budgets_info, oracle_rows = [], {}, {}
    if args.merge:
        parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
        for part in parts:
            runs += part["runs"]
            budgets_info.update(part["budgets"])
            oracle_rows.update({int(seed): rows for seed, rows in (part["oracle"] or {}).items()})
        command = " && ".join(part["command"] for part in parts) + " && " + command
        args.seeds = sorted({r["seed"] for r in runs})
        started = time.perf_counter() - max(part["wall_s"] for part in parts)  # the parts ran in parallel
        print(_save(args, config, runs, budgets_info, oracle_rows, command, started))
        return
    summary = ""
    for name in args.datasets:
        for seed in args.seeds:
            data = load_dataset(name, seed)
            source = train_float(MODELS[name], data, config, seed)
            float_acc = score(source.module, data.x_test, data.y_test)
            log(f"{name} seed {seed}: float test accuracy {float_acc:.4f}")
            graph = trace(source.module, data.input_shape)
            for fraction in args.fractions:
                budgets, info = flash_budget(graph, board, fraction, args.budget_mode)
                budgets_info[f"{name}@{fraction}"] = info
                t0 = time.perf_counter()
                try:
                    result = run_search(pretrained(source), data, board, budgets=budgets, config=config, seed=seed,
                                        progress=False, log=lambda m: None)
                    methods = {m["method"]: m for m in result.record.model_dump(mode="json")["methods"]}
                except UserError as exc:  # no policy at all fits (even all-int4): every method infeasible
                    log(f"{name} seed {seed} f={fraction}: {exc}")
                    methods = {}
                run = {"dataset": name, "seed": seed, "fraction": fraction, "float_test_acc": float_acc,
                       "seconds": time.perf_counter() - t0, "budget": info,
                       "methods": {m: None if m not in methods else
                                   {"bits": methods[m]["bits"], "test_acc": methods[m]["test_acc"],
                                    "test_acc_same_finetune": methods[m]["test_acc_same_finetune"],
                                    "test_acc_before_finetune": methods[m]["test_acc_before_finetune"],
                                    "layer_flash": sum(layer["flash_bytes"] for layer in methods[m]["cost"]["layers"]),
                                    "fits": methods[m]["cost"]["fits"]}
                                   for m in METHODS}}
                runs.append(run)
                log(f"{name} seed {seed} f={fraction}: " + ", ".join(
                    f"{m} {v['test_acc']:.4f}" if v else f"{m} infeasible" for m, v in run["methods"].items())
                    + f" ({run['seconds']:.0f} s)")
            if name == "mnist1d" and seed in args.oracle_seeds and not args.no_oracle:
                log(f"oracle, seed {seed}: 256 policies x {args.oracle_epochs} finetune epoch(s)")
                oracle_rows[seed] = oracle(source, data, board, config, seed, args.oracle_epochs, log)
                Path(args.out).with_suffix(".oracle.json").write_text(json.dumps(oracle_rows), encoding="utf-8")
        # After each data set, so a long run leaves its results so far.
        summary = _save(args, config, runs, budgets_info, oracle_rows, command, started)
    print(summary)


def _regrets(runs: list[dict], oracle_by_seed: dict[int, list[dict]]) -> list[dict]:
    out = []
    for run in runs:
        if run["dataset"] != "mnist1d" or run["seed"] not in oracle_by_seed:
            continue
        oracle_rows = oracle_by_seed[run["seed"]]
        by_bits = {key(r["bits"]): r for r in oracle_rows}
        limit = run["budget"]["layer_flash_budget"]
        feasible = [r for r in oracle_rows if r["layer_flash"] <= limit]
        best = max(feasible, key=lambda r: r["acc"])
        row = {"seed": run["seed"], "fraction": run["fraction"], "feasible": len(feasible), "best_acc": best["acc"],
               "best_bits": best["bits"], "methods": {}}
        for m, v in run["methods"].items():
            if v is None:
                row["methods"][m] = None
                continue
            o = by_bits[key(v["bits"])]
            rank = 1 + sum(r["acc"] > o["acc"] for r in feasible)
            row["methods"][m] = {"oracle_acc": o["acc"], "regret": best["acc"] - o["acc"], "rank": rank}
        out.append(row)
    return out


def _save(args, config, runs, budgets_info, oracle_rows, command, started) -> str:
    regrets = _regrets(runs, oracle_rows)
    payload = {"command": command, "config": config.to_dict(), "runs": runs, "budgets": budgets_info,
               "oracle": oracle_rows, "regrets": regrets, "wall_s": time.perf_counter() - started}
    Path(args.out).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    text = _tables(args, config, runs, budgets_info, regrets, oracle_rows, command, time.perf_counter() - started)
    if runs:
        _plot(runs, args.plot)
    if not args.no_write:
        write_section(SECTION, text)
    return text


def _mean_std(values: list[float]) -> str:
    a = np.array(values) * 100
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def _paired(runs: list[dict], baseline: str, key: str = "test_acc") -> str:
    pairs = [(r["methods"]["smpq"], r["methods"][baseline]) for r in runs]
    diffs = np.array([100 * (s[key] - b[key]) for s, b in pairs if s is not None and b is not None
                      and b["fits"]["flash"] and s.get(key) is not None and b.get(key) is not None])
    if not len(diffs):
        feasible = any(b is not None and b["fits"]["flash"] for _, b in pairs)
        return "n/a" if feasible else "infeasible"
    spread = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
    wins, ties = int((diffs > 1e-9).sum()), int((abs(diffs) <= 1e-9).sum())
    return f"{diffs.mean():+.2f} ± {spread:.2f} ({wins}/{ties}/{len(diffs) - wins - ties})"


def _paired_table(args, runs: list[dict], key: str, caption: str) -> list[str]:
    lines = ["", caption, "", "| dataset | f | " + " | ".join(f"smpq − {m}" for m in METHODS[1:]) + " |",
             "|---|---|" + "---|" * (len(METHODS) - 1)]
    for name in args.datasets:
        for fraction in args.fractions:
            sel = [r for r in runs if r["dataset"] == name and r["fraction"] == fraction]
            if sel:
                lines.append(f"| {name} | {fraction} | " + " | ".join(_paired(sel, m, key) for m in METHODS[1:]) + " |")
    return lines


def _tables(args, config, runs, budgets_info, regrets, oracle_rows, command, wall) -> str:
    c = config
    lines = [SECTION, "",
             f"Command: `{command}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
             f"jobs during the run), CPU only; torch {torch.__version__}. Date: {datetime.date.today().isoformat()}. "
             f"Wall time {wall / 60:.1f} min{' (longest of the merged parallel runs)' if args.merge else ''}.  ",
             f"Config (`SearchConfig.quick()` x epochs-scale {args.epochs_scale}, float epochs set by --float-epochs): float {c.float_train.epochs} epochs "
             f"(trained once per dataset and seed, passed to `run_search` as pretrained), warm-up {c.warmup.epochs}, "
             f"SMPQ search {c.search.epochs}, finetune {c.finetune.epochs} (every pick but DMPQ's is trained "
             f"search+finetune = {c.search.epochs + c.finetune.epochs} epochs from the warm-up, DMPQ's finetune "
             f"epochs from its search weights, as `run_search` does), Shapley "
             f"{c.shapley.permutations} permutations per update, {c.shapley.final_permutations} final, "
             f"{c.shapley.val_samples} val samples, k_best {c.k_best}. Board {args.board}; RAM and cycle budgets "
             "the board's (never binding here). These are far fewer epochs than the default `SearchConfig()`: "
             "absolute accuracies are low-effort, the comparison is at equal effort.", "",
             ("Flash budget at fraction f: layers' flash (weights+bias+quant params) ≤ f × all-int8 layers' flash"
              if args.budget_mode == "int8-fraction" else
              "Flash budget at fraction f (\"f of the way\" from all-int4 to all-int8): layers' flash (weights+bias+"
              "quant params) ≤ int4 + f × (int8 − int4) layers' flash")
             + "; whole-firmware budget = that + policy-independent model flash + board reserve.", ""]
    lines += ["| dataset | f | layer flash budget (B) | all-int8 layers (B) | all-int4 layers (B, fraction) |",
              "|---|---|---|---|---|"]
    for k, info in budgets_info.items():
        lines.append(f"| {k.split('@')[0]} | {info['fraction']} | {info['layer_flash_budget']} | "
                     f"{info['int8_layer_flash']} | {info['int4_layer_flash']} ({info['int4_fraction']:.2f}) |")
    lines += ["", f"Test accuracy (%) after finetune, mean ± std over seeds {args.seeds} "
              "(uniform int8 never fits a budget with f < 1 and is recorded as infeasible, as `run_search` does; "
              "\"infeasible\" = the method has no policy within the budget):", "",
              "| dataset | f | " + " | ".join(METHODS) + " | SMPQ rank |", "|---|---|" + "---|" * (len(METHODS) + 1)]
    for name in args.datasets:
        for fraction in args.fractions:
            sel = [r for r in runs if r["dataset"] == name and r["fraction"] == fraction]
            if not sel:
                continue
            cells, means = [], {}
            for m in METHODS:
                vals = [r["methods"][m] for r in sel]
                if all(v is None for v in vals):
                    cells.append("infeasible")
                    continue
                accs = [v["test_acc"] for v in vals if v is not None]
                over = any(not v["fits"]["flash"] for v in vals if v is not None)
                cell = _mean_std(accs) + (f" ({len(accs)}/{len(vals)} feasible)" if len(accs) < len(vals) else "")
                if m == "uniform8" or over:
                    cell += " (over budget)" if over else ""
                else:
                    means[m] = float(np.mean(accs))
                cells.append(cell)
            if "smpq" not in means:
                lines.append(f"| {name} | {fraction} | " + " | ".join(cells) + " | - |")
                continue
            rank = 1 + sum(v > means.get("smpq", -1) for m, v in means.items() if m != "smpq")
            lines.append(f"| {name} | {fraction} | " + " | ".join(cells) + f" | {rank} of {len(means)} |")
    lines += ["", "SMPQ rank: among the methods that fit the budget (uniform8 excluded), by mean accuracy."]
    lines += _paired_table(args, runs, "test_acc", "Paired differences, SMPQ minus each baseline on the same seed "
                           "(same split, float model and warm-up, so seed-to-seed variation cancels): mean ± std in "
                           "points, and SMPQ wins / ties / losses.")
    lines += _paired_table(args, runs, "test_acc_same_finetune", "The same, with every method's pick finetuned "
                           "identically (from the shared warm-up weights, search + finetune epochs; "
                           "`test_acc_same_finetune`): selection alone, without the methods' own training schedules.")
    if regrets:
        seeds = sorted(oracle_rows)
        lines += ["", f"Oracle (mnist1d_dscnn, seeds {seeds}): all 256 policies, each finetuned "
                  f"**{args.oracle_epochs} epoch(s)** from that seed's warm-up weights (not the methods' own longer "
                  "finetunes); a method's pick is scored by the oracle's accuracy for the same policy. Regret = best "
                  "feasible oracle accuracy − the pick's (points), mean ± std over seeds; rank = 1 + feasible policies "
                  "strictly better than the pick, mean over seeds (the best of 256 noisy short finetunes is lifted by "
                  "their noise, the rank less so).", "",
                  "| f | feasible policies | best acc (%) | " + " | ".join(f"{m} regret (rank)" for m in METHODS) + " |",
                  "|---|---|---|" + "---|" * len(METHODS)]
        for fraction in args.fractions:
            rows = [r for r in regrets if r["fraction"] == fraction]
            if not rows:
                continue
            cells = []
            for m in METHODS:
                picks = [r["methods"][m] for r in rows if r["methods"][m] is not None]
                if not picks:
                    cells.append("infeasible")
                    continue
                regret = np.array([100 * v["regret"] for v in picks])
                spread = f" ± {regret.std(ddof=1):.1f}" if len(regret) > 1 else ""
                shown = f"{regret.mean():.1f}{spread} ({np.mean([v['rank'] for v in picks]):.0f})"
                cells.append(shown + (f", {len(picks)}/{len(rows)} feasible" if len(picks) < len(rows) else ""))
            lines.append(f"| {fraction} | {np.mean([r['feasible'] for r in rows]):.0f} | "
                         f"{100 * np.mean([r['best_acc'] for r in rows]):.1f} | " + " | ".join(cells) + " |")
        lines += ["", "How much the choice of layers can matter at all: per seed, the spread of the 256 oracle "
                  "accuracies, and a least-squares fit of them on one int8-vs-int4 effect per layer (points; what "
                  "the fit leaves is finetune noise and interactions).", "",
                  "| seed | min / median / max (%) | int8 effect per layer (points) | R² | residual std (points) |",
                  "|---|---|---|---|---|"]
        for seed in seeds:
            accs = np.array([r["acc"] for r in oracle_rows[seed]]) * 100
            effects, r2, residual = _layer_effects(oracle_rows[seed])
            lines.append(f"| {seed} | {accs.min():.1f} / {np.median(accs):.1f} / {accs.max():.1f} | "
                         + " ".join(f"{e:+.2f}" for e in effects) + f" | {r2:.2f} | {residual:.2f} |")
        lines += ["", "(uniform8's regret is measured against the budget's feasible set, so it can be negative "
                  "when it is over budget.)"]
    lines += ["", f"Plot: `bench/{Path(args.plot).name}`; raw numbers: `bench/{Path(args.out).name}`."]
    return "\n".join(lines) + "\n"


def _layer_effects(oracle_rows: list[dict]) -> tuple[np.ndarray, float, float]:
    """Oracle accuracy (points) fitted as a constant plus one int8 effect per layer (the rows' bits
    are name -> bits here, in layer order)."""
    return layer_effects([{"bits": list(r["bits"].values()), "acc": r["acc"]} for r in oracle_rows])


def _plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        fractions = sorted({r["fraction"] for r in runs if r["dataset"] == name})
        for j, m in enumerate(METHODS):
            xs, ys, es = [], [], []
            for f in fractions:
                accs = [r["methods"][m]["test_acc"] * 100 for r in runs
                        if r["dataset"] == name and r["fraction"] == f and r["methods"][m] is not None]
                if accs:
                    xs.append(f + (j - 2) * 0.006)
                    ys.append(np.mean(accs))
                    es.append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, linestyle="--" if m == "uniform8" else "-")
        ax.set_title(f"{name} ({MODELS[name]})")
        ax.set_xlabel("flash budget f (layers: f of the way from all-int4 to all-int8, or f x int8 with --budget-mode int8-fraction)", fontsize=7)
        ax.set_ylabel("test accuracy after finetune (%)")
        ax.set_xticks(fractions)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
