"""Board profiles: YAML files in ``boards/`` (or a user's own path) validated into ``Board``.

Validation is strict on purpose: an unknown key (``flash_kbb``), a wrong type, a size outside what
microcontrollers have, or a budget larger than the board stops with one line naming the file and
the field, because a silently ignored typo would give a model that does not fit the chip.
"""

from __future__ import annotations

from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, ValidationError, field_validator,
                      model_validator)

from smpq_edge.common.errors import UserError
from smpq_edge.common.precision import Precision
from smpq_edge.common.vocabulary import KernelSet

BOARDS_DIR = Path(str(resources.files("smpq_edge.board_profiles")))  # boards/ in the repository

# Largest sizes accepted: beyond these a figure is a typo (bytes given as KB), not a microcontroller.
MAX_FLASH_KB = 64 * 1024
MAX_RAM_KB = 16 * 1024
MAX_CLOCK_MHZ = 2000


# Strict: a YAML `true` or a quoted "120" is a mistake, not a number (lax pydantic read `true` as 1).
# `.nan` and `.inf` are refused as "not a finite number" rather than by a misleading range check.
Number = Annotated[float, Strict(), AllowInfNan(False)]

# A board file is a few KB; reading stops beyond this, so `--board /dev/zero` cannot hang or fill memory.
MAX_BOARD_FILE_BYTES = 1 << 20


class Core(str, Enum):
    cortex_m0plus = "cortex-m0plus"
    cortex_m3 = "cortex-m3"
    cortex_m4 = "cortex-m4"
    cortex_m7 = "cortex-m7"
    cortex_m33 = "cortex-m33"
    cortex_m55 = "cortex-m55"


# Cores whose DWT unit has a cycle counter (CYCCNT); M0/M0+ lack it and fall back to SysTick.
CORES_WITH_DWT = {Core.cortex_m3, Core.cortex_m4, Core.cortex_m7, Core.cortex_m33, Core.cortex_m55}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reserve(_Strict):
    """What the firmware needs besides the model: TFLM runtime, kernels, application, stack."""

    flash_kb: Number = Field(ge=0, le=MAX_FLASH_KB)
    ram_kb: Number = Field(ge=0, le=MAX_RAM_KB)
    # Whether flash_kb already holds TFLM's DECODE (about 22 KB, for LUT layers); if not, a policy
    # with a LUT layer pays it on top.
    decode: StrictBool = False


# The firmware/ports/<run>/ folders: how an image is flashed and run (README part, make rules).
RUNNERS = ("stm32", "qemu", "library")
C_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
ADDRESS = Field(default=None, ge=0, le=0xFFFF_FFFF)


class Port(_Strict):
    """How the board's firmware is built and run (``smpq_edge.firmware.render``): a bare-metal image
    with the start-up code and linker script of ``firmware/ports/baremetal/``, or a library that
    the board's SDK links."""

    kind: Literal["baremetal", "library"]
    run: Literal[RUNNERS]  # type: ignore[valid-type]
    flash_origin: int | None = ADDRESS  # bare metal: where flash starts (its size is flash_kb)
    ram_origin: int | None = ADDRESS
    # The contiguous RAM the linker script may use, when less than ram_kb (split SRAM banks).
    ram_kb: Number | None = Field(default=None, gt=0, le=MAX_RAM_KB)
    stack_kb: Number = Field(default=8, gt=0, le=1024)
    qemu_machine: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,40}$")  # `validate` runs it there
    instructions_per_tick: int = Field(default=0, ge=0)  # QEMU -icount shift=0: instructions per SysTick tick
    pyocd_target: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,40}$")
    dwt_unlock: StrictBool = False  # Cortex-M7: the DWT's CoreSight lock must be opened
    use_systick: StrictBool = True  # SysTick fallback (else the SDK may own SysTick)
    systick_handler: str = Field(default="SysTick_Handler", pattern=C_IDENTIFIER)
    sdk_hint: str = Field(default="", max_length=300)
    flash_hint: str = Field(default="", max_length=300)

    @model_validator(mode="after")
    def _memory_map(self) -> Port:
        has_map = self.flash_origin is not None and self.ram_origin is not None
        if self.kind == "baremetal" and not has_map:
            raise ValueError("a baremetal port needs flash_origin and ram_origin")
        if self.kind == "library" and (self.flash_origin is not None or self.ram_origin is not None):
            raise ValueError("a library port has no memory map (the SDK links it): drop flash_origin and ram_origin")
        if (self.kind == "library") != (self.run == "library"):
            raise ValueError(f"run: {self.run!r} does not go with kind {self.kind!r}")
        if (self.run == "qemu") != (self.qemu_machine is not None):
            raise ValueError("run: qemu and qemu_machine go together")
        return self


