"""The build report: ``report.md`` and a self-contained ``report.html`` with embedded plots.

Inputs are the typed records the other stages wrote (search.json, emulation.json, see
``records``), so a report can be remade from a build folder without rerunning anything.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from smpq_edge.common.precision import Precision, weight_form  # noqa: E402
from smpq_edge.common.records import CostRecord, EmulationRecord, MethodRecord, SearchRecord  # noqa: E402
from smpq_edge.inputs.task import TASKS, Task  # noqa: E402


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    images: dict[str, bytes]  # file name -> PNG bytes (embedded in the HTML, written beside the .md)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


# One colour per weight width, from 2 bits (red) to 8 (blue); the two-candidate space keeps int4
# orange and int8 blue as before.
BITS_COLOUR = {2: "tab:red", 3: "tab:pink", 4: "tab:orange", 5: "tab:olive", 6: "tab:green", 7: "tab:cyan",
               8: "tab:blue"}
INT16_COLOUR = "tab:purple"
LAYER_AXIS = "layer (in graph order)"


def _colour(c: Precision) -> str:
    return INT16_COLOUR if c.wide else BITS_COLOUR[c.weights]


def _form(c: Precision) -> str:
    """A candidate for a legend: "int4 weights", "int8 weights, int16 activations"."""
    return f"{weight_form(c.weights)} weights" + (", int16 activations" if c.wide else "")


def _label(c: Precision) -> str:
    """A candidate in a grid cell: its weight bits, "8a16" for int16 activations."""
    return f"{c.weights}a{c.activations}" if c.wide else str(c.weights)


def _zero_label(form: str, column: np.ndarray) -> str:
    """The legend entry of a candidate's markers at zero."""
    if np.isnan(column).all():  # the narrowest candidate: the others' entries are measured from it
        return f"{form}: 0 by definition (the others are measured from it)"
    return f"{form}: Shapley value 0"


def _shapley_plot(search: SearchRecord) -> Figure:
    """Per layer, each candidate's raw Shapley mean (bar, +-1 standard error) and the score the
    selection summed, valued at the budget where it was and after the monotone prior (black mark);
    the chosen candidate is outlined."""
    layers = list(search.layer_shapes)
    k = len(search.candidates)
    mean = np.array([np.nan if v is None else v for v in search.shapley.mean]).reshape(len(layers), k)
    err = np.array([0.0 if v is None else v for v in search.shapley.stderr]).reshape(len(layers), k)
    used = np.array(search.shapley_scores)
    chosen = search.shipped.policy
    at_budget = bool(search.k_best) and search.k_best[0].source == "Shapley at the budget"
    used_label = "score the selection summed (" + ("valued at the budget, " if at_budget else "") + "after the monotone prior)"
    figure, axis = plt.subplots(figsize=(max(6.5, 0.8 * len(layers)), 4.0), layout="constrained")
    width = 0.8 / k
    for j, candidate in enumerate(Precision.parse(name) for name in search.candidates):
        x = np.arange(len(layers)) + (j - (k - 1) / 2) * width
        colour, form = _colour(candidate), _form(candidate)
        values = np.nan_to_num(mean[:, j])
        zero = values == 0
        shipped = np.array([chosen[name] == candidate for name in layers])
        axis.bar(x, values, width, yerr=err[:, j], color=colour, alpha=0.75, capsize=2,
                 label=None if zero.all() else f"{form}: Shapley value (+-1 s.e.)")
        # Outlines on their own bars: with `alpha=`, an edge colour of "none" would come out black.
        axis.bar(x[shipped], values[shipped], width, fill=False, edgecolor="black", linewidth=1.5)
        if zero.any():  # a bar of height 0 is not seen: a marker at zero stands for it
            axis.scatter(x[zero], values[zero], marker="D", s=36, color=colour,
                         edgecolors=np.where(shipped[zero], "black", colour), linewidths=1.2, zorder=4,
                         label=_zero_label(form, mean[:, j]))
        axis.scatter(x, used[:, j], marker="_", s=160, color="black", zorder=3,
                     label=used_label if j == 0 else None)
    axis.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    axis.set_xlabel(LAYER_AXIS)
    axis.axhline(0, color="black", linewidth=0.6)
    value = ("minus the KL divergence from float" if search.coalition_value == "kl"
             else TASKS[search.task].value_name)
    axis.set_ylabel(f"contribution to {value}\n(validation batch)")
    axis.set_title("Shapley value per layer and precision (outlined: the shipped choice)", fontsize=10)
    axis.legend(fontsize=7, loc="best")
    return figure


