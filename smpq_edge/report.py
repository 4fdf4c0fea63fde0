"""The build report: ``report.md`` and a self-contained ``report.html`` with embedded plots.

Inputs are the plain records the other stages wrote (search.json, emulation.json), so a report
can be remade from a build folder without rerunning anything.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class Report:
    markdown: str
    html: str
    images: dict[str, bytes]  # file name -> PNG bytes (embedded in the HTML, written beside the .md)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _shapley_plot(search: dict) -> bytes:
    table = search["shapley"]
    players = table["players"]
    mean = np.array([np.nan if v is None else v for v in table["mean"]])
    err = np.array([0.0 if v is None else v for v in table["stderr"]])
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * len(players)), 3.6))
    colours = ["tab:orange" if p.endswith("w4a8") else "tab:blue" for p in players]
    axis.bar(range(len(players)), np.nan_to_num(mean), yerr=err, color=colours, capsize=3)
    axis.set_xticks(range(len(players)), players, rotation=60, ha="right", fontsize=8)
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set_ylabel("Shapley value (accuracy)")
    axis.set_title("Shapley value per (layer, bit-width), ±1 standard error", fontsize=10)
    return _png(figure)


def _bits_plot(methods: list[dict]) -> bytes:
    layers = list(methods[0]["bits"])
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(layers)), 1.8 + 0.45 * len(methods)))
    grid = np.array([[m["bits"][name] for name in layers] for m in methods])
    axis.imshow(grid, cmap="coolwarm", vmin=4, vmax=8, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        axis.text(col, row, str(value), ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(methods)), [m["method"] for m in methods])
    axis.set_title("Weight bits per layer")
    return _png(figure)


def _budget_plot(cost: dict) -> bytes:
    used = [cost["flash_total_bytes"], cost["ram_total_bytes"], cost["cycles"]]
    budget = [cost["flash_budget_bytes"], cost["ram_budget_bytes"], cost["cycle_budget"]]
    share = [100.0 * u / b for u, b in zip(used, budget)]
    figure, axis = plt.subplots(figsize=(6, 2.4))
    axis.barh(["flash", "RAM", "cycles"], share, color=["tab:green" if s <= 100 else "tab:red" for s in share])
    axis.axvline(100, color="black", linestyle="--", linewidth=0.8)
    for row, (s, u) in enumerate(zip(share, used)):
        axis.text(s, row, f" {s:.1f}% ({u:,})", va="center", fontsize=8)
    axis.set_xlim(0, max(110, max(share) * 1.25))
    axis.set_xlabel("% of budget (chosen policy, predicted)")
    return _png(figure)


def _accuracy_plot(methods: list[dict]) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for m in methods:
        axis.scatter(m["cost"]["model_flash_bytes"], 100 * m["test_acc"], s=40, label=m["method"])
    axis.set_xlabel("model flash (bytes, predicted)")
    axis.set_ylabel("test accuracy after finetune (%)")
    axis.set_title("Accuracy against flash, same budget and finetune")
    axis.legend(fontsize=8)
    return _png(figure)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def make_report(search: dict, emulation: dict | None, build: dict | None = None) -> Report:
    methods = search["methods"]
    smpq = methods[0]
    cost = smpq["cost"]
    images = {
        "shapley.png": _shapley_plot(search),
        "bits.png": _bits_plot(methods),
        "budget.png": _budget_plot(cost),
        "accuracy_vs_flash.png": _accuracy_plot(methods),
    }
    accuracy_rows = [["float (torch)", f"{100 * search['float_test_acc']:.2f} %"],
                     ["fake-quant before finetune", f"{100 * smpq['test_acc_before_finetune']:.2f} %"],
                     ["fake-quant after finetune", f"{100 * smpq['test_acc']:.2f} %"]]
    if emulation:
        accuracy_rows.append(["TFLM emulator (on-device numerics)", f"{100 * emulation['accuracy']:.2f} %"])
    budget_rows = [
        ["flash", f"{cost['flash_total_bytes']:,} B", f"{cost['flash_budget_bytes']:,} B", "ok" if cost["fits"]["flash"] else "OVER"],
        ["RAM", f"{cost['ram_total_bytes']:,} B", f"{cost['ram_budget_bytes']:,} B", "ok" if cost["fits"]["ram"] else "OVER"],
        ["cycles", f"{cost['cycles']:,} ({cost['latency_ms']:.2f} ms)", f"{cost['cycle_budget']:,}", "ok" if cost["fits"]["cycles"] else "OVER"],
    ]
    layer_rows = [[layer["name"], layer["kind"], layer["weight_bits"], layer["params"], layer["flash_bytes"],
                   layer["cycles"]] for layer in cost["layers"]]
    method_rows = [[m["method"], " ".join(str(b) for b in m["bits"].values()), f"{100 * m['test_acc_before_finetune']:.2f}",
                    f"{100 * m['test_acc']:.2f}", m["cost"]["model_flash_bytes"], m["cost"]["cycles"]] for m in methods]
    sections = [
        f"# smpq_edge build: {search['model']} on {search['board']}",
        f"Data: {search['data']['name']} ({search['data']['test']} test samples). Seed {search['seed']}.",
        "## Accuracy\n\n" + _table(["measured on the test split", "accuracy"], accuracy_rows),
        "## Budgets (predicted by the cost model)\n\n" + _table(["", "used", "budget", ""], budget_rows)
        + "\n\n![budget use](budget.png)",
        "## Bits per layer\n\n" + _table(["layer", "kind", "bits", "params", "flash B", "cycles"], layer_rows)
        + "\n\n![bits](bits.png)",
        "## Shapley values\n\n![shapley](shapley.png)",
        "## SMPQ and the baselines (same budgets, same finetune)\n\n"
        + _table(["method", "bits", "acc before finetune %", "acc after %", "model flash B", "cycles"], method_rows)
        + "\n\n![accuracy vs flash](accuracy_vs_flash.png)",
    ]
    if emulation:
        rows = [["test samples", f"{emulation['samples']:,}"]]
        # `emulate` run on its own has no fake-quant network to compare with and leaves these None.
        if emulation.get("label_agreement") is not None:
            rows += [["label agreement with the fake-quant network", f"{100 * emulation['label_agreement']:.2f} %"],
                     ["mean / max |output difference| (dequantised logits)",
                      f"{emulation['mean_abs_output_delta']:.4f} / {emulation['max_abs_output_delta']:.4f}"]]
        sections.append("## TFLM emulator (model.tflite on the tflite-micro interpreter)\n\n" + _table(["figure", "value"], rows + [
            ["model size (.tflite)", f"{emulation['model_bytes']:,} B (predicted {cost['model_flash_bytes']:,} B)"],
            ["smallest tensor arena (host TFLM, reference kernels)", f"{emulation['arena_bytes']:,} B"],
            ["host emulator speed", f"{emulation['inferences_per_second']:.0f} inferences/s"],
        ]))
    markdown = "\n\n".join(sections) + "\n"
    return Report(markdown, _html(markdown, images), images)


def _html(markdown: str, images: dict[str, bytes]) -> str:
    """Markdown to a single HTML file with the PNGs inlined as data URIs (no external files)."""
    body = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, name = line[2:].split("](")
            data = base64.b64encode(images[name.rstrip(")")]).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>smpq_edge report</title><style>{style}</style></head><body>\n" \
        + "\n".join(body) + "\n</body></html>\n"
