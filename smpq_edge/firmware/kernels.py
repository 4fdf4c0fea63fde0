"""Which TFLM kernels a model needs: the op resolver's registrations (CMSIS-NN's INT4/INT8
variants where the board uses CMSIS-NN) and the kernel files the Makefile compiles."""

from __future__ import annotations

from dataclasses import dataclass

from smpq_edge.common.errors import UserError
from smpq_edge.common.precision import DECODE_OP


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


@dataclass(frozen=True)
class OpUse:
    """One builtin op of the model with the tensor types its instances use."""

    name: str  # builtin name, "CONV_2D"
    count: int  # instances in the graph
    input_types: tuple[str, ...]  # distinct types of input 0 ("INT8", "INT16")
    weight_types: tuple[str, ...]  # distinct filter types ("INT4", "INT8"); () for ops without


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
