"""The records stages hand to each other, search.json and emulation.json: one class each, which
the stage builds and writes (``write``) and every reader reads back (``read_search``,
``read_emulation``), so a renamed or missing field fails in one place with one line and nobody
indexes raw dicts. Unknown fields are ignored on reading: a newer writer may add figures an older
reader lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import read_json, write_json
from smpq_edge.common.precision import WIDE, Precision, policy_text
from smpq_edge.common.vocabulary import CoalitionValueName, KernelSet, RankedSource, TaskName, WeightedKind

if TYPE_CHECKING:
    from smpq_edge.inputs.task import Task


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def write(self, path: Path) -> None:
        """The record as JSON, atomically (``fileio.write_json``)."""
        write_json(path, self.model_dump(mode="json"))


class LayerCostRecord(_Record):
    """One weighted layer's predicted cost (``cost.LayerCost``)."""

    name: str
    kind: WeightedKind
    weight_bits: int
    params: int
    macs: int
    flash_bytes: int
    scratch_bytes: int
    cycles: int
    weight_bytes: int = 0
    bias_bytes: int = 0
    quant_param_bytes: int = 0
    lut_bytes: int = 0
    decoded_bytes: int = 0


class OpCostRecord(_Record):
    """One TFLite operator's predicted cycles and the kernel variant priced (``cost.OpCost``)."""

    name: str
    op: str  # TFLite builtin, as the firmware's profile names it
    kernel: str = ""
    cycles: int


class CostRecord(_Record):
    """A policy's predicted cost on a board (``cost.CostReport.to_dict``)."""

    board: str = ""
    layers: list[LayerCostRecord]
    ops: list[OpCostRecord] | None = None  # every operator, execution order (records before it: None)
    model_flash_bytes: int
    arena_bytes: int
    cycles: int
    reserve_flash_bytes: int
    reserve_ram_bytes: int
    extra_kernel_flash_bytes: int = 0  # kernel code beyond the reserve (records before LUT layers: 0)
    extra_kernels: dict[str, int] = {}  # that code per kernel: DECODE, the s16 kernels, QUANTIZE
    flash_total_bytes: int
    ram_total_bytes: int
    flash_budget_bytes: int
    ram_budget_bytes: int
    cycle_budget: int
    latency_ms: float
    fits: dict[str, bool]
    runtime_flash_bytes: int = 0
    static_ram_bytes: int = 0
    firmware_flash_bytes: int = 0
    firmware_ram_bytes: int = 0
    clock_mhz: float = 0.0

    def flash_total_with(self, model_bytes: int) -> int:
        """The whole firmware's flash with a model of ``model_bytes`` (the exported .tflite, which
        the firmware embeds byte for byte) in place of the predicted one."""
        return self.flash_total_bytes - self.model_flash_bytes + model_bytes

    def reserve_flash_text(self) -> str:
        """The flash besides the model, for a table: the board's reserve, and the kernel code it lacks."""
        return f"{self.reserve_flash_bytes:,} B{kernel_code_text(self.extra_kernels)}"


class _PolicyRecord(_Record):
    """A policy as records hold it: weight bits per layer and the int16-activation layers."""

    bits: dict[str, int]
    int16: list[str] = []

    @property
    def policy(self) -> dict[str, Precision]:
        return {name: Precision(b, WIDE if name in self.int16 else 8) for name, b in self.bits.items()}

    @property
    def text(self) -> str:
        """Per layer: "8 4 8", an int16-activation layer as "8a16"."""
        return policy_text(self.policy)


class MethodRecord(_PolicyRecord):
    """One method's pick under the budgets (SMPQ's or a baseline's), its cost and its scores."""

    method: str
    cost: CostRecord
    score: float | None
    test_acc_before_finetune: float
    test_acc: float  # fake-quant, after the method's own finetune
    # The pick finetuned from the shared warm-up weights for search + finetune epochs, the same
    # for every method: what separates the selections from the training schedules around them.
    test_acc_same_finetune: float | None


