"""The report's plots, built from small hand-made records: labelled axes, an accuracy axis that stops
at 100 %, reference lines and method markers that do not hide one another, zero Shapley bars seen."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer

from smpq_edge.common.records import SearchRecord
from smpq_edge.report import (BITS_COLOUR, _accuracy_plot, _bits_plot, _budget_plot, _shapley_plot,
                              make_report)
from smpq_edge.inputs.task import CLASSIFICATION, RECONSTRUCTION, Classification

LAYERS = ["conv0", "conv1", "dense"]


def cost(flash: int) -> dict:
    return {"layers": [], "model_flash_bytes": flash, "arena_bytes": 4000, "cycles": 90_000,
            "reserve_flash_bytes": 20_000, "reserve_ram_bytes": 3000, "flash_total_bytes": flash + 20_000,
            "ram_total_bytes": 7000, "flash_budget_bytes": 40_000, "ram_budget_bytes": 16_000,
            "cycle_budget": 800_000, "latency_ms": 1.1, "fits": {"flash": True, "ram": True, "cycles": True}}


def method(name: str, bits: list[int], flash: int, score: float) -> dict:
    return {"method": name, "bits": dict(zip(LAYERS, bits)), "cost": cost(flash), "score": None,
            "test_acc_before_finetune": score, "test_acc": score, "test_acc_same_finetune": None}


def measured(score: float) -> dict:
    return {"val_acc": score, "test_acc": score, "val_agreement": 1.0, "test_agreement": 1.0}


def record(task: str = "classification", float_score: float = 0.95, ptq_score: float = 0.95,
           methods: list[dict] | None = None,
           shapley_mean: tuple = (None, 0.02, None, 0.0001, None, 0.05)) -> SearchRecord:
    """Two candidates, int4 and int8: the narrowest (int4) has no Shapley entry, as the search writes it."""
    methods = methods or [method("smpq", [8, 4, 8], 15_000, 0.94), method("hawq", [8, 8, 8], 18_000, 0.95),
                          method("uniform8", [8, 8, 8], 18_000, 0.95), method("uniform4", [4, 4, 4], 9_000, 0.90)]
    return SearchRecord.model_validate({
        "model": "tiny", "task": task, "data": {"name": "toy", "train": 100, "val": 20, "test": 20}, "board": "b",
        "seed": 0, "pretrained": False, "shipped_method": "smpq", "float_test_acc": float_score,
        "reference": {"float": measured(float_score), "ptq_int8": measured(ptq_score),
                      "shipped": measured(methods[0]["test_acc"])},
        "stage_checks": [],
        "floor_check": {"floor_val_acc": ptq_score, "shipped_val_acc": 0.94, "standard_error": 0.01,
                        "below_floor": False},
        "shapley": {"players": [f"{layer}:w{b}a8" for layer in LAYERS for b in (4, 8)], "value": "kl",
                    "mean": list(shapley_mean), "stderr": [None, 0.004, None, 0.002, None, 0.01]},
        "shapley_scores": [[0.0, 0.02], [0.0, 0.0001], [0.0, 0.05]],
        "candidates": [4, 8], "k_best": [{"bits": methods[0]["bits"], "summed_shapley": 0.07, "val_acc": 0.94,
                                          "chosen": True}],
        "methods": methods, "layer_shapes": {layer: [8, 3, 3, 1] for layer in LAYERS}, "rerank_margin": 1.0,
    })


def figures(search: SearchRecord) -> dict:
    cost = search.shipped.cost
    return {"shapley": _shapley_plot(search), "bits": _bits_plot(search.methods),
            "budget": _budget_plot(cost, cost.flash_total_bytes), "accuracy": _accuracy_plot(search, CLASSIFICATION)}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_every_plot_labels_its_x_axis():
    for name, figure in figures(record()).items():
        for axis in figure.axes:
            assert axis.get_xlabel().strip(), name


def test_layer_axes_name_the_layers():
    search = record()
    for figure in (_shapley_plot(search), _bits_plot(search.methods)):
        axis = figure.axes[0]
        assert "layer" in axis.get_xlabel()
        assert [label.get_text() for label in axis.get_xticklabels()] == LAYERS


def test_accuracy_axis_stops_at_100_percent():
    search = record(float_score=1.0, ptq_score=1.0, methods=[method("smpq", [8, 4, 8], 15_000, 1.0),
                                                             method("uniform4", [4, 4, 4], 9_000, 0.97)])
    axis = _accuracy_plot(search, CLASSIFICATION).axes[0]
    assert "%" in axis.get_ylabel()
    assert axis.get_ylim()[1] <= 100
    assert axis.get_ylim()[0] < 97  # the lowest point is still on the axis


def test_accuracy_axis_of_a_fraction_stops_at_1():
    class Fraction(Classification):
        def plotted(self, score):
            return score

    fraction = Fraction(**{**dataclasses.asdict(CLASSIFICATION), "axis": "test accuracy"})
    search = record(float_score=1.0, ptq_score=0.99, methods=[method("smpq", [8, 4, 8], 15_000, 1.0)])
    assert _accuracy_plot(search, fraction).axes[0].get_ylim()[1] <= 1


def test_an_mse_axis_is_left_free():
    mse = [method("smpq", [8, 4, 8], 15_000, -150.0), method("uniform4", [4, 4, 4], 9_000, -180.0)]
    search = record("reconstruction", float_score=-140.0, ptq_score=-145.0, methods=mse)
    axis = _accuracy_plot(search, RECONSTRUCTION).axes[0]
    assert axis.get_ylim()[1] > 180  # not held at 100, and the largest MSE keeps its margin


def test_float_line_is_dashed_above_the_ptq_line():
    axis = _accuracy_plot(record(float_score=0.95, ptq_score=0.95), CLASSIFICATION).axes[0]
    lines = {line.get_label(): line for line in axis.lines}
    floating, ptq = lines["float"], lines["PTQ int8 (calibration only)"]
    assert floating.get_ydata()[0] == ptq.get_ydata()[0] == pytest.approx(95)
    assert floating.get_linestyle() == "--" and ptq.get_linestyle() == "-"
    assert floating.get_zorder() > ptq.get_zorder()
    assert ptq.get_linewidth() > floating.get_linewidth()  # the PTQ line shows either side of the dashes
    assert to_rgba(floating.get_color()) != to_rgba(ptq.get_color())
    assert {"float", "PTQ int8 (calibration only)"} <= {t.get_text() for t in axis.get_legend().get_texts()}


def test_methods_at_one_point_are_all_drawn_apart():
    figure = _accuracy_plot(record(), CLASSIFICATION)  # hawq and uniform8: 18,000 B, 95 %
    figure.canvas.draw()
    axis = figure.axes[0]
    marks = {c.get_label(): c for c in axis.collections}
    where = {name: tuple(c.get_offset_transform().transform(c.get_offsets())[0]) for name, c in marks.items()}
    assert where["hawq"] != where["uniform8"]
    assert abs(where["hawq"][0] - where["uniform8"][0]) >= 5  # display pixels, side by side
    assert marks["hawq"].get_offsets()[0][0] == marks["uniform8"].get_offsets()[0][0] == 18_000  # data kept
    shapes = [c.get_paths()[0].vertices.tobytes() for c in marks.values()]
    assert len(set(shapes)) == len(marks)
    assert len({c.get_sizes()[0] for c in marks.values()}) == len(marks)
    for c in marks.values():  # hollow: a marker drawn later does not cover one beneath
        assert all(face[3] == 0 for face in c.get_facecolor())


def test_a_candidate_whose_shapley_values_are_all_zero_is_still_drawn():
    search = record()
    axis = _shapley_plot(search).axes[0]
    int4 = to_rgba(BITS_COLOUR[4])
    zero_marks = [c for c in axis.collections if any(np.allclose(face, int4) for face in c.get_facecolor())]
    assert len(zero_marks) == 1
    mark = zero_marks[0]
    assert len(mark.get_offsets()) == len(LAYERS) and np.all(mark.get_offsets()[:, 1] == 0)
    assert mark.get_sizes()[0] > 0
    assert "int4" in mark.get_label() and "0" in mark.get_label()
    assert mark.get_label() in [t.get_text() for t in axis.get_legend().get_texts()]
    # The shipped int4 layer's mark is outlined like a shipped bar; the others are not.
    assert [to_rgba(e) == to_rgba("black") for e in mark.get_edgecolor()] == [False, True, False]


def test_zero_shapley_values_of_a_measured_candidate_are_marked_as_zeros():
    axis = _shapley_plot(record(shapley_mean=(None, 0.0, None, 0.0, None, 0.03))).axes[0]
    int8 = to_rgba(BITS_COLOUR[8])
    marks = [c for c in axis.collections if any(np.allclose(face, int8) for face in c.get_facecolor())]
    assert len(marks) == 1 and len(marks[0].get_offsets()) == 2  # conv0 and conv1; dense has a bar
    assert marks[0].get_label() == "int8 weights: Shapley value 0"


def test_shapley_bars_keep_error_bars_and_outline_only_the_shipped_choice():
    axis = _shapley_plot(record()).axes[0]
    bars = [b for b in axis.containers if isinstance(b, BarContainer)]
    filled = [b for b in bars if b.patches[0].get_fill()]
    assert len(filled) == 2 and all(b.errorbar is not None for b in filled)
    assert all(p.get_edgecolor()[3] == 0 for b in filled for p in b.patches)
    outlines = [p for b in bars if not b.patches[0].get_fill() for p in b.patches]
    assert sorted(round(p.get_height(), 6) for p in outlines) == [0.0, 0.02, 0.05]  # int8 conv0 and dense, int4 conv1


def test_make_report_embeds_every_plot_as_png():
    report = make_report(record(), None)
    assert set(report.images) == {"shapley.png", "bits.png", "budget.png", "accuracy_vs_flash.png"}
    assert all(png.startswith(b"\x89PNG") for png in report.images.values())
    assert "data:image/png;base64," in report.html
