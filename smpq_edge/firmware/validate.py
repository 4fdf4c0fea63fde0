"""Validate on target: run a build's firmware self-check and compare it with the cost model.

Two ways to get the self-check report (what the generated ``main.cc`` prints):

- a board with a QEMU port (``qemu-mps2-an386``): the firmware in ``BUILD_DIR/firmware`` is built
  with ``make`` against the user's TFLM tree and run under ``qemu-system-arm -icount shift=0``,
  where SysTick ticks x 40 are executed instructions;
- ``port=``: the report is read from a serial line of a board the user has flashed already.

The report is parsed (``parse_self_check``) and set against ``BUILD_DIR/search.json`` (the
chosen method's predicted cycles per layer and arena): every output byte-equal to the
emulator's, measured counts per inference and per op against predicted cycles, arena used
against predicted. Every profiled op is set against the cost model's operator of the same place
(``cost.ops`` in search.json: PAD, pooling and ADD too); a search.json without them (an older
build) gives the weighted layers alone. ``validate`` returns a ``Validation`` and writes it as
``BUILD_DIR/validation.json``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import write_json, write_text
from smpq_edge.inputs.policy import load_policy
from smpq_edge.common.records import FirmwareRecord, read_firmware, read_search_costs

QEMU = "qemu-system-arm"
CROSS_CXX = "arm-none-eabi-g++"
DEFAULT_BUILD_TIMEOUT_S = 3600.0
DEFAULT_RUN_TIMEOUT_S = 300.0
DEFAULT_SERIAL_TIMEOUT_S = 60.0
DEFAULT_BAUD = 115200
RESULT_FILE = "validation.json"
MAKE_LOG = "validation-make.log"
# The objects and the ELF, outside firmware/ so that the generated folder stays as generated.
OBJECT_DIR = "validation-build"
REPORT_FILE = "validation-report.txt"


# ---- the self-check report -------------------------------------------------------------------


@dataclass(frozen=True)
class ProfiledOp:
    """One line of the firmware's per-op profile."""

    index: int
    op: str
    count: int  # in the report's counter unit (SysTick ticks or DWT cycles)
    instructions: int | None  # count x instructions per tick, under QEMU


@dataclass(frozen=True)
class SelfCheck:
    """What the firmware's self-check printed."""

    board: str
    vectors: int
    outputs_equal: int  # vectors whose every output byte equals the emulator's
    labelled: int
    correct: int
    arena_used: int
    arena_size: int
    counter: str  # "SysTick ticks", "DWT cycles" or "none"
    per_inference: tuple[int, int, int] | None  # min, mean, max in the counter's unit
    instructions_per_tick: int  # > 0 under QEMU -icount shift=0
    instructions_per_inference: int | None
    ops: tuple[ProfiledOp, ...]
    passed: bool


_HEADER = re.compile(r"smpq_edge self-check on (\S+): (\d+) test vectors")
_END = re.compile(r"^(PASS|FAIL)\b")
_ARENA = re.compile(r"tensor arena: (\d+) of (\d+) bytes used")
_EQUAL = re.compile(r"outputs equal to the emulator's: (\d+)/(\d+)")
_LABELS = re.compile(r"correct labels \(argmax\): (\d+)/(\d+)")
_PER_INFERENCE = re.compile(r"^(SysTick ticks|DWT cycles) per inference: min (\d+) mean (\d+) max (\d+)")
_INSTRUCTIONS = re.compile(r"instructions per inference: (\d+) \(SysTick ticks x (\d+)")
_PROFILE = re.compile(r"per-op profile of the last inference \(([^,)]+)(?:, instructions = ticks x (\d+))?\):")
_OP_LINE = re.compile(r"^\s+op\s+(\d+)\s+(\S+)\s+(\d+)(?:\s+(\d+))?\s*$")


