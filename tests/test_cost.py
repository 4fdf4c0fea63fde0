"""The cost model against figures worked out by hand for tiny models, and the arena planner on
hand-made lifetimes. Cycle coefficients are read from the board files, so recalibrating a board
does not break these tests, but a wrong formula does."""

import functools
import json

import pytest
import torch
import yaml
from torch import nn

from smpq_edge.boards import BOARDS_DIR, board_names, load_board, parse_board
from smpq_edge.cost import ARENA_ALIGNMENT, arena_activation_peak, estimate, tflite_layout, uniform, weight_bytes
from smpq_edge.errors import UserError
from smpq_edge.graph import Graph, Op, trace
from smpq_edge.models import example_names, load_model
from smpq_edge.policy import LayerChoice, Policy, load_policy, save_policy

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
    # (weight bytes, bias bytes = 4 x out channels, quant params = a 4-byte scale per output channel
    # for conv/depthwise (one for the FC) plus one 8-byte zero point, for the weights and again for
    # the bias)
    hand = {
        4: {"conv": (68, 20, 2 * (4 * 5 + 8)), "dw": (23, 20, 2 * (4 * 5 + 8)), "fc": (120, 12, 2 * (4 + 8))},
        8: {"conv": (135, 20, 2 * (4 * 5 + 8)), "dw": (45, 20, 2 * (4 * 5 + 8)), "fc": (240, 12, 2 * (4 + 8))},
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


def test_tiny_model_cycles_by_hand():
    board = load_board(CMSIS)
    c = board.cycles
    for bits in (4, 8):
        report = estimate(tiny_graph(), uniform(tiny_graph(), bits), board)
        w = (lambda k: k.w4) if bits == 4 else (lambda k: k.w8)
        hand = {
            "conv": int(2160 * w(c.conv) + c.conv.per_op),
            "dw": int(720 * w(c.depthwise) + c.depthwise.per_op),
            "fc": int(240 * w(c.fc) + c.fc.per_op),
        }
        assert {name: layer.cycles for name, layer in by_name(report).items()} == hand
        # Besides the layers, only the flatten runs (the ReLUs are fused): 80 input elements.
        flatten = int(80 * c.other.per_element + c.other.per_op)
        assert report.cycles == sum(hand.values()) + flatten
        assert report.latency_ms == pytest.approx(report.cycles / (board.clock_mhz * 1e3))


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
    (lambda p: p["layers"][0].update(weight_bits=5), "layers.0.weight_bits"),
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
