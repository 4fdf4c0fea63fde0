"""The cost model against figures worked out by hand for tiny models, and the arena planner on
hand-made lifetimes. Cycle coefficients are read from the board files, so recalibrating a board
does not break these tests, but a wrong formula does."""

import dataclasses
import functools
import json

import pytest
import torch
import yaml
from torch import nn

from smpq_edge.inputs.boards import BOARDS_DIR, KernelCycles, board_names, load_board, parse_board
from smpq_edge.network.cost import (
    ARENA_ALIGNMENT, FLATBUFFER, HOST_ARENA, QUANT_PARAM_BYTES, RUNTIME, TARGET_ARENA, WORK_UNITS, OpWork,
    arena_activation_peak, estimate,
    formula_cycles, op_work, registered_kernels, tflite_layout, tflite_operators, uniform, weight_bytes,
)
from smpq_edge.common.errors import UserError
from smpq_edge.network.graph import Graph, Op, trace
from smpq_edge.inputs.models import example_names, load_model
from smpq_edge.inputs.policy import LayerChoice, Policy, load_policy, save_policy

CMSIS = "nucleo-l4r5zi"
REFERENCE = "rpi-pico"


class Tiny(nn.Module):
    """conv 3x3 3->5 (135 weights: odd), depthwise 3x3 on 5 channels (45: odd), FC 80->3 (240)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)  # (3, 6, 6) -> (5, 4, 4)
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5)  # -> (5, 4, 4)
        self.fc = nn.Linear(80, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).flatten(1))


TINY_SHAPE = (3, 6, 6)
TINY_MACS = {"conv": 4 * 4 * 3 * 3 * 3 * 5, "dw": 4 * 4 * 3 * 3 * 5, "fc": 80 * 3}  # 2160, 720, 240


@functools.lru_cache(maxsize=None)
def tiny_graph() -> Graph:
    return trace(Tiny(), TINY_SHAPE)


@functools.lru_cache(maxsize=None)
def example_graph(name) -> Graph:
    source = load_model(name)
    return trace(source.module, source.input_shape)


def by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_weight_bytes_packing():
    assert [weight_bytes(n, 4) for n in (0, 1, 2, 3, 135)] == [0, 1, 1, 2, 68]
    assert [weight_bytes(n, 8) for n in (0, 1, 135)] == [0, 1, 135]


def test_tiny_model_flash_by_hand():
    # (weight bytes, bias bytes = 4 x out channels, quant params = a 4-byte scale and an 8-byte zero
    # point per output channel for conv/depthwise (one each for the FC), for the weights and again
    # for the bias)
    hand = {
        4: {"conv": (68, 20, 2 * 5 * (4 + 8)), "dw": (23, 20, 2 * 5 * (4 + 8)), "fc": (120, 12, 2 * (4 + 8))},
        8: {"conv": (135, 20, 2 * 5 * (4 + 8)), "dw": (45, 20, 2 * 5 * (4 + 8)), "fc": (240, 12, 2 * (4 + 8))},
    }
    board = load_board(CMSIS)
    for bits, layers in hand.items():
        report = by_name(estimate(tiny_graph(), uniform(tiny_graph(), bits), board))
        for name, (weights, bias, quant) in layers.items():
            layer = report[name]
            assert (layer.weight_bits, layer.params, layer.macs) == (bits, {"conv": 135, "dw": 45, "fc": 240}[name],
                                                                      TINY_MACS[name])
            assert (layer.weight_bytes, layer.bias_bytes, layer.quant_param_bytes) == (weights, bias, quant), name
            assert layer.flash_bytes == weights + bias + quant


# Tiny's operators as TFLite runs them (the flatten folds into FULLY_CONNECTED, the ReLUs fuse),
# with their work counted by hand: conv 3x3x3 -> 5 on a 4x4 output, depthwise 3x3 on 5 channels.
TINY_WORK = {
    "conv": OpWork(macs=2160, taps=2160 // 3, im2col=16 * 9 * 3, copies=16 * 9, outputs=80, pixels=16, rows=4,
                   inputs=108, weights=135),
    "dw": OpWork(macs=720, taps=720, im2col=16 * 9 * 5, copies=16 * 3, outputs=80, pixels=16, rows=4, inputs=80,
                 weights=45),
    "fc": OpWork(macs=240, taps=3, outputs=3, pixels=1, rows=1, inputs=80, weights=240),
}


def by_hand(work: OpWork, formula) -> int:
    return round(work.macs * formula.per_mac + work.taps * formula.per_tap + work.im2col * formula.per_im2col
                 + work.copies * formula.per_copy + work.outputs * formula.per_output + work.pixels * formula.per_pixel
                 + work.rows * formula.per_row + work.inputs * formula.per_input + work.weights * formula.per_weight
                 + work.calls * formula.per_call)


def test_tiny_model_work_by_hand():
    operators = tflite_operators(tiny_graph())
    assert [(o.name, o.builtin) for o in operators] == [("conv", "CONV_2D"), ("dw", "DEPTHWISE_CONV_2D"),
                                                        ("fc", "FULLY_CONNECTED")]
    assert {o.name: op_work(o) for o in operators} == TINY_WORK


@pytest.mark.parametrize("board_name, bits, kernels", [
    (CMSIS, 8, {"conv": "conv_s8", "dw": "depthwise_3x3_s8", "fc": "fc_s8"}),
    (CMSIS, 4, {"conv": "conv_s4", "dw": "depthwise_s4", "fc": "fc_s4"}),  # no 3x3 s4 depthwise kernel
    (REFERENCE, 8, {"conv": "conv_s8", "dw": "depthwise_s8", "fc": "fc_s8"}),
    (REFERENCE, 4, {"conv": "conv_s4", "dw": "depthwise_s4", "fc": "fc_s4"}),
])
def test_tiny_model_cycles_by_hand(board_name, bits, kernels):
    board = load_board(board_name)
    report = estimate(tiny_graph(), uniform(tiny_graph(), bits), board)
    assert [(op.name, op.kernel) for op in report.ops] == list(kernels.items())
    hand = {name: by_hand(TINY_WORK[name], board.cycles[kernel]) for name, kernel in kernels.items()}
    assert {name: layer.cycles for name, layer in by_name(report).items()} == hand
    assert report.cycles == sum(hand.values())  # nothing else runs: no RESHAPE is priced
    assert report.latency_ms == pytest.approx(report.cycles / (board.clock_mhz * 1e3))


def test_formula_prices_every_term():
    # Distinct powers of two per unit: a term dropped or swapped changes the sum.
    work = OpWork(**{name: 2 ** i for i, name in enumerate(WORK_UNITS)})
    coefficients = [name for name in KernelCycles.model_fields]
    assert len(coefficients) == len(WORK_UNITS)
    for i, coefficient in enumerate(coefficients):
        alone = KernelCycles(**{coefficient: 3.0})
        assert formula_cycles(work, alone) == 3 * 2 ** i, coefficient
    assert formula_cycles(work, KernelCycles(**dict.fromkeys(coefficients, 1.0))) == 2 ** len(WORK_UNITS) - 1


def _variants(module: nn.Module, shape, bits: int, board_name: str) -> list[tuple[str, str]]:
    graph = trace(module, shape)
    return [(op.op, op.kernel) for op in estimate(graph, uniform(graph, bits), load_board(board_name)).ops]


def test_cmsis_kernel_choice_by_shape():
    # CMSIS-NN's wrappers: 1x1 unit stride, strided 1x1, im2col for the rest; the 3x3 depthwise
    # kernel only for int8 with padding <= 1, the general one for 5x5.
    net = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    expected = ["conv_1x1_s8", "conv_1x1_strided_s8", "conv_s8", "depthwise_3x3_s8", "depthwise_s8", "fc_s8"]
    assert [kernel for _, kernel in _variants(net, (8, 8, 8), 8, CMSIS)] == expected
    assert [kernel for _, kernel in _variants(net, (8, 8, 8), 4, CMSIS)] == [
        "conv_1x1_s4", "conv_1x1_strided_s4", "conv_s4", "depthwise_s4", "depthwise_s4", "fc_s4"]
    assert [kernel for _, kernel in _variants(net, (8, 8, 8), 8, REFERENCE)] == [
        "conv_s8", "conv_s8", "conv_s8", "depthwise_s8", "depthwise_s8", "fc_s8"]


def test_pad_operator_is_priced_by_rows():
    # A stride-2 3x3 conv with torch padding 1 on an even input needs a PAD in front (the converter
    # cannot express it as SAME); the PAD's work is the padded tensor: 1 x 10 x 10, 10 rows.
    graph = trace(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 3)), (1, 8, 8))
    pad, conv, _ = tflite_operators(graph)
    assert (pad.builtin, conv.builtin, conv.inputs) == ("PAD", "CONV_2D", (pad.name,))
    assert op_work(pad) == OpWork(outputs=100, pixels=100, rows=10, inputs=64)
    board = load_board(CMSIS)
    report = estimate(graph, uniform(graph, 8), board)
    assert [op.kernel for op in report.ops] == ["pad", "conv_s8", "fc_s8"]
    assert report.ops[0].cycles == by_hand(op_work(pad), board.cycles["pad"])
    assert report.cycles == sum(op.cycles for op in report.ops)


def test_depthwise_behind_a_pad_runs_unpadded():
    # Behind its PAD the strided 3x3 depthwise is VALID: CMSIS-NN's 3x3 kernel (padding <= 1) runs it.
    net = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), nn.Flatten(), nn.Linear(64, 3))
    assert _variants(net, (4, 8, 8), 8, CMSIS) == [("PAD", "pad"), ("DEPTHWISE_CONV_2D", "depthwise_3x3_s8"),
                                                    ("FULLY_CONNECTED", "fc_s8")]


def test_registered_kernels_follow_the_weight_types():
    graph = tiny_graph()
    mixed = {"conv": 4, "dw": 8, "fc": 8}
    assert registered_kernels(graph, uniform(graph, 8), "cmsis_nn") == (
        "CONV_2D_INT8", "DEPTHWISE_CONV_2D_INT8", "FULLY_CONNECTED_INT8")
    assert registered_kernels(graph, mixed, "cmsis_nn") == (
        "CONV_2D_INT4", "DEPTHWISE_CONV_2D_INT8", "FULLY_CONNECTED_INT8")
    assert registered_kernels(graph, mixed, "reference") == ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@pytest.mark.parametrize("board_name", [CMSIS, REFERENCE])
def test_firmware_memory_is_model_plus_runtime(board_name):
    board = load_board(board_name)
    graph = tiny_graph()
    table = RUNTIME[board.kernels]
    for bits in ({"conv": 4, "dw": 8, "fc": 8}, uniform(graph, 8)):
        report = estimate(graph, bits, board)
        kernels = registered_kernels(graph, bits, board.kernels)
        assert report.runtime_flash_bytes == table.flash_base + sum(table.flash_per_kernel[k] for k in kernels)
        assert report.firmware_flash_bytes == report.model_flash_bytes + report.runtime_flash_bytes
        assert report.firmware_ram_bytes == report.arena_bytes + table.static_ram + 3 * table.static_ram_per_op
    assert table.flash_base > 0 and all(size >= 0 for size in table.flash_per_kernel.values())


def test_target_arena_is_below_the_host_one():
    # Same planned buffers; the overhead differs: the target's persistent structures hold 4-byte
    # pointers (fitted to the firmware's report), the host's 8-byte ones.
    graph = example_graph("resnet8")
    for board_name in (CMSIS, REFERENCE):
        board = load_board(board_name)
        target = estimate(graph, uniform(graph, 8), board).arena_bytes
        host = estimate(graph, uniform(graph, 8), board, host=True).arena_bytes
        n_ops, n_tensors, _ = tflite_layout(graph)
        channels = sum(op.out_channels for op in graph.layers if op.kind != "fc")

        def overhead(o):
            return o.fixed + o.per_tensor * n_tensors + o.per_op * n_ops + o.per_channel * channels

        assert host - target == overhead(HOST_ARENA) - overhead(TARGET_ARENA[board.kernels]) > 0


def test_flash_total_moves_by_the_weight_bytes_alone():
    board = load_board(CMSIS)
    w4 = estimate(tiny_graph(), uniform(tiny_graph(), 4), board)
    w8 = estimate(tiny_graph(), uniform(tiny_graph(), 8), board)
    assert w8.model_flash_bytes - w4.model_flash_bytes == (135 - 68) + (45 - 23) + (240 - 120)
    mixed = estimate(tiny_graph(), {"conv": 4, "dw": 8, "fc": 8}, board)
    assert w8.model_flash_bytes - mixed.model_flash_bytes == 135 - 68
    assert w4.flash_total_bytes == w4.model_flash_bytes + 96 * 1024  # the board's reserve


@pytest.mark.parametrize("board_name", board_names())
@pytest.mark.parametrize("model", example_names())
def test_int4_flash_below_int8(model, board_name):
    graph, board = example_graph(model), load_board(board_name)
    w4 = estimate(graph, uniform(graph, 4), board)
    w8 = estimate(graph, uniform(graph, 8), board)
    assert w4.model_flash_bytes < w8.model_flash_bytes
    params = sum(op.weight_count for op in graph.layers)
    assert w8.model_flash_bytes - w4.model_flash_bytes == params - sum(weight_bytes(op.weight_count, 4)
                                                                     for op in graph.layers)


def test_scratch_by_kernel_set():
    # Reference kernels unpack an INT4 filter into a full int8 copy (its weight count) per invoke;
    # CMSIS-NN reads packed weights: its scratch is im2col (2 x int16 x 3*3*3 for the conv) and the
    # s4 depthwise column buffer (int16 x 3*3 x 5), the same or smaller for int8.
    hand = {
        (REFERENCE, 4): {"conv": 135, "dw": 45, "fc": 240},
        (REFERENCE, 8): {"conv": 0, "dw": 0, "fc": 0},
        (CMSIS, 4): {"conv": 108, "dw": 90, "fc": 0},
        (CMSIS, 8): {"conv": 108, "dw": 0, "fc": 0},
    }
    for (board_name, bits), expected in hand.items():
        report = estimate(tiny_graph(), uniform(tiny_graph(), bits), load_board(board_name))
        assert {name: layer.scratch_bytes for name, layer in by_name(report).items()} == expected, (board_name, bits)


def test_reference_int4_unpack_grows_the_arena_cmsis_does_not():
    # Exact placement is the planner's business (tested on hand-made lifetimes below); here the
    # claim is only that the unpack buffers cost arena on the reference board and nothing on
    # CMSIS-NN, whose int4 conv and FC need the same scratch as int8 (no depthwise here).
    graph = trace(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(80, 3)), TINY_SHAPE)
    arena = {(b, bits): estimate(graph, uniform(graph, bits), load_board(b)).arena_bytes
             for b in (REFERENCE, CMSIS) for bits in (4, 8)}
    # At the conv, input (108 -> 112) and output (80) are alive: the unpacked filter (135 -> 144)
    # adds to them, so the arena must grow, by at most that buffer plus the FC's (240).
    assert 144 <= arena[REFERENCE, 4] - arena[REFERENCE, 8] <= 144 + 240
    assert arena[CMSIS, 4] == arena[CMSIS, 8]
    tiny = {bits: estimate(tiny_graph(), uniform(tiny_graph(), bits), load_board(REFERENCE)).arena_bytes
            for bits in (4, 8)}
    assert tiny[4] > tiny[8]


@pytest.mark.parametrize("model", example_names())
def test_reference_int4_scratch_is_the_int8_filter(model):
    graph = example_graph(model)
    report = estimate(graph, uniform(graph, 4), load_board(REFERENCE))
    assert [layer.scratch_bytes for layer in report.layers] == [op.weight_count for op in graph.layers]
    # The unpack buffer lives only during its layer, so it may fit beside smaller activations
    # (ResNet-8's largest filters sit where activations are small), but it never shrinks the arena.
    assert report.arena_bytes >= estimate(graph, uniform(graph, 8), load_board(REFERENCE)).arena_bytes


# --- the greedy arena planner on hand-made lifetimes ------------------------------------------

def chain(*sizes) -> Graph:
    """input -> t1 -> t2 ..., each tensor of the given byte size (int8, so bytes = elements)."""
    ops = [Op("t0", "input", (), (sizes[0],))]
    for i, size in enumerate(sizes[1:], start=1):
        ops.append(Op(f"t{i}", "relu", (f"t{i - 1}",), (size,)))
    return Graph(ops, ops[0].out_shape, ops[-1].name)


def aligned(n: int) -> int:
    return -(-n // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


def test_arena_alignment_is_16():
    assert ARENA_ALIGNMENT == 16
    assert arena_activation_peak(tflite_layout(chain(1))[2], {}) == 16


def test_arena_chain_peak_is_the_largest_adjacent_pair():
    # Each op holds its input and its output; buffers two steps apart never live together.
    sizes = (100, 40, 70, 33, 5)
    expected = max(aligned(a) + aligned(b) for a, b in zip(sizes, sizes[1:]))
    assert expected == 112 + 48
    assert arena_activation_peak(tflite_layout(chain(*sizes))[2], {}) == expected


def test_arena_chain_with_scratch():
    # A 20-byte scratch during t1's op: t0 (112) + t1 (48) + scratch (32) alive together.
    assert arena_activation_peak(tflite_layout(chain(100, 40, 70))[2], {"t1": 20}) == 112 + 48 + 32
    # Scratch during t2's op: t1 (48) + t2 (80) + 1000 -> 1008.
    assert arena_activation_peak(tflite_layout(chain(100, 40, 70))[2], {"t2": 1000}) == 48 + 80 + 1008


def test_arena_branch_keeps_the_shared_input_alive():
    # x feeds a and b, and a waits for the add: at b's step x, a and b are all alive.
    ops = [
        Op("x", "input", (), (64,)),
        Op("a", "relu", ("x",), (32,)),
        Op("b", "relu", ("x",), (48,)),
        Op("c", "add", ("a", "b"), (16,)),
    ]
    assert arena_activation_peak(tflite_layout(Graph(ops, (64,), "c"))[2], {}) == 64 + 32 + 48


def test_arena_reuses_memory_of_dead_buffers():
    # Ten 1 KB steps in a chain need two buffers, not ten.
    assert arena_activation_peak(tflite_layout(chain(*[1024] * 10))[2], {}) == 2 * 1024


# --- policy mismatches and candidates ---------------------------------------------------------

def test_policy_missing_layer():
    with pytest.raises(UserError, match=r"missing layers \['fc'\]"):
        estimate(tiny_graph(), {"conv": 8, "dw": 8}, load_board(CMSIS))


def test_policy_unknown_layer():
    with pytest.raises(UserError, match=r"unknown layers \['head'\]"):
        estimate(tiny_graph(), {"conv": 8, "dw": 8, "fc": 8, "head": 4}, load_board(CMSIS))


def test_bit_width_not_a_candidate():
    with pytest.raises(UserError, match=r"layer 'dw': 2-bit weights are not a candidate on board nucleo-l4r5zi"):
        estimate(tiny_graph(), {"conv": 8, "dw": 2, "fc": 8}, load_board(CMSIS))
    raw = yaml.safe_load((BOARDS_DIR / f"{CMSIS}.yaml").read_text(encoding="utf-8"))
    int8_only = parse_board(yaml.safe_dump({**raw, "name": "int8-only", "candidates": ["w8a8"]}), "int8-only.yaml")
    assert int8_only.weight_bits == (8,)
    estimate(tiny_graph(), uniform(tiny_graph(), 8), int8_only)
    with pytest.raises(UserError, match=r"layer 'conv': 4-bit weights are not a candidate on board int8-only"):
        estimate(tiny_graph(), uniform(tiny_graph(), 4), int8_only)


def test_budgets_decide_fits():
    board = load_board(CMSIS)
    report = estimate(tiny_graph(), uniform(tiny_graph(), 8), board)
    assert report.fits == {"flash": True, "ram": True, "cycles": True}
    tight = estimate(tiny_graph(), uniform(tiny_graph(), 8), board, flash_budget_bytes=report.flash_total_bytes - 1,
                     ram_budget_bytes=report.ram_total_bytes, cycle_budget=report.cycles - 1)
    assert tight.fits == {"flash": False, "ram": True, "cycles": False}


def test_policy_file_round_trip(tmp_path):
    graph = tiny_graph()
    policy = Policy(board=CMSIS, model="tiny", method="manual", layers=[
        LayerChoice(name=op.name, kind=op.kind, weight_bits=bits, params=op.weight_count)
        for op, bits in zip(graph.layers, (4, 8, 4))])
    path = save_policy(policy, tmp_path / "policy.json")
    loaded = load_policy(path)
    assert loaded == policy and loaded.bits == {"conv": 4, "dw": 8, "fc": 4}
    assert [layer.weight_bits for layer in estimate(graph, loaded.bits, load_board(CMSIS)).layers] == [4, 8, 4]


@pytest.mark.parametrize("edit,expected", [
    (lambda p: p["layers"][0].update(weight_bits=1), "layers.0.weight_bits"),
    (lambda p: p["layers"][1].update(name="conv"), "a layer is listed twice"),
    (lambda p: p.update(layerz=[]), "layerz"),
])
def test_bad_policy_file(tmp_path, edit, expected):
    raw = {"board": CMSIS, "model": "tiny", "layers": [
        {"name": "conv", "kind": "conv", "weight_bits": 4, "params": 135},
        {"name": "dw", "kind": "depthwise", "weight_bits": 8, "params": 45}]}
    edit(raw)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("board_name", [CMSIS, REFERENCE])
def test_a_final_softmax_is_one_more_operator_and_tensor(board_name):
    board = load_board(board_name)
    logits = estimate(tiny_graph(), uniform(tiny_graph(), 8), board)
    softmax_graph = dataclasses.replace(tiny_graph(), output_softmax=True)
    softmax = estimate(softmax_graph, uniform(softmax_graph, 8), board)
    operator = tflite_operators(softmax_graph)[-1]
    assert (operator.name, operator.builtin, operator.inputs) == ("fc/softmax", "SOFTMAX", ("fc",))
    work = OpWork(outputs=3, pixels=1, rows=1, inputs=3)
    assert op_work(operator) == work
    assert softmax.ops[-1].kernel == "other"  # no measured fit: the board's generic elementwise formula
    assert softmax.cycles - logits.cycles == by_hand(work, board.cycles["other"])
    # One more activation (its scale and zero point), tensor and operator in the flatbuffer.
    assert softmax.model_flash_bytes - logits.model_flash_bytes == \
        QUANT_PARAM_BYTES + FLATBUFFER.per_tensor + FLATBUFFER.per_op
    kernel_flash = {CMSIS: RUNTIME["cmsis_nn"], REFERENCE: RUNTIME["reference"]}[board_name].flash_per_kernel["SOFTMAX"]
    assert softmax.runtime_flash_bytes - logits.runtime_flash_bytes == kernel_flash
    overhead = TARGET_ARENA[board.kernels]
    # The 3 probabilities get a 16-byte slot of their own next to the 3 logits they are made from.
    assert softmax.arena_bytes - logits.arena_bytes >= overhead.per_tensor + overhead.per_op


def test_cost_command_prices_a_models_final_softmax_unless_logits(tmp_path, capsys):
    from smpq_edge.cli import main

    path = tmp_path / "soft.py"
    path.write_text("from torch import nn\nINPUT_SHAPE = (1, 8, 8)\n"
                    "def build_model(num_classes=10):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes), nn.Softmax(dim=1))\n")
    for extra, expected in (([], ["FULLY_CONNECTED", "SOFTMAX"]), (["--logits"], ["FULLY_CONNECTED"])):
        assert main(["cost", "--model", str(path), "--json", *extra]) == 0
        printed = capsys.readouterr().out
        report = json.loads(printed[printed.index("{"):])
        assert [op["op"] for op in report["ops"]] == expected
