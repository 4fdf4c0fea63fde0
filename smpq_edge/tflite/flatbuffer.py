"""Read, inspect and rewrite a .tflite flatbuffer.

Built on the schema module that ships with ai-edge-litert (its generated object API), so no
schema is vendored here. Views are plain frozen dataclasses; edits go through ``TfliteModel``
methods and ``to_bytes()`` packs a fresh flatbuffer. Only the main subgraph (index 0, the one
TFLM runs) is exposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from smpq_edge.common.errors import UserError

FILE_IDENTIFIER = b"TFL3"
# The schema asks for 16-byte aligned buffer data (force_align: 16); the generated Python
# packer ignores that, and a misaligned int32 bias faults on cores without unaligned loads.
BUFFER_ALIGNMENT = 16
# Buffer.offset is 0 (no data) or 1 (placeholder) unless the data lies after the flatbuffer.
_FIRST_REAL_OFFSET = 2


def _enum_names(enum_class: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


_OP_NAMES = _enum_names(schema.BuiltinOperator)
_TYPE_NAMES = _enum_names(schema.TensorType)
_TYPE_CODES = {name: code for code, name in _TYPE_NAMES.items()}
_ACTIVATION_NAMES = _enum_names(schema.ActivationFunctionType)


@dataclass(frozen=True)
class Quantization:
    """Affine quantisation: real = scale * (q - zero_point), per tensor or along one axis."""

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    type: str  # schema TensorType name: "INT8", "INT32", "INT4", ...
    buffer: int
    data: bytes | None  # constant contents; None for activations
    quantization: Quantization | None

    def dequantised(self) -> np.ndarray:
        """An int8 constant's real values, scale * (q - zero point), per tensor or along its axis."""
        q = self.quantization
        values = np.frombuffer(self.data, dtype=np.int8).reshape(self.shape).astype(np.float64)
        view = [1] * len(self.shape)
        if len(q.scales) > 1:
            view[q.quantized_dimension] = -1
        scale = np.asarray(q.scales, dtype=np.float64).reshape(view)
        zero = np.asarray(q.zero_points, dtype=np.float64).reshape(view if len(q.zero_points) > 1 else [1] * len(view))
        return (values - zero) * scale


@dataclass(frozen=True)
class OperatorInfo:
    index: int  # position in execution order
    name: str  # builtin name ("CONV_2D") or "CUSTOM:<code>"
    version: int
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    fused_activation: str | None  # "NONE", "RELU", ... for ops that carry one
    options: dict  # scalar builtin options, schema field names (strideW, padding, ...)


