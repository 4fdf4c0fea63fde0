"""The stages of ``build`` (search -> export -> emulate -> firmware -> report) in one output folder.

Each stage reads the files earlier stages wrote and writes its own atomically. ``build.json``
records, per finished stage, a hash of what it was given (arguments, input files, and by content
what it reads from outside: the model file, the data, the board file, this package's code and,
for the firmware, the templates) and of what it wrote; ``--resume`` skips a stage whose record
still matches, so a build interrupted between stages (Ctrl-C, kill) redoes nothing it had
finished, and an edited model or data file redoes every stage that reads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import smpq_edge
from smpq_edge.firmware import render as firmware
from smpq_edge.firmware import templates
from smpq_edge.firmware.spec import HOST_ARENA_BASIS
from smpq_edge.inputs.boards import Board, board_path
from smpq_edge.network.cost import estimate
from smpq_edge.inputs.data import BUILTIN_DATASETS, Dataset
from smpq_edge.emulator import emulate
from smpq_edge.export.exporter import ExportResult, export_model
from smpq_edge.common.fileio import ensure_dir, write_bytes, write_json, write_text
from smpq_edge.inputs.models import EXAMPLES_DIR, ModelSource
from smpq_edge.common.errors import UserError
from smpq_edge.inputs.policy import Policy, load_policy
from smpq_edge.network.quant import QuantNet
from smpq_edge.common.records import BuildRecord, EmulationRecord, StageRun, read_build, read_emulation, read_search
from smpq_edge.search.runner import SearchConfig, finetune, load_quantnet, save_quantnet, traced_for
from smpq_edge.search.train import TrainConfig
from smpq_edge.inputs.task import task_of
from smpq_edge.common.versions import versions

PACKAGE_DIR = Path(smpq_edge.__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # files in the build folder this stage reads
    outputs: tuple[str, ...]  # files (or folders) it writes
    run: Callable[[Path], None]
    reads: tuple[str, ...] = ()  # what it reads from outside the folder: keys of ``outside_keys``


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


def _code_key() -> str:
    """This package's Python code (the examples are models, keyed on their own) and the versions of
    what it runs on: a fix in the search or the exporter must not be skipped on resume."""
    digest = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if EXAMPLES_DIR not in path.parents:
            digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + path.read_bytes())
    return digest.hexdigest()


def _data_key(data: Dataset, reference: str | None) -> str:
    """The data by content: the loader's own key (files, folders), else a built-in's name (the seed
    is among the arguments), else the hash of the file or folder given."""
    if getattr(data, "source_hash", None):
        return data.source_hash
    if reference is None or reference in BUILTIN_DATASETS:
        return f"built-in {data.name}"
    return _hash_path(Path(reference))


def outside_keys(source: ModelSource, data: Dataset, data_reference: str | None, board: str) -> dict[str, str]:
    """Content keys of what the stages read from outside the build folder, by ``Stage.reads`` name."""
    model = source.content_key or _hash_path(Path(source.origin))
    return {"model": model, "data": _data_key(data, data_reference),
            "board": _hash_path(board_path(board)), "code": _code_key(),
            "templates": _hash_path(templates.FIRMWARE_DIR)}


def _fingerprint(stage: Stage, out: Path, arguments: dict, outside: dict[str, str]) -> str:
    reads = {key: outside[key] for key in stage.reads}
    digest = hashlib.sha256(json.dumps({"stage": stage.name, "arguments": arguments, "reads": reads},
                                       sort_keys=True).encode())
    for name in stage.inputs:
        digest.update(name.encode() + _hash_path(out / name).encode())
    return digest.hexdigest()


def run_stages(stages: list[Stage], out: Path, arguments: dict, resume: bool, outside: dict[str, str] | None = None,
               log: Callable[[str], None] = print) -> BuildRecord:
    """Run the stages in order; with ``resume``, skip those whose inputs and outputs are unchanged.
    ``outside`` holds the content keys the stages' ``reads`` name (``outside_keys``)."""
    ensure_dir(out)
    for stale in out.rglob(".*.tmp"):  # left by a write that a kill cut short (see fileio)
        stale.unlink()
    record_path = out / "build.json"
    previous = read_build(record_path).stages if resume and record_path.exists() else {}
    runs: dict[str, StageRun] = {}
    for stage in stages:
        fingerprint = _fingerprint(stage, out, arguments, outside or {})
        done = previous.get(stage.name)
        outputs = {name: _hash_path(out / name) for name in stage.outputs}
        if done and done.inputs == fingerprint and done.outputs == outputs and "missing" not in outputs.values():
            log(f"[{stage.name}] unchanged, skipped (--resume)")
            runs[stage.name] = done.model_copy(update={"skipped": True})  # its seconds are the run's that made it
        else:
            log(f"[{stage.name}] running")
            started = time.perf_counter()
            stage.run(out)
            runs[stage.name] = StageRun(inputs=fingerprint, seconds=round(time.perf_counter() - started, 3),
                                        outputs={name: _hash_path(out / name) for name in stage.outputs})
        # Written after every stage, skipped ones too (a record ending at the last stage that ran
        # would redo the rest next time): a kill between stages keeps what has finished.
        record = BuildRecord(arguments=arguments, versions=versions(), stages=runs)
        record.write(record_path)
    return record


def report_stage(out: Path) -> None:
    from smpq_edge.common.records import read_emulation, read_search
    from smpq_edge.report import make_report

    emulation = read_emulation(out / "emulation.json") if (out / "emulation.json").exists() else None
    wide = load_policy(out / "policy.json").wide if (out / "policy.json").exists() else frozenset()
    report = make_report(read_search(out / "search.json"), emulation, wide)
    for name, png in report.images.items():
        write_bytes(out / name, png)
    write_text(out / "report.md", report.markdown)
    write_text(out / "report.html", report.html)