def parse_self_check(text: str, source: str) -> SelfCheck:
    """The report in ``text`` (the last one, if the board printed several); UserError when
    there is none or it stops early."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if _HEADER.search(line)]
    if not starts:
        raise UserError(f"{source}: no smpq_edge self-check report in the output")
    lines = lines[starts[-1]:]
    header = _HEADER.search(lines[0])
    end = next((i for i, line in enumerate(lines) if _END.match(line.strip())), None)
    if end is None:
        raise UserError(f"{source}: the self-check report ends before its PASS/FAIL line")
    body = lines[:end + 1]
    init_failure = next((line.strip() for line in body if line.strip().startswith("FAIL: ")), None)

    def find(pattern: re.Pattern, required: bool = True):
        for line in body:
            match = pattern.search(line)
            if match:
                return match
        if required and init_failure is None:
            raise UserError(f"{source}: the self-check report has no line matching '{pattern.pattern}'")
        return None

    arena, equal = find(_ARENA), find(_EQUAL)
    labels, per_inference = find(_LABELS, required=False), find(_PER_INFERENCE, required=False)
    instructions, profile = find(_INSTRUCTIONS, required=False), find(_PROFILE, required=False)
    ops = []
    if profile is not None:
        first = next(i for i, line in enumerate(body) if _PROFILE.search(line)) + 1
        for line in body[first:]:
            match = _OP_LINE.match(line)
            if match is None:
                break
            ops.append(ProfiledOp(int(match.group(1)), match.group(2), int(match.group(3)),
                                  int(match.group(4)) if match.group(4) else None))
    return SelfCheck(
        board=header.group(1), vectors=int(header.group(2)),
        outputs_equal=int(equal.group(1)) if equal else 0,
        labelled=int(labels.group(2)) if labels else 0, correct=int(labels.group(1)) if labels else 0,
        arena_used=int(arena.group(1)) if arena else 0, arena_size=int(arena.group(2)) if arena else 0,
        counter=per_inference.group(1) if per_inference else "none",
        per_inference=tuple(int(per_inference.group(i)) for i in (2, 3, 4)) if per_inference else None,
        instructions_per_tick=int(instructions.group(2)) if instructions else 0,
        instructions_per_inference=int(instructions.group(1)) if instructions else None,
        ops=tuple(ops),
        passed=body[-1].strip().startswith("PASS") and init_failure is None,
    )


# ---- the result ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpComparison:
    """One profiled op: measured, and the cost model's cycles where it prices the op alone."""

    index: int
    op: str
    layer: str | None  # the cost model's operator (a layer's name, "<layer>/pad" for its PAD)
    measured: int  # in the validation's unit (instructions under QEMU, else the counter's)
    predicted_cycles: int | None
    ratio: float | None  # measured / predicted


@dataclass(frozen=True)
class Validation:
    """The self-check on target against the cost model's prediction."""

    build_dir: str
    board: str
    target: str  # "qemu-system-arm mps2-an386" or "serial /dev/ttyACM0"
    passed: bool  # the self-check's verdict: every output byte-equal to the emulator's
    vectors: int
    outputs_equal: int
    labelled: int
    correct: int
    unit: str  # what "measured" counts: "instructions", "DWT cycles", "SysTick ticks" or "none"
    measured_per_inference: int | None
    method: str | None  # the search method whose prediction is compared (None without search.json)
    predicted_cycles: int | None
    cycles_ratio: float | None  # measured / predicted
    arena_used: int
    arena_size: int
    predicted_arena: int | None
    arena_ratio: float | None
    ops: tuple[OpComparison, ...]
    notes: tuple[str, ...]
    self_check: SelfCheck
    build_seconds: float | None
    run_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(measured: int | None, predicted: int | None) -> float | None:
    if measured is None or not predicted:
        return None
    return round(measured / predicted, 4)


@dataclass(frozen=True)
class Prediction:
    method: str
    cycles: int
    arena: int
    layers: tuple[tuple[str, str, int], ...]  # (name, kind, cycles) of the weighted layers, graph order
    ops: tuple[tuple[str, str, int], ...] | None  # (name, TFLite op, cycles) of every operator, if recorded
    notes: tuple[str, ...]


def _recorded_ops(path: Path, method: str) -> tuple[tuple[str, str, int], ...] | None:
    """The method's per-operator prediction, where search.json has one (``cost.ops``)."""
    cost = next((m.cost for m in read_search_costs(path).methods if m.method == method), None)
    if cost is None or cost.ops is None:
        return None
    return tuple((op.name, op.op, op.cycles) for op in cost.ops)


