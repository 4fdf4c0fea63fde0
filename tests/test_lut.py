"""LUT weights (issue 21, the export slice): a layer of 2, 3, 5, 6 or 7 bits is written as int8
values on a b-bit grid, stored by tflite-micro's compression tool as b-bit indices into value
tables with a DECODE operator before it, and TFLM computes from it exactly what the fake-quant
network computes; the cost model prices the file, and `cost` takes the widths as candidates."""

from __future__ import annotations

import pytest

from smpq_edge.inputs.data import load_dataset
from smpq_edge.emulator import emulate
from smpq_edge.common.errors import UserError
from smpq_edge.export.exporter import export_model
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.network.graph import trace
from smpq_edge.inputs.models import load_model
from smpq_edge.common.precision import LUT_BITS, WEIGHT_BITS
from smpq_edge.network.quant import QuantNet
from smpq_edge.search.runner import calibrate
from smpq_edge.search.train import TrainConfig, seed_everything, train

SAMPLES = 200


@pytest.fixture(scope="module")
def digits():
    """digits_cnn, trained in float (a few epochs), calibrated with every weight width a candidate."""
    seed_everything(0)
    data = load_dataset("digits", seed=0)
    source = load_model("digits_cnn", num_classes=data.num_classes)
    train(source.module, data, TrainConfig(epochs=8, lr=1e-2), 0, progress=False)
    source.module.eval()
    net = QuantNet(trace(source.module, data.input_shape), source.module, WEIGHT_BITS)
    calibrate(net, data, 0)
    return net.eval(), data


@pytest.mark.parametrize("bits", LUT_BITS)
def test_lut_layers_decode_in_tflm_to_what_the_fake_quant_computes(digits, bits):
    net, data = digits
    layers = net.graph.layers
    # Alternate layers take the LUT width: the two convs for even widths, the depthwise (per-channel
    # tables on axis 3) and the fc (one table, per-tensor scale) for odd ones.
    policy = {op.name: bits if (i + bits) % 2 == 0 else 8 for i, op in enumerate(layers)}
    net.set_policy(policy)
    exported = export_model(net, policy, data.x_train[:64])
    model = TfliteModel.from_bytes(exported.tflite)
    names = [op.name for op in model.operators()]
    lut_layers = sum(b == bits for b in policy.values())
    assert names.count("CUSTOM:TFLM_DECODE") == lut_layers >= 2
    result = emulate(exported.tflite, data.x_test[:SAMPLES], data.y_test[:SAMPLES], net, progress=False,
                     measure_arena=False)
    assert result.label_agreement == 1.0
    # TFLM's int8 outputs exactly: float32 against float64 dequantisation is all that differs.
    assert result.max_abs_output_delta < 1e-3 * result.output_scale
    # The all-int8 reference of the same export stays plain int8.
    reference = TfliteModel.from_bytes(exported.tflite_int8)
    assert "CUSTOM:TFLM_DECODE" not in [op.name for op in reference.operators()]


def test_weights_wider_than_8_or_narrower_than_2_bits_are_refused(digits):
    net, data = digits
    policy = {op.name: 8 for op in net.graph.layers}
    policy[net.graph.layers[0].name] = 1
    with pytest.raises(UserError, match="TFLM runs weights of 2 to 8 bits"):
        export_model(net, policy, data.x_train[:64])



def test_the_cost_model_prices_the_exported_lut_model(digits):
    """Flash within 2 % of the written file (value tables are priced at their bound), the DECODE
    operators where the exporter put them, and each LUT layer's cycles include its DECODE's."""
    from smpq_edge.inputs.boards import load_board
    from smpq_edge.network.cost import DECODE, estimate, tflite_operators
    from smpq_edge.common.precision import CANDIDATES

    net, data = digits
    policy = dict(zip([op.name for op in net.graph.layers], (3, 6, 2, 7)))
    net.set_policy(policy)
    exported = export_model(net, policy, data.x_train[:64])
    board = load_board("qemu-mps2-an386").with_candidates(list(CANDIDATES))
    report = estimate(net.graph, policy, board)
    assert abs(report.model_flash_bytes / len(exported.tflite) - 1) < 0.02
    written = [op.name.removeprefix("CUSTOM:") for op in TfliteModel.from_bytes(exported.tflite).operators()]
    assert [op.builtin for op in tflite_operators(net.graph, policy)] == written
    assert [op.op for op in report.ops].count(DECODE) == 4 and "TFLM_DECODE" in [op.op for op in report.ops]
    decode_cycles = {op.name: op.cycles for op in report.ops if op.op == DECODE}
    layer_cycles = {op.name: op.cycles for op in report.ops if op.op != DECODE}
    for layer in report.layers:
        assert layer.cycles == layer_cycles[layer.name] + decode_cycles[f"{layer.name}/decode"]
        assert layer.lut_bytes > 0 and layer.decoded_bytes == layer.params


