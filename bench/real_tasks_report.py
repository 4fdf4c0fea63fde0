"""Tables and plots of bench/real_tasks.py's measurements (its JSON), kept apart from the runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BASELINES = ("dmpq", "hawq", "uniform8", "uniform4")
QAT_METHODS = ("smpq",) + BASELINES


# SMPQ's post-training picks by coalition value and players ("kl:layers"; ":sampled", the layer
# table by 96 permutations where the search would enumerate it), and by how the K best are
# re-ranked: on the Shapley batch (no suffix; older runs of this bench: the search now
# re-ranks on the whole split), not at all ("/sum"), on the whole validation split
# ("/val-all"). The first is what the search ships now.
SMPQ_LABELS = {"smpq[kl:layers]/val-all": "smpq", "smpq[kl:layers]": "smpq, batch re-rank",
               "smpq[kl:layers]/sum": "smpq, no re-rank", "smpq[kl:layers:sampled]/val-all": "smpq, sampled table",
               "smpq[kl:layers:sampled]/sum": "smpq, sampled table, no re-rank",
               "smpq[top1:candidates]": "smpq before"}


def ptq_methods(task: dict) -> list[str]:
    """The SMPQ variants measured (SMPQ_LABELS' order), then the baselines."""
    measured = {m for seed in task["seeds"].values() for pick in seed["picks"].values() for m in pick["bits"]}
    return [m for m in SMPQ_LABELS if m in measured] + list(BASELINES)


def label(method: str) -> str:
    return SMPQ_LABELS.get(method, method)


def _ms(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def _wtl(differences: list[float], tie: float = 1e-9) -> str:
    return "/".join(str(sum(c(d) for d in differences)) for c in (lambda d: d > tie, lambda d: abs(d) <= tie,
                                                                  lambda d: d < -tie))


def _split_text(data: dict) -> str:
    split = data["preprocessing"].get("split", {})
    if split.get("by") == "group":
        return f"groups held out: validation {', '.join(split['val_groups'])}, test {', '.join(split['test_groups'])}"
    return "seeded, stratified by class"


def regrets(task: dict) -> dict[str, dict[str, list[dict]]]:
    """Per fraction, per method: one {regret, rank, acc, feasible, best} per seed (points)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for seed in task["seeds"].values():
        by_bits = {tuple(r["bits"]): r for r in seed["oracle"]}
        for fraction, pick in seed["picks"].items():
            feasible = [r for r in seed["oracle"] if r["layer_flash"] <= pick["budget"]["layer_flash_budget"]]
            best = max(r["acc"] for r in feasible)
            for method, bits in pick["bits"].items():
                row = by_bits[tuple(bits)]
                out.setdefault(fraction, {}).setdefault(method, []).append({
                    "regret": 100 * (best - row["acc"]), "acc": 100 * row["acc"],
                    "rank": 1 + sum(r["acc"] > row["acc"] for r in feasible),
                    "feasible": len(feasible), "best": 100 * best})
    return out


def rerank_replacements(task: dict) -> str:
    """How often the re-rank on the validation split shipped another policy than the summed-Shapley
    optimum, and how those replacements fared on the oracle (issue 24: evidence about the estimator)."""
    shipped, summed = "smpq[kl:layers]/val-all", "smpq[kl:layers]/sum"
    seen, changes = 0, []
    for seed in task["seeds"].values():
        accuracy = {tuple(r["bits"]): 100 * r["acc"] for r in seed["oracle"]}
        for pick in seed["picks"].values():
            bits = pick["bits"]
            if shipped not in bits or summed not in bits:
                continue
            seen += 1
            if bits[shipped] != bits[summed]:
                changes.append(accuracy[tuple(bits[shipped])] - accuracy[tuple(bits[summed])])
    if not seen:
        return "The re-rank was not measured apart from the summed-Shapley pick here."
    text = f"The re-rank replaced the summed-Shapley optimum in {len(changes)} of {seen} seed-budgets"
    if changes:
        text += (f"; on the oracle the replacement scored {_ms(changes)} points more ({_wtl(changes)} "
                 "better / equal / worse)")
    return text + "."


def layer_effects(rows: list[dict]) -> tuple[np.ndarray, float, float]:
    """Oracle accuracy (points) as a constant plus an int8 effect per layer: effects, R², residual std."""
    design = np.array([[1.0] + [float(b == 8) for b in r["bits"]] for r in rows])
    accs = np.array([r["acc"] for r in rows]) * 100
    coef = np.linalg.lstsq(design, accs, rcond=None)[0]
    residual = accs - design @ coef
    return coef[1:], 1 - (residual ** 2).sum() / ((accs - accs.mean()) ** 2).sum(), float(residual.std())


def ptq_tables(name: str, task: dict) -> list[str]:
    methods = ptq_methods(task)
    seeds = sorted(task["seeds"], key=int)
    first = task["seeds"][seeds[0]]
    int8 = [100 * next(r["acc"] for r in s["oracle"] if set(r["bits"]) == {8}) for s in task["seeds"].values()]
    int4 = [100 * next(r["acc"] for r in s["oracle"] if set(r["bits"]) == {4}) for s in task["seeds"].values()]
    flash8 = next(r["model_flash"] for r in first["oracle"] if set(r["bits"]) == {8})
    flash4 = next(r["model_flash"] for r in first["oracle"] if set(r["bits"]) == {4})
    lines = [f"### {name}: {task['model']} on {task['data']['name']}, post-training", "",
             f"Split {task['data']['train']} / {task['data']['val']} / {task['data']['test']} "
             f"({_split_text(task['data'])}); the oracle scores the "
             f"first {task['oracle_samples']} test samples. Float {100 * task['float_acc']:.2f} %, PTQ int8 "
             f"{_ms(int8)} % ({flash8:,} B), PTQ all-int4 {_ms(int4)} % ({flash4:,} B), over seeds {', '.join(seeds)}.",
             "", "| f | model flash budget | feasible | best feasible (%) | "
             + " | ".join(f"{label(m)} regret (rank)" for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    table = regrets(task)
    for fraction in sorted(table, key=float):
        picked = table[fraction]
        any_row = next(iter(picked.values()))
        budget = first["picks"][fraction]["budget"]
        model_budget = budget["layer_flash_budget"] + flash8 - budget["int8_layer_flash"]
        cells = []
        for m in methods:
            rows = picked.get(m, [])
            cells.append(f"{_ms([r['regret'] for r in rows])} ({np.mean([r['rank'] for r in rows]):.0f})"
                         if rows else "over budget")
        lines.append(f"| {float(fraction):g} | {model_budget:,} B ({model_budget / flash8:.0%} of int8) | "
                     f"{any_row[0]['feasible']} | {_ms([r['best'] for r in any_row])} | " + " | ".join(cells) + " |")
    smpq = methods[0]
    lines += ["", f"Paired regret differences per seed, each other method's minus {label(smpq)}'s (points; positive: "
              f"{label(smpq)}'s pick is better), with {label(smpq)}'s wins / ties / losses:", "",
              "| f | " + " | ".join(f"{label(m)}" for m in methods[1:]) + " |", "|---|" + "---|" * (len(methods) - 1)]
    for fraction in sorted(table, key=float):
        picked = table[fraction]
        cells = []
        for m in methods[1:]:
            if m not in picked:
                cells.append("over budget")
                continue
            d = [o["regret"] - s["regret"] for o, s in zip(picked[m], picked[smpq])]
            cells.append(f"{_ms(d)} ({_wtl(d)})")
        lines.append(f"| {float(fraction):g} | " + " | ".join(cells) + " |")
    lines += ["", rerank_replacements(task)]
    lines += ["", "How much the choice of layers matters here: per seed, the spread of all policies' oracle accuracy "
              "and a least-squares fit on one int8-over-int4 effect per layer (points):", "",
              "| seed | min / median / max (%) | int8 effect per layer | R² | residual std |", "|---|---|---|---|---|"]
    for seed in seeds:
        rows = task["seeds"][seed]["oracle"]
        accs = [100 * r["acc"] for r in rows]
        effects, r2, std = layer_effects(rows)
        lines.append(f"| {seed} | {min(accs):.2f} / {np.median(accs):.2f} / {max(accs):.2f} | "
                     + " ".join(f"{e:+.2f}" for e in effects) + f" | {r2:.2f} | {std:.2f} |")
    return lines


def qat_tables(name: str, task: dict) -> list[str]:
    runs = task["runs"]
    methods = [m for m in QAT_METHODS if any(m in r["methods"] for r in runs)]
    fractions = sorted({r["fraction"] for r in runs})
    lines = [f"### {name}: {task['model']}, QAT (every method trained identically)", "",
             f"Float {_ms([100 * r['float_test_acc'] for r in runs])} %, PTQ int8 "
             f"{_ms([100 * r['ptq_int8_test_acc'] for r in runs])} % (test split, whole). Schedule: warm-up "
             f"{task['config']['warmup']['epochs']}, search {task['config']['search']['epochs']}, finetune "
             f"{task['config']['finetune']['epochs']} epochs (the quick build's schedule; the uniform policies and "
             "SMPQ's and HAWQ's picks train search + finetune epochs from the warm-up).", "",
             "| f | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for f in fractions:
        here = [r for r in runs if r["fraction"] == f]
        cells = [_ms([100 * r["methods"][m]["test_acc"] for r in here if m in r["methods"]]) or "–"
                 if any(m in r["methods"] for r in here) else "over budget" for m in methods]
        lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences, SMPQ minus each (points, same seed), SMPQ wins / ties / losses:", "",
              "| f | " + " | ".join(f"smpq − {m}" for m in methods[1:]) + " |", "|---|" + "---|" * (len(methods) - 1)]
    for f in fractions:
        here = [r for r in runs if r["fraction"] == f]
        cells = []
        for m in methods[1:]:
            d = [100 * (r["methods"]["smpq"]["test_acc"] - r["methods"][m]["test_acc"]) for r in here
                 if m in r["methods"]]
            cells.append(f"{_ms(d)} ({_wtl(d)})" if d else "over budget")
        lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    return lines


def tables(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}` ({payload['date']}, {payload['machine']}, CPU only; "
             f"wall time {payload.get('wall_s', 0) / 60:.0f} min"
             + (f", the longest of {payload['merged']} commands run side by side" if payload.get("merged") else "")
             + f"). Board {payload['board']}. Flash budget at f: "
             "the layers' flash (weights, biases, quantisation parameters) f of the way from all-int4 to all-int8; "
             "the table gives the whole model's budget. Regret: best feasible oracle accuracy minus the pick's, "
             "mean ± std over seeds; rank: 1 + feasible policies strictly better (mean).", ""]
    for name, task in payload["ptq"].items():
        lines += ptq_tables(name, task) + [""]
    for name, task in payload["qat"].items():
        lines += qat_tables(name, task) + [""]
    lines.append("Plot: `bench/real_tasks.png`; raw numbers: `bench/real_tasks.json`.")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ptq", n) for n in payload["ptq"]] + [("qat", n) for n in payload["qat"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (kind, name) in zip(axes[0], panels):
        (_ptq_panel if kind == "ptq" else _qat_panel)(ax, name, payload[kind][name])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ptq_panel(ax, name: str, task: dict) -> None:
    seed = sorted(task["seeds"], key=int)[0]
    data = task["seeds"][seed]
    ax.scatter([r["model_flash"] / 1024 for r in data["oracle"]], [100 * r["acc"] for r in data["oracle"]],
               s=6, color="0.75", label=f"all {len(data['oracle'])} policies (oracle)")
    by_bits = {tuple(r["bits"]): r for r in data["oracle"]}
    for fraction, pick in data["picks"].items():
        budget = pick["budget"]
        fixed = next(r["model_flash"] - r["layer_flash"] for r in data["oracle"])
        ax.axvline((budget["layer_flash_budget"] + fixed) / 1024, color="0.5", linestyle=":", linewidth=1)
        for j, m in enumerate(ptq_methods(task)):
            if m in pick["bits"]:
                row = by_bits[tuple(pick["bits"][m])]
                ax.scatter(row["model_flash"] / 1024, 100 * row["acc"], marker="os^Dv<>ph"[j % 9], facecolors="none",
                           edgecolors=f"C{j}", s=60, label=label(m) if fraction == next(iter(data["picks"])) else None)
    ax.set_title(f"{name} ({task['model']}), post-training, seed {seed}; dotted: budgets")
    ax.set_xlabel("model flash (KB)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _qat_panel(ax, name: str, task: dict) -> None:
    runs = task["runs"]
    fractions = sorted({r["fraction"] for r in runs})
    for j, m in enumerate(QAT_METHODS):
        xs, ys, es = [], [], []
        for f in fractions:
            accs = [100 * r["methods"][m]["test_acc"] for r in runs if r["fraction"] == f and m in r["methods"]]
            if accs:
                xs.append(f + (j - 2) * 0.01)
                ys.append(np.mean(accs))
                es.append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="os^Dv"[j], capsize=3, label=m)
    ax.set_title(f"{name} ({task['model']}), QAT, mean ± std over seeds")
    ax.set_xlabel("flash budget f (layers f of the way from all-int4 to all-int8)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(fractions)
    ax.set_xlim(min(fractions) - 0.1, max(fractions) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