def load_prediction(build_dir: Path) -> Prediction | None:
    """The chosen method's cost from search.json (the method named in policy.json, else the
    first); None when the build folder has no search.json."""
    path = build_dir / "search.json"
    if not path.is_file():
        return None
    methods = read_search_costs(path).methods
    policy = load_policy(build_dir / "policy.json") if (build_dir / "policy.json").is_file() else None
    wanted = policy.method if policy else None
    chosen = next((m for m in methods if m.method == wanted), methods[0] if methods else None)
    if chosen is None:
        raise UserError(f"{path}: no method with a cost in 'methods'")
    layers = tuple((layer.name, layer.kind, layer.cycles) for layer in chosen.cost.layers)
    prediction = (chosen.method, chosen.cost.cycles, chosen.cost.arena_bytes)
    notes = []
    if policy and (policy.bits != chosen.bits or policy.wide != frozenset(chosen.int16)):
        notes.append(f"policy.json differs from search.json's {prediction[0]} pick ({chosen.text}): the prediction "
                     "is for the search's pick")
    return Prediction(*prediction, layers=layers, ops=_recorded_ops(path, chosen.method), notes=tuple(notes))


def _predicted_ops(check: SelfCheck, prediction: Prediction | None, notes: list[str]) -> dict[int, tuple[str, int]]:
    """Profiled op index -> (the cost model's operator name, its predicted cycles): every op
    where search.json records the operators and they are the profiled ones, else the weighted
    layers in order where those line up, else none."""
    if prediction is None:
        return {}
    notes.extend(prediction.notes)
    if prediction.ops is not None:
        if [op for _, op, _ in prediction.ops] == [op.op for op in check.ops]:
            return {op.index: (name, cycles) for op, (name, _, cycles) in zip(check.ops, prediction.ops)}
        if check.ops:
            notes.append("the profiled ops differ from search.json's operators: per-op prediction for the "
                         "weighted layers only")
    from smpq_edge.network.ops import WEIGHTED_TFLITE  # here: torch loads with it, and validate's typos should not wait

    weighted = [op for op in check.ops if op.op in WEIGHTED_TFLITE.values()]
    kinds_ok = len(prediction.layers) == len(weighted) and all(
        WEIGHTED_TFLITE.get(kind) == op.op for (_, kind, _), op in zip(prediction.layers, weighted))
    if kinds_ok:
        return {op.index: (name, cycles) for op, (name, _, cycles) in zip(weighted, prediction.layers)}
    if check.ops:
        notes.append("the profiled ops do not line up with search.json's layers: no per-op prediction")
    return {}


def compare(check: SelfCheck, prediction: Prediction | None, build_dir: Path, target: str,
            build_seconds: float | None, run_seconds: float) -> Validation:
    """Set a parsed self-check against the prediction."""
    notes: list[str] = []
    if check.instructions_per_inference is not None:
        unit, measured = "instructions", check.instructions_per_inference
    elif check.per_inference is not None:
        unit, measured = check.counter, check.per_inference[1]
        if check.counter == "SysTick ticks":
            notes.append("SysTick ticks count core clock cycles on hardware (CLKSOURCE = processor clock)")
    else:
        unit, measured = "none", None

    def op_measure(op: ProfiledOp) -> int:
        return op.instructions if unit == "instructions" and op.instructions is not None else op.count

    predicted = _predicted_ops(check, prediction, notes)
    ops = []
    for op in check.ops:
        value = op_measure(op)
        name, cycles = predicted.get(op.index, (None, None))
        ops.append(OpComparison(op.index, op.op, name, value, cycles, _ratio(value, cycles)))
    if check.outputs_equal != check.vectors:
        notes.append(f"{check.vectors - check.outputs_equal} of {check.vectors} outputs differ from the emulator's")
    predicted_cycles = prediction.cycles if prediction else None
    predicted_arena = prediction.arena if prediction else None
    return Validation(
        build_dir=str(build_dir), board=check.board, target=target, passed=check.passed, vectors=check.vectors,
        outputs_equal=check.outputs_equal, labelled=check.labelled, correct=check.correct, unit=unit,
        measured_per_inference=measured, method=prediction.method if prediction else None,
        predicted_cycles=predicted_cycles, cycles_ratio=_ratio(measured, predicted_cycles),
        arena_used=check.arena_used, arena_size=check.arena_size, predicted_arena=predicted_arena,
        arena_ratio=_ratio(check.arena_used, predicted_arena) if check.arena_used else None,
        ops=tuple(ops), notes=tuple(notes), self_check=check,
        build_seconds=None if build_seconds is None else round(build_seconds, 1), run_seconds=round(run_seconds, 2),
    )


# ---- getting the report: QEMU ----------------------------------------------------------------


def _firmware_dir(build_dir: Path) -> tuple[Path, FirmwareRecord]:
    firmware = build_dir / "firmware"
    if not (firmware / "Makefile").is_file() or not (firmware / "firmware.json").is_file():
        raise UserError(f"{build_dir}: no generated firmware (firmware/Makefile and firmware/firmware.json); "
                        "run 'build' or 'firmware --out BUILD_DIR/firmware' first")
    return firmware, read_firmware(firmware / "firmware.json")


