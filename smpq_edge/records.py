"""Typed readers of the records stages hand to each other: search.json and emulation.json.

The search and the emulator write plain JSON (``asdict`` of their results); the report, the CLI
and the build read it back through these models only, so a renamed or missing field fails in
one place with one line, and nobody indexes raw dicts or assumes which method comes first.
Unknown fields are ignored on reading: a newer writer may add figures an older reader lacks.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from smpq_edge.errors import UserError
from smpq_edge.fileio import read_json


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LayerCostRecord(_Record):
    name: str
    kind: str
    weight_bits: int
    params: int
    macs: int
    flash_bytes: int
    scratch_bytes: int
    cycles: int


class CostRecord(_Record):
    layers: list[LayerCostRecord]
    model_flash_bytes: int
    arena_bytes: int
    cycles: int
    reserve_flash_bytes: int
    reserve_ram_bytes: int
    extra_kernel_flash_bytes: int = 0  # DECODE's code, beyond the reserve (records before LUT layers: 0)
    flash_total_bytes: int
    ram_total_bytes: int
    flash_budget_bytes: int
    ram_budget_bytes: int
    cycle_budget: int
    latency_ms: float
    fits: dict[str, bool]

    def reserve_flash_text(self) -> str:
        """The flash besides the model, for a table: the board's reserve, and DECODE's code."""
        extra = f" + DECODE {self.extra_kernel_flash_bytes:,} B" if self.extra_kernel_flash_bytes else ""
        return f"{self.reserve_flash_bytes:,} B{extra}"


class MethodRecord(_Record):
    method: str
    bits: dict[str, int]
    cost: CostRecord
    score: float | None
    test_acc_before_finetune: float
    test_acc: float
    test_acc_same_finetune: float | None


class MeasuredRecord(_Record):
    val_acc: float
    test_acc: float
    val_agreement: float
    test_agreement: float
    test_auc: float | None = None


class StageCheckRecord(_Record):
    stage: str
    val_acc_before: float
    val_acc_after: float
    standard_error: float
    undone: bool


class FloorCheckRecord(_Record):
    floor_val_acc: float
    shipped_val_acc: float
    standard_error: float
    below_floor: bool


class FloorActionRecord(_Record):
    action: str
    shipped_method: str
    message: str
    tried: list[dict] = []


class ShapleyRecord(_Record):
    players: list[str]
    mean: list[float | None]
    stderr: list[float | None]
    value: str | None = None  # the coalition value the table was scored by (None: written before it was kept)


class KBestRecord(_Record):
    bits: dict[str, int]
    summed_shapley: float
    val_acc: float
    chosen: bool


class SearchRecord(_Record):
    """search.json. Its ``*_acc`` and ``*agreement`` figures are the task's scores, higher is better:
    accuracy and top-1 agreement with float for classification, minus the MSE and minus the MSE to
    float's outputs for reconstruction (``task.Task.show`` prints them as the user reads them)."""

    model: str
    task: str = "classification"
    data: dict
    board: str
    kernels: str | None = None  # the board's kernel set (None: written before it was recorded)
    zero_points: str = "per_channel"  # boards.Board.zero_points
    zero_point_saving_bytes: int = 0  # what "single" saved against per-channel zero points
    seed: int
    pretrained: bool
    shipped_method: str
    float_test_acc: float
    reference: dict[str, MeasuredRecord]  # float, ptq_int8, shipped
    stage_checks: list[StageCheckRecord]
    floor_check: FloorCheckRecord  # the shipped network against the floor
    floor_action: FloorActionRecord | None = None  # what replaced SMPQ's pick when it fell below the floor
    shapley: ShapleyRecord
    shapley_scores: list[list[float]]  # per layer and candidate: the scores the selection used
    candidates: list[int]
    k_best: list[KBestRecord]
    methods: list[MethodRecord]
    layer_shapes: dict[str, list[int]]  # layer -> TFLite weight shape
    rerank_margin: float
    config: dict = {}  # the search's schedule (runner.SearchConfig)

    @property
    def post_training(self) -> bool:
        """Nothing was trained (``--ptq``)."""
        return bool(self.config.get("post_training", False))

    @property
    def coalition_value(self) -> str | None:
        """What the Shapley table's coalitions were scored by (``smpq.score``'s value names)."""
        return self.shapley.value

    @property
    def shipped(self) -> MethodRecord:
        """The method whose network the build exports."""
        return self.method(self.shipped_method)

    def method(self, name: str) -> MethodRecord:
        for record in self.methods:
            if record.method == name:
                return record
        raise KeyError(name)


class EmulationRecord(_Record):
    """emulation.json; ``accuracy``, ``torch_accuracy`` and ``label_agreement`` are task scores as
    in ``SearchRecord``."""

    samples: int
    accuracy: float
    torch_accuracy: float | None
    label_agreement: float | None
    mean_abs_output_delta: float | None
    max_abs_output_delta: float | None
    arena_bytes: int
    model_bytes: int
    inferences_per_second: float
    workers: int
    task: str = "classification"
    auc: float | None = None


def percent(value: float | None, missing: str = "-") -> str:
    """A fraction from a record as the report and the summary print it ("97.50 %")."""
    return missing if value is None else f"{100 * value:.2f} %"


def _read(model: type[_Record], path: Path, what: str):
    try:
        return model.model_validate(read_json(path, what))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: not a {what} this version reads ({where}: {first['msg']}); "
                        "rerun the stage that writes it") from None


class SearchCostsRecord(_Record):
    """The part of search.json that ``validate`` sets a measurement against: each method's pick and
    predicted cost (a build folder trimmed to its firmware and costs still validates)."""

    methods: list[MethodRecord]


def read_search(path: Path) -> SearchRecord:
    return _read(SearchRecord, Path(path), "search record")


def read_search_costs(path: Path) -> SearchCostsRecord:
    return _read(SearchCostsRecord, Path(path), "search record")


def read_emulation(path: Path) -> EmulationRecord:
    return _read(EmulationRecord, Path(path), "emulation record")
