"""Cost model: flash bytes, RAM (TFLM tensor arena) bytes and cycles of a policy on a board.

A policy gives each quantisable layer its weight bit-width (4 or 8; activations are always int8).
Flash counts what the ``.tflite`` flatbuffer stores; RAM counts what TFLM's arena holds
(activations placed by a greedy planner like TFLM's, kernel scratch, persistent data); cycles
count MACs times the board's per-MAC coefficient for the op kind, bit-width and kernel set.
The overhead constants are fitted against real exported models and TFLM's own arena
measurement (see ``bench/RESULTS.md``, cost model against reality).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from smpq_edge.boards import Board
from smpq_edge.errors import UserError
from smpq_edge.graph import Graph, Op

# TFLite flatbuffer: a scale (float32) per quantisation channel and a zero point (int64), one per
# channel for activations (one channel) and one for a whole weight or bias tensor, which TFLM's
# allocator expands (the exporter writes it so).
SCALE_BYTES, ZERO_POINT_BYTES = 4, 8
QUANT_PARAM_BYTES = SCALE_BYTES + ZERO_POINT_BYTES
# TFLM aligns every arena buffer to 16 bytes (MicroArenaBufferAlignment).
ARENA_ALIGNMENT = 16


# Both fitted (non-negative least squares) to 12 exported models, 4 examples x 3 policies, by
# `python bench/cost_model.py --fit`; bench/RESULTS.md has the resulting errors. The arena's are
# for TFLM on a 64-bit host, whose pointers make its persistent structures larger than on an MCU.
@dataclass(frozen=True)
class FlatbufferOverhead:
    """Bytes of a .tflite beyond tensor data and quantisation parameters (tables, shapes, names)."""

    fixed: int = 912
    per_tensor: int = 113
    per_op: int = 0


@dataclass(frozen=True)
class ArenaOverhead:
    """TFLM arena bytes beyond planned activations and scratch: interpreter tables, per-op data."""

    fixed: int = 715
    per_tensor: int = 51
    per_op: int = 93
    per_channel: int = 8  # requantisation multiplier and shift, int32 each, per conv output channel


FLATBUFFER = FlatbufferOverhead()
ARENA = ArenaOverhead()


def quant_channels(op: Op) -> int:
    """Scales stored for a layer's weights: per output channel for conv and depthwise, one for a
    fully connected layer (TFLM's per-channel FULLY_CONNECTED path rejects INT4, and the exporter
    writes int8 FC weights per tensor too, so one policy change never moves the scale layout)."""
    return 1 if op.kind == "fc" else op.out_channels


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    weight_bits: int
    params: int
    macs: int
    weight_bytes: int
    bias_bytes: int
    quant_param_bytes: int
    scratch_bytes: int
    cycles: int

    @property
    def flash_bytes(self) -> int:
        return self.weight_bytes + self.bias_bytes + self.quant_param_bytes


@dataclass(frozen=True)
class CostReport:
    board: str
    layers: list[LayerCost]
    model_flash_bytes: int
    arena_bytes: int
    cycles: int
    reserve_flash_bytes: int
    reserve_ram_bytes: int
    flash_budget_bytes: int
    ram_budget_bytes: int
    cycle_budget: int
    clock_mhz: float

    @property
    def flash_total_bytes(self) -> int:
        return self.model_flash_bytes + self.reserve_flash_bytes

    @property
    def ram_total_bytes(self) -> int:
        return self.arena_bytes + self.reserve_ram_bytes

    @property
    def latency_ms(self) -> float:
        return self.cycles / (self.clock_mhz * 1e3)

    @property
    def fits(self) -> dict[str, bool]:
        return {
            "flash": self.flash_total_bytes <= self.flash_budget_bytes,
            "ram": self.ram_total_bytes <= self.ram_budget_bytes,
            "cycles": self.cycles <= self.cycle_budget,
        }

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [dict(asdict(layer), flash_bytes=layer.flash_bytes) for layer in self.layers]
        out.update(flash_total_bytes=self.flash_total_bytes, ram_total_bytes=self.ram_total_bytes,
                   latency_ms=self.latency_ms, fits=self.fits)
        return out


def weight_bytes(count: int, bits: int) -> int:
    """INT4 packs two weights per byte (an odd count leaves the last high nibble unused)."""
    return math.ceil(count / 2) if bits == 4 else count


def scratch_bytes(op: Op, bits: int, board: Board) -> int:
    """Per-op scratch that TFLM plans into the arena for the duration of the op."""
    if board.kernels == "reference":
        # Reference kernels unpack an INT4 filter into an int8 copy of the whole filter per invoke.
        return op.weight_count if bits == 4 else 0
    if op.kind == "conv":
        _, kh, kw, c_in = op.weight_shape
        if (kh, kw) == (1, 1) and op.stride == (1, 1) and op.padding == (0, 0):
            return 0
        return 2 * 2 * c_in * kh * kw  # CMSIS-NN im2col: two int16 columns
    if op.kind == "depthwise":
        _, kh, kw, channels = op.weight_shape
        if (kh, kw) == (3, 3) and bits == 8:
            return 0  # CMSIS-NN's 3x3 depthwise s8 kernel needs no buffer
        return 2 * channels * kh * kw  # an int16 column per output pixel
    return 0


def _op_cycles(op: Op, bits: int, board: Board, graph: Graph) -> int:
    table = board.cycles
    if op.weighted:
        coeff = getattr(table, op.kind)
        return int(op.macs * (coeff.w4 if bits == 4 else coeff.w8) + coeff.per_op)
    source_elements = max((graph.op(s).out_elements for s in op.inputs), default=0)
    if op.kind in ("avgpool", "maxpool", "global_avgpool"):
        # Global average pooling is exported as AVERAGE_POOL_2D (CMSIS-NN has it), not MEAN.
        cost = table.pool
    elif op.kind == "add":
        cost = table.add
    elif op.kind == "input":
        return 0
    else:
        cost = table.other
    return int(source_elements * cost.per_element + cost.per_op)


def needs_pad_op(op: Op, input_shape: tuple[int, ...]) -> bool:
    """Whether a convolution's symmetric torch padding cannot be TFLite's SAME or VALID, so the
    converter puts an explicit PAD operator in front of it (seen for stride-2 convolutions).
    TensorFlow's own SAME padding (``same_pads``) is TFLite's SAME: no PAD."""
    if op.padding == (0, 0) or op.same_pads:
        return False
    for n, k, s, p in zip(input_shape[1:], op.weight_shape[1:3], op.stride, op.padding):
        out = (n + 2 * p - k) // s + 1
        same_out = -(-n // s)
        same_total = max((same_out - 1) * s + k - n, 0)
        if out != same_out or p != same_total // 2:
            return True
    return False


@dataclass(frozen=True)
class TfliteTensor:
    """An activation tensor of the exported model: its bytes and the ops (by index) using it."""

    name: str
    elements: int
    first: int
    last: int


def tflite_layout(graph: Graph) -> tuple[int, int, list[TfliteTensor]]:
    """Operator count, tensor count and activation tensors of the model as the exporter writes it:
    a PAD before a convolution that needs one, no RESHAPE in front of a FULLY_CONNECTED (which
    flattens its input itself), no operator for the input."""
    activations: dict[str, list] = {}
    n_ops = 0
    n_tensors = 0
    alias: dict[str, str] = {}
    for op in graph.ops:
        sources = [alias.get(s, s) for s in op.inputs]
        if op.kind == "input":
            activations[op.name] = [op.out_elements, 0, 0]
            n_tensors += 1
            continue
        if op.kind == "reshape" and all(graph.op(c).kind == "fc" for c in graph.consumers[op.name]):
            alias[op.name] = sources[0]
            continue
        if op.weighted and needs_pad_op(op, graph.op(sources[0]).out_shape):
            padded = tuple(d + 2 * p for d, p in zip(graph.op(sources[0]).out_shape[1:], op.padding))
            pad_name = f"{op.name}/pad"
            activations[sources[0]][2] = n_ops
            activations[pad_name] = [graph.op(sources[0]).out_shape[0] * math.prod(padded), n_ops, n_ops]
            n_ops += 1
            n_tensors += 2  # the padded activation and the paddings constant
            sources = [pad_name]
        for source in sources:
            activations[source][2] = n_ops
        activations[op.name] = [op.out_elements, n_ops, n_ops]
        n_ops += 1
        n_tensors += 1 + (2 if op.weighted else 0)  # output, plus weights and bias
    activations[alias.get(graph.output, graph.output)][2] = n_ops  # the output lives to the end
    tensors = [TfliteTensor(name, size, first, last) for name, (size, first, last) in activations.items()]
    return n_ops, n_tensors, tensors


def arena_activation_peak(tensors: list[TfliteTensor], scratch: dict[str, int]) -> int:
    """Peak of TFLM's greedy planner over ``tflite_layout``'s activation tensors and the ops'
    scratch: buffers sorted by size, each put at the lowest offset that does not overlap a placed
    buffer alive at the same time. Lifetimes are op indices."""
    op_index = {t.name: t.first for t in tensors}
    buffers = [(t.elements, t.first, t.last) for t in tensors]  # (size, first, last)
    for name, size in scratch.items():
        if size:
            buffers.append((size, op_index[name], op_index[name]))
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    peak = 0
    # Largest first; among equal sizes TFLM's sort leaves the later-added buffer first.
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i][0], -i))
    for size, first, last in (buffers[i] for i in order):
        size = -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        offset = 0
        for other_offset, other_end, other_first, other_last in sorted(placed):
            if other_last < first or other_first > last:
                continue  # not alive together
            if offset + size <= other_offset:
                break
            offset = max(offset, other_end)
        placed.append((offset, offset + size, first, last))
        peak = max(peak, offset + size)
    return peak


def estimate(graph: Graph, bits: dict[str, int], board: Board, flash_budget_bytes: int | None = None,
             ram_budget_bytes: int | None = None, cycle_budget: int | None = None) -> CostReport:
    """The cost of ``bits`` (layer name -> weight bit-width) on ``board``.

    Budgets default to the board's; the search passes its own to study other operating points.
    """
    missing = [op.name for op in graph.layers if op.name not in bits]
    unknown = sorted(set(bits) - {op.name for op in graph.layers})
    if missing or unknown:
        raise UserError(f"policy does not match the model: missing layers {missing}, unknown layers {unknown}")
    layers, scratch = [], {}
    for op in graph.layers:
        b = bits[op.name]
        if b not in board.weight_bits:
            raise UserError(f"layer '{op.name}': {b}-bit weights are not a candidate on board {board.name}")
        channels = quant_channels(op)
        scratch[op.name] = scratch_bytes(op, b, board)
        layers.append(LayerCost(
            name=op.name, kind=op.kind, weight_bits=b, params=op.weight_count, macs=op.macs,
            weight_bytes=weight_bytes(op.weight_count, b),
            bias_bytes=4 * op.out_channels,
            # weights and bias each carry their own scales, and one zero point each
            quant_param_bytes=2 * (SCALE_BYTES * channels + ZERO_POINT_BYTES),
            scratch_bytes=scratch[op.name],
            cycles=_op_cycles(op, b, board, graph),
        ))
    n_ops, n_tensors, activations = tflite_layout(graph)
    # Every activation carries one scale and zero point; a PAD's paddings are 8 int32 values.
    pad_bytes = 32 * sum(1 for t in activations if t.name.endswith("/pad"))
    model_flash = (sum(layer.flash_bytes for layer in layers) + QUANT_PARAM_BYTES * len(activations) + pad_bytes
                   + FLATBUFFER.fixed + FLATBUFFER.per_tensor * n_tensors + FLATBUFFER.per_op * n_ops)
    requantised_channels = sum(op.out_channels for op in graph.layers if op.kind != "fc")
    arena = (arena_activation_peak(activations, scratch) + ARENA.fixed + ARENA.per_tensor * n_tensors
             + ARENA.per_op * n_ops + ARENA.per_channel * requantised_channels)
    cycles = sum(layer.cycles for layer in layers) + sum(
        _op_cycles(op, 8, board, graph) for op in graph.ops if not op.weighted)
    return CostReport(
        board=board.name, layers=layers, model_flash_bytes=model_flash, arena_bytes=arena, cycles=cycles,
        reserve_flash_bytes=int(board.reserve.flash_kb * 1024), reserve_ram_bytes=int(board.reserve.ram_kb * 1024),
        flash_budget_bytes=flash_budget_bytes if flash_budget_bytes is not None else int(board.budgets.flash_kb * 1024),
        ram_budget_bytes=ram_budget_bytes if ram_budget_bytes is not None else int(board.budgets.ram_kb * 1024),
        cycle_budget=cycle_budget if cycle_budget is not None else board.cycle_budget,
        clock_mhz=board.clock_mhz,
    )


def uniform(graph: Graph, bits: int) -> dict[str, int]:
    return {op.name: bits for op in graph.layers}
