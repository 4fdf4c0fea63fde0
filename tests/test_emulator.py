"""On-device fidelity of exported models in the TFLM host interpreter (issue 4), and the cost
model's flash and arena predictions against the real .tflite and TFLM's smallest arena."""

from __future__ import annotations

import numpy as np
import pytest

from smpq_edge.boards import load_board
from smpq_edge.cost import estimate, uniform
from smpq_edge.emulator import emulate
from smpq_edge.tflm import TensorSpec, quantise_input, smallest_arena

from test_export import CASES, trained_case

# The host interpreter runs TFLM's reference kernels: compare arenas with a reference-kernel board.
REFERENCE_BOARD = "rpi-pico"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return trained_case(request.param)


def test_quantise_input_goes_channels_last_rounds_and_clamps():
    x = np.array([[[[0.0, 0.25], [1.0, -2.0]]]], np.float32)  # NCHW (1, 1, 2, 2)
    q = quantise_input(x, TensorSpec((1, 2, 2, 1), np.dtype(np.int8), 1 / 255, -128))
    assert q.dtype == np.int8 and q.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(q[0, :, :, 0], [[-128, -64], [127, -128]])


def test_tflm_matches_torch_fake_quant(case):
    result = emulate(case.export.tflite, case.data.x_test, case.data.y_test, case.net, progress=False)
    print(f"\n{case.name} mixed {case.bits}: torch {result.torch_accuracy:.4f} TFLM {result.accuracy:.4f} "
          f"agreement {result.label_agreement:.4f} mean|d| {result.mean_abs_output_delta:.4f} "
          f"(output step {result.output_scale:.4f}) arena {result.arena_bytes} B "
          f"{result.inferences_per_second:.0f} inf/s")
    assert result.samples == len(case.data.y_test) and result.workers == 2
    assert abs(result.accuracy - result.torch_accuracy) <= 0.003 + 1e-9
    assert result.label_agreement >= 0.99
    assert result.mean_abs_output_delta < result.output_scale


def test_int8_reference_matches_torch(case):
    net = case.net
    net.set_policy({name: 8 for name in case.bits})
    try:
        result = emulate(case.export.tflite_int8, case.data.x_test, case.data.y_test, net, progress=False,
                         measure_arena=False)
    finally:
        net.set_policy(case.bits)
    print(f"\n{case.name} int8: torch {result.torch_accuracy:.4f} TFLM {result.accuracy:.4f} "
          f"agreement {result.label_agreement:.4f} mean|d| {result.mean_abs_output_delta:.4f}")
    assert result.label_agreement >= 0.99


def test_cost_model_against_real_flash_and_arena(case):
    """The cost model's targets: model bytes within 2 % of the .tflite, arena within 5 % of TFLM's
    smallest working arena (reference kernels, as the host interpreter runs)."""
    board = load_board(REFERENCE_BOARD)
    graph = case.net.graph
    for label, bits in (("int8", uniform(graph, 8)), ("int4", uniform(graph, 4)), ("mixed", case.bits)):
        blob = case.export.variant(case.net, bits)
        arena = smallest_arena(blob)
        report = estimate(graph, bits, board)
        print(f"\n{case.name} {label}: flash predicted {report.model_flash_bytes} actual {len(blob)} "
              f"({report.model_flash_bytes / len(blob) - 1:+.1%}); arena predicted {report.arena_bytes} "
              f"actual {arena} ({report.arena_bytes / arena - 1:+.1%})")
        assert abs(report.model_flash_bytes / len(blob) - 1) <= 0.02
        assert abs(report.arena_bytes / arena - 1) <= 0.05