class Measured(_Record):
    """One network on the validation and test splits: the task's score (accuracy, or minus the
    MSE), agreement with float (or minus the MSE to float's outputs), and the test ROC AUC where
    the task and the labels give one (``search.guard.measure``)."""

    val_acc: float
    test_acc: float
    val_agreement: float
    test_agreement: float
    test_auc: float | None = None


class StageCheck(_Record):
    """A training stage measured on validation before and after; undone when it made things worse."""

    stage: str
    val_acc_before: float
    val_acc_after: float
    standard_error: float
    undone: bool


class FloorCheck(_Record):
    """The shipped network against the calibration-only int8 floor, on validation
    (``search.guard.check_floor``)."""

    floor_val_acc: float
    shipped_val_acc: float
    standard_error: float
    below_floor: bool

    def verdict(self, task: Task) -> str:
        """What the comparison says, in the words that fit the numbers (the summary and the report)."""
        show, spread = task.show, task.show_spread(self.standard_error)
        figures = (f"validation {task.metric} {show(self.shipped_val_acc)} against {show(self.floor_val_acc)} for "
                   f"calibration-only int8 on the same samples")
        if self.below_floor:
            return f"the shipped model is BELOW the int8 floor: {figures}, worse by more than one standard error ({spread})"
        if self.shipped_val_acc >= self.floor_val_acc:
            return f"the shipped model is at or above the int8 floor: {figures}"
        return f"the shipped model is within one standard error ({spread}) below the int8 floor: {figures}"

    def sentence(self, task: Task, warning: str = "WARNING: ") -> str:
        """The verdict as a sentence, led by ``warning`` when the shipped model is below the floor."""
        verdict = self.verdict(task)
        return f"{warning if self.below_floor else ''}{verdict[0].upper()}{verdict[1:]}."


class FloorAction(_Record):
    """What the build did when its pick fell below the floor: which network it shipped and why."""

    action: str  # "uniform int8" | "next policy" | "best below floor"
    shipped_method: str
    message: str
    tried: list[dict] = []  # each policy tried after the pick: its bits and validation score


class ShapleyRecord(_Record):
    """The final Shapley table (``search.shapley.ShapleyTable.to_dict``) and its players."""

    players: list[str]
    mean: list[float | None]
    stderr: list[float | None]
    value: CoalitionValueName | None = None  # what the coalitions were scored by (None: written before it was kept)
    std: list[float | None] = []
    count: list[int] = []
    mean_minus_std: list[float | None] = []
    full_value: float | None = None
    n_permutations: int = 0
    n_coalitions: int = 0
    n_calls: int = 0


class KBestRecord(_PolicyRecord):
    summed_shapley: float  # the summed scores of the selection it came from (see ``source``)
    val_acc: float
    chosen: bool
    cost: list[float] = []  # flash, RAM, cycles as the selector counted them
    source: RankedSource = "Shapley"