def _bits_plot(methods: list[MethodRecord]) -> Figure:
    layers = list(methods[0].bits)
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(layers)), 1.9 + 0.45 * len(methods)), layout="constrained")
    grid = [[m.policy[name] for name in layers] for m in methods]
    used = sorted({c for row in grid for c in row})
    axis.imshow([[used.index(c) for c in row] for row in grid], cmap=ListedColormap([_colour(c) for c in used]),
                vmin=0, vmax=max(len(used) - 1, 1), aspect="auto")
    for row, choices in enumerate(grid):
        for col, c in enumerate(choices):
            axis.text(col, row, _label(c), ha="center", va="center", fontsize=8, color="white")
    axis.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    axis.set_xlabel(LAYER_AXIS)
    axis.set_yticks(range(len(methods)), [m.method for m in methods])
    axis.set_ylabel("method")
    axis.set_title("Precision per layer")
    axis.legend(handles=[Patch(color=_colour(c), label=_form(c)) for c in used],
                fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _budget_plot(cost: CostRecord, flash_total: int) -> Figure:
    used = [flash_total, cost.ram_total_bytes, cost.cycles]
    budget = [cost.flash_budget_bytes, cost.ram_budget_bytes, cost.cycle_budget]
    share = [100.0 * u / b for u, b in zip(used, budget)]
    figure, axis = plt.subplots(figsize=(6, 2.4), layout="constrained")
    axis.barh(["flash", "RAM", "cycles"], share, color=["tab:green" if s <= 100 else "tab:red" for s in share])
    axis.axvline(100, color="black", linestyle="--", linewidth=0.8)
    for row, (s, u) in enumerate(zip(share, used)):
        axis.text(s, row, f" {s:.1f}% ({u:,})", va="center", fontsize=8)
    axis.set_xlim(0, max(110, max(share) * 1.25))
    axis.set_xlabel("% of budget, whole firmware (model + board reserve)")
    return figure


MARKERS = "os^DvP*X"
DODGE_POINTS = 7  # how far apart, sideways, methods at one (flash, score) point are drawn


def _score_ceiling(task: Task) -> float | None:
    """The top of the score axis when it is an accuracy (``plotted(1.0)``: 100 for percent, 1 for a
    fraction); None for a free axis (an MSE)."""
    return task.plotted(1.0) if task.metric == "accuracy" else None


def _dodges(points: list[tuple[int, float]]) -> list[float]:
    """Per point, a sideways shift in points that spreads the ones at the same place side by side."""
    total, before = Counter(points), Counter()
    shifts = []
    for point in points:
        shifts.append((before[point] - (total[point] - 1) / 2) * DODGE_POINTS)
        before[point] += 1
    return shifts


def _accuracy_plot(search: SearchRecord, task: Task) -> Figure:
    """Every method's pick: hollow markers of different shapes and sizes, and methods at the same point
    spread sideways by a few points, so coinciding ones stay visible."""
    figure, axis = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    points = [(m.cost.model_flash_bytes, task.plotted(m.test_acc)) for m in search.methods]
    for i, (m, point, shift) in enumerate(zip(search.methods, points, _dodges(points))):
        # The shift is in points, on the screen; the data (and the axis limits) keep the true flash.
        axis.scatter(*point, s=110 * 0.8 ** i, marker=MARKERS[i % len(MARKERS)], facecolors="none",
                     edgecolors=f"C{i}", linewidths=1.6, label=m.method, zorder=3, clip_on=False,
                     transform=offset_copy(axis.transData, fig=figure, x=shift, units="points"))
        axis.update_datalim([point])
    # PTQ int8 often scores as float: a wide pale PTQ line under a dashed float line shows both. Both lie
    # above the frame (zorder 2.5), which an accuracy of 100 % runs along, and under the markers.
    axis.axhline(task.plotted(search.reference["ptq_int8"].test_acc), color="0.7", linewidth=3.5, zorder=2.6,
                 solid_capstyle="butt", clip_on=False, label="PTQ int8 (calibration only)")
    axis.axhline(task.plotted(search.reference["float"].test_acc), color="black", linestyle="--", linewidth=1.2,
                 zorder=2.7, clip_on=False, label="float")
    budget = search.methods[0].cost.flash_budget_bytes - search.methods[0].cost.reserve_flash_bytes
    largest = max(m.cost.model_flash_bytes for m in search.methods)
    if budget <= 1.5 * largest:  # a budget far to the right would squash every point into one
        axis.axvline(budget, color="tab:red", linewidth=0.8, label="flash budget for the model")
    else:
        axis.set_title(f"{task.metric.capitalize()} against flash (model budget {budget:,} B, off the right)",
                       fontsize=10, pad=10)  # room for the markers at 100 %, drawn over the frame
    axis.set_xlabel("model flash (bytes, predicted)")
    axis.set_ylabel(task.axis)
    ceiling = _score_ceiling(task)
    if ceiling is not None:  # the autoscale margin would run an accuracy past 100 %
        axis.set_ylim(top=min(axis.get_ylim()[1], ceiling))
    if not axis.get_title():
        axis.set_title(f"{task.metric.capitalize()} against flash, same budget", fontsize=10, pad=10)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _auc(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _accuracy_section(search: SearchRecord, emulation: EmulationRecord | None, task: Task) -> str:
    ref, show = search.reference, task.show
    aucs = ref["float"].test_auc is not None  # anomaly labels on the test split

    def row(name: str, measured, emulated: EmulationRecord | None = None) -> list[str]:
        if emulated is not None:
            return [name, "–", show(emulated.accuracy), "–"] + ([_auc(emulated.auc)] if aucs else [])
        return ([name, show(measured.val_acc), show(measured.test_acc), show(measured.test_agreement)]
                + ([_auc(measured.test_auc)] if aucs else []))

    rows = [row("float (torch)", ref["float"]),
            row("PTQ int8: every layer int8, calibration only (the floor)", ref["ptq_int8"]),
            row("shipped policy, fake-quant (torch)", ref["shipped"])]
    if emulation:
        rows.append(row("shipped policy, TFLM emulator (on-device numerics)", None, emulation))
    verdict = search.floor_check.sentence(task, warning="**WARNING:** ")
    if search.floor_action:
        verdict = f"{search.floor_action.message}.\n\n{verdict}"
    origin = "arrived trained" if search.pretrained else "was trained here in float"
    header = ["network", f"validation {task.metric}", f"test {task.metric}", f"test {task.agreement_metric}"]
    return (f"## {task.heading}\n\nThe model {origin}.\n\n"
            + _table(header + (["test ROC AUC (anomalies)"] if aucs else []), rows) + "\n\n" + verdict)


def _stages_section(search: SearchRecord, task: Task) -> str:
    if not search.stage_checks:
        return "## Training stages\n\nNo weights were trained (post-training quantisation only)."
    show = task.show
    rows = [[c.stage, show(c.val_acc_before), show(c.val_acc_after), task.show_spread(c.standard_error),
             "**undone**: its starting weights were kept" if c.undone else "kept"] for c in search.stage_checks]
    return ("## Training stages\n\nEach stage of the shipped network is measured on the validation split before "
            "and after; one that loses more than one paired standard error is undone.\n\n"
            + _table(["stage", "val before", "val after", "standard error", "result"], rows))


def _zero_point_note(search: SearchRecord) -> str:
    if search.zero_points != "single":
        return ""
    return (f"\n\nWeights and biases keep one zero point per tensor (`--single-zero-point`): "
            f"{search.zero_point_saving_bytes:,} B less flash than one per channel, as the TFLite schema wants. TFLM "
            "runs this model; LiteRT and other TFLite tools refuse it.")


def _why_section(search: SearchRecord, task: Task) -> str:
    label = "**SMPQ's pick, shipped**" if search.shipped_method == "smpq" else "**SMPQ's pick**"
    rows = [[k.text, k.source, f"{k.summed_shapley:.4f}", task.show(k.val_acc),
             label if k.chosen else ""] for k in search.k_best]
    chosen = next(i for i, k in enumerate(search.k_best) if k.chosen)
    top = search.k_best[0].source
    reason = (f"the best by {top} that fits every budget; no other of these led it on the validation "
              f"split by more than {search.rerank_margin:g} paired standard error(s)" if chosen == 0 else
              f"it led the best by {top} on the validation split by more than {search.rerank_margin:g} "
              "paired standard error(s)")
    floor = f"\n\n{search.floor_action.message}." if search.floor_action else ""
    at_budget = (" Each layer's Shapley value is taken at the budget's own policy: among as many layers at each "
                 "narrower width as the pick has, not averaged over every count (\"Shapley at the budget\"; the "
                 "pick is revalued until it stays put)." if top == "Shapley at the budget" else "")
    return ("## Why this policy\n\nThe selection takes the policies with the largest summed Shapley value within "
            f"the budgets (an exact knapsack), and the uniform policies that fit.{at_budget} It measures each on "
            f"the whole validation split. SMPQ's pick: {reason}.{floor}\n\n"
            + _table(["bits per layer", "from", "summed score", f"validation {task.metric}", ""], rows))


def _emulator_section(emulation: EmulationRecord, cost: CostRecord, task: Task) -> str:
    rows = [["test samples", f"{emulation.samples:,}"], [f"test {task.metric}", task.show(emulation.accuracy)]]
    if emulation.auc is not None:
        rows.append(["test ROC AUC of the reconstruction error (anomalies)", _auc(emulation.auc)])
    # `emulate` run on its own has no fake-quant network to compare with and leaves these None.
    if emulation.label_agreement is not None:
        rows += [[task.emulator_agreement, task.show(emulation.label_agreement)],
                 ["mean / max absolute output difference (dequantised outputs)",
                  f"{emulation.mean_abs_output_delta:.4f} / {emulation.max_abs_output_delta:.4f}"]]
    rows += [["model size (.tflite)", f"{emulation.model_bytes:,} B (predicted {cost.model_flash_bytes:,} B)"],
             ["smallest tensor arena (host TFLM, reference kernels)", f"{emulation.arena_bytes:,} B"],
             ["host emulator speed", f"{emulation.inferences_per_second:.0f} inferences/s"]]
    return "## TFLM emulator (model.tflite on the tflite-micro interpreter)\n\n" + _table(["figure", "value"], rows)


def int16_note(wide: frozenset[str], searched: frozenset[str] | None = None) -> str:
    """Which layers of the shipped model run int16 activations; and, where they are not the
    search's pick (``searched``: its int16 layers), that policy.json set them and the search's
    figures are not for them."""
    if not wide:
        return ""
    note = (f"int16 activations (TFLM's 16x8 kernels): {', '.join(sorted(wide))}, with a QUANTIZE at each "
            "int8/int16 boundary")
    if searched is not None and wide != searched:
        note += ("; set in policy.json, not the search's pick, whose cost figures are for its own int16 layers "
                 f"({', '.join(sorted(searched)) or 'none'}): export.json's and the emulator's are for the shipped file")
    return note


def make_report(search: SearchRecord, emulation: EmulationRecord | None, wide: frozenset[str] = frozenset()) -> Report:
    shipped = search.shipped
    cost = shipped.cost
    task = TASKS[search.task]
    # Flash counts the exported .tflite (the firmware embeds it) where the emulate stage measured it.
    model_flash = f"{cost.model_flash_bytes:,} B (predicted)"
    flash_total = cost.flash_total_bytes
    if emulation is not None:
        model_flash = f"{emulation.model_bytes:,} B (.tflite; predicted {cost.model_flash_bytes:,} B)"
        flash_total = cost.flash_total_with(emulation.model_bytes)
    images = {
        "shapley.png": _png(_shapley_plot(search)),
        "bits.png": _png(_bits_plot(search.methods)),
        "budget.png": _png(_budget_plot(cost, flash_total)),
        "accuracy_vs_flash.png": _png(_accuracy_plot(search, task)),
    }
    budget_rows = [
        ["flash", model_flash, cost.reserve_flash_text(), f"{flash_total:,} B",
         f"{cost.flash_budget_bytes:,} B", "ok" if flash_total <= cost.flash_budget_bytes else "OVER"],
        ["RAM", f"{cost.arena_bytes:,} B (arena)", f"{cost.reserve_ram_bytes:,} B", f"{cost.ram_total_bytes:,} B",
         f"{cost.ram_budget_bytes:,} B", "ok" if cost.fits["ram"] else "OVER"],
        ["cycles", f"{cost.cycles:,} ({cost.latency_ms:.2f} ms)", "–", f"{cost.cycles:,}", f"{cost.cycle_budget:,}",
         "ok" if cost.fits["cycles"] else "OVER"],
    ]
    layer_rows = [[layer.name, layer.kind, "×".join(str(d) for d in search.layer_shapes[layer.name]),
                   _label(shipped.policy[layer.name]), layer.params, layer.flash_bytes, layer.cycles]
                  for layer in cost.layers]
    # Post-training, "before" and "after" are one figure: one column, and no word of a finetune.
    scores = (lambda m: [task.show(m.test_acc)]) if search.post_training else \
        (lambda m: [task.show(m.test_acc_before_finetune), task.show(m.test_acc)])
    score_header = [f"test {task.metric} (post-training)"] if search.post_training else \
        [f"test {task.metric} before finetune", "after"]
    method_rows = [[m.method, m.text, *scores(m), f"{m.cost.model_flash_bytes:,}",
                    f"{m.cost.cycles:,}"] for m in search.methods]
    sections = [
        f"# smpq_edge build: {search.model} on {search.board}",
        f"Data: {search.data['name']}, {search.data['train']:,} training / {search.data['val']:,} validation / "
        f"{search.data['test']:,} test samples, task {task.name}. Seed {search.seed}. "
        f"Model input: {search.data.get('input_description', 'not recorded')}.",
        _accuracy_section(search, emulation, task),
        "## Budgets\n\nFlash counts the exported model where there is one; RAM and cycles are the cost "
        "model's prediction for the board's kernels.\n\n"
        + _table(["", "model", "board reserve", "total", "budget", ""], budget_rows) + _zero_point_note(search)
        + "\n\n![budget use](budget.png)",
        "## Bits per layer\n\n"
        + _table(["layer", "kind", "weight shape (TFLite)", "bits", "params", "flash B", "cycles"], layer_rows)
        + (f"\n\n{int16_note(wide, frozenset(shipped.int16))}." if wide else "") + "\n\n![bits](bits.png)",
        _why_section(search, task),
        "## Shapley values\n\n![shapley](shapley.png)",
        _stages_section(search, task),
        "## SMPQ and the baselines (same budgets)\n\n"
        + _table(["method", "bits", *score_header, "model flash B", "cycles"], method_rows) + f"\n\n![{task.metric} vs flash](accuracy_vs_flash.png)",
    ]
    if emulation:
        sections.append(_emulator_section(emulation, cost, task))
    markdown = "\n\n".join(sections) + "\n"
    return Report(markdown, _html(markdown, images), images)


def _html(markdown_text: str, images: dict[str, bytes]) -> str:
    """Markdown to a single HTML file (Python-Markdown with its tables extension), with the PNGs
    inlined as data URIs so the file stands alone."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    for name, png in images.items():
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{base64.b64encode(png).decode()}"')
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>smpq_edge report</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")
