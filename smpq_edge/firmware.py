"""Firmware stage: a .tflite and a board profile -> C/C++ sources and build files for TFLM.

The output folder holds the model as a C array, a runner with exactly the model's ops in a
``MicroMutableOpResolver`` (the CMSIS-NN INT4/INT8 kernel variants where the board uses
CMSIS-NN), a tensor arena sized from the TFLM host interpreter's measurement plus a stated
margin, embedded test vectors with the host interpreter's outputs, a self-check ``main.cc``,
the board port (start-up code and linker script where the repo has a bare-metal port) and a
``Makefile``/``CMakeLists.txt`` that take the TFLM tree from ``TFLM_DIR``.

Files come from hand-written templates in ``firmware/`` (``common/`` for
every board, ``ports/<port>/`` per port), filled whole with ``FileTemplate`` (``@@name@@``
placeholders; every placeholder must be given and every value used). Output is deterministic:
the same spec, board and margin give byte-identical files.

Use ``build_spec`` (a .tflite's bytes, optional float samples) to measure and describe a model,
then ``generate_firmware`` (or the pure ``render_firmware``) to produce the files.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from smpq_edge.boards import Board, Core, Port
from smpq_edge.errors import UserError
from smpq_edge.fileio import ensure_dir, write_text
from smpq_edge.records import ArenaRecord, FirmwareRecord, RegistrationRecord
from smpq_edge.precision import DECODE_OP

# The templates are package data (installed with the package, editable or not).
FIRMWARE_DIR = Path(str(resources.files("smpq_edge.firmware_templates")))  # firmware/ in the repository
BYTES_PER_LINE = 12  # model_data.cc: hex bytes per line
VALUES_PER_LINE = 16  # test_vectors.cc: decimal values per line
DEFAULT_VECTORS = 20
ARENA_ALIGNMENT = 16
# Default arena margin: a fraction of the estimate, at least a floor. A host measurement runs
# TFLM's reference kernels with 64-bit pointers (on the target pointers are 32-bit, but CMSIS-NN
# kernels request scratch buffers the reference kernels do not); the cost model's target arena
# was within 2.6 % of the firmware's on QEMU (bench/cycles.py).
DEFAULT_MARGIN_FRACTION = 0.25
DEFAULT_MARGIN_MIN_BYTES = 1024
DEFAULT_MARGIN_REASON = "default: 25 % of the estimate, at least 1024 bytes"
HOST_ARENA_BASIS = "measured with the TFLM host interpreter (reference kernels, 64-bit pointers)"

# Builtin op -> MicroMutableOpResolver method, from tensorflow/lite/micro/micro_mutable_op_resolver.h.
ADD_METHODS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin", "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast",
    "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic", "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D", "MIRROR_PAD": "AddMirrorPad", "MEAN": "AddMean",
    "MINIMUM": "AddMinimum", "MUL": "AddMul", "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE_CONV": "AddTransposeConv", "TRANSPOSE": "AddTranspose",
    "UNPACK": "AddUnpack", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
    # Custom: the DECODE before a LUT-compressed layer (tflite-micro's compression tool).
    f"CUSTOM:{DECODE_OP}": "AddDecode",
}

# Ops with weight-type-specific CMSIS-NN registrations (int8 activations): Register_<OP>_INT4()
# and Register_<OP>_INT8(), declared in these headers (TFLM kernels/conv.h, depthwise_conv.h,
# fully_connected.h; defined in kernels/cmsis_nn/*.cc). With reference kernels they are inline
# aliases of the generic registration, so plain AddXxx() is used there.
VARIANT_HEADERS: dict[str, str] = {
    "CONV_2D": "tensorflow/lite/micro/kernels/conv.h",
    "DEPTHWISE_CONV_2D": "tensorflow/lite/micro/kernels/depthwise_conv.h",
    "FULLY_CONNECTED": "tensorflow/lite/micro/kernels/fully_connected.h",
}
VARIANT_WEIGHT_TYPES = ("INT4", "INT8")

# Builtin op -> the TFLM kernel files (under tensorflow/lite/micro/kernels/, without .cc) the
# Makefile compiles for it: the file defining its Register_<OP>() (the CMSIS-NN file of the same
# name replaces it where the board uses CMSIS-NN) and the *_common / helper files it includes,
# followed transitively (read from TFLM 90b983c). kernel_util.cc is always compiled. An op not
# listed here makes the Makefile compile every kernel (TFLM_KERNELS=all).
_KERNEL_DEPS: dict[str, tuple[str, ...]] = {
    "activations": ("activations_common",), "add": ("add_common",),
    # DECODE's setup creates whichever decoder a tensor's metadata names, so all three link.
    "decode": ("decode_state", "decode_state_huffman", "decode_state_lut", "decode_state_prune"),
    "batch_matmul": ("batch_matmul_common",), "conv": ("conv_common",),
    "depthwise_conv": ("depthwise_conv_common", "conv_common"), "dequantize": ("dequantize_common",),
    "fully_connected": ("fully_connected_common",), "hard_swish": ("hard_swish_common",),
    "leaky_relu": ("leaky_relu_common",), "logical": ("logical_common",), "logistic": ("logistic_common",),
    "mul": ("mul_common",), "pad": ("pad_common",), "pooling": ("pooling_common",),
    "prelu": ("prelu_common",), "quantize": ("quantize_common",), "reduce": ("reduce_common",),
    "reshape": ("reshape_common",), "softmax": ("softmax_common",),
    "strided_slice": ("strided_slice_common",), "sub": ("sub_common",), "svdf": ("svdf_common",),
    "transpose": ("transpose_common",),
    "unidirectional_sequence_lstm": ("lstm_eval", "lstm_eval_common", "fully_connected_common",
                                     "micro_tensor_utils"),
}
_KERNEL_FILE_OF: dict[str, str] = {
    "ABS": "elementwise", "ADD_N": "add_n", "ARG_MAX": "arg_min_max", "ARG_MIN": "arg_min_max",
    "AVERAGE_POOL_2D": "pooling", "BATCH_TO_SPACE_ND": "batch_to_space_nd", "CONCATENATION": "concatenation",
    "CONV_2D": "conv", "COS": "elementwise", "DEPTHWISE_CONV_2D": "depthwise_conv", "EQUAL": "comparisons",
    f"CUSTOM:{DECODE_OP}": "decode",
    "GREATER": "comparisons", "GREATER_EQUAL": "comparisons", "L2_NORMALIZATION": "l2norm",
    "LESS": "comparisons", "LESS_EQUAL": "comparisons", "LOG": "elementwise", "LOGICAL_AND": "logical",
    "LOGICAL_NOT": "elementwise", "LOGICAL_OR": "logical", "LOG_SOFTMAX": "log_softmax",
    "MAXIMUM": "maximum_minimum", "MAX_POOL_2D": "pooling", "MEAN": "reduce", "MINIMUM": "maximum_minimum",
    "NOT_EQUAL": "comparisons", "PADV2": "pad", "REDUCE_ALL": "reduce", "REDUCE_MAX": "reduce",
    "REDUCE_MIN": "reduce", "RELU": "activations", "RELU6": "activations", "REVERSE_V2": "reverse",
    "RSQRT": "elementwise", "SELECT_V2": "select", "SIN": "elementwise", "SQRT": "elementwise",
    "SQUARE": "elementwise", "SUM": "reduce",
}
# Ops whose kernel file is their lower-case name (ADD -> add.cc), unless listed above.
_KERNEL_FILE_IS_NAME = frozenset({
    "ADD", "ASSIGN_VARIABLE", "BATCH_MATMUL", "BROADCAST_ARGS", "BROADCAST_TO", "CALL_ONCE", "CAST", "CEIL",
    "CUMSUM", "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV", "DYNAMIC_UPDATE_SLICE", "EMBEDDING_LOOKUP", "ELU", "EXP",
    "EXPAND_DIMS", "FILL", "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GATHER_ND",
    "HARD_SWISH", "IF", "L2_POOL_2D", "LEAKY_RELU", "LOGISTIC", "MIRROR_PAD", "MUL", "NEG", "PACK", "PAD",
    "PRELU", "QUANTIZE", "READ_VARIABLE", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "ROUND",
    "SHAPE", "SLICE", "SOFTMAX", "SPACE_TO_BATCH_ND", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SVDF", "TANH", "TRANSPOSE_CONV", "TRANSPOSE",
    "UNPACK", "UNIDIRECTIONAL_SEQUENCE_LSTM", "VAR_HANDLE", "WHILE", "ZEROS_LIKE",
})
ALL_KERNELS = "all"
WEIGHT_INPUT = 1  # the filter is input 1 of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED


# ---- plain data in and out ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorQuant:
    """A model input or output as the firmware sees it (batch 1)."""

    shape: tuple[int, ...]
    dtype: str  # "int8"
    scale: float
    zero_point: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))


@dataclass(frozen=True)
class OpUse:
    """One builtin op of the model with the tensor types its instances use."""

    name: str  # builtin name, "CONV_2D"
    count: int  # instances in the graph
    input_types: tuple[str, ...]  # distinct types of input 0 ("INT8", "INT16")
    weight_types: tuple[str, ...]  # distinct filter types ("INT4", "INT8"); () for ops without


@dataclass(frozen=True, eq=False)
class TestVectors:
    """Self-check vectors: model-ready int8 inputs, labels (-1: none), expected int8 outputs."""

    inputs: np.ndarray  # (N, *input.shape[1:]) int8
    labels: np.ndarray  # (N,) int, -1 where unknown
    expected: np.ndarray  # (N, *output.shape[1:]) int8, from the TFLM host interpreter
    origin: str  # where the inputs came from, for the generated comment

    def __len__(self) -> int:
        return len(self.inputs)


UNKNOWN_PREPROCESSING = "the float values the model was built with (not recorded for this .tflite)"


@dataclass(frozen=True, eq=False)
class FirmwareSpec:
    """Everything the generator needs to know about a model."""

    model_bytes: bytes
    name: str  # the model's file name, for comments
    operators: tuple[str, ...]  # op names in execution order
    ops: tuple[OpUse, ...]  # distinct ops, in order of first use
    arena_bytes: int  # the arena the firmware is sized from, before the margin
    input: TensorQuant
    output: TensorQuant
    vectors: TestVectors
    arena_basis: str = HOST_ARENA_BASIS  # where arena_bytes comes from
    # What the float input x is, from the stored samples (e.g. pixels p -> p / 255), for the README.
    input_preprocessing: str = UNKNOWN_PREPROCESSING


@dataclass(frozen=True)
class Registration:
    """One resolver line: ``resolver.<method>(<registration>())``."""

    op: str
    method: str  # "AddConv2D"
    registration: str | None  # "Register_CONV_2D_INT4", or None for the method's default
    header: str | None  # header declaring the registration
    reason: str

    @property
    def call(self) -> str:
        argument = f"tflite::{self.registration}()" if self.registration else ""
        return f"resolver.{self.method}({argument})"


KB = 1024


@dataclass(frozen=True)
class FirmwareResult:
    out_dir: Path
    board: str
    port: str  # the board's port.run: how the image is flashed and run
    qemu_machine: str | None  # the QEMU machine that runs it, if any (``validate``)
    files: tuple[str, ...]  # written, relative to out_dir, sorted
    registrations: tuple[Registration, ...]
    arena_estimate: int
    arena_basis: str
    arena_margin: int
    arena_size: int
    vectors: int
    model_bytes: int

    def record(self) -> FirmwareRecord:
        """firmware.json (without the output folder, so it is reproducible)."""
        return FirmwareRecord(
            board=self.board, port=self.port, qemu_machine=self.qemu_machine, model_bytes=self.model_bytes,
            arena=ArenaRecord(estimate=self.arena_estimate, basis=self.arena_basis, margin=self.arena_margin,
                              size=self.arena_size),
            resolver=[RegistrationRecord(op=r.op, call=r.call, reason=r.reason) for r in self.registrations],
            test_vectors=self.vectors, files=list(self.files))


# ---- templates ------------------------------------------------------------------------------


class FileTemplate(string.Template):
    """``@@name@@`` placeholders, so C's and make's ``$`` and make's ``$@`` pass through."""

    delimiter = "@@"
    pattern = r"""
        @@(?:
          (?P<escaped>@@) |
          (?P<named>[a-z][a-z0-9_]*)@@ |
          (?P<braced>(?!)) |
          (?P<invalid>)
        )
    """
    flags = re.VERBOSE  # placeholders are lower case