class SearchRecord(_Record):
    """search.json. Its ``*_acc`` and ``*agreement`` figures are the task's scores, higher is better:
    accuracy and top-1 agreement with float for classification, minus the MSE and minus the MSE to
    float's outputs for reconstruction (``task.Task.show`` prints them as the user reads them)."""

    model: str
    task: TaskName = "classification"
    data: dict  # data.Dataset.summary()
    board: str
    kernels: KernelSet | None = None  # the board's kernel set (None: written before it was recorded)
    zero_points: str = "per_channel"  # boards.Board.zero_points
    zero_point_saving_bytes: int = 0  # what "single" saved against per-channel zero points
    seed: int
    pretrained: bool
    shipped_method: str
    float_test_acc: float
    reference: dict[str, Measured]  # float, ptq_int8, shipped
    stage_checks: list[StageCheck]
    floor_check: FloorCheck  # the shipped network against the floor
    floor_action: FloorAction | None = None  # what replaced SMPQ's pick when it fell below the floor
    shapley: ShapleyRecord
    shapley_scores: list[list[float]]  # per layer and candidate: the scores the selection used
    candidates: list[str]  # candidate names, narrow to wide ("w4a8", "w8a8", "w8a16")

    @field_validator("candidates", mode="before")
    @classmethod
    def _named(cls, candidates: list) -> list:
        """Records written before int16 activations held weight bits (4, 8): those are w4a8, w8a8."""
        return [f"w{c}a8" if isinstance(c, int) else c for c in candidates]
    k_best: list[KBestRecord]
    methods: list[MethodRecord]
    layer_shapes: dict[str, list[int]]  # layer -> TFLite weight shape
    rerank_margin: float
    config: dict = {}  # the search's schedule (runner.SearchConfig)
    budgets: dict = {}  # search.budget.Budgets, whole firmware
    knapsack_budgets: dict[str, float] = {}  # what the selector had left for the policy-dependent part
    alpha_history: list = []  # the supernet's architecture weights per search epoch
    timings: dict[str, float] = {}  # seconds per step
    versions: dict = {}  # of the libraries the search ran on

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
    """A .tflite on the TFLM interpreter (emulation.json): ``accuracy``, ``torch_accuracy`` and
    ``label_agreement`` are task scores as in ``SearchRecord``."""

    samples: int
    accuracy: float  # TFLM's on the split
    torch_accuracy: float | None  # the fake-quant QuantNet's, when given
    # Classification: fraction of samples where TFLM and torch pick the same class;
    # reconstruction: minus the MSE between TFLM's and torch's outputs.
    label_agreement: float | None
    mean_abs_output_delta: float | None  # mean |TFLM - torch| over dequantised outputs (probabilities after SOFTMAX)
    max_abs_output_delta: float | None
    arena_bytes: int  # smallest tensor arena TFLM runs the model in
    model_bytes: int
    inferences_per_second: float  # host TFLM, all workers together
    workers: int
    input_scale: float | None = None
    input_zero_point: int | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None
    task: TaskName = "classification"
    auc: float | None = None  # ROC AUC of TFLM's reconstruction error, with anomaly labels


class ArenaRecord(_Record):
    estimate: int  # bytes the arena is sized from
    basis: str  # where that estimate comes from
    margin: int
    size: int  # what the firmware allocates: estimate + margin, aligned


class RegistrationRecord(_Record):
    op: str
    call: str  # the op resolver's Add... call
    reason: str


class FirmwareRecord(_Record):
    """firmware.json: what the firmware generator wrote (``firmware.FirmwareResult.record``)."""

    board: str
    port: str  # the board's port.run
    qemu_machine: str | None = None  # the QEMU machine ``validate`` runs it on, if any
    model_bytes: int
    arena: ArenaRecord
    resolver: list[RegistrationRecord]
    test_vectors: int
    files: list[str]


class StageRun(_Record):
    """One build stage as build.json keeps it: what it was given and wrote, and its wall time."""

    inputs: str  # a hash of its arguments, input files and what it reads from outside the folder
    outputs: dict[str, str]  # output -> hash of its contents
    seconds: float  # of the run that made the outputs (a skipped stage keeps the earlier run's)
    skipped: bool = False  # --resume found it unchanged


class BuildRecord(_Record):
    """build.json: what made each artefact, so that a resumed build knows what it may skip."""

    arguments: dict
    versions: dict = {}
    stages: dict[str, StageRun] = {}


def kernel_code_text(kernels: dict[str, int]) -> str:
    """Kernel code outside the board's reserve, for a line of figures: " + DECODE 21,986 B"."""
    return "".join(f" + {name} {size:,} B" for name, size in sorted(kernels.items()) if size)


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


def read_build(path: Path) -> BuildRecord:
    return _read(BuildRecord, Path(path), "build record")


def read_firmware(path: Path) -> FirmwareRecord:
    return _read(FirmwareRecord, Path(path), "firmware record")
