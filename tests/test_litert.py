"""Every .tflite the SDK writes opens in LiteRT (ai-edge-litert, the successor of tflite-runtime),
the interpreter users check and compare models with before they flash anything, and computes what
TFLM computes. LiteRT refused the single shared zero point of per-channel weights and biases that
TFLM alone accepts, so the exporter writes one zero point per scale."""

from __future__ import annotations

import numpy as np
import pytest

from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.tflite.tflm import TflmRunner, quantise_input

from test_export import CASES, trained_case
from test_lut import digits  # noqa: F401 (a fixture)

SAMPLES = 100


def litert_outputs(model: bytes, x: np.ndarray) -> np.ndarray:
    """LiteRT with its reference kernels (no XNNPack delegate), one sample per invoke as TFLM runs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    outputs = []
    for sample in x:
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(outputs)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("which", ["mixed int4/int8", "int8"])
def test_litert_opens_the_export_and_agrees_with_tflm(name, which):
    case = trained_case(name)
    model = case.export.tflite if which == "mixed int4/int8" else case.export.tflite_int8
    types = {tensor.type for tensor in TfliteModel.from_bytes(model).tensors()}
    assert ("INT4" in types) == (which == "mixed int4/int8")
    runner = TflmRunner(model)
    x = quantise_input(case.data.x_test[:SAMPLES], runner.input)
    tflm, litert = runner.run(x).astype(np.int32), litert_outputs(model, x).astype(np.int32)
    # Two runtimes with their own kernels: LiteRT's reference kernels round some requantisation
    # ties otherwise than TFLM's, so a rare output is one step apart (measured: 1 output of 50
    # samples on each case's int8 model, none on the mixed ones); any larger gap is a wrong model.
    assert np.abs(tflm - litert).max() <= 1
    assert (tflm == litert).mean() >= 0.99
    assert (tflm.argmax(1) == litert.argmax(1)).mean() >= 0.98


def test_single_zero_point_is_tflms_alone_smaller_by_what_the_cost_model_says():
    """--single-zero-point: one zero point per weight and bias tensor, 16 B less per output channel;
    TFLM runs it exactly as before, LiteRT refuses it (as it refused every export before)."""
    from dataclasses import replace

    from smpq_edge.inputs.boards import load_board
    from smpq_edge.network.cost import estimate, zero_point_saving

    case = trained_case("digits_cnn")
    compact = replace(case.export, single_zero_point=True).variant(case.net, case.bits)
    per_tensor = [t for t in TfliteModel.from_bytes(compact).tensors() if t.quantization and len(t.quantization.scales) > 1]
    assert per_tensor and all(t.quantization.zero_points == (0,) for t in per_tensor)
    board = load_board("nucleo-l4r5zi")
    single = board.model_copy(update={"zero_points": "single"})
    saving = zero_point_saving(case.net.graph, case.bits, single)
    assert len(case.export.tflite) - len(compact) == saving > 0
    assert estimate(case.net.graph, case.bits, board).model_flash_bytes - \
        estimate(case.net.graph, case.bits, single).model_flash_bytes == saving
    runner = TflmRunner(case.export.tflite)
    x = quantise_input(case.data.x_test[:SAMPLES], runner.input)
    np.testing.assert_array_equal(TflmRunner(compact).run(x), runner.run(x))
    with pytest.raises(ValueError, match="zero_point values"):
        litert_outputs(compact, x[:1])


def test_report_states_what_the_single_zero_point_saved():
    from smpq_edge.report import _zero_point_note
    from smpq_edge.common.records import SearchRecord

    fields = {"zero_points": "single", "zero_point_saving_bytes": 1234}
    note = _zero_point_note(SearchRecord.model_construct(**fields))
    assert "1,234 B less flash" in note and "LiteRT" in note
    assert _zero_point_note(SearchRecord.model_construct(zero_points="per_channel")) == ""


def test_litert_opens_a_lut_export_and_names_the_op_it_lacks(digits):
    """A LUT model (DECODE before its 2-7-bit layers) is a valid TFLite file: LiteRT reads it (the
    index tensors carry no stray scales) and stops only at TFLM's custom DECODE, which it has no
    kernel for; TFLM alone runs such a model."""
    from smpq_edge.export.exporter import export_model

    net, data = digits  # every weight width a candidate
    bits = {op.name: 3 for op in net.graph.layers}
    net.set_policy(bits)
    try:
        model = export_model(net, bits, data.x_train[:64]).tflite
    finally:
        net.set_policy(None)
    runner = TflmRunner(model)
    x = quantise_input(data.x_test[:1], runner.input)
    with pytest.raises(RuntimeError, match="unresolved custom op: TFLM_DECODE"):
        litert_outputs(model, x)