def test_cli_cost_takes_lut_candidates(capsys):
    from smpq_edge.cli import main

    assert main(["cost", "--model", "digits_cnn", "--bits", "3", "--json"]) == 2  # not a candidate of the board
    assert "--candidates w3a8" in capsys.readouterr().err
    import json

    # On the 128 KB default board DECODE's code (22 KB, beyond any board's reserve) does not fit.
    assert main(["cost", "--model", "digits_cnn", "--bits", "3", "--candidates", "w3a8,w8a8", "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["extra_kernel_flash_bytes"] > 20000 and not report["fits"]["flash"]
    assert main(["cost", "--model", "digits_cnn", "--bits", "3", "--candidates", "w3a8,w8a8", "--json",
                 "--board", "nucleo-l4r5zi"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(layer["weight_bits"] == 3 and layer["lut_bytes"] > 0 for layer in report["layers"])
    assert main(["cost", "--model", "digits_cnn", "--candidates", "w4a16"]) == 2
    assert capsys.readouterr().err.startswith("error: --candidates: w4a16: TFLM's 16x8 kernels take int8 weights only")


def test_a_reserve_that_holds_decode_pays_no_extra_flash(digits):
    """`reserve: {decode: true}`: the board's reserve already counts DECODE's code, so neither the
    cost report nor the selector adds it; by default both do, once."""
    from smpq_edge.inputs.boards import load_board
    from smpq_edge.network.cost import estimate
    from smpq_edge.common.precision import CANDIDATES
    from smpq_edge.search.budget import Budgets, knapsack

    net, _ = digits
    board = load_board("nucleo-l4r5zi").with_candidates(list(CANDIDATES))
    holds = board.model_copy(update={"reserve": board.reserve.model_copy(update={"decode": True})})
    policy = {op.name: 3 for op in net.graph.layers}
    charged, covered = estimate(net.graph, policy, board), estimate(net.graph, policy, holds)
    assert charged.flash_total_bytes - covered.flash_total_bytes == charged.extra_kernel_flash_bytes > 20000
    assert covered.extra_kernel_flash_bytes == 0
    assert len(knapsack(net.graph, board, Budgets.of_board(board), board.precisions).shared) == 1
    assert knapsack(net.graph, holds, Budgets.of_board(holds), holds.precisions).shared == ()


def test_a_build_below_the_all_int4_model_ships_lut_layers_that_tflm_runs(tmp_path, capsys):
    """Issue 21's acceptance: with w2a8 w3a8 w4a8 w8a8 and a flash budget whose model part is below
    the all-int4 model's bytes (a board whose reserve holds DECODE), the build ships a smaller model
    with LUT layers; TFLM runs it as the fake-quant network does, and the report names each layer's
    precision and why."""
    import json
    import re
    from pathlib import Path

    from smpq_edge.cli import main

    text = Path("boards/nucleo-l4r5zi.yaml").read_text()
    board = tmp_path / "l4r5zi-decode.yaml"
    board.write_text(text.replace("name: nucleo-l4r5zi", "name: l4r5zi-decode")
                     .replace("reserve: {flash_kb: 96, ram_kb: 24}", "reserve: {flash_kb: 96, ram_kb: 24, decode: true}"))
    assert main(["cost", "--board", str(board), "--bits", "4", "--json"]) == 0
    int4 = json.loads(capsys.readouterr().out)
    flash = int4["reserve_flash_bytes"] + 0.97 * int4["model_flash_bytes"]
    out = tmp_path / "build"
    assert main(["build", "--out", str(out), "--quick", "--board", str(board), "--flash-kb", f"{flash / 1024:.3f}",
                 "--candidates", "w2a8", "w3a8", "w4a8", "w8a8"]) == 0
    policy = json.loads((out / "policy.json").read_text())
    widths = [layer["weight_bits"] for layer in policy["layers"]]
    assert min(widths) < 4, widths
    assert (out / "model.tflite").stat().st_size < int4["model_flash_bytes"]
    names = [op.name for op in TfliteModel.from_file(out / "model.tflite").operators()]
    assert names.count("CUSTOM:TFLM_DECODE") == sum(b not in (4, 8) for b in widths)
    assert json.loads((out / "emulation.json").read_text())["label_agreement"] >= 0.99
    report = (out / "report.md").read_text()
    bits_rows = re.findall(r"^\| (\w+) \| \w+ \| [^|]+ \| (\d) \|", report.split("## Bits per layer")[1], re.M)
    assert [int(b) for _, b in bits_rows] == widths
    assert "## Why this policy" in report and "| Shapley at the budget |" in report