CALIBRATION_SAMPLES = 256
FIRMWARE_VECTORS = 20


def _finetune_config(out: Path) -> TrainConfig:
    """The finetune schedule the search used (gentler for a model that arrived trained), on one process."""
    search = out / "search.json"
    saved = read_search(search).config.get("finetune", {}) if search.exists() else {}
    known = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    return replace(SearchConfig().finetune, **{**known, "shards": 1})


def net_for_policy(out: Path, source: ModelSource, data: Dataset, board: Board, policy: Policy,
                   seed: int) -> tuple[QuantNet, str | None]:
    """quantnet.pt's network under the policy's weight bits and int16 layers, and a note when it
    was not trained for those bits.

    After an edit of policy.json's weight bits the network is finetuned for them first (and saved):
    an all-int4 edit exported as it was lost 7.5 test points to a finetuned all-int4 network. An
    edit of activation_bits alone is not: int16 activations lie on a grid 256 times finer than
    the int8 one the network was trained on, over the same calibrated range."""
    checkpoint = load_quantnet(out, source, board, data)
    bits = policy.bits
    net, trained = checkpoint.net, checkpoint.trained_bits
    try:
        net.set_policy(policy.precisions)
    except ValueError as exc:  # a width the search's network was not built with
        raise UserError(f"{out / 'policy.json'}: {exc} on board {board.name}; search with --candidates "
                        "that include it") from None
    if trained is None:
        return net, "quantnet.pt does not record the policy it was finetuned for; exported without finetuning"
    if trained == bits:
        return net, None
    config = _finetune_config(out)
    differ = sum(trained.get(name) != b for name, b in bits.items())
    tuned, before, after = finetune(net, policy.precisions, data, config, seed, progress=True,
                                    desc="finetune policy.json")
    save_quantnet(tuned, bits, out)
    task = task_of(data)
    return tuned, (f"quantnet.pt was finetuned for another policy ({differ} layers differ from policy.json): "
                   f"finetuned for policy.json ({config.epochs} epochs), fake-quant test {task.metric} "
                   f"{task.show(before)} before, {task.show(after)} after; quantnet.pt updated")


def export_stage(out: Path, source: ModelSource, data: Dataset, board: Board,
                 calibration: int = CALIBRATION_SAMPLES, seed: int = 0) -> ExportResult:
    """policy.json + quantnet.pt -> model.tflite (the policy), model_int8.tflite, export.json."""
    policy = load_policy(out / "policy.json")
    net, note = net_for_policy(out, source, data, board, policy, seed)
    result = export_model(net, policy.bits, data.x_train[:calibration], softmax=source.output_softmax,
                          single_zero_point=board.zero_points == "single", input_shape=source.file_input_shape)
    if note:
        result.notes.append(note)
    write_bytes(out / "model.tflite", result.tflite)
    write_bytes(out / "model_int8.tflite", result.tflite_int8)
    write_json(out / "export.json", result.to_dict())
    return result


def emulate_stage(out: Path, source: ModelSource, data: Dataset, board: Board) -> EmulationRecord:
    """model.tflite on the TFLM interpreter over the test split, against the fake-quant network."""
    net = load_quantnet(out, source, board, data).net
    policy = load_policy(out / "policy.json")
    net.set_policy(policy.precisions)
    record = emulate((out / "model.tflite").read_bytes(), data.x_test, data.y_test, net,
                     source=str(out / "model.tflite"), task=task_of(data))
    record.write(out / "emulation.json")
    return record


TARGET_ARENA_BASIS = "the cost model's target arena for CMSIS-NN kernels (bench/cycles.py)"


def firmware_arena(out: Path, source: ModelSource, data: Dataset, board: Board) -> tuple[int, str]:
    """The arena the firmware is sized from, and where it comes from. With reference kernels, the
    emulate stage's measurement: the host runs the same kernels, and its 64-bit pointers only add.
    CMSIS-NN kernels plan other scratch than the host's reference kernels: they read an INT4
    filter packed where the reference kernels unpack it into an int8 copy in the arena (the
    default build's host arena is 6.5 KB, its target arena 1.8 KB), and they ask for im2col
    buffers the reference kernels do not. There the cost model's target arena, fitted to the firmware's
    own report on QEMU, is the estimate."""
    if board.kernels != "cmsis_nn":
        return read_emulation(out / "emulation.json").arena_bytes, HOST_ARENA_BASIS
    graph = traced_for(source, data)
    policy = load_policy(out / "policy.json")
    return estimate(graph, policy.bits, board, wide=policy.wide).arena_bytes, TARGET_ARENA_BASIS


def firmware_stage(out: Path, source: ModelSource, data: Dataset, board: Board, seed: int) -> None:
    """Firmware sources for model.tflite, with the arena ``firmware_arena`` estimates."""
    arena, basis = firmware_arena(out, source, data, board)
    labels = data.y_test if task_of(data).has_classes else None  # anomaly labels are no classes to hit
    firmware.generate_from_tflite(out / "model.tflite", board, out / "firmware", x=data.x_test, labels=labels,
                                  vectors=FIRMWARE_VECTORS, seed=seed, arena_bytes=arena, arena_basis=basis,
                                  origin=f"{data.name} test split (seed {seed}), first {FIRMWARE_VECTORS} samples",
                                  input_preprocessing=data.input_description)