def fill_template(relative: str, values: dict[str, object]) -> str:
    """A template under firmware/ filled whole; each placeholder given, each value used."""
    path = FIRMWARE_DIR / relative
    template = FileTemplate(path.read_text(encoding="utf-8"))
    wanted = set(template.get_identifiers())
    given = set(values)
    if wanted != given or not template.is_valid():
        raise RuntimeError(
            f"template {relative}: missing {sorted(wanted - given)}, unused {sorted(given - wanted)}"
        )
    return template.substitute({k: str(v) for k, v in values.items()})


# ---- C text helpers -------------------------------------------------------------------------


def c_identifier(text: str) -> str:
    """A valid C identifier from any text: other characters become '_', no leading digit."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    return ident


def c_string(text: str) -> str:
    """Contents for a C string literal: quotes, backslashes and non-printables escaped."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in "\\\"":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F and char != "?":  # '?' escaped: no trigraphs
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def comment_text(text: str) -> str:
    """Text safe inside a // comment or Markdown code span: printable ASCII on one line."""
    return "".join(c if 0x20 <= ord(c) < 0x7F and c != "`" else "?" for c in text)


def c_float(value: float) -> str:
    """A float32 literal that round-trips (9 significant digits)."""
    text = f"{float(np.float32(value)):.9g}"
    if not any(c in text for c in ".eEn"):
        text += ".0"
    return text + "f"


