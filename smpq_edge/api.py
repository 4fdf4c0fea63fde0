"""The pipeline as a Python API; the command line (``smpq_edge.cli``) is a thin layer over it.

    import smpq_edge
    result = smpq_edge.build(model, (x, y), board="nucleo-l412kb", out="build", flash_kb=100)
    result.policy, result.accuracy, result.cost, result.paths

``model`` is a ``torch.nn.Module``, a ``keras.Model``, a model file or an example name. ``data``
is ``(x, y)`` NumPy arrays (the SDK makes the validation and test splits), ``(x,)`` for an
autoencoder, a file, a folder or a built-in name. The keyword options are the command line's
flags with ``_`` for ``-`` (``--flash-kb`` is ``flash_kb``); ``Options`` lists them. ``search``,
``export``, ``emulate``, ``firmware`` and ``validate`` run one stage each.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.preprocess import Preprocessing, parse_floats
from smpq_edge.firmware.validate import validate  # noqa: F401 - a stage of the API as it is

if TYPE_CHECKING:
    from smpq_edge.common.records import CostRecord, EmulationRecord, SearchRecord, StageRun
    from smpq_edge.export.exporter import ExportResult
    from smpq_edge.firmware.render import FirmwareResult
    from smpq_edge.inputs.boards import Board
    from smpq_edge.inputs.data import Dataset
    from smpq_edge.inputs.models import ModelSource
    from smpq_edge.search.budget import Budgets
    from smpq_edge.search.runner import SearchConfig

__all__ = ["Options", "BuildResult", "build", "search", "export", "emulate", "firmware", "validate"]

# The default build: a model that does not fit a small part in int8 but does with int4 where it
# costs least, so that a first run shows what the search is for (see examples/digits_dense.py).
DEFAULT_BOARD = "nucleo-l412kb"
DEFAULT_MODEL = "digits_dense"


@dataclass(frozen=True)
class Options:
    """The options of ``search`` and ``build`` (and, in part, of the other stages): the command
    line's flags, with the same defaults."""

    board: str | Path = DEFAULT_BOARD  # a board name or a YAML path
    seed: int = 0
    resize: bool = False  # image folders: resize to the model's input instead of stopping
    name_pattern: str | None = None  # e.g. '{label}_{group}_{index}'
    split_by: str = "sample"  # or "group" (e.g. speakers held out)
    task: str | None = None  # classification or reconstruction; default: from the data
    logits: bool = False  # drop a final Softmax
    single_zero_point: bool = False
    candidates: Sequence[str] | None = None  # e.g. ("w2a8", "w4a8", "w8a8"); default: the board's
    input_range: str = "0..1"  # image folders: what pixels 0..255 become
    mean: str | Sequence[float] | None = None
    std: str | Sequence[float] | None = None
    channel_order: str = "rgb"
    flash_kb: float | None = None  # whole-firmware budgets (default: the board's)
    ram_kb: float | None = None
    latency_ms: float | None = None
    quick: bool = False
    no_baselines: bool = False
    ptq: bool = False  # post-training only: no finetuning at all
    allow_chance_accuracy: bool = False
    pretrained: bool = True  # an in-memory torch.nn.Module arrives trained (a file says so itself)

    @classmethod
    def of(cls, options: dict) -> Options:
        """Keywords -> Options; an unknown keyword is one line naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"unknown option '{unknown[0]}'; options: {', '.join(sorted(known))}")
        return cls(**options)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_range, _floats(self.mean, "mean"), _floats(self.std, "std"),
                             self.channel_order)


# The options that say how image pixels become model inputs (``preprocess``).
PREPROCESSING_OPTIONS = ("input_range", "mean", "std", "channel_order")


def _floats(value: str | Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if value is None or isinstance(value, str):
        return parse_floats(value, f"--{name}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Inputs:
    """What every stage reads: the board, the data and the model, sized to the data's classes."""

    board: Board
    data: Dataset
    source: ModelSource
    data_reference: str | None  # the data argument where it names a file, folder or built-in


def _board(options: Options) -> Board:
    from smpq_edge.inputs.boards import load_board

    board = load_board(options.board)
    if options.single_zero_point:
        board = board.model_copy(update={"zero_points": "single"})
    if options.candidates:
        board = board.with_candidates([name for text in options.candidates for name in text.split(",") if name])
    return board