def _as_tuple(values) -> tuple:
    return () if values is None else tuple(np.asarray(values).tolist())


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class _AlignedBufferT(schema.BufferT):
    """BufferT whose data vector is packed at BUFFER_ALIGNMENT."""

    def Pack(self, builder: flatbuffers.Builder) -> int:
        data_offset = None
        if self.data is not None:
            payload = np.asarray(self.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data_offset = builder.EndVector()
        schema.BufferStart(builder)
        if data_offset is not None:
            schema.BufferAddData(builder, data_offset)
        return schema.BufferEnd(builder)


class TfliteModel:
    """A parsed .tflite model; inspect with ``operators()``/``tensors()``, edit, ``to_bytes()``."""

    def __init__(self, model: schema.ModelT, source: str):
        self._model = model
        self._source = source

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> TfliteModel:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read TFLite file ({exc.strerror})") from exc
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<tflite bytes>") -> TfliteModel:
        """Parse ``data``; ``source`` names the file in error messages."""
        data = bytes(data)
        if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
            raise UserError(f"{source}: not a TFLite model (no '{FILE_IDENTIFIER.decode()}' identifier)")
        try:
            model = schema.ModelT.InitFromPackedBuf(data, 0)
        except Exception as exc:  # the generated decoder raises whatever struct/numpy raise
            raise UserError(f"{source}: corrupt TFLite flatbuffer ({type(exc).__name__}: {exc})") from exc
        _inline_external_buffers(model, data, source)
        _check_structure(model, source)
        return cls(model, source)

    # ---- views ---------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return self._source

    @property
    def _graph(self) -> schema.SubGraphT:
        return self._model.subgraphs[0]

    @property
    def inputs(self) -> tuple[int, ...]:
        return _as_tuple(self._graph.inputs)

    @property
    def outputs(self) -> tuple[int, ...]:
        return _as_tuple(self._graph.outputs)

    def operators(self) -> list[OperatorInfo]:
        """Operators in execution order (the order TFLM invokes them)."""
        return [self._operator(i, op) for i, op in enumerate(self._graph.operators or [])]

    def tensors(self) -> list[TensorInfo]:
        return [self.tensor(i) for i in range(len(self._graph.tensors or []))]

    def tensor(self, index: int) -> TensorInfo:
        t = self._graph.tensors[index]
        buffer = self._model.buffers[t.buffer]
        q = t.quantization
        quantization = None
        if q is not None and q.scale is not None and len(q.scale) > 0:
            quantization = Quantization(
                scales=_as_tuple(q.scale),
                zero_points=_as_tuple(q.zeroPoint),
                quantized_dimension=int(q.quantizedDimension),
            )
        data = None if buffer.data is None or len(buffer.data) == 0 else bytes(buffer.data)
        return TensorInfo(
            index=index,
            name=_decode(t.name),
            shape=_as_tuple(t.shape),
            type=_TYPE_NAMES.get(t.type, f"UNKNOWN({t.type})"),
            buffer=int(t.buffer),
            data=data,
            quantization=quantization,
        )

    def _operator(self, index: int, op: schema.OperatorT) -> OperatorInfo:
        code = self._model.operatorCodes[op.opcodeIndex]
        # Codes above 127 live only in builtinCode; older files only fill the deprecated field.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM:
            name = f"CUSTOM:{_decode(code.customCode)}"
        else:
            name = _OP_NAMES.get(builtin, f"UNKNOWN({builtin})")
        raw_options = vars(op.builtinOptions) if op.builtinOptions is not None else {}
        options = {k: v for k, v in raw_options.items() if isinstance(v, (bool, int, float))}
        activation = options.get("fusedActivationFunction")
        return OperatorInfo(
            index=index,
            name=name,
            version=int(code.version),
            inputs=_as_tuple(op.inputs),
            outputs=_as_tuple(op.outputs),
            fused_activation=None if activation is None else _ACTIVATION_NAMES[activation],
            options=options,
        )

    # ---- edits ---------------------------------------------------------------------------

    def set_tensor_data(self, index: int, data: bytes) -> None:
        """Replace a constant tensor's bytes (a shared buffer is split off first)."""
        t = self._graph.tensors[index]
        if self._buffer_is_shared(t.buffer, index):
            self._model.buffers.append(_AlignedBufferT())
            t.buffer = len(self._model.buffers) - 1
        self._model.buffers[t.buffer].data = np.frombuffer(bytes(data), dtype=np.uint8)

    def set_tensor_type(self, index: int, type_name: str) -> None:
        if type_name not in _TYPE_CODES:
            raise ValueError(f"unknown TFLite tensor type {type_name!r}")
        self._graph.tensors[index].type = _TYPE_CODES[type_name]

    def set_tensor_shape(self, index: int, shape: Sequence[int]) -> None:
        """Give a tensor another shape of the same size (its readers must not care which)."""
        t = self._graph.tensors[index]
        if int(np.prod(shape)) != int(np.prod(t.shape)):
            raise ValueError(f"tensor {index}: shape {tuple(shape)} does not hold {tuple(t.shape)}'s elements")
        t.shape = np.asarray(shape, dtype=np.int32)
        if t.shapeSignature is not None and len(t.shapeSignature):  # keeps a dynamic batch (-1)
            t.shapeSignature = np.asarray([t.shapeSignature[0], *shape[1:]], dtype=np.int32)

    def set_tensor_quantization(
        self,
        index: int,
        scales: Sequence[float],
        zero_points: Sequence[int],
        quantized_dimension: int = 0,
    ) -> None:
        # One zero point for many scales is read by TFLM's allocator (micro_allocator.cc), but the
        # schema and LiteRT want one per scale; the exporter writes one per scale.
        if len(scales) == 0 or len(zero_points) not in (1, len(scales)):
            raise ValueError("scales must be non-empty, with one zero point or one per scale")
        q = schema.QuantizationParametersT()
        q.scale = [float(s) for s in scales]
        q.zeroPoint = [int(z) for z in zero_points]
        q.quantizedDimension = int(quantized_dimension)
        self._graph.tensors[index].quantization = q

    def set_operator_input(self, index: int, position: int, tensor: int) -> None:
        """Make operator ``index`` read ``tensor`` as its input number ``position``."""
        op = self._graph.operators[index]
        inputs = list(op.inputs)
        inputs[position] = tensor
        op.inputs = np.asarray(inputs, dtype=np.int32)

    def remove_operators(self, indices: set[int]) -> None:
        """Drop operators whose outputs nobody reads any more (``compact`` then drops their tensors)."""
        graph = self._graph
        graph.operators = [op for i, op in enumerate(graph.operators) if i not in indices]

    def set_operator_option(self, index: int, name: str, value: bool | int | float) -> None:
        """Set one scalar builtin option (schema field name, as in ``OperatorInfo.options``)."""
        options = self._graph.operators[index].builtinOptions
        if options is None or not hasattr(options, name):
            raise ValueError(f"operator {index} has no option {name!r}")
        setattr(options, name, value)

    def add_activation_tensor(self, like: int, type_name: str, scale: float, zero_point: int) -> int:
        """A new activation tensor of tensor ``like``'s shape, of ``type_name`` with one scale and
        zero point; its index."""
        graph = self._graph
        tensor = schema.TensorT()
        tensor.shape = np.asarray(graph.tensors[like].shape, dtype=np.int32)
        tensor.type = _TYPE_CODES[type_name]
        tensor.buffer = len(self._model.buffers)
        self._model.buffers.append(_AlignedBufferT())  # an activation: an empty buffer of its own
        graph.tensors.append(tensor)
        self.set_tensor_quantization(len(graph.tensors) - 1, [scale], [zero_point])
        return len(graph.tensors) - 1

    def insert_operator(self, position: int, builtin: int, inputs: Sequence[int], outputs: Sequence[int],
                        options_type: int = 0, options=None) -> None:
        """A builtin operator put at ``position`` in the execution order (len(operators): last)."""
        op = schema.OperatorT()
        op.opcodeIndex = self.opcode_index(builtin)
        op.inputs, op.outputs = np.asarray(inputs, dtype=np.int32), np.asarray(outputs, dtype=np.int32)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        operators = list(self._graph.operators or [])
        self._graph.operators = [*operators[:position], op, *operators[position:]]

    def set_output(self, index: int) -> None:
        """Make tensor ``index`` the graph's one output."""
        self._graph.outputs = np.asarray([index], dtype=np.int32)

    def append_softmax(self, beta: float, scale: float, zero_point: int) -> int:
        """Put a SOFTMAX after the graph's one output; it writes a new int8 output tensor of the
        same shape with (``scale``, ``zero_point``), whose index is returned."""
        (source,) = self.outputs
        out = self.add_activation_tensor(source, "INT8", scale, zero_point)
        options = schema.SoftmaxOptionsT()
        options.beta = float(beta)
        self.insert_operator(len(self._graph.operators or []), schema.BuiltinOperator.SOFTMAX, [source], [out],
                             schema.BuiltinOptions.SoftmaxOptions, options)
        self.set_output(out)
        return out

    def opcode_index(self, builtin: int) -> int:
        """The operator code of ``builtin``, added (version 1) if the model has none."""
        for i, code in enumerate(self._model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = min(builtin, 127)
        code.version = 1
        self._model.operatorCodes.append(code)
        return len(self._model.operatorCodes) - 1

    def clear_tensor_quantization(self, index: int) -> None:
        self._graph.tensors[index].quantization = None

    def compact(self) -> None:
        """Drop what TFLM never reads and flash would still hold: tensors no operator uses (e.g.
        MEAN's axes after a rewrite), their buffers, converter-chosen tensor names (often 100
        bytes each; replaced by short ones) and signature definitions (index maps to names)."""
        graph = self._graph
        used = set(self.inputs) | set(self.outputs)
        for op in graph.operators or []:
            used |= {i for i in list(op.inputs) + list(op.outputs) if i >= 0}
        keep = sorted(used)
        new_index = {old: new for new, old in enumerate(keep)}
        graph.tensors = [graph.tensors[i] for i in keep]
        for op in graph.operators or []:
            op.inputs = [new_index[i] if i >= 0 else i for i in op.inputs]
            op.outputs = [new_index[i] for i in op.outputs]
        graph.inputs = [new_index[i] for i in graph.inputs]
        graph.outputs = [new_index[i] for i in graph.outputs]
        named = {graph.inputs[0]: "input", graph.outputs[0]: "output"} if len(graph.inputs) == len(graph.outputs) == 1 else {}
        for i, tensor in enumerate(graph.tensors):
            tensor.name = named.get(i, f"t{i}")
        buffers_used = {0} | {t.buffer for t in graph.tensors} | {
            m.buffer for m in (self._model.metadata or [])}
        buffer_index = {old: new for new, old in enumerate(sorted(buffers_used))}
        self._model.buffers = [self._model.buffers[i] for i in sorted(buffers_used)]
        for tensor in graph.tensors:
            tensor.buffer = buffer_index[tensor.buffer]
        for entry in self._model.metadata or []:
            entry.buffer = buffer_index[entry.buffer]
        self._model.signatureDefs = []
        graph.name = "main"

    def _buffer_is_shared(self, buffer: int, owner: int) -> bool:
        if buffer == 0:  # the schema's shared empty sentinel
            return True
        # Converters deduplicate identical constants into one buffer.
        return any(
            t.buffer == buffer and (g, i) != (0, owner)
            for g, sg in enumerate(self._model.subgraphs)
            for i, t in enumerate(sg.tensors or [])
        )

    # ---- writing -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Pack the (edited) model into a new flatbuffer with the TFL3 identifier."""
        self._model.buffers = [_aligned(b) for b in self._model.buffers]
        builder = flatbuffers.Builder(1024)
        builder.Finish(self._model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _aligned(buffer: schema.BufferT) -> _AlignedBufferT:
    if isinstance(buffer, _AlignedBufferT):
        return buffer
    out = _AlignedBufferT()
    out.data = buffer.data
    return out


def _inline_external_buffers(model: schema.ModelT, data: bytes, source: str) -> None:
    """Files over 2 GB keep buffer data after the flatbuffer; pull it inline (offset/size)."""
    for i, buffer in enumerate(model.buffers or []):
        if buffer.offset >= _FIRST_REAL_OFFSET:
            end = buffer.offset + buffer.size
            if end > len(data):
                raise UserError(f"{source}: corrupt TFLite file (buffer {i} runs past the end of the file)")
            buffer.data = np.frombuffer(data, dtype=np.uint8, count=buffer.size, offset=buffer.offset)
        buffer.offset = buffer.size = 0


def _check_structure(model: schema.ModelT, source: str) -> None:
    """Catch dangling indices that a damaged file decodes into, before anything uses them."""

    def fail(what: str) -> None:
        raise UserError(f"{source}: corrupt TFLite model ({what})")

    if not model.subgraphs:
        fail("no subgraphs")
    n_buffers = len(model.buffers or [])
    n_codes = len(model.operatorCodes or [])
    for g, graph in enumerate(model.subgraphs):
        n_tensors = len(graph.tensors or [])
        for t, tensor in enumerate(graph.tensors or []):
            if not 0 <= tensor.buffer < n_buffers:
                fail(f"subgraph {g} tensor {t} points at buffer {tensor.buffer} of {n_buffers}")
        for o, op in enumerate(graph.operators or []):
            if not 0 <= op.opcodeIndex < n_codes:
                fail(f"subgraph {g} operator {o} has opcode index {op.opcodeIndex} of {n_codes}")
            for idx in list(_as_tuple(op.inputs)) + list(_as_tuple(op.outputs)):
                if not -1 <= idx < n_tensors:
                    fail(f"subgraph {g} operator {o} uses tensor {idx} of {n_tensors}")
        for idx in _as_tuple(graph.inputs) + _as_tuple(graph.outputs):
            if not 0 <= idx < n_tensors:
                fail(f"subgraph {g} input/output tensor {idx} of {n_tensors}")
