"""The one adapter around the TFLM host interpreter (``tflite_micro`` Python package).

Quirks of that package, handled here so no other module meets them:

- TFLM logs (``MicroPrintf``) and ``print_allocations()`` write from C++ straight to file
  descriptor 2, past ``sys.stderr``; they are captured at the descriptor level.
- The interpreter-config keyword is spelled ``intrepreter_config``.
- With no ``arena_size`` it guesses 10 x the model size, and an arena that is too small can
  kill the process with a segmentation fault instead of raising. So the runner's default arena
  is large virtual memory (the OS only backs the pages TFLM touches), and any smaller arena is
  first tried in a throw-away child process.
- There is no binding for ``arena_used_bytes()``; ``print_allocations()`` text is parsed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tflite_micro.python.tflite_micro import runtime

from smpq_edge.common.errors import UserError
from smpq_edge.tflite.flatbuffer import TfliteModel

# Virtual size of the default arena: far above any microcontroller's RAM, so "does not fit"
# never happens in-process, yet only the bytes TFLM uses become resident.
GENEROUS_ARENA_BYTES = 1 << 28
# TFLM aligns arena allocations to 16 bytes (MicroArenaBufferAlignment).
ARENA_ALIGNMENT = 16

_MISSING_OP = re.compile(r"Didn't find op for builtin opcode '([^']+)'")
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")

# Child process for arena probes: exit 0 when the model allocates and invokes in the arena.
_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
model = sys.stdin.buffer.read()
interpreter = runtime.Interpreter.from_bytes(model, arena_size=int(sys.argv[1]))
details = interpreter.get_input_details(0)
interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
interpreter.invoke()
"""


@dataclass(frozen=True)
class TensorSpec:
    """What TFLM reports for a model input or output."""

    shape: tuple[int, ...]  # batch first, as in the model (TFLM runs batch 1)
    dtype: np.dtype
    scale: float
    zero_point: int


def quantise_input(x: np.ndarray, spec: TensorSpec, source: str = "<model>") -> np.ndarray:
    """Float data-set samples -> the int8 batch the model takes, exactly as the firmware's test
    vectors and the emulator feed it: channels-first samples (N, C, H, W) go channels last where
    the model's input is (N, H, W, C), and (N, 1, F, 1) vectors (as the data loader keeps (N, F)
    data) go flat where it is (N, F); then round(x / scale) + zero point (half to even), clamped."""
    target = tuple(spec.shape[1:])
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4 and (x.shape[2], x.shape[3], x.shape[1]) == target:
        x = x.transpose(0, 2, 3, 1)
    elif x.ndim == 4 and x.shape[1] == x.shape[3] == 1 and target == (x.shape[2],):
        x = x.reshape(len(x), -1)
    elif tuple(x.shape[1:]) != target:
        raise UserError(f"{source}: data samples have shape {tuple(x.shape[1:])} (channels first); the model "
                        f"takes {target} (channels last)")
    q = np.round(x / np.float32(spec.scale)) + spec.zero_point
    return np.ascontiguousarray(np.clip(q, -128, 127).astype(np.int8))


@contextlib.contextmanager
def _captured_native_output() -> Iterator[list[str]]:
    """Send fds 1 and 2 to a temp file for the block; the list receives the captured text."""
    captured: list[str] = []
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            libc.fflush(None)  # C stdio buffers must drain into the sink, not after restore
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _explain(log: str, source: str) -> UserError:
    """One line from TFLM's log: the missing op if that is the cause, else its last message
    (which names the failing node) and its first (the check that failed)."""
    missing = _MISSING_OP.search(log)
    if missing:
        return UserError(f"{source}: TFLM has no kernel for op {missing.group(1)}")
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if not lines:
        return UserError(f"{source}: TFLM cannot run this model (it gave no reason)")
    cause = f" ({lines[0]})" if len(lines) > 1 else ""
    return UserError(f"{source}: TFLM cannot run this model: {lines[-1]}{cause}")


