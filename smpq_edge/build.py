"""``build``: search -> export -> emulate -> firmware -> report, in one output folder.

Each stage reads the files earlier stages wrote and writes its own atomically. ``build.json``
records, per finished stage, a hash of what it was given (arguments and input files) and of what
it wrote; ``--resume`` skips a stage whose record still matches, so a build interrupted between
stages (Ctrl-C, kill) redoes nothing it had finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from smpq_edge.boards import Board
from smpq_edge.data import Dataset
from smpq_edge.emulator import emulate
from smpq_edge.export.exporter import ExportResult, export_model
from smpq_edge.fileio import ensure_dir, read_json, write_bytes, write_json, write_text
from smpq_edge.firmware import generate_from_tflite
from smpq_edge.models import ModelSource
from smpq_edge.policy import load_policy
from smpq_edge.search.runner import load_quantnet
from smpq_edge.versions import versions


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # files in the build folder this stage reads
    outputs: tuple[str, ...]  # files (or folders) it writes
    run: Callable[[Path], None]


@dataclass
class BuildLog:
    """build.json: what made each artefact, so a resumed build knows what it may skip."""

    arguments: dict
    stages: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"arguments": self.arguments, "versions": versions(), "stages": self.stages}


def _hash_path(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(child.read_bytes())
    elif path.is_file():
        digest.update(path.read_bytes())
    else:
        return "missing"
    return digest.hexdigest()


def _fingerprint(stage: Stage, out: Path, arguments: dict) -> str:
    digest = hashlib.sha256(json.dumps({"stage": stage.name, "arguments": arguments}, sort_keys=True).encode())
    for name in stage.inputs:
        digest.update(name.encode() + _hash_path(out / name).encode())
    return digest.hexdigest()


def run_stages(stages: list[Stage], out: Path, arguments: dict, resume: bool,
               log: Callable[[str], None] = print) -> dict:
    """Run the stages in order; with ``resume``, skip those whose inputs and outputs are unchanged."""
    ensure_dir(out)
    for stale in out.rglob(".*.tmp"):  # left by a write that a kill cut short (see fileio)
        stale.unlink()
    record_path = out / "build.json"
    previous = read_json(record_path, "build record").get("stages", {}) if resume and record_path.exists() else {}
    build = BuildLog(arguments)
    for stage in stages:
        fingerprint = _fingerprint(stage, out, arguments)
        done = previous.get(stage.name)
        outputs = {name: _hash_path(out / name) for name in stage.outputs}
        if done and done["inputs"] == fingerprint and done["outputs"] == outputs and "missing" not in outputs.values():
            log(f"[{stage.name}] unchanged, skipped (--resume)")
            build.stages[stage.name] = done
            continue
        log(f"[{stage.name}] running")
        started = time.perf_counter()
        stage.run(out)
        build.stages[stage.name] = {
            "inputs": fingerprint,
            "outputs": {name: _hash_path(out / name) for name in stage.outputs},
            "seconds": round(time.perf_counter() - started, 3),
        }
        # Written after every stage: a kill between stages keeps what has finished.
        write_json(record_path, build.to_dict())
    return build.to_dict()


def report_stage(out: Path) -> None:
    from smpq_edge.report import make_report

    search = read_json(out / "search.json", "search record")
    emulation = read_json(out / "emulation.json", "emulation record") if (out / "emulation.json").exists() else None
    report = make_report(search, emulation)
    for name, png in report.images.items():
        write_bytes(out / name, png)
    write_text(out / "report.md", report.markdown)
    write_text(out / "report.html", report.html)


CALIBRATION_SAMPLES = 256
FIRMWARE_VECTORS = 20


def export_stage(out: Path, source: ModelSource, data: Dataset, board: Board,
                 calibration: int = CALIBRATION_SAMPLES) -> ExportResult:
    """policy.json + quantnet.pt -> model.tflite (the policy), model_int8.tflite, export.json."""
    policy = load_policy(out / "policy.json")
    net = load_quantnet(out, source, board, data.input_shape)
    net.set_policy(policy.bits)
    result = export_model(net, policy.bits, data.x_train[:calibration])
    write_bytes(out / "model.tflite", result.tflite)
    write_bytes(out / "model_int8.tflite", result.tflite_int8)
    write_json(out / "export.json", result.to_dict())
    return result


def emulate_stage(out: Path, source: ModelSource, data: Dataset, board: Board) -> dict:
    """model.tflite on the TFLM interpreter over the test split, against the fake-quant network."""
    net = load_quantnet(out, source, board, data.input_shape)
    net.set_policy(load_policy(out / "policy.json").bits)
    result = emulate((out / "model.tflite").read_bytes(), data.x_test, data.y_test, net, source=str(out / "model.tflite"))
    record = result.to_dict()
    write_json(out / "emulation.json", record)
    return record


def firmware_stage(out: Path, data: Dataset, board: Board, seed: int) -> None:
    """Firmware sources for model.tflite, with the arena the emulate stage measured (not measured again)."""
    arena = read_json(out / "emulation.json", "emulation record")["arena_bytes"]
    generate_from_tflite(out / "model.tflite", board, out / "firmware", x=data.x_test, labels=data.y_test,
                         vectors=FIRMWARE_VECTORS, seed=seed, arena_bytes=arena,
                         origin=f"{data.name} test split (seed {seed}), first {FIRMWARE_VECTORS} samples")