class Budgets(_Strict):
    """Whole-firmware limits (model plus reserve); each must fit the board."""

    flash_kb: Number = Field(gt=0, le=MAX_FLASH_KB)
    ram_kb: Number = Field(gt=0, le=MAX_RAM_KB)
    latency_ms: Number = Field(gt=0, le=1e6)


# The kernel variants a kernel set runs, each priced by its own formula (``KernelCycles``).
# CMSIS-NN picks its kernel by shape and weight type (arm_convolve_wrapper_s8/s4,
# arm_depthwise_conv_wrapper_s8/s4 for a core with DSP and without MVE): a 1x1 unit-stride
# convolution, a strided 1x1, the im2col one for everything else; the 3x3 depthwise kernel (int8
# only) or the general one. The reference kernels have one loop nest per op and weight type.
# ``smpq_edge.network.cost.kernel_variant`` maps an operator to its name here.
_ELEMENTWISE_VARIANTS = ("add", "average_pool_2d", "max_pool_2d", "pad", "reshape", "quantize", "other")
# TFLM's DECODE before a LUT layer (``smpq_edge.network.cost.decode_variant``): unrolled 2 and 3-bit loops,
# and the generic one; the same code with either kernel set.
_DECODE_VARIANTS = ("decode_lut2", "decode_lut3", "decode_lut")
# The 16x8 layers (int16 activations, int8 weights): CMSIS-NN's s16 kernels, or the reference ones.
_WIDE_VARIANTS = ("conv_s16", "depthwise_s16", "fc_s16")
KERNEL_VARIANTS: dict[str, tuple[str, ...]] = {
    "cmsis_nn": ("conv_1x1_s8", "conv_1x1_s4", "conv_1x1_strided_s8", "conv_1x1_strided_s4", "conv_s8", "conv_s4",
                 "depthwise_3x3_s8", "depthwise_s8", "depthwise_s4", "fc_s8", "fc_s4", *_WIDE_VARIANTS,
                 *_ELEMENTWISE_VARIANTS, *_DECODE_VARIANTS),
    "reference": ("conv_s8", "conv_s4", "depthwise_s8", "depthwise_s4", "fc_s8", "fc_s4", *_WIDE_VARIANTS,
                  *_ELEMENTWISE_VARIANTS, *_DECODE_VARIANTS),
}


class KernelCycles(_Strict):
    """Cycles of one kernel variant per call: a term per unit of work (``smpq_edge.network.cost.OpWork``).
    A term left out is 0 (the kernel does no work that scales with it)."""

    per_mac: Number = Field(default=0, ge=0, le=1000)
    per_tap: Number = Field(default=0, ge=0, le=1e4)  # output elements x kernel height x width
    per_im2col: Number = Field(default=0, ge=0, le=1e4)  # output pixels x kernel h x w x input channels
    per_copy: Number = Field(default=0, ge=0, le=1e4)  # contiguous runs of those im2col copies
    per_output: Number = Field(default=0, ge=0, le=1e4)  # output elements
    per_pixel: Number = Field(default=0, ge=0, le=1e4)  # output height x width
    per_row: Number = Field(default=0, ge=0, le=1e4)  # output height
    per_input: Number = Field(default=0, ge=0, le=1e4)  # input elements
    per_weight: Number = Field(default=0, ge=0, le=1e4)  # weight elements (e.g. unpacking INT4)
    per_channel: Number = Field(default=0, ge=0, le=1e6)  # a DECODE's value tables (one per channel or tensor)
    per_unrolled: Number = Field(default=0, ge=0, le=1e4)  # weights a DECODE unpacks in unrolled groups
    per_call: Number = Field(default=0, ge=0, le=1e8)


