"""Cost model: flash bytes, RAM (TFLM tensor arena) bytes and cycles of a policy on a board.

A policy gives each quantisable layer its weight bit-width (2 to 8, ``smpq_edge.common.precision``;
activations are always int8). A LUT layer (2, 3, 5, 6, 7 bits) stores b-bit indices and value
tables; TFLM's DECODE operator before it expands them into an int8 tensor in the arena, which
lives while the layer runs, and costs cycles on every inference.
Flash counts what the ``.tflite`` flatbuffer stores; RAM counts what TFLM's arena holds on the
32-bit target (activations placed by a greedy planner like TFLM's, kernel scratch, persistent
data). Cycles are priced per TFLite operator (``tflite_operators``: PADs included, no RESHAPE in
front of a FULLY_CONNECTED) by the board's formula for the kernel variant that runs it
(``kernel_variant``: CMSIS-NN's choice by shape and weight type) over the operator's work
(``OpWork``: MACs, im2col elements, output elements, ... and one call).

The report also predicts the whole firmware's flash and static RAM from what its ELF holds
(``RUNTIME``: TFLM core and application, plus each registered kernel), as ``firmware_flash_bytes``
and ``firmware_ram_bytes``. The budgets keep counting the board's ``reserve`` in their place: the
runtime depends on which kernels a policy registers, which the search's knapsack (additive over
layers) cannot express, and a board's reserve also covers what the user's own firmware adds.

The overhead constants are fitted against real exported models, TFLM's host arena measurement
(``bench/cost_model.py``) and the firmware on QEMU (``bench/cycles.py``); ``bench/RESULTS.md``
has both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from smpq_edge.inputs.boards import Board, KernelCycles
from smpq_edge.common.errors import UserError
from smpq_edge.network.graph import Graph, Op
from smpq_edge.network.ops import KINDS
from smpq_edge.network.quant import activation_types
from smpq_edge.common.precision import DECODE_OP, PACKED_INT4, is_lut, kernel_bits, lut_levels

# TFLite flatbuffer: a scale (float32) and a zero point (int64) per quantisation channel, as the
# schema wants and LiteRT checks; weight and bias tensors may instead keep one zero point, which
# TFLM alone reads (``Board.zero_points``).
SCALE_BYTES, ZERO_POINT_BYTES = 4, 8
QUANT_PARAM_BYTES = SCALE_BYTES + ZERO_POINT_BYTES
# TFLM aligns every arena buffer to 16 bytes (MicroArenaBufferAlignment).
ARENA_ALIGNMENT = 16


# Both fitted (non-negative least squares) to 12 exported models, 4 examples x 3 policies, by
# `python bench/cost_model.py --fit`; bench/RESULTS.md has the resulting errors.
@dataclass(frozen=True)
class FlatbufferOverhead:
    """Bytes of a .tflite beyond tensor data and quantisation parameters (tables, shapes, names)."""

    fixed: int = 912
    per_tensor: int = 113
    per_op: int = 0
    # A DECODE with its ancillary and decoded tensors as the exporter writes them: the mean growth
    # beyond data and quantisation of 4 models (digits_cnn, resnet8, mnist1d_dscnn, dscnn_kws)
    # with every layer at 3 bits, 6-29 B a DECODE above this (fitted by hand; bench/RESULTS.md).
    per_decode: int = 150


@dataclass(frozen=True)
class ArenaOverhead:
    """TFLM arena bytes beyond planned activations and scratch: interpreter tables, per-op data."""

    fixed: int
    per_tensor: int
    per_op: int
    per_channel: int  # requantisation multiplier and shift, int32 each, per conv output channel
    per_decode: int  # a DECODE with its two tensors (its decoder's state), instead of per_op and per_tensor

    def bytes(self, n_tensors: int, n_ops: int, channels: int, decodes: int) -> int:
        """The overhead of a model of ``n_tensors`` and ``n_ops`` (``tflite_layout``'s counts, each
        DECODE's op and two tensors included) with ``channels`` requantised channels."""
        return (self.fixed + self.per_tensor * (n_tensors - 2 * decodes) + self.per_op * (n_ops - decodes)
                + self.per_channel * channels + self.per_decode * decodes)


FLATBUFFER = FlatbufferOverhead()
# TFLM on the 64-bit host (the emulator's interpreter), whose pointers make its persistent
# structures larger than on an MCU: fitted by `python bench/cost_model.py --fit`.
# per_decode by hand from 2 models' LUT exports (digits_cnn, mnist1d_dscnn: 185-188 B a DECODE).
HOST_ARENA = ArenaOverhead(fixed=715, per_tensor=51, per_op=93, per_channel=8, per_decode=187)
# TFLM on the 32-bit target, per kernel set: fitted by `python bench/cycles.py` to the arena the
# firmware reports on QEMU mps2-an386 (CMSIS-NN kernels keep other per-op data than the reference ones).
TARGET_ARENA = {
    "cmsis_nn": ArenaOverhead(fixed=12, per_tensor=75, per_op=0, per_channel=7, per_decode=122),
    "reference": ArenaOverhead(fixed=118, per_tensor=54, per_op=23, per_channel=8, per_decode=119),
}


@dataclass(frozen=True)
class RuntimeMemory:
    """What the firmware holds besides the model and the arena, for one kernel set: measured by
    `python bench/cycles.py` on the generated QEMU firmware (arm-none-eabi-gcc -O2, gc-sections,
    Cortex-M4F) with `arm-none-eabi-size`, less the embedded test vectors."""

    flash_base: int  # text + data: TFLM core, the self-check application, newlib, start-up code
    flash_per_kernel: dict[str, int]  # a registered kernel (``registered_kernels``) -> its text + data
    static_ram: int  # data + bss besides the tensor arena (TFLM and newlib state, the resolver)
    static_ram_per_op: int  # the self-check's per-operator profile records


# Kernels every measured firmware links (CONV_2D, FULLY_CONNECTED, AVERAGE_POOL_2D, and with
# reference kernels DEPTHWISE_CONV_2D too) cannot be told apart from the base: their code is in it.
RUNTIME = {
    "cmsis_nn": RuntimeMemory(
        flash_base=77938, static_ram=3505, static_ram_per_op=15,
        flash_per_kernel={"ADD": 5653, "AVERAGE_POOL_2D": 0, "CONV_2D_INT16": 0, "CONV_2D_INT4": 17334,
                          "CONV_2D_INT8": 9931, "DEPTHWISE_CONV_2D_INT16": 8098, "DEPTHWISE_CONV_2D_INT4": 1021,
                          "DEPTHWISE_CONV_2D_INT8": 0, "FULLY_CONNECTED_INT16": 0, "FULLY_CONNECTED_INT4": 4389,
                          "FULLY_CONNECTED_INT8": 12872, "MAX_POOL_2D": 3920, "PAD": 6233, "QUANTIZE": 3163,
                          "SOFTMAX": 8984, "TFLM_DECODE": 21986}),
    "reference": RuntimeMemory(
        flash_base=89569, static_ram=3505, static_ram_per_op=15,
        flash_per_kernel={"ADD": 5643, "AVERAGE_POOL_2D": 0, "CONV_2D": 0, "DEPTHWISE_CONV_2D": 0,
                          "FULLY_CONNECTED": 0, "MAX_POOL_2D": 3709, "PAD": 6058, "QUANTIZE": 2922,
                          "SOFTMAX": 7792, "TFLM_DECODE": 21944}),
}
# TFLM_DECODE (about 22 KB) links all three of TFLM's decoders (``firmware._KERNEL_DEPS``). With
# CMSIS-NN, CONV_2D's and FULLY_CONNECTED's s16 code always came with QUANTIZE in the bench's int16
# firmware: only their sum is identified, and it is charged to QUANTIZE, which every policy with an
# int16 layer links (bench/cycles.py); DEPTHWISE_CONV_2D's s16 code was measured apart.
# SOFTMAX's entries are not bench/cycles.py fits: measured once, as the text + data a 10-class
# model's firmware gained with a SOFTMAX (less the 160 model bytes it added), on the same QEMU build.
VARIANT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
DECODE = DECODE_OP  # as the firmware's profile names the operator
# A LUT tensor's ancillary data starts with TFLM's 16-byte decode common metadata (DCM).
DCM_BYTES = 16


def registered_kernels(graph: Graph, bits: dict[str, int], kernels: str,
                       wide: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The kernels the firmware links, as ``firmware.registrations`` registers them: with
    CMSIS-NN an op whose layers all have one weight type links only that variant
    (``CONV_2D_INT8``); mixed weights link both (the generic kernel dispatches at run time). The
    generic kernel of an op with 16x8 layers links the INT4 and INT8 code and CMSIS-NN's s16 code
    (``<OP>_INT16``)."""
    operators = tflite_operators(graph, bits, wide)
    out = set()
    for builtin in {o.builtin for o in operators}:
        if kernels != "cmsis_nn" or builtin not in VARIANT_OPS:
            out.add(builtin)
            continue
        used = {kernel_bits(bits[o.op.name]) for o in operators if o.builtin == builtin}
        if any(o.op.name in wide for o in operators if o.builtin == builtin):
            used |= {4, 8, 16}  # the generic registration
        out.update(f"{builtin}_INT{b}" for b in used)
    return tuple(sorted(out))


def extra_kernels(graph: Graph, bits: dict[str, int], board: Board, wide: frozenset[str] = frozenset()) -> dict[str, int]:
    """Kernel code a policy pays on top of the board's reserve, which was set for the int8 and INT4
    kernels: TFLM's DECODE for a LUT layer (unless ``reserve.decode`` says the reserve holds it),
    and for 16x8 layers their kernels' s16 code and QUANTIZE. Kernel -> flash bytes."""
    table = RUNTIME[board.kernels].flash_per_kernel
    out = {}
    if not board.reserve.decode and any(is_lut(b) for b in bits.values()):
        out[DECODE] = table[DECODE]
    if wide:
        added = set(registered_kernels(graph, bits, board.kernels, wide)) - set(registered_kernels(graph, bits, board.kernels))
        out.update({k: table.get(k, 0) for k in added if k.endswith("_INT16") or k == "QUANTIZE"})
    return out


def runtime_flash_bytes(graph: Graph, bits: dict[str, int], kernels: str, wide: frozenset[str] = frozenset()) -> int:
    table = RUNTIME[kernels]
    return table.flash_base + sum(table.flash_per_kernel.get(k, 0)
                                  for k in registered_kernels(graph, bits, kernels, wide))


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
    weight_bytes: int  # int8, packed INT4, or a LUT layer's packed indices
    bias_bytes: int
    quant_param_bytes: int
    scratch_bytes: int
    cycles: int  # the layer's operator, and its DECODE for a LUT layer
    lut_bytes: int = 0  # a LUT layer's value tables and metadata, and its DECODE's flatbuffer bytes
    decoded_bytes: int = 0  # a LUT layer's int8 weights as DECODE expands them into the arena

    @property
    def flash_bytes(self) -> int:
        return self.weight_bytes + self.lut_bytes + self.bias_bytes + self.quant_param_bytes


@dataclass(frozen=True)
class CostReport:
    board: str
    layers: list[LayerCost]
    ops: list[OpCost]  # every TFLite operator, in execution order (weighted layers and the rest)
    model_flash_bytes: int
    arena_bytes: int
    cycles: int
    reserve_flash_bytes: int
    reserve_ram_bytes: int
    # Kernel code the board's reserve does not hold (``extra_kernels``): DECODE, s16 code, QUANTIZE.
    extra_kernels: dict[str, int]
    # The firmware besides model and arena, for the board's kernel set (``RUNTIME``): reported as
    # firmware_flash_bytes / firmware_ram_bytes; the budgets count the board's reserve instead.
    runtime_flash_bytes: int
    static_ram_bytes: int
    flash_budget_bytes: int
    ram_budget_bytes: int
    cycle_budget: int
    clock_mhz: float

    @property
    def extra_kernel_flash_bytes(self) -> int:
        return sum(self.extra_kernels.values())

    @property
    def flash_total_bytes(self) -> int:
        return self.model_flash_bytes + self.reserve_flash_bytes + self.extra_kernel_flash_bytes

    @property
    def ram_total_bytes(self) -> int:
        return self.arena_bytes + self.reserve_ram_bytes

    @property
    def firmware_flash_bytes(self) -> int:
        """Predicted text + data of the firmware: model, TFLM core, the registered kernels, application."""
        return self.model_flash_bytes + self.runtime_flash_bytes

    @property
    def firmware_ram_bytes(self) -> int:
        """Predicted data + bss with an arena of exactly ``arena_bytes``."""
        return self.arena_bytes + self.static_ram_bytes

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
                   extra_kernel_flash_bytes=self.extra_kernel_flash_bytes,
                   latency_ms=self.latency_ms, fits=self.fits,
                   firmware_flash_bytes=self.firmware_flash_bytes, firmware_ram_bytes=self.firmware_ram_bytes)
        return out


def weight_bytes(count: int, bits: int) -> int:
    """INT4 packs two weights per byte (an odd count leaves the last high nibble unused); a LUT
    layer packs its b-bit indices end to end; int8 is a byte each."""
    return math.ceil(count * bits / 8) if bits == PACKED_INT4 or is_lut(bits) else count


def lut_bytes(op: Op, bits: int) -> int:
    """What a LUT layer stores besides its indices: the DECODE operator and its two tensors
    (``FlatbufferOverhead.per_decode``), and the ancillary data: the DCM, then one table of int8
    values per quantisation channel (``quant_channels``). A table holds the values its channel
    uses; it is priced at its bound, every level of the b-bit grid or every weight of a small
    channel, so trained 6 and 7-bit layers, whose channels leave some levels unused, cost less."""
    if not is_lut(bits):
        return 0
    channels = quant_channels(op)
    return FLATBUFFER.per_decode + DCM_BYTES + channels * min(lut_levels(bits), op.weight_count // channels)


def decoded_bytes(op: Op, bits: int) -> int:
    """The int8 tensor DECODE writes into the arena for a LUT layer (0 for the others)."""
    return op.weight_count if is_lut(bits) else 0


def arena_extra_bytes(op: Op, bits: int, board: Board) -> int:
    """What a layer's own precision adds to the arena while it runs: scratch and decoded weights."""
    return scratch_bytes(op, bits, board) + decoded_bytes(op, bits)


def scratch_bytes(op: Op, bits: int, board: Board, wide: bool = False) -> int:
    """Per-op scratch that TFLM plans into the arena for the duration of the op (``wide``: a 16x8
    layer)."""
    bits = kernel_bits(bits)  # a LUT layer's kernel reads the decoded int8 tensor
    if board.kernels == "reference":
        # Reference kernels unpack an INT4 filter into an int8 copy of the whole filter per invoke.
        return op.weight_count if bits == 4 else 0
    if wide:  # CMSIS-NN's s16 buffers on a DSP core: two int16 im2col columns for every conv (1x1
        # too); the fast depthwise's int16 window when the kernel has under 512 taps; none for FC.
        if op.kind == "fc":
            return 0
        _, kh, kw, c_in = op.weight_shape
        if op.kind == "conv":
            return 2 * 2 * c_in * kh * kw
        return 2 * c_in * kh * kw if kh * kw < 512 else 0
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


@dataclass(frozen=True)
class TfliteOperator:
    """One operator of the exported model, in execution order."""

    name: str  # the graph op's name; "<conv>/pad" for the PAD the converter puts in front of a conv
    builtin: str
    op: Op  # the graph op it comes from (the convolution, for its PAD)
    inputs: tuple[str, ...]  # the activation tensors it reads
    input_shape: tuple[int, ...]  # of its first input (channels first, no batch)
    out_elements: int
    element_bytes: int = 1  # of its output: 2 for an int16 activation

    @property
    def out_bytes(self) -> int:
        return self.out_elements * self.element_bytes


def tflite_operators(graph: Graph, bits: dict[str, int] | None = None,
                     wide: frozenset[str] = frozenset()) -> list[TfliteOperator]:
    """The operators as the exporter writes them: a PAD before a convolution that needs one, no
    RESHAPE in front of a FULLY_CONNECTED (which flattens its input itself), none for the input;
    with ``bits``, a DECODE right before each LUT layer (where tflite-micro's compression tool
    puts it), reading only constants and writing the layer's int8 weights; with ``wide`` (layers
    with int16 activations), a QUANTIZE before the first reader of a tensor in the other type
    (``quant.activation_types``), and before the output where that is int16."""
    alias: dict[str, str] = {}
    shapes = {op.name: op.out_shape for op in graph.ops}
    types = activation_types(graph, wide)
    tensor_bits = {op.name: 8 for op in graph.ops if op.kind == "input"}
    out: list[TfliteOperator] = []

    def as_type(source: str, width: int) -> str:
        """``source`` as ``width`` bits, through a QUANTIZE the first time it is needed."""
        if tensor_bits[source] == width:
            return source
        name = f"{source}/int{width}"
        if name not in tensor_bits:
            quantize = Op(name, "quantize", (source,), shapes[source])
            out.append(TfliteOperator(name, "QUANTIZE", quantize, (source,), shapes[source], quantize.out_elements,
                                      width // 8))
            tensor_bits[name], shapes[name] = width, shapes[source]
        return name

    for op in graph.ops:
        sources = tuple(alias.get(s, s) for s in op.inputs)
        if op.kind == "input":
            continue
        if op.kind == "reshape" and all(graph.op(c).kind == "fc" for c in graph.consumers[op.name]):
            alias[op.name] = sources[0]
            continue
        if op.weighted and needs_pad_op(op, shapes[sources[0]]):
            source_shape = shapes[sources[0]]
            padded = (source_shape[0], *(d + 2 * p for d, p in zip(source_shape[1:], op.padding)))
            pad_name = f"{op.name}/pad"
            shapes[pad_name], tensor_bits[pad_name] = padded, tensor_bits[sources[0]]
            out.append(TfliteOperator(pad_name, "PAD", op, sources, source_shape, math.prod(padded),
                                      tensor_bits[pad_name] // 8))
            sources = (pad_name,)
        if not KINDS[op.kind].shares_input_scale:  # every other op reads its own type (int16 for a 16x8 layer)
            sources = tuple(as_type(source, types[op.name]) for source in sources)
        if op.weighted and bits is not None and is_lut(bits[op.name]):
            out.append(TfliteOperator(f"{op.name}/decode", DECODE, op, (), tuple(op.weight_shape), op.weight_count))
        tensor_bits[op.name] = types[op.name]
        out.append(TfliteOperator(op.name, KINDS[op.kind].tflite, op, sources, shapes[sources[0]], op.out_elements,
                                  types[op.name] // 8))
    last = as_type(alias.get(graph.output, graph.output), 8)
    if graph.output_softmax:
        softmax = Op(f"{graph.output}/softmax", "softmax", (graph.output,), shapes[graph.output])
        out.append(TfliteOperator(softmax.name, KINDS["softmax"].tflite, softmax, (last,), softmax.out_shape,
                                  softmax.out_elements))
    return out


def tflite_layout(graph: Graph, bits: dict[str, int] | None = None,
                  wide: frozenset[str] = frozenset()) -> tuple[int, int, list[TfliteTensor]]:
    """Operator count, tensor count and arena tensors (with op-index lifetimes, sizes in bytes)
    of the model as the exporter writes it (``tflite_operators``): activations, and the weights
    each DECODE writes, alive until its layer has run."""
    operators = tflite_operators(graph, bits, wide)
    activations = {op.name: [op.out_elements, 0, 0] for op in graph.ops if op.kind == "input"}
    n_tensors = len(activations)
    for index, operator in enumerate(operators):
        for source in operator.inputs:
            activations[source][2] = index
        activations[operator.name] = [operator.out_bytes, index, index]
        if operator.builtin == "PAD":
            n_tensors += 2  # the padded activation and the paddings constant
        elif operator.builtin == DECODE:
            n_tensors += 2  # the decoded weights and the ancillary data (the indices are the layer's weights)
            activations[operator.name][2] = index + 1
        else:
            n_tensors += 1 + (2 if operator.op.weighted else 0)  # output, plus weights and bias
    last = operators[-1].name if operators else graph.output
    activations[last][2] = len(operators)  # the output lives to the end
    # In the file's tensor order, which breaks the planner's ties of size: the exporter appends
    # the QUANTIZE outputs after onnx2tf's tensors, then the SOFTMAX's.
    builtin = {operator.name: operator.builtin for operator in operators}
    appended = {"QUANTIZE": 1, "SOFTMAX": 2}
    order = sorted(activations, key=lambda name: appended.get(builtin.get(name, ""), 0))
    tensors = [TfliteTensor(name, *activations[name]) for name in order]
    return len(operators), n_tensors, tensors


# ---- cycles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpWork:
    """What one operator call does, in the units a ``KernelCycles`` formula prices."""

    macs: int = 0
    taps: int = 0  # output elements x kernel (or pooling window) height x width
    im2col: int = 0  # output pixels x kernel height x width x input channels (CMSIS-NN's im2col copies)
    copies: int = 0  # contiguous runs those copies take: output pixels x kernel height (x width for conv);
    # for pooling, output elements x window height
    outputs: int = 0
    pixels: int = 0  # output height x width
    rows: int = 0  # output height (row-wise copies, as PAD does)
    inputs: int = 0
    weights: int = 0
    channels: int = 0  # a DECODE's value tables (each channel's indices are unpacked in their own run)
    unrolled: int = 0  # weights a DECODE unpacks in its unrolled groups (then not in ``weights``)
    calls: int = 1


# Indices TFLM's LUT decoder unpacks per step of its unrolled loops, by index width (the groups
# start at aligned index offsets; the indices before and after go one at a time).
_UNROLLED_GROUP = {2: 16, 3: 32}


def decode_work(op: Op, bits: int) -> OpWork:
    """A DECODE's work: each channel's run of indices, in aligned groups where the width has an
    unrolled loop (``decode_variant``), the rest one index at a time."""
    channels = quant_channels(op)
    per_channel = op.weight_count // channels
    group = _UNROLLED_GROUP.get(bits) if decode_variant(op, bits) != "decode_lut" else None
    unrolled = 0
    for channel in range(channels if group else 0):
        lead = min(-(channel * per_channel) % group, per_channel)
        unrolled += (per_channel - lead) // group * group
    return OpWork(weights=op.weight_count - unrolled, unrolled=unrolled, channels=channels)


def op_work(operator: TfliteOperator, bits: int = 8) -> OpWork:
    op = operator.op
    if operator.builtin == DECODE:
        return decode_work(op, bits)
    inputs = math.prod(operator.input_shape)
    shape = operator_out_shape(operator)
    rows, pixels = (shape[1], shape[1] * shape[2]) if len(shape) == 3 else (1, 1)
    if KINDS[op.kind].cost == "pool" and operator.builtin != "PAD":
        # Pooling sums each output's window row by row: taps = window elements, copies = window rows.
        kh, kw = op.kernel
        return OpWork(taps=operator.out_elements * kh * kw, copies=operator.out_elements * kh,
                      outputs=operator.out_elements, pixels=pixels, rows=rows, inputs=inputs)
    if operator.builtin == "PAD" or not op.weighted:
        return OpWork(outputs=operator.out_elements, pixels=pixels, rows=rows, inputs=inputs)
    if op.kind == "fc":
        return OpWork(macs=op.macs, taps=op.out_elements, outputs=op.out_elements, pixels=1, rows=1, inputs=inputs,
                      weights=op.weight_count)
    _, kh, kw, c_in = op.weight_shape  # conv OHWI; depthwise [1, H, W, C]
    depthwise = op.kind == "depthwise"
    return OpWork(macs=op.macs, taps=op.macs if depthwise else op.macs // c_in,
                  im2col=pixels * kh * kw * (op.out_channels if depthwise else c_in),
                  copies=pixels * kh * (1 if depthwise else kw), outputs=op.out_elements, pixels=pixels, rows=rows,
                  inputs=inputs, weights=op.weight_count)


def operator_out_shape(operator: TfliteOperator) -> tuple[int, ...]:
    """Channels-first output shape of an operator (a PAD's is the padded input)."""
    if operator.builtin != "PAD":
        return operator.op.out_shape
    shape = operator.input_shape
    return (shape[0], *(d + 2 * p for d, p in zip(shape[1:], operator.op.padding)))


def _tflite_padding(operator: TfliteOperator) -> tuple[int, int]:
    """The convolution's own padding in TFLite: VALID (0) behind a PAD, else torch's (SAME)."""
    behind_pad = operator.inputs[0] == f"{operator.op.name}/pad"
    return (0, 0) if behind_pad else operator.op.padding


def kernel_variant(operator: TfliteOperator, bits: int, kernels: str) -> str:
    """The kernel variant (a key of the board's ``cycles``) that runs ``operator``: CMSIS-NN's
    choice by shape and weight type (boards.KERNEL_VARIANTS). Depthwise multipliers other than 1
    and CMSIS-NN's 1xN convolution (input height 1) are priced as the general kernels."""
    op = operator.op
    if operator.builtin == "PAD":
        return "pad"
    if operator.builtin == DECODE:
        return decode_variant(op, bits)
    if not op.weighted:
        return KINDS[op.kind].cycles
    if operator.element_bytes == 2:
        return f"{op.kind}_s16"  # CMSIS-NN's s16 kernels have no 1x1 or 3x3 special case
    bits = kernel_bits(bits)
    suffix = f"_s{bits}"
    if op.kind == "fc":
        return "fc" + suffix
    _, kh, kw, _ = op.weight_shape
    padding = _tflite_padding(operator)
    unpadded = padding == (0, 0) and not any(op.same_pads)
    if kernels == "cmsis_nn" and op.kind == "conv" and (kh, kw) == (1, 1) and unpadded:
        return ("conv_1x1" if op.stride == (1, 1) else "conv_1x1_strided") + suffix
    if kernels == "cmsis_nn" and op.kind == "depthwise" and bits == 8 and (kh, kw) == (3, 3) and max(padding) <= 1:
        return "depthwise_3x3_s8"
    return op.kind + suffix


def decode_variant(op: Op, bits: int) -> str:
    """DECODE's LUT loop: TFLM unrolls 2 and 3-bit indices when the tables run along the first
    axis; a depthwise filter's channels are its last axis (the "alternate axis"), and other widths
    take the generic loop."""
    return f"decode_lut{bits}" if bits in _UNROLLED_GROUP and op.kind != "depthwise" else "decode_lut"


WORK_UNITS = tuple(f.name for f in fields(OpWork))
# OpWork's unit -> its KernelCycles coefficient's name after "per_" (plural units, singular terms).
UNIT_COEFFICIENT = {"macs": "mac", "taps": "tap", "copies": "copy", "outputs": "output", "pixels": "pixel",
                    "rows": "row", "inputs": "input", "weights": "weight", "channels": "channel",
                   "unrolled": "unrolled", "calls": "call"}


def formula_cycles(work: OpWork, formula: KernelCycles) -> int:
    return round(sum(getattr(work, unit) * getattr(formula, f"per_{UNIT_COEFFICIENT.get(unit, unit)}")
                     for unit in WORK_UNITS))


@dataclass(frozen=True)
class OpCost:
    """One TFLite operator's predicted cycles and the kernel variant priced."""

    name: str
    op: str  # TFLite builtin, as the firmware's profile names it
    kernel: str
    cycles: int


def operator_costs(graph: Graph, bits: dict[str, int], board: Board, wide: frozenset[str] = frozenset()) -> list[OpCost]:
    """Every operator's cycles on ``board``, in the firmware's execution order (the layers in
    ``wide`` on their 16x8 kernels)."""
    out = []
    for operator in tflite_operators(graph, bits, wide):
        layer_bits = bits.get(operator.op.name, 8) if operator.builtin != "PAD" else 8
        variant = kernel_variant(operator, layer_bits, board.kernels)
        out.append(OpCost(operator.name, operator.builtin, variant,
                          formula_cycles(op_work(operator, layer_bits), board.cycles[variant])))
    return out


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


def zero_points(board: Board, channels: int) -> int:
    """Zero points stored for a weight or bias tensor of ``channels`` scales (``Board.zero_points``)."""
    return 1 if board.zero_points == "single" else channels


def zero_point_saving(graph: Graph, bits: dict[str, int], board: Board) -> int:
    """Model bytes the board's zero-point form saves against one zero point per channel."""
    per_channel = board.model_copy(update={"zero_points": "per_channel"})
    return estimate(graph, bits, per_channel).model_flash_bytes - estimate(graph, bits, board).model_flash_bytes


def estimate(graph: Graph, bits: dict[str, int], board: Board, flash_budget_bytes: int | None = None,
             ram_budget_bytes: int | None = None, cycle_budget: int | None = None, host: bool = False,
             wide: frozenset[str] = frozenset()) -> CostReport:
    """The cost of ``bits`` (layer name -> weight bit-width) on ``board``, with the layers in
    ``wide`` on int16 activations (twice the arena bytes, an int64 bias, QUANTIZE operators).

    Budgets default to the board's; the search passes its own to study other operating points.
    The arena is the 32-bit target's; ``host=True`` predicts the 64-bit host interpreter's instead.
    """
    missing = [op.name for op in graph.layers if op.name not in bits]
    unknown = sorted(set(bits) - {op.name for op in graph.layers})
    if missing or unknown:
        raise UserError(f"policy does not match the model: missing layers {missing}, unknown layers {unknown}")
    for op in graph.layers:
        if bits[op.name] not in board.weight_bits:
            raise UserError(f"layer '{op.name}': {bits[op.name]}-bit weights are not a candidate on board {board.name}")
    ops = operator_costs(graph, bits, board, wide)
    op_cycles = {op.name: op.cycles for op in ops}
    layers, scratch = [], {}
    for op in graph.layers:
        b = bits[op.name]
        channels = quant_channels(op)
        scratch[op.name] = scratch_bytes(op, b, board, op.name in wide)
        layers.append(LayerCost(
            name=op.name, kind=op.kind, weight_bits=b, params=op.weight_count, macs=op.macs,
            weight_bytes=weight_bytes(op.weight_count, b), lut_bytes=lut_bytes(op, b),
            decoded_bytes=decoded_bytes(op, b),
            bias_bytes=(8 if op.name in wide else 4) * op.out_channels,
            # Weights and bias each carry a scale per channel, and a zero point per channel or one
            # (a LUT layer's on its decoded tensor).
            quant_param_bytes=2 * (SCALE_BYTES * channels + ZERO_POINT_BYTES * zero_points(board, channels)),
            scratch_bytes=scratch[op.name],
            cycles=op_cycles[op.name] + op_cycles.get(f"{op.name}/decode", 0),
        ))
    n_ops, n_tensors, activations = tflite_layout(graph, bits, wide)
    # Every activation carries one scale and zero point; a PAD's paddings are 8 int32 values.
    pad_bytes = 32 * sum(1 for t in activations if t.name.endswith("/pad"))
    # A decoded weight tensor carries the layer's weight quantisation, counted with the layer.
    quantised_activations = sum(1 for t in activations if not t.name.endswith("/decode"))
    decodes = sum(1 for op in graph.layers if is_lut(bits[op.name]))  # their tensors are in the layers' lut_bytes
    model_flash = (sum(layer.flash_bytes for layer in layers) + QUANT_PARAM_BYTES * quantised_activations + pad_bytes
                   + FLATBUFFER.fixed + FLATBUFFER.per_tensor * (n_tensors - 2 * decodes)
                   + FLATBUFFER.per_op * (n_ops - decodes))
    requantised_channels = sum(op.out_channels for op in graph.layers if op.kind != "fc")
    overhead = HOST_ARENA if host else TARGET_ARENA[board.kernels]
    arena = arena_activation_peak(activations, scratch) + overhead.bytes(n_tensors, n_ops, requantised_channels, decodes)
    cycles = sum(op.cycles for op in ops)
    return CostReport(
        board=board.name, layers=layers, ops=ops, model_flash_bytes=model_flash, arena_bytes=arena, cycles=cycles,
        reserve_flash_bytes=int(board.reserve.flash_kb * 1024), reserve_ram_bytes=int(board.reserve.ram_kb * 1024),
        extra_kernels=extra_kernels(graph, bits, board, wide),
        runtime_flash_bytes=runtime_flash_bytes(graph, bits, board.kernels, wide),
        static_ram_bytes=RUNTIME[board.kernels].static_ram + RUNTIME[board.kernels].static_ram_per_op * n_ops,
        flash_budget_bytes=flash_budget_bytes if flash_budget_bytes is not None else int(board.budgets.flash_kb * 1024),
        ram_budget_bytes=ram_budget_bytes if ram_budget_bytes is not None else int(board.budgets.ram_kb * 1024),
        cycle_budget=cycle_budget if cycle_budget is not None else board.cycle_budget,
        clock_mhz=board.clock_mhz,
    )


def uniform(graph: Graph, bits: int) -> dict[str, int]:
    return {op.name: bits for op in graph.layers}
