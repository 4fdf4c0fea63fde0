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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import ensure_dir, write_text
from smpq_edge.common.records import ArenaRecord, FirmwareRecord, RegistrationRecord
from smpq_edge.firmware.kernels import Registration, kernel_files, registrations
from smpq_edge.firmware.ports import cpu_flags, defines, link_rules, memory_map, run_section
from smpq_edge.firmware.spec import (DEFAULT_VECTORS, HOST_ARENA_BASIS, UNKNOWN_PREPROCESSING, FirmwareSpec, build_spec,
                                    build_test_vectors, check_vectors)
from smpq_edge.firmware.templates import (FIRMWARE_DIR, c_float, c_identifier, c_int, c_string, comment_text, fill_template,
                                         hex_bytes, int_lines, int_rows)
from smpq_edge.inputs.boards import Board


ARENA_ALIGNMENT = 16


# Default arena margin: a fraction of the estimate, at least a floor. A host measurement runs
# TFLM's reference kernels with 64-bit pointers (on the target pointers are 32-bit, but CMSIS-NN
# kernels request scratch buffers the reference kernels do not); the cost model's target arena
# was within 2.6 % of the firmware's on QEMU (bench/cycles.py).
DEFAULT_MARGIN_FRACTION = 0.25
DEFAULT_MARGIN_MIN_BYTES = 1024
DEFAULT_MARGIN_REASON = "default: 25 % of the estimate, at least 1024 bytes"




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


def default_arena_margin(measured: int) -> int:
    """25 % of the measured arena, at least 1024 bytes, topped up so the sum is 16-aligned."""
    margin = max(DEFAULT_MARGIN_MIN_BYTES, math.ceil(measured * DEFAULT_MARGIN_FRACTION))
    return _align(measured + margin) - measured


def _align(size: int) -> int:
    return -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render_firmware(
    spec: FirmwareSpec, board: Board, margin: int | None = None
) -> tuple[dict[str, str], FirmwareResult]:
    """All generated files as {name: text}, and the result (with out_dir left as '.')."""
    check_vectors(spec)
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
        "labels": "\n".join(int_lines(v.labels, "  ")),
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
        files["linker.ld"] = fill_template("ports/baremetal/linker.ld.in", {"board": board_text, **memory_map(board)})
        port_rows = "| `startup_cortex_m.c`, `linker.ld` | bare-metal start-up (vector table, FPU, .data/.bss) and memory map |\n"

    cxx_srcs = ["main.cc", "model_data.cc", "model_runner.cc", "smpq_micro_time.cc", "test_vectors.cc"]
    c_srcs = ["smpq_timer.c"] + (["startup_cortex_m.c"] if port.kind == "baremetal" else [])
    flags = cpu_flags(board)
    macros = defines(board, port)
    needed = kernel_files([r.op for r in regs])
    tflm_kernels = needed if isinstance(needed, str) else " ".join(needed)
    build_values = {
        "board": board_text, "core": board.core.value, "kernels": board.kernels,
        "fpu": "yes" if board.fpu else "no", "dsp": "yes" if board.dsp else "no",
        "cpu_flags": " ".join(flags), "clock_hz": int(round(board.clock_mhz * 1e6)), "app_name": app_name,
    }
    files["Makefile"] = fill_template("common/Makefile.in", {
        **build_values,
        "defines": " \\\n  ".join(f"-D{d}" for d in macros),
        "app_cxx_srcs": " ".join(cxx_srcs), "app_c_srcs": " ".join(c_srcs),
        "tflm_kernels": tflm_kernels,
        "default_target": "$(BUILD_DIR)/$(APP).elf" if port.kind == "baremetal"
        else "$(BUILD_DIR)/libsmpq_model.a $(TFLM_LIB)",
        "link_rules": link_rules(port),
    })
    files["CMakeLists.txt"] = fill_template("common/CMakeLists.txt.in", {
        **{k: build_values[k] for k in ("board", "core", "kernels", "fpu", "dsp", "clock_hz", "app_name")},
        "tflm_kernels": tflm_kernels,
        "cpu_flags": " ".join(flags),
        "cmake_defines": "\n  ".join(macros),
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
        "run_section": run_section(board, port, app_name),
    }).rstrip("\n") + "\n"

    result = FirmwareResult(
        out_dir=Path("."), board=board.name, port=port.run, qemu_machine=port.qemu_machine,
        files=tuple(sorted([*files, "firmware.json"])), registrations=regs,
        arena_estimate=spec.arena_bytes, arena_basis=spec.arena_basis, arena_margin=margin_bytes, arena_size=arena_size,
        vectors=len(v), model_bytes=len(spec.model_bytes),
    )
    return files, result


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