class Board(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str = Field(max_length=200)
    core: Core
    fpu: StrictBool
    dsp: StrictBool
    clock_mhz: Number = Field(gt=0, le=MAX_CLOCK_MHZ)
    flash_kb: Number = Field(gt=0, le=MAX_FLASH_KB)
    ram_kb: Number = Field(gt=0, le=MAX_RAM_KB)
    kernels: KernelSet
    reserve: Reserve
    budgets: Budgets
    # Per-layer precisions the search chooses among (``smpq_edge.common.precision``: w2a8 ... w8a8, w8a16).
    candidates: tuple[str, ...] = Field(default=("w4a8", "w8a8"), min_length=1)
    # "per_channel": a zero point per scale, as the TFLite schema wants and LiteRT checks.
    # "single": one per weight or bias tensor, which TFLM alone reads (16 B less per output channel).
    zero_points: Literal["per_channel", "single"] = "per_channel"
    # Kernel variant of ``KERNEL_VARIANTS[kernels]`` -> its cycle formula; exactly those variants.
    cycles: dict[str, KernelCycles]
    port: Port

    @model_validator(mode="before")
    @classmethod
    def _known_variants(cls, raw: object) -> object:
        """An unknown kernel variant is named as such before its formula's fields are checked."""
        kernels = raw.get("kernels") if isinstance(raw, dict) else None
        # A list or mapping under `kernels` is refused by the field's own check; only a known name is looked up.
        if isinstance(kernels, str) and kernels in KERNEL_VARIANTS and isinstance(raw.get("cycles"), dict):
            wanted = KERNEL_VARIANTS[raw["kernels"]]
            unknown = [name for name in raw["cycles"] if name not in wanted]
            if unknown:
                raise ValueError(f"cycles.{unknown[0]}: not a kernel variant of {raw['kernels']} kernels "
                                 f"(known: {', '.join(wanted)})")
        return raw

    @field_validator("candidates")
    @classmethod
    def _runnable(cls, candidates: tuple[str, ...]) -> tuple[str, ...]:
        precisions = [Precision.parse(name) for name in candidates]  # one TFLM cannot run: refused with its reason
        if all(p.wide for p in precisions):
            raise ValueError("needs an int8-activation candidate (w2a8 ... w8a8): the search's floor is the int8 model")
        return candidates

    @model_validator(mode="after")
    def _fits_the_board(self) -> Board:
        wanted = KERNEL_VARIANTS[self.kernels]
        missing = [name for name in wanted if name not in self.cycles]
        if missing:
            raise ValueError(f"cycles: no formula for kernel variant {missing[0]} of {self.kernels} kernels")
        if self.budgets.flash_kb > self.flash_kb:
            raise ValueError(f"budgets.flash_kb ({self.budgets.flash_kb:g}) exceeds the board's flash_kb ({self.flash_kb:g})")
        if self.budgets.ram_kb > self.ram_kb:
            raise ValueError(f"budgets.ram_kb ({self.budgets.ram_kb:g}) exceeds the board's ram_kb ({self.ram_kb:g})")
        if self.reserve.flash_kb >= self.budgets.flash_kb:
            raise ValueError("reserve.flash_kb leaves no flash for the model within budgets.flash_kb")
        if self.reserve.ram_kb >= self.budgets.ram_kb:
            raise ValueError("reserve.ram_kb leaves no RAM for the model within budgets.ram_kb")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates lists a bit-width twice")
        if self.core == Core.cortex_m0plus and self.dsp:
            raise ValueError("dsp: Cortex-M0+ has no DSP instructions")
        if self.port.ram_kb is not None and self.port.ram_kb > self.ram_kb:
            raise ValueError(f"port.ram_kb ({self.port.ram_kb:g}) exceeds the board's ram_kb ({self.ram_kb:g})")
        return self

    @property
    def has_dwt(self) -> bool:
        return self.core in CORES_WITH_DWT

    @property
    def precisions(self) -> tuple[Precision, ...]:
        """The candidates, narrow to wide: what the search chooses among per layer."""
        return tuple(sorted(Precision.parse(c) for c in self.candidates))

    @property
    def weight_bits(self) -> tuple[int, ...]:
        """The candidates' weight bit-widths, e.g. (4, 8)."""
        return tuple(sorted({p.weights for p in self.precisions}))

    def with_candidates(self, candidates: list[str]) -> Board:
        """This board with other candidates, checked as a board file's are."""
        try:
            return Board.model_validate({**self.model_dump(), "candidates": tuple(candidates)})
        except ValidationError as e:
            raise UserError(f"--candidates: {_describe(e.errors()[0]).removeprefix('candidates: ')}") from None

    @property
    def model_flash_budget_bytes(self) -> int:
        return int((self.budgets.flash_kb - self.reserve.flash_kb) * 1024)

    @property
    def model_ram_budget_bytes(self) -> int:
        return int((self.budgets.ram_kb - self.reserve.ram_kb) * 1024)

    @property
    def cycle_budget(self) -> int:
        return int(self.budgets.latency_ms * 1e-3 * self.clock_mhz * 1e6)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    # The cross-field checks (budget vs board) have no location but name their fields themselves.
    return f"{where}: {message}" if where else message


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a repeated `flash_kb` is a mistake, so refuse it."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *base` may be overridden on purpose; odd keys are refused by the base class
            key = self.construct_scalar(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"field '{key}' given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_board(text: str, source: str) -> Board:
    """Validate a board profile's YAML text; ``source`` names it in errors."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise UserError(f"{source}: {exc.problem}" + (f" at line {mark.line + 1}" if mark else "")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{source}: not valid YAML{where}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise UserError(f"{source}: YAML nested too deeply for a board profile") from None
    except ValueError:  # PyYAML's int() of a number with more than 4300 digits
        raise UserError(f"{source}: a number in the file has too many digits") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of board fields, got {type(raw).__name__}")
    try:
        return Board.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(exc.errors()[0])}") from None


def board_names() -> list[str]:
    return sorted(path.stem for path in BOARDS_DIR.glob("*.yaml"))


def board_path(name_or_path: str | Path) -> Path:
    """The YAML file of a built-in board name (``nucleo-l4r5zi``) or of a user's path."""
    text_name = str(name_or_path)
    looks_like_path = text_name.endswith((".yaml", ".yml")) or "/" in text_name or "\\" in text_name
    if looks_like_path:
        return Path(text_name)
    if text_name in board_names():
        return BOARDS_DIR / f"{text_name}.yaml"
    raise UserError(f"unknown board '{text_name}'; known boards: {', '.join(board_names())} (or give a .yaml path)")


def load_board(name_or_path: str | Path) -> Board:
    """A built-in board by name (``nucleo-l4r5zi``) or a user's YAML file by path."""
    path = board_path(name_or_path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BOARD_FILE_BYTES + 1)
        if len(raw) > MAX_BOARD_FILE_BYTES:
            raise UserError(f"{path}: board file is larger than {MAX_BOARD_FILE_BYTES // 1024} KB; not a board profile")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: board file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read board file ({exc.__class__.__name__})") from None
    return parse_board(text, str(path))