def _tflm_dir(tflm_dir: str | Path | None) -> Path:
    given = tflm_dir if tflm_dir is not None else os.environ.get("TFLM_DIR")
    if not given:
        raise UserError("no TFLM tree: give --tflm-dir or set TFLM_DIR to a tflite-micro checkout")
    path = Path(given).expanduser().resolve()
    if not (path / "tensorflow/lite/micro/micro_interpreter.h").is_file():
        raise UserError(f"{given}: not a tflite-micro checkout (no tensorflow/lite/micro/micro_interpreter.h)")
    return path


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise UserError(f"{tool} not found on PATH (Debian: apt-get install gcc-arm-none-eabi "
                        "libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib qemu-system-arm make)")
    return found


def _first_error(log: str) -> str:
    """The line of a make log that best says what went wrong: the first linker or compiler
    error (usually the cause), else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for needle in ("undefined reference", "error:"):
        for line in lines:
            if needle in line.lower():
                return line[:300]
    return lines[-1][:300] if lines else "no output"


def build_firmware(firmware: Path, objects: Path, tflm: Path, tflm_build_dir: Path | None, jobs: int,
                   timeout_s: float, log_path: Path, kernels: str | None = None) -> tuple[Path, float]:
    """``make`` the bare-metal image in ``firmware`` into ``objects`` (TFLM's objects into
    ``tflm_build_dir`` when given; ``kernels`` overrides the board's kernel set, e.g.
    ``"reference"``); returns the ELF and the seconds it took. The make output goes to ``log_path``."""
    make = _require("make")
    _require(CROSS_CXX)
    objects = objects.resolve()
    app = re.search(r"^APP := (\S+)$", (firmware / "Makefile").read_text(encoding="utf-8"), re.M)
    if app is None:
        raise UserError(f"{firmware / 'Makefile'}: no 'APP := name' line (regenerate the firmware)")
    command = [make, f"TFLM_DIR={tflm}", f"BUILD_DIR={objects}", f"-j{max(1, jobs)}"]
    if tflm_build_dir is not None:
        command.insert(3, f"TFLM_BUILD_DIR={Path(tflm_build_dir).resolve()}")
    if kernels is not None:
        command.insert(3, f"KERNELS={kernels}")
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=firmware, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        write_text(log_path, _text(exc.stdout) + _text(exc.stderr))
        raise UserError(f"{firmware}: make did not finish within {timeout_s:g} s (log: {log_path})") from None
    seconds = time.monotonic() - start
    write_text(log_path, f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise UserError(f"{firmware}: make failed (exit {done.returncode}): {_first_error(done.stderr or done.stdout)} "
                        f"(log: {log_path})")
    elf = objects / f"{app.group(1)}.elf"
    if not elf.is_file():
        raise UserError(f"{firmware}: make succeeded but left no {elf}")
    return elf, seconds


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def qemu_command(machine: str) -> list[str]:
    """QEMU's command line for a board's ``port.qemu_machine`` (the ELF's path follows); one
    instruction per tick of -icount, so the self-check's counts are instructions."""
    return [QEMU, "-M", machine, "-nographic", "-semihosting", "-icount", "shift=0", "-kernel"]


def run_qemu(machine: str, elf: Path, timeout_s: float) -> tuple[str, float]:
    """Run the ELF under QEMU's ``machine``; its console output and the seconds it took."""
    command = qemu_command(machine)
    _require(command[0])
    start = time.monotonic()
    try:
        done = subprocess.run([*command, str(elf)], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{elf}: {command[0]} did not finish within {timeout_s:g} s") from None
    return done.stdout + done.stderr, time.monotonic() - start


# ---- getting the report: a serial line -------------------------------------------------------


def read_serial(port: str, timeout_s: float = DEFAULT_SERIAL_TIMEOUT_S, baud: int = DEFAULT_BAUD) -> str:
    """Read a board's serial output until a complete self-check report (its PASS/FAIL line)
    has arrived; UserError if the port cannot be opened or ``timeout_s`` passes first."""
    try:
        import serial  # pyserial, a dependency in pyproject.toml
    except ImportError:
        raise UserError("reading a serial port needs pyserial: python -m pip install 'pyserial>=3.5,<4'") from None

    try:
        line = serial.Serial(port, baudrate=baud, timeout=0.2)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise UserError(f"{port}: cannot open serial port ({exc})") from None
    received = bytearray()
    deadline = time.monotonic() + timeout_s
    seen_header = False
    try:
        while time.monotonic() < deadline:
            try:
                chunk = line.read(4096)
            except (serial.SerialException, OSError) as exc:
                raise UserError(f"{port}: serial read failed ({exc})") from None
            if not chunk:
                continue
            received += chunk
            text = received.decode("utf-8", "replace").replace("\r", "")
            at = text.rfind("smpq_edge self-check on ")
            seen_header = seen_header or at >= 0
            if at >= 0 and re.search(r"^(PASS|FAIL)\b.*\n", text[at:], re.M):
                return text[at:]
    finally:
        line.close()
    what = "the report did not finish" if seen_header else "no self-check report arrived (reset the board?)"
    raise UserError(f"{port}: {what} within {timeout_s:g} s")


# ---- entry -----------------------------------------------------------------------------------


def validate(
    build_dir: str | Path,
    tflm_dir: str | Path | None = None,
    port: str | None = None,
    tflm_build_dir: str | Path | None = None,
    timeout_s: float | None = None,
    baud: int = DEFAULT_BAUD,
    jobs: int | None = None,
    build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
) -> Validation:
    """Run the self-check of ``build_dir``'s firmware (on QEMU, or read from ``port``), compare
    it with search.json's prediction and write ``build_dir/validation.json``.

    ``tflm_dir`` defaults to $TFLM_DIR. The objects and the ELF go to ``build_dir/validation-build``;
    ``tflm_build_dir`` (TFLM's objects and libtflm.a, by default there too) may be shared by builds
    for the same board, so that TFLM compiles once. ``timeout_s`` bounds the QEMU run or the serial
    read."""
    build = Path(build_dir)
    if not build.is_dir():
        raise UserError(f"{build}: build folder not found")
    firmware, record = _firmware_dir(build)
    prediction = load_prediction(build)
    build_seconds = None
    if port is not None:
        start = time.monotonic()
        text = read_serial(port, DEFAULT_SERIAL_TIMEOUT_S if timeout_s is None else timeout_s, baud)
        run_seconds, target = time.monotonic() - start, f"serial {port}"
    else:
        machine = record.qemu_machine
        if not machine:
            raise UserError(f"{build}: board {record.board} has no port.qemu_machine (QEMU runs boards such "
                            "as qemu-mps2-an386); flash it and give --port /dev/ttyACM0")
        tflm = _tflm_dir(tflm_dir)
        elf, build_seconds = build_firmware(firmware, build / OBJECT_DIR, tflm,
                                            None if tflm_build_dir is None else Path(tflm_build_dir),
                                            jobs or os.cpu_count() or 2, build_timeout_s, build / MAKE_LOG)
        text, run_seconds = run_qemu(machine, elf, DEFAULT_RUN_TIMEOUT_S if timeout_s is None else timeout_s)
        target = " ".join(qemu_command(machine)[:3])
    write_text(build / REPORT_FILE, text)
    check = parse_self_check(text, target)
    result = compare(check, prediction, build, target, build_seconds, run_seconds)
    write_json(build / RESULT_FILE, result.to_dict())
    return result


def summary_lines(result: Validation) -> list[str]:
    """The result in a few lines, for the command line."""
    lines = [f"{'PASS' if result.passed else 'FAIL'} on {result.target} ({result.board}): outputs equal to the "
             f"emulator's {result.outputs_equal}/{result.vectors}"
             + (f", labels correct {result.correct}/{result.labelled}" if result.labelled else "")]
    if result.measured_per_inference is not None:
        line = f"{result.unit} per inference: {result.measured_per_inference:,}"
        if result.predicted_cycles:
            line += f"; predicted {result.predicted_cycles:,} cycles ({result.method}), ratio {result.cycles_ratio:.2f}"
        lines.append(line)
    arena = f"arena used: {result.arena_used:,} of {result.arena_size:,} bytes"
    if result.predicted_arena:
        arena += f"; predicted {result.predicted_arena:,}, ratio {result.arena_ratio:.2f}"
    lines.append(arena)
    for op in result.ops:
        predicted = f"  predicted {op.predicted_cycles:>10,}  ratio {op.ratio:5.2f}" if op.predicted_cycles else ""
        lines.append(f"  op {op.index:2d} {op.op:<20} {op.measured:>12,}{predicted}")
    lines.extend(f"note: {note}" for note in result.notes)
    return lines