def load_inputs(model, data, options: Options, log: Callable[[str], None] = print) -> Inputs:
    """Board, data set and model, the cheap checks first (a typo is one line in a second, not
    after torch's import); a model file's classifier is built for the data's classes."""
    from smpq_edge.inputs.data import check_data_argument, from_arrays, load_dataset, with_input_affine, with_task
    from smpq_edge.inputs.models import check_model_argument, from_keras, from_module, is_keras_model, load_model

    board = _board(options)
    by_name = isinstance(model, (str, Path))
    if by_name:
        check_model_argument(model)
    reference = str(data) if isinstance(data, (str, Path)) else None
    if reference is not None:
        check_data_argument(reference)
    pixels = options.preprocessing

    from smpq_edge.search.train import seed_everything

    seed_everything(options.seed)  # the model's initial weights are part of what the seed fixes
    if by_name:
        probe = load_model(model)  # its input shape is what image and audio folders are decoded to
    elif is_keras_model(model):
        probe = from_keras(model)
    else:
        probe = None  # a torch module: its input shape is the data's
    if isinstance(data, tuple):
        dataset = from_arrays(data, options.seed, probe.input_shape if probe else None)
    else:
        if probe is None and reference is not None and Path(reference).is_dir():
            raise UserError("data: a folder needs a model that declares its input shape; give a model file, "
                            "or load the folder into (x, y) arrays")
        channels, size = (probe.input_shape[0], tuple(probe.input_shape[1:])) if probe else (None, None)
        dataset = load_dataset(reference or (probe and probe.default_data) or "digits", seed=options.seed,
                               channels=channels, size=size, resize=options.resize,
                               name_pattern=options.name_pattern, split_by=options.split_by, pixels=pixels)
    dataset = with_task(dataset, options.task)
    if options.task is None and dataset.task != "classification":
        log(f"note: task {dataset.task}: data {dataset.name} has no class labels y (give --task to choose)")
    if probe is None:
        shape = data[0].shape[1:] if isinstance(data, tuple) and data[0].ndim == 2 else dataset.input_shape
        source = from_module(model, tuple(shape), options.pretrained)
    elif probe.origin.endswith(".py") and dataset.num_classes:  # a model file builds its classifier for the data
        seed_everything(options.seed)
        source = load_model(model, num_classes=dataset.num_classes)
    else:
        source = probe
    if source.input_affine is not None:  # one line, before the model's own scaling meets data of another shape
        source.check_input(dataset.input_shape, dataset.name)
    dataset = with_input_affine(dataset, source.input_affine)
    if options.logits:
        source = source.as_logits()
    for note in source.notes:
        log(f"note: {note}")
    return Inputs(board, dataset, source, reference)


def budgets_from(options: Options, board: Board) -> Budgets:
    """The whole-firmware budgets: the board's, or tighter ones given (never more than it has)."""
    from smpq_edge.search.budget import Budgets

    limits = {"flash_kb": board.flash_kb, "ram_kb": board.ram_kb, "latency_ms": None}
    for name, limit in limits.items():
        value = getattr(options, name)
        option = f"--{name.replace('_', '-')}"
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{option} must be a positive number, got {value:g}")
        if value is not None and limit is not None and value > limit:
            raise UserError(f"{option} {value:g} is more than board {board.name} has ({name} {limit:g})")
    return Budgets.of_board(
        board,
        flash_bytes=int(options.flash_kb * 1024) if options.flash_kb else None,
        ram_bytes=int(options.ram_kb * 1024) if options.ram_kb else None,
        cycles=int(options.latency_ms * 1e-3 * board.clock_mhz * 1e6) if options.latency_ms else None,
    )


def search_config(options: Options, inputs: Inputs) -> SearchConfig:
    """The search's schedule: quick or full, gentle for a model that arrives trained, none with
    ``ptq``; checked, with the model against the data and its task, before any output folder is made."""
    from smpq_edge.search.guard import check_trained
    from smpq_edge.search.runner import SearchConfig, check_config, traced_for

    source, data = inputs.source, inputs.data
    traced_for(source, data)
    check_trained(source, data, options.allow_chance_accuracy, options.seed)
    config = SearchConfig.quick() if options.quick else SearchConfig()
    if source.pretrained:
        config = config.for_pretrained()
    if options.ptq:
        config = config.post_training_only()
    config = replace(config, baselines=()) if options.no_baselines else config
    check_config(source, config)
    return config


