"""On-device fidelity of exported models in the TFLM host interpreter (issue 4), and the cost
model's flash and arena predictions against the real .tflite and TFLM's smallest arena."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from smpq_edge.inputs.boards import load_board
from smpq_edge.network.cost import estimate, uniform
from smpq_edge.inputs.data import load_dataset
from smpq_edge.emulator import emulate
from smpq_edge.inputs.models import example_names, load_model
from smpq_edge.search.train import TrainConfig, seed_everything, train
from smpq_edge.tflite.tflm import TensorSpec, quantise_input, smallest_arena

from test_export import CASES, Case, calibrated_export, trained_case

# The host interpreter runs TFLM's reference kernels: compare arenas with a reference-kernel board.
REFERENCE_BOARD = "rpi-pico"
# The fake-quant network's inference runs TFLM's integer arithmetic, so it gives TFLM's int8
# outputs exactly (issue 13 item 5); the bound is the target, with no machine's luck in it.
MIN_LABEL_AGREEMENT = 0.998


@functools.lru_cache(maxsize=None)
def example_case(name: str) -> Case:
    """test_export's trained case where it has one; else the example on its default data after one
    float epoch (no QAT): enough for the numerics, which do not depend on accuracy."""
    if name in CASES:
        return trained_case(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: intra-op threads only add contention
    try:
        seed_everything(0)
        source = load_model(name)
        data = load_dataset(source.default_data, seed=0)
        train(source.module, data, TrainConfig(epochs=1, lr=1e-2), 0, progress=False)
        source.module.eval()
        net, bits, export = calibrated_export(source, data, 128)
    finally:
        torch.set_num_threads(threads)
    return Case(name, data, net, bits, export)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return trained_case(request.param)


@pytest.fixture(scope="module", params=example_names())
def example(request):
    return example_case(request.param)


def test_quantise_input_goes_channels_last_rounds_and_clamps():
    x = np.array([[[[0.0, 0.25], [1.0, -2.0]]]], np.float32)  # NCHW (1, 1, 2, 2)
    q = quantise_input(x, TensorSpec((1, 2, 2, 1), np.dtype(np.int8), 1 / 255, -128))
    assert q.dtype == np.int8 and q.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(q[0, :, :, 0], [[-128, -64], [127, -128]])


def test_tflm_matches_torch_fake_quant(example):
    result = emulate(example.export.tflite, example.data.x_test, example.data.y_test, example.net, progress=False,
                     measure_arena=False)
    print(f"\n{example.name} mixed {example.bits}: torch {result.torch_accuracy:.4f} TFLM {result.accuracy:.4f} "
          f"agreement {result.label_agreement:.4f} max|d| {result.max_abs_output_delta:.2g} "
          f"(output step {result.output_scale:.4f}) {result.inferences_per_second:.0f} inf/s")
    assert result.samples == len(example.data.y_test) and result.workers == 2
    assert result.label_agreement >= MIN_LABEL_AGREEMENT
    # Every output is TFLM's int8 value; float32 against float64 dequantisation is all that differs.
    assert result.max_abs_output_delta < 1e-3 * result.output_scale
    assert result.accuracy == result.torch_accuracy


def test_int8_reference_matches_torch(case):
    net = case.net
    net.set_policy({name: 8 for name in case.bits})
    try:
        result = emulate(case.export.tflite_int8, case.data.x_test, case.data.y_test, net, progress=False,
                         measure_arena=False)
    finally:
        net.set_policy(case.bits)
    print(f"\n{case.name} int8: torch {result.torch_accuracy:.4f} TFLM {result.accuracy:.4f} "
          f"agreement {result.label_agreement:.4f} max|d| {result.max_abs_output_delta:.2g}")
    assert result.label_agreement >= MIN_LABEL_AGREEMENT
    assert result.max_abs_output_delta < 1e-3 * result.output_scale


def test_cost_model_against_real_flash_and_arena(case):
    """The cost model's targets: model bytes within 2 % of the .tflite, arena within 5 % of TFLM's
    smallest working arena (reference kernels, as the host interpreter runs; the host's arena, whose
    64-bit pointers make TFLM's persistent structures larger than the target's)."""
    board = load_board(REFERENCE_BOARD)
    graph = case.net.graph
    for label, bits in (("int8", uniform(graph, 8)), ("int4", uniform(graph, 4)), ("mixed", case.bits)):
        blob = case.export.variant(case.net, bits)
        arena = smallest_arena(blob)
        report = estimate(graph, bits, board, host=True)
        print(f"\n{case.name} {label}: flash predicted {report.model_flash_bytes} actual {len(blob)} "
              f"({report.model_flash_bytes / len(blob) - 1:+.1%}); arena predicted {report.arena_bytes} "
              f"actual {arena} ({report.arena_bytes / arena - 1:+.1%})")
        assert abs(report.model_flash_bytes / len(blob) - 1) <= 0.02
        assert abs(report.arena_bytes / arena - 1) <= 0.05