def c_int(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


def hex_bytes(data: bytes, per_line: int = BYTES_PER_LINE) -> str:
    lines = []
    for start in range(0, len(data), per_line):
        chunk = data[start:start + per_line]
        lines.append("  " + " ".join(f"0x{b:02x}," for b in chunk))
    return "\n".join(lines)


def _int_lines(values: np.ndarray, indent: str) -> list[str]:
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    return [
        indent + " ".join(f"{v:4d}," for v in flat[i:i + VALUES_PER_LINE])
        for i in range(0, len(flat), VALUES_PER_LINE)
    ]


def int_rows(rows: np.ndarray) -> str:
    """A 2-D C initialiser body: one braced row per sample, wrapped."""
    out = []
    for index, row in enumerate(rows):
        out.append(f"  {{  // {index}")
        out.extend(_int_lines(row, "    "))
        out.append("  },")
    return "\n".join(out)


# ---- model -> spec --------------------------------------------------------------------------


def operator_uses(model) -> tuple[tuple[str, ...], tuple[OpUse, ...]]:
    """Op names in execution order, and the distinct ops with the tensor types they use."""
    order: list[str] = []
    uses: dict[str, dict] = {}
    for op in model.operators():
        order.append(op.name)
        use = uses.setdefault(op.name, {"count": 0, "inputs": [], "weights": []})
        use["count"] += 1
        if op.inputs and op.inputs[0] >= 0:
            use["inputs"].append(model.tensor(op.inputs[0]).type)
        if op.name in VARIANT_HEADERS and len(op.inputs) > WEIGHT_INPUT and op.inputs[WEIGHT_INPUT] >= 0:
            use["weights"].append(model.tensor(op.inputs[WEIGHT_INPUT]).type)

    def distinct(items: list[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(items))

    return tuple(order), tuple(
        OpUse(name, u["count"], distinct(u["inputs"]), distinct(u["weights"])) for name, u in uses.items()
    )


def build_test_vectors(
    model_bytes: bytes,
    x: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    count: int = DEFAULT_VECTORS,
    seed: int = 0,
    source: str = "<model>",
    origin: str | None = None,
) -> TestVectors:
    """The first ``count`` samples of ``x`` (float, channels first) quantised with the model's
    input scale and zero point, or seeded random int8 inputs without labels when ``x`` is None;
    expected outputs from the TFLM host interpreter."""
    from smpq_edge.tflm import TflmRunner, quantise_input

    if count < 1:
        raise UserError(f"test vectors: need at least 1, got {count}")
    runner = TflmRunner(model_bytes, source=source)
    spec = runner.input
    if spec.dtype != np.int8 or runner.output.dtype != np.int8:
        raise UserError(f"{source}: firmware needs int8 input and output, got {spec.dtype} and {runner.output.dtype}")
    if x is None:
        rng = np.random.default_rng(seed)
        inputs = rng.integers(-128, 128, size=(count, *spec.shape[1:])).astype(np.int8)
        label_array = np.full(count, -1, dtype=np.int16)
        origin = origin or f"random int8 (seed {seed})"
    else:
        x = np.asarray(x)[:count]
        inputs = quantise_input(x, spec, source)
        if labels is None:
            label_array = np.full(len(inputs), -1, dtype=np.int16)
        else:
            label_array = np.asarray(labels)[:count].astype(np.int16)
            if len(label_array) != len(inputs):
                raise UserError(f"{source}: {len(inputs)} samples but {len(label_array)} labels")
        origin = origin or "caller's samples"
    expected = runner.run(inputs)
    return TestVectors(inputs=inputs, labels=label_array, expected=expected, origin=origin)


def build_spec(
    model_bytes: bytes,
    vectors: TestVectors,
    name: str = "model.tflite",
    arena_bytes: int | None = None,
    arena_basis: str = HOST_ARENA_BASIS,
    input_preprocessing: str = UNKNOWN_PREPROCESSING,
) -> FirmwareSpec:
    """Describe a .tflite for the generator; measures the arena when ``arena_bytes`` is None (else
    ``arena_basis`` says where it comes from)."""
    from smpq_edge.export.tflite_file import TfliteModel
    from smpq_edge.tflm import TflmRunner, smallest_arena

    model = TfliteModel.from_bytes(model_bytes, source=name)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"{name}: firmware supports one input and one output, the model has "
                        f"{len(model.inputs)} and {len(model.outputs)}")
    operators, ops = operator_uses(model)
    runner = TflmRunner(model_bytes, source=name)
    io = []
    for what, t in (("input", runner.input), ("output", runner.output)):
        if t.dtype != np.int8:
            raise UserError(f"{name}: firmware needs an int8 {what}, the model's is {t.dtype}")
        io.append(TensorQuant(tuple(t.shape), "int8", float(t.scale), int(t.zero_point)))
    measured = smallest_arena(model_bytes, name) if arena_bytes is None else int(arena_bytes)
    spec = FirmwareSpec(
        model_bytes=bytes(model_bytes), name=name, operators=operators, ops=ops,
        arena_bytes=measured, input=io[0], output=io[1], vectors=vectors,
        arena_basis=arena_basis if arena_bytes is not None else HOST_ARENA_BASIS,
        input_preprocessing=input_preprocessing,
    )
    _check_vectors(spec)
    return spec


def _check_vectors(spec: FirmwareSpec) -> None:
    v = spec.vectors
    n = len(v)
    if n < 1:
        raise UserError(f"{spec.name}: the self-check needs at least one test vector")
    shapes = {
        "inputs": (v.inputs, (n, *spec.input.shape[1:])),
        "expected": (v.expected, (n, *spec.output.shape[1:])),
    }
    for what, (array, shape) in shapes.items():
        if array.dtype != np.int8 or tuple(array.shape) != shape:
            raise ValueError(f"test vector {what}: expected int8 {shape}, got {array.dtype} {array.shape}")
    if v.labels.shape != (n,) or v.labels.min() < -1 or v.labels.max() > np.iinfo(np.int16).max:
        raise ValueError(f"test vector labels: expected ({n},) in -1..32767, got {v.labels.shape}")


# ---- spec -> files --------------------------------------------------------------------------


def registrations(ops: tuple[OpUse, ...], kernels: str) -> tuple[Registration, ...]:
    """The resolver line for each op: a weight-type variant where CMSIS-NN has one."""
    out = []
    for use in ops:
        method = ADD_METHODS.get(use.name)
        if method is None:
            raise UserError(
                f"model op {use.name}: TFLM's MicroMutableOpResolver has no AddXxx() for it"
                + (" (custom ops need hand-written registration)" if use.name.startswith("CUSTOM") else "")
            )
        registration = header = None
        if use.name not in VARIANT_HEADERS:
            reason = "no weight-type variants for this op"
        elif kernels != "cmsis_nn":
            reason = "reference kernels: the variants alias the generic kernel"
        elif use.input_types != ("INT8",):
            reason = f"generic: activations {'/'.join(use.input_types)}, variants are for int8"
        elif len(use.weight_types) != 1:
            reason = f"generic: instances mix {'/'.join(use.weight_types)} weights, one variant cannot run both"
        elif use.weight_types[0] not in VARIANT_WEIGHT_TYPES:
            reason = f"generic: {use.weight_types[0]} weights have no variant"
        else:
            weights = use.weight_types[0]
            registration = f"Register_{use.name}_{weights}"
            header = VARIANT_HEADERS[use.name]
            reason = f"CMSIS-NN int8 activations, {weights} weights"
        out.append(Registration(use.name, method, registration, header, reason))
    return tuple(out)


def kernel_files(op_names: tuple[str, ...] | list[str]) -> tuple[str, ...] | str:
    """The TFLM kernel files (stems under kernels/) the ops need, sorted, or ``"all"`` when an op
    is not in the table (then the Makefile compiles every kernel)."""
    stems: set[str] = set()
    for name in op_names:
        stem = _KERNEL_FILE_OF.get(name) or (name.lower() if name in _KERNEL_FILE_IS_NAME else None)
        if stem is None:
            return ALL_KERNELS
        stems.add(stem)
        stems.update(_KERNEL_DEPS.get(stem, ()))
    return tuple(sorted(stems))


def default_arena_margin(measured: int) -> int:
    """25 % of the measured arena, at least 1024 bytes, topped up so the sum is 16-aligned."""
    margin = max(DEFAULT_MARGIN_MIN_BYTES, math.ceil(measured * DEFAULT_MARGIN_FRACTION))
    return _align(measured + margin) - measured


def _align(size: int) -> int:
    return -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


def cpu_flags(board: Board) -> list[str]:
    """GCC flags for the board's core: -mcpu (with +nofp/+nodsp), -mthumb, FPU and float ABI."""
    core = board.core.value
    if board.core == Core.cortex_m0plus or board.core == Core.cortex_m3:
        return [f"-mcpu={core}", "-mthumb", "-mfloat-abi=soft"]
    suffix = ""
    if board.core in (Core.cortex_m33, Core.cortex_m55) and not board.dsp:
        suffix += "+nodsp"
    if not board.fpu:
        return [f"-mcpu={core}{suffix}+nofp", "-mthumb", "-mfloat-abi=soft"]
    fpu = {
        Core.cortex_m4: "fpv4-sp-d16",
        Core.cortex_m7: "fpv5-sp-d16",  # single precision: runs on the -sp and the -d16 FPUs
        Core.cortex_m33: "fpv5-sp-d16",
        Core.cortex_m55: "auto",
    }[board.core]
    return [f"-mcpu={core}{suffix}", "-mthumb", f"-mfpu={fpu}", "-mfloat-abi=hard"]


def _defines(board: Board, port: Port) -> list[str]:
    defines = [
        f"SMPQ_HAS_DWT={int(board.has_dwt)}",
        f"SMPQ_USE_SYSTICK={int(port.use_systick or not board.has_dwt)}",
        f"SMPQ_DWT_UNLOCK={int(port.dwt_unlock)}",
    ]
    if port.systick_handler != "SysTick_Handler":
        defines.append(f"SMPQ_SYSTICK_HANDLER={c_identifier(port.systick_handler)}")
    return defines


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render_firmware(
    spec: FirmwareSpec, board: Board, margin: int | None = None
) -> tuple[dict[str, str], FirmwareResult]:
    """All generated files as {name: text}, and the result (with out_dir left as '.')."""
    _check_vectors(spec)
    port = board.port
    regs = registrations(spec.ops, board.kernels)
    if margin is None:
        margin_bytes, margin_reason = default_arena_margin(spec.arena_bytes), DEFAULT_MARGIN_REASON
    else:
        if margin < 0:
            raise UserError(f"arena margin must be >= 0 bytes, got {margin}")
        margin_bytes, margin_reason = int(margin), "set by the caller"
    arena_size = _align(spec.arena_bytes + margin_bytes)
    margin_bytes = arena_size - spec.arena_bytes  # rounding up to the alignment adds to the margin
    app_name = c_identifier(f"smpq_{board.name}")
    name = comment_text(spec.name)
    board_text = comment_text(board.name)
    common = {"model_name_comment": name, "board": board_text}

    files: dict[str, str] = {}
    files["model_data.h"] = fill_template("common/model_data.h.in", {**common, "model_len": len(spec.model_bytes)})
    files["model_data.cc"] = fill_template(
        "common/model_data.cc.in", {**common, "model_bytes": hex_bytes(spec.model_bytes)}
    )
    v = spec.vectors
    files["test_vectors.h"] = fill_template("common/test_vectors.h.in", {
        **common, "vector_source_comment": comment_text(v.origin), "count": len(v),
        "input_size": spec.input.size, "output_size": spec.output.size,
    })
    files["test_vectors.cc"] = fill_template("common/test_vectors.cc.in", {
        **common,
        "inputs": int_rows(v.inputs.reshape(len(v), -1)),
        "labels": "\n".join(_int_lines(v.labels, "  ")),
        "expected": int_rows(v.expected.reshape(len(v), -1)),
    })
    arena = {
        "arena_estimate": spec.arena_bytes, "arena_basis": spec.arena_basis, "arena_margin": margin_bytes,
        "arena_margin_reason": margin_reason, "arena_size": arena_size,
    }
    files["model_runner.h"] = fill_template("common/model_runner.h.in", {
        **common, **arena,
        "input_shape": _shape_text(spec.input.shape), "input_size": spec.input.size,
        "input_scale": c_float(spec.input.scale), "input_zero_point": c_int(spec.input.zero_point),
        "output_shape": _shape_text(spec.output.shape), "output_size": spec.output.size,
        "output_scale": c_float(spec.output.scale), "output_zero_point": c_int(spec.output.zero_point),
        "operator_count": len(spec.operators), "op_count": len(regs),
    })
    headers = sorted({r.header for r in regs if r.header})
    files["model_runner.cc"] = fill_template("common/model_runner.cc.in", {
        **common, **arena, "kernels": board.kernels,
        "kernel_includes": "".join(f'#include "{h}"\n' for h in headers),
        "op_list": ", ".join(r.op for r in regs), "op_count": len(regs),
        "registrations": "\n".join(
            f"  // {r.op}: {r.reason}\n  if ({r.call} != kTfLiteOk) return kTfLiteError;" for r in regs
        ),
    })
    files["main.cc"] = fill_template("common/main.cc.in", {
        **common, "board_c_string": c_string(board.name), "instructions_per_tick": port.instructions_per_tick,
    })
    for static in ("smpq_timer.h", "smpq_timer.c", "smpq_micro_time.cc"):
        files[static] = (FIRMWARE_DIR / "common" / static).read_text(encoding="utf-8")

    port_rows = ""
    if port.kind == "baremetal":
        files["startup_cortex_m.c"] = (FIRMWARE_DIR / "ports/baremetal/startup_cortex_m.c").read_text(encoding="utf-8")
        files["linker.ld"] = fill_template("ports/baremetal/linker.ld.in", {"board": board_text, **_memory_map(board)})
        port_rows = "| `startup_cortex_m.c`, `linker.ld` | bare-metal start-up (vector table, FPU, .data/.bss) and memory map |\n"

    cxx_srcs = ["main.cc", "model_data.cc", "model_runner.cc", "smpq_micro_time.cc", "test_vectors.cc"]
    c_srcs = ["smpq_timer.c"] + (["startup_cortex_m.c"] if port.kind == "baremetal" else [])
    flags = cpu_flags(board)
    defines = _defines(board, port)
    needed = kernel_files([r.op for r in regs])
    tflm_kernels = needed if isinstance(needed, str) else " ".join(needed)
    build_values = {
        "board": board_text, "core": board.core.value, "kernels": board.kernels,
        "fpu": "yes" if board.fpu else "no", "dsp": "yes" if board.dsp else "no",
        "cpu_flags": " ".join(flags), "clock_hz": int(round(board.clock_mhz * 1e6)), "app_name": app_name,
    }
    files["Makefile"] = fill_template("common/Makefile.in", {
        **build_values,
        "defines": " \\\n  ".join(f"-D{d}" for d in defines),
        "app_cxx_srcs": " ".join(cxx_srcs), "app_c_srcs": " ".join(c_srcs),
        "tflm_kernels": tflm_kernels,
        "default_target": "$(BUILD_DIR)/$(APP).elf" if port.kind == "baremetal"
        else "$(BUILD_DIR)/libsmpq_model.a $(TFLM_LIB)",
        "link_rules": _link_rules(port),
    })
    files["CMakeLists.txt"] = fill_template("common/CMakeLists.txt.in", {
        **{k: build_values[k] for k in ("board", "core", "kernels", "fpu", "dsp", "clock_hz", "app_name")},
        "tflm_kernels": tflm_kernels,
        "cpu_flags": " ".join(flags),
        "cmake_defines": "\n  ".join(defines),
        "cmake_app_srcs": " ".join(cxx_srcs + c_srcs),
        "cmake_link_rules": fill_template(f"ports/{port.kind}/link.cmake.in", {}),
    })
    cmsis = board.kernels == "cmsis_nn"
    files["README.md"] = fill_template("common/README.md.in", {
        **{k: build_values[k] for k in ("board", "core", "kernels", "cpu_flags")},
        "board_description": comment_text(board.description), "model_name": name,
        "model_len": len(spec.model_bytes), "op_count": len(regs), "vector_count": len(v),
        "port_files_rows": port_rows,
        "registration_list": "\n".join(f"- `{r.call}`: {r.reason}" for r in regs),
        **arena,
        "input_shape": _shape_text(spec.input.shape), "input_scale_text": f"{spec.input.scale:.9g}",
        "input_zero_point": spec.input.zero_point, "input_preprocessing": spec.input_preprocessing,
        "output_shape": _shape_text(spec.output.shape), "output_scale_text": f"{spec.output.scale:.9g}",
        "output_zero_point": spec.output.zero_point,
        "cmsis_needs": ", CMSIS and CMSIS-NN" if cmsis else "",
        "cmsis_make_vars": " CMSIS_DIR=... CMSIS_NN_DIR=..." if cmsis else "",
        "run_section": _run_section(board, port, app_name),
    }).rstrip("\n") + "\n"

    result = FirmwareResult(
        out_dir=Path("."), board=board.name, port=port.run, qemu_machine=port.qemu_machine,
        files=tuple(sorted([*files, "firmware.json"])), registrations=regs,
        arena_estimate=spec.arena_bytes, arena_basis=spec.arena_basis, arena_margin=margin_bytes, arena_size=arena_size,
        vectors=len(v), model_bytes=len(spec.model_bytes),
    )
    return files, result


def _memory_map(board: Board) -> dict[str, str]:
    """The linker script's memory regions: flash_kb at the port's flash origin, and the port's
    contiguous RAM (or ram_kb) at its RAM origin."""
    port = board.port
    flash_kb, ram_kb = int(board.flash_kb), int(port.ram_kb or board.ram_kb)
    return {
        "memory_comment": f"flash {flash_kb} KB at 0x{port.flash_origin:08x}, RAM {ram_kb} KB at 0x{port.ram_origin:08x}",
        "flash_origin": f"0x{port.flash_origin:08x}", "flash_length": f"{flash_kb}K",
        "ram_origin": f"0x{port.ram_origin:08x}", "ram_length": f"{ram_kb}K",
        "stack_size": f"0x{int(port.stack_kb * KB):x}",
    }


def _link_rules(port: Port) -> str:
    if port.kind == "library":
        return fill_template("ports/library/link.mk.in", {})
    run_rules = ""
    if (FIRMWARE_DIR / f"ports/{port.run}/run.mk.in").exists():
        values = ({"pyocd_target": port.pyocd_target} if port.pyocd_target else
                  {"qemu_machine": port.qemu_machine} if port.qemu_machine else {})
        run_rules = "\n" + fill_template(f"ports/{port.run}/run.mk.in", values)
    return fill_template("ports/baremetal/link.mk.in", {"run_rules": run_rules})


def _run_section(board: Board, port: Port, app_name: str) -> str:
    relative = f"ports/{port.run}/README.run.md.in"
    if port.run == "qemu":
        return fill_template(relative, {"app_name": app_name, "kernels": board.kernels,
                                        "qemu_machine": port.qemu_machine,
                                        "instructions_per_tick": port.instructions_per_tick})
    if port.run == "stm32":
        return fill_template(relative, {
            "app_name": app_name, "board_description": comment_text(board.description),
            "flash_origin": f"0x{port.flash_origin:08x}", "ram_origin": f"0x{port.ram_origin:08x}",
            "ram_length_kb": int(port.ram_kb or board.ram_kb), "pyocd_target": port.pyocd_target,
        })
    timer_hint = (
        "Cycles come from DWT CYCCNT." if board.has_dwt and not port.use_systick
        else f"Cycles come from SysTick: `{port.systick_handler}` (in smpq_timer.c) must be the SDK's "
             "SysTick vector, and nothing else may use SysTick."
    )
    return fill_template(relative, {
        "board": comment_text(board.name), "core": board.core.value,
        "cmsis_lib": " and CMSIS-NN" if board.kernels == "cmsis_nn" else "",
        "sdk_hint": port.sdk_hint, "timer_hint": timer_hint, "flash_hint": port.flash_hint,
    })


def generate_firmware(
    spec: FirmwareSpec, board: Board, out_dir: str | Path, margin: int | None = None
) -> FirmwareResult:
    """Write the firmware sources for ``spec`` on ``board`` into ``out_dir`` (atomically, file by
    file) plus ``firmware.json``; returns what was written."""
    out = ensure_dir(Path(out_dir))
    files, result = render_firmware(spec, board, margin)
    for name, text in files.items():
        write_text(out / name, text)
    result.record().write(out / "firmware.json")
    return replace(result, out_dir=out)


def generate_from_tflite(
    model_path: str | Path,
    board: Board,
    out_dir: str | Path,
    x: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    vectors: int = DEFAULT_VECTORS,
    seed: int = 0,
    margin: int | None = None,
    origin: str | None = None,
    arena_bytes: int | None = None,
    arena_basis: str = HOST_ARENA_BASIS,
    input_preprocessing: str = UNKNOWN_PREPROCESSING,
) -> FirmwareResult:
    """A .tflite file -> firmware folder: test vectors from ``x``/``labels`` (float, channels
    first; seeded random int8 inputs when None), arena measured on the host unless ``arena_bytes``
    (with ``arena_basis``: the emulator's measurement, or the cost model's target arena) is
    given, files written."""
    path = Path(model_path)
    try:
        model_bytes = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read TFLite file ({exc.strerror or exc.__class__.__name__})") from None
    test_vectors = build_test_vectors(model_bytes, x, labels, count=vectors, seed=seed, source=str(path), origin=origin)
    spec = build_spec(model_bytes, test_vectors, name=path.name, arena_bytes=arena_bytes, arena_basis=arena_basis,
                      input_preprocessing=input_preprocessing)
    return generate_firmware(spec, board, out_dir, margin=margin)