def search(model=DEFAULT_MODEL, data=None, *, out: str | Path = "out", device: str = "cpu",
           shards: int | None = None, **options) -> SearchRecord | None:
    """SMPQ's search under the budgets; writes policy.json, search.json and quantnet.pt into
    ``out``. Under ``torchrun`` every rank calls it; only the main rank gets the record."""
    chosen = Options.of(options)
    inputs = load_inputs(model, data, chosen)  # first: a typo is one line before torch is imported
    from smpq_edge.common.distributed import init_from_environment, shutdown
    from smpq_edge.common.fileio import ensure_dir
    from smpq_edge.search.runner import run_search, save_search

    budgets = budgets_from(chosen, inputs.board)
    config = search_config(chosen, inputs)
    if device == "cuda" and not _cuda_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    shards = shards or int(os.environ.get("WORLD_SIZE", "1"))
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    folder = ensure_dir(Path(out))  # after the inputs, so a bad input leaves no folder behind
    context = init_from_environment(device)
    try:
        result = run_search(inputs.source, inputs.data, inputs.board, budgets=budgets,
                            config=config.with_shards(shards), seed=chosen.seed, context=context)
    finally:
        shutdown(context)
    if not context.is_main:
        return None
    save_search(result, folder)
    return result.record


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class BuildResult:
    """What ``build`` made: the records it wrote (read back when first asked for), and where
    everything is."""

    out: Path
    stages: dict[str, StageRun]  # build.json's: each stage's seconds, and whether --resume skipped it

    @cached_property
    def search(self) -> SearchRecord:
        from smpq_edge.common.records import read_search

        return read_search(self.out / "search.json")

    @cached_property
    def emulation(self) -> EmulationRecord:
        from smpq_edge.common.records import read_emulation

        return read_emulation(self.out / "emulation.json")

    @property
    def policy(self) -> dict[str, str]:
        """The shipped candidate per layer, in graph order: {"conv0": "w8a16", "fc1": "w4a8"}."""
        return {name: c.name for name, c in self.search.shipped.policy.items()}

    @property
    def accuracy(self) -> dict[str, float]:
        """The task's test score: float, int8 post-training (the floor), shipped under fake
        quantisation, and the shipped .tflite on the TFLM interpreter."""
        reference = self.search.reference
        return {"float": reference["float"].test_acc, "ptq_int8": reference["ptq_int8"].test_acc,
                "shipped": reference["shipped"].test_acc, "emulator": self.emulation.accuracy}

    @property
    def cost(self) -> CostRecord:
        """The shipped policy's predicted flash, RAM and cycles on the board."""
        return self.search.shipped.cost

    @property
    def paths(self) -> dict[str, Path]:
        names = ("model.tflite", "model_int8.tflite", "policy.json", "search.json", "emulation.json",
                 "report.html", "firmware", "build.json")
        return {name: self.out / name for name in names}


def build(model=DEFAULT_MODEL, data=None, *, out: str | Path = "build", resume: bool = False,
          log: Callable[[str], None] = print, **options) -> BuildResult:
    """Search, export, emulate, firmware and report in one folder; with ``resume``, the stages
    whose inputs are unchanged are skipped (``smpq_edge.stages``)."""
    chosen = Options.of(options)
    inputs = load_inputs(model, data, chosen, log)  # first: a typo is one line before torch is imported
    from smpq_edge.common.fileio import ensure_dir
    from smpq_edge.stages import outside_keys, run_stages

    budgets = budgets_from(chosen, inputs.board)
    config = search_config(chosen, inputs)
    folder = ensure_dir(Path(out))  # after the inputs, so a bad input leaves no folder behind
    arguments = {**_jsonable(chosen), "model": _argument(model), "data": _argument(data),
                 "board_profile": inputs.board.model_dump(mode="json")}
    record = run_stages(_build_stages(inputs, budgets, config, chosen.seed, log), folder, arguments, resume,
                        outside_keys(inputs.source, inputs.data, inputs.data_reference, chosen.board), log)
    return BuildResult(folder, record.stages)


