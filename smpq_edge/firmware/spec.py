"""A .tflite described for the firmware: its tensors' quantisation, the ops it uses, the arena
measured on the TFLM host interpreter, and test vectors with the interpreter's outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smpq_edge.common.errors import UserError
from smpq_edge.firmware.kernels import VARIANT_HEADERS, OpUse


DEFAULT_VECTORS = 20
HOST_ARENA_BASIS = "measured with the TFLM host interpreter (reference kernels, 64-bit pointers)"
WEIGHT_INPUT = 1  # the filter is input 1 of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED


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
    from smpq_edge.tflite.tflm import TflmRunner, quantise_input

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
    from smpq_edge.tflite.flatbuffer import TfliteModel
    from smpq_edge.tflite.tflm import TflmRunner, smallest_arena

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
    check_vectors(spec)
    return spec


def check_vectors(spec: FirmwareSpec) -> None:
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