def _fits(model_bytes: bytes, arena_size: int) -> bool:
    """Whether TFLM allocates and invokes the model in ``arena_size`` bytes (in a child)."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(arena_size)],
        input=model_bytes,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0  # a segfault (negative code) also means "does not fit"


class TflmRunner:
    """A TFLM interpreter for one model with one input and one output, fed sample by sample."""

    def __init__(self, model_bytes: bytes, arena_size: int | None = None, source: str = "<model>"):
        self.model_bytes = bytes(model_bytes)
        self.source = source
        # Validate in Python first: TFLM trusts the flatbuffer and may crash on a damaged one.
        parsed = TfliteModel.from_bytes(self.model_bytes, source)
        if len(parsed.inputs) != 1 or len(parsed.outputs) != 1:
            raise UserError(
                f"{source}: expected one input and one output, "
                f"found {len(parsed.inputs)} and {len(parsed.outputs)}"
            )
        if arena_size is not None and not _fits(self.model_bytes, arena_size):
            needed = smallest_arena(self.model_bytes, source)  # raises if it cannot run at all
            raise UserError(
                f"{source}: a {arena_size}-byte tensor arena is too small for TFLM "
                f"(it needs {needed} bytes)"
            )
        self.arena_size = GENEROUS_ARENA_BYTES if arena_size is None else arena_size
        self._interpreter = self._create()
        self.input = self._spec(self._interpreter.get_input_details(0))
        self.output = self._spec(self._interpreter.get_output_details(0))

    def _create(self) -> runtime.Interpreter:
        with _captured_native_output() as log:
            try:
                return runtime.Interpreter.from_bytes(
                    self.model_bytes,
                    arena_size=self.arena_size,
                    # sic: the package spells the keyword this way. Recording is the mode in
                    # which print_allocations() works.
                    intrepreter_config=runtime.InterpreterConfig.kAllocationRecording,
                )
            except (RuntimeError, ValueError) as exc:
                failure = exc
        raise _explain(log[0], self.source) from failure

    @staticmethod
    def _spec(details: dict) -> TensorSpec:
        quant = details["quantization_parameters"]
        scales, zero_points = quant["scales"], quant["zero_points"]
        return TensorSpec(
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]),
            scale=float(scales[0]) if len(scales) else 0.0,
            zero_point=int(zero_points[0]) if len(zero_points) else 0,
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Invoke once per sample; ``batch`` is (N, *input.shape[1:]) of the input dtype."""
        batch = np.asarray(batch)
        expected = self.input.shape[1:]
        if batch.dtype != self.input.dtype or batch.shape[1:] != expected:
            raise ValueError(
                f"expected a ({'N', *expected}) batch of {self.input.dtype}, "
                f"got {batch.shape} of {batch.dtype}"
            )
        outputs = np.empty((len(batch), *self.output.shape[1:]), dtype=self.output.dtype)
        with _captured_native_output() as log:
            try:
                for i, sample in enumerate(batch):
                    self._interpreter.set_input(np.ascontiguousarray(sample[None]), 0)
                    self._interpreter.invoke()
                    outputs[i] = self._interpreter.get_output(0)[0]
            except RuntimeError as exc:
                failure = exc
            else:
                failure = None
        if failure is not None:
            raise _explain(log[0], self.source) from failure
        return outputs

    def arena_used_bytes(self) -> int:
        """Arena bytes TFLM's recording allocator reports (head + tail, after one invoke)."""
        with _captured_native_output() as log:
            self._interpreter.print_allocations()
        match = _ARENA_TOTAL.search(log[0])
        if match is None:
            raise RuntimeError(f"no arena total in TFLM's allocation report: {log[0]!r}")
        return int(match.group(1))


def smallest_arena(model_bytes: bytes, source: str = "<model>") -> int:
    """The smallest ``arena_size`` with which TFLM allocates and invokes the model.

    Starts from the recording allocator's total (run in-process with a generous arena), then
    narrows by probing child processes, since a too-small arena may crash instead of failing.
    """
    runner = TflmRunner(model_bytes, source=source)
    runner.run(np.zeros((1, *runner.input.shape[1:]), dtype=runner.input.dtype))
    fits_upper = runner.arena_used_bytes()
    step = ARENA_ALIGNMENT
    while not _fits(runner.model_bytes, fits_upper):
        fits_upper += step
        step *= 2
        if fits_upper >= GENEROUS_ARENA_BYTES:
            raise RuntimeError(f"{source}: no arena below {GENEROUS_ARENA_BYTES} bytes works")
    # Gallop down to a size that fails, then bisect; fits(size) is monotone in size.
    step = 4 * ARENA_ALIGNMENT
    fails_lower = max(fits_upper - step, 0)
    while fails_lower > 0 and _fits(runner.model_bytes, fails_lower):
        fits_upper = fails_lower
        step *= 2
        fails_lower = max(fits_upper - step, 0)
    while fits_upper - fails_lower > 1:
        middle = (fits_upper + fails_lower) // 2
        if _fits(runner.model_bytes, middle):
            fits_upper = middle
        else:
            fails_lower = middle
    return fits_upper