def _build_stages(inputs: Inputs, budgets: Budgets, config: SearchConfig, seed: int,
                  log: Callable[[str], None]) -> list:
    from smpq_edge.search.runner import run_search, save_search
    from smpq_edge.stages import Stage, emulate_stage, export_stage, firmware_stage, report_stage

    source, data, board = inputs.source, inputs.data, inputs.board

    def search_stage(folder: Path) -> None:
        save_search(run_search(source, data, board, budgets=budgets, config=config, seed=seed, log=log), folder)

    computed = ("model", "data", "board", "code")  # what the search, export and emulate stages read
    return [
        Stage("search", (), ("policy.json", "search.json", "quantnet.pt"), search_stage, computed),
        Stage("export", ("policy.json", "quantnet.pt", "search.json"),
              ("model.tflite", "model_int8.tflite", "export.json"),
              lambda folder: export_stage(folder, source, data, board, seed=seed), computed),
        Stage("emulate", ("model.tflite", "quantnet.pt", "policy.json"), ("emulation.json",),
              lambda folder: emulate_stage(folder, source, data, board), computed),
        Stage("firmware", ("model.tflite", "emulation.json", "policy.json"), ("firmware",),
              lambda folder: firmware_stage(folder, source, data, board, seed), ("data", "board", "code", "templates")),
        Stage("report", ("search.json", "emulation.json", "policy.json"), ("report.md", "report.html"), report_stage,
              ("code",)),
    ]


def _argument(value) -> str | None:
    """A model or data argument as build.json records it: its name, or what kind of object it was
    (the object's content is keyed separately, see ``stages.outside_keys``)."""
    if value is None or isinstance(value, (str, Path)):
        return None if value is None else str(value)
    return f"<in-memory {type(value).__name__}>"


def _jsonable(options: Options) -> dict:
    record = asdict(options)
    record["board"] = str(options.board)
    for name in ("candidates", "mean", "std"):
        if record[name] is not None and not isinstance(record[name], str):
            record[name] = list(record[name])
    return record


def export(model=DEFAULT_MODEL, data=None, *, out: str | Path = "out", calibration: int = 256,
           **options) -> ExportResult:
    """policy.json and quantnet.pt in ``out`` -> model.tflite (the policy) and model_int8.tflite."""
    inputs = load_inputs(model, data, Options.of(options))
    from smpq_edge.stages import export_stage

    return export_stage(Path(out), inputs.source, inputs.data, inputs.board, calibration)


def emulate(model_file: str | Path, data="digits", *, seed: int = 0, **preprocessing) -> EmulationRecord:
    """A .tflite on the TFLM interpreter over the data's test split; the result is also written
    beside it as emulation_<name>.json."""
    from smpq_edge.emulator import emulate as run_emulation
    from smpq_edge.inputs.task import task_of

    path = Path(model_file)
    try:
        model_bytes = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read TFLite file ({exc.strerror})") from None
    dataset = _stage_data(data, seed, preprocessing)
    task = task_of(dataset)
    result = run_emulation(model_bytes, dataset.x_test, dataset.y_test, source=str(path), task=task)
    # Its own file: a build's emulation.json holds the agreement figures this run cannot measure.
    result.write(path.parent / f"emulation_{path.stem}.json")
    return result


def _stage_data(data, seed: int, preprocessing: dict) -> Dataset:
    """The data of a stage that takes no model (emulate, firmware): arrays, or a name or path."""
    from smpq_edge.inputs.data import from_arrays, load_dataset

    unknown = sorted(set(preprocessing) - set(PREPROCESSING_OPTIONS))
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}'; options: seed, {', '.join(PREPROCESSING_OPTIONS)}")
    pixels = Options.of(preprocessing).preprocessing
    if isinstance(data, tuple):
        return from_arrays(data, seed)
    return load_dataset(data, seed=seed, pixels=pixels)


def firmware(model_file: str | Path, *, out: str | Path, board: str | Path = DEFAULT_BOARD, data=None,
             vectors: int = 20, seed: int = 0, margin: int | None = None, **preprocessing) -> FirmwareResult:
    """C/C++ firmware sources for a .tflite on a board, with self-check vectors from the data's
    test split (random int8 inputs without data)."""
    from smpq_edge.inputs.boards import load_board
    from smpq_edge.firmware.render import generate_from_tflite
    from smpq_edge.inputs.task import task_of

    target = load_board(board)
    x = labels = origin = None
    if data is not None:
        dataset = _stage_data(data, seed, preprocessing)
        # Anomaly labels are not classes the self-check could count top-1 hits of.
        x, labels = dataset.x_test, dataset.y_test if task_of(dataset).has_classes else None
        origin = f"{dataset.name} test split (seed {seed}), first {min(vectors, len(dataset.y_test))} samples"
    return generate_from_tflite(model_file, target, out, x=x, labels=labels, vectors=vectors, seed=seed,
                                margin=margin, origin=origin)
