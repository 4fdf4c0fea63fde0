"""Cost model against the firmware: per-operator instruction counts, arena and ELF sizes measured
on an emulated Cortex-M4 (QEMU mps2-an386, ``-icount shift=0``), and the cycle formulas fitted to
them.

Every case (the four example models and two shapes built here) is exported under int8, all-int4,
a mixed int4/int8 policy, a LUT policy (layers at 2, 3, 5, 6, 7 bits in turn, each with its
DECODE) and an int16 policy (two layers in three 16x8 ones, QUANTIZE between) WITHOUT training
(instruction counts and sizes do not depend on the trained weights), turned into firmware for ``qemu-mps2-an386`` with one test vector, built with CMSIS-NN
and with reference kernels (``make KERNELS=reference``) and run. The formulas of
``smpq_edge.network.cost`` (per kernel variant, over the terms of ``TERMS``: per MAC, im2col element,
output element, ..., call) are fitted with non-negative least squares on relative error on the
FIT cases and checked on the HELD_OUT ones; the target arena overhead, the runtime flash table
(nnls over which kernels each firmware links) and the static RAM are fitted on FIT the same way.
The run refuses to write bench/RESULTS.md unless cost.py and the board files carry this fit.

    TFLM_DIR=../shared/tflm SMPQ_FIRMWARE_BUILD_CACHE=/path/cache python bench/cycles.py
    python bench/cycles.py --cases resnet8 --policies int16   # measure these again, keep the rest
    python bench/cycles.py --reuse      # refit and rewrite from the measurements of an earlier run
    python bench/cycles.py --reuse --write-boards  # write the fitted cycles into the board files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scipy.optimize import nnls  # noqa: E402

from bench._results import write_section  # noqa: E402
from smpq_edge.inputs.boards import BOARDS_DIR, KernelCycles, load_board  # noqa: E402
from smpq_edge.network.cost import (  # noqa: E402
    RUNTIME, TARGET_ARENA, UNIT_COEFFICIENT, VARIANT_OPS, WORK_UNITS, ArenaOverhead, OpWork, RuntimeMemory,
    arena_activation_peak, estimate, formula_cycles, kernel_variant, op_work, scratch_bytes, tflite_layout,
    tflite_operators,
)
from smpq_edge.export.exporter import export_model  # noqa: E402
from smpq_edge.tflite.flatbuffer import TfliteModel  # noqa: E402
from smpq_edge.firmware.kernels import ADD_METHODS  # noqa: E402
from smpq_edge.firmware.render import generate_firmware  # noqa: E402
from smpq_edge.firmware.spec import build_spec, build_test_vectors  # noqa: E402
from smpq_edge.network.graph import Graph, trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.common.precision import CANDIDATES, LUT_BITS, WEIGHT_BITS, is_lut  # noqa: E402
from smpq_edge.network.quant import QuantNet  # noqa: E402
from smpq_edge.firmware.validate import build_firmware, parse_self_check, run_qemu  # noqa: E402

BOARD = "qemu-mps2-an386"
KERNEL_SETS = ("cmsis_nn", "reference")
POLICIES = ("int8", "int4", "mixed", "lut", "int16")
DEFAULT_WORK = Path("/tmp/smpq_cycles_bench")
MEASUREMENTS = "measurements.json"
SECTION = "## Cycles and memory on the firmware (bench/cycles.py)"
WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
METHOD_OPS = {method: op for op, method in ADD_METHODS.items()}


# ---- the cases -------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


def dscnn_k5() -> nn.Module:
    """Shapes the examples lack: a strided first layer behind a PAD of one channel, 5x5 and 1x5
    depthwise (CMSIS-NN's general s8 depthwise, not the 3x3 one), a strided 3x3 depthwise behind a
    PAD, wider 1x1 convolutions."""
    return nn.Sequential(*_conv(1, 24, 3, stride=2), *_conv(24, 24, 5, groups=24), *_conv(24, 48, 1),
                         *_conv(48, 48, 3, stride=2, groups=48), *_conv(48, 48, 1),
                         nn.Conv2d(48, 48, (1, 5), padding=(0, 2), groups=48, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def cnn_rgb() -> nn.Module:
    """A 3-channel 5x5 first layer, max pooling, a 5x5 depthwise on 16 channels, a strided 1x1
    convolution, a two-layer head."""
    return nn.Sequential(*_conv(3, 16, 5), nn.MaxPool2d(2), *_conv(16, 16, 5, groups=16), *_conv(16, 32, 3),
                         nn.Conv2d(32, 32, 1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


BENCH_SHAPES = {"dscnn_k5": (dscnn_k5, (1, 48, 24)), "cnn_rgb": (cnn_rgb, (3, 20, 20))}
# Fitted on these; checked on the others. The held-out ones use only kernel variants that the
# fit cases contain (3x3 and generic depthwise, 1x1 and generic conv, first layers of 1 channel).
FIT = ("digits_cnn", "resnet8", "dscnn_k5", "cnn_rgb")
HELD_OUT = ("mnist1d_dscnn", "dscnn_kws")
CASES = FIT + HELD_OUT


def case_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name in BENCH_SHAPES:
        build, shape = BENCH_SHAPES[name]
        return build(), shape
    source = load_model(name)
    return source.module, source.input_shape


def case_graph(name: str) -> Graph:
    torch.manual_seed(0)
    module, shape = case_model(name)
    return trace(module.eval(), shape)


def policies(graph: Graph) -> dict[str, tuple[dict[str, int], frozenset[str]]]:
    """Per policy, the layers' weight bits and the layers on int16 activations ("int16": two
    layers of every three 16x8 ones, so that conv, depthwise and fully connected layers of the
    alternating DS-CNNs all run 16x8, with QUANTIZE operators between)."""
    none = frozenset()
    return {
        "int8": ({op.name: 8 for op in graph.layers}, none),
        "int4": ({op.name: 4 for op in graph.layers}, none),
        "mixed": ({op.name: 4 if i % 2 == 0 else 8 for i, op in enumerate(graph.layers)}, none),
        "lut": ({op.name: LUT_BITS[i % len(LUT_BITS)] for i, op in enumerate(graph.layers)}, none),
        "int16": ({op.name: 8 for op in graph.layers},
                  frozenset(op.name for i, op in enumerate(graph.layers) if i % 3 != 2)),
    }


def export_case(name: str, work: Path, measured: tuple[str, ...] = POLICIES) -> dict[str, Path]:
    """The case's .tflite files of the ``measured`` policies under ``work/name``, exported from
    calibrated (untrained) weights; random calibration data, since counts and sizes do not depend
    on the values."""
    torch.manual_seed(0)
    module, shape = case_model(name)
    module.eval()
    graph = trace(module, shape)
    net = QuantNet(graph, module, WEIGHT_BITS)
    x = np.random.default_rng(0).normal(size=(64, *shape)).astype(np.float32)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(x))
        net.commit_observations()
    net.eval()
    chosen = policies(graph)
    exported = export_model(net, chosen["mixed"][0], x)
    paths = {}
    for policy in measured:
        path = work / name / policy / "model.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        bits, wide = chosen[policy]
        net.set_activation_bits(wide)
        path.write_bytes(exported.tflite if policy == "mixed" else exported.variant(net, bits, wide))
        paths[policy] = path
    net.set_activation_bits(frozenset())
    return paths


# ---- one firmware build and run ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One case x policy x kernel set, as the firmware reported it."""

    case: str
    policy: str
    kernels: str
    ops: list[tuple[str, int]]  # (TFLite op, instructions) in execution order
    instructions: int
    arena_used: int
    arena_size: int
    text: int
    data: int
    bss: int
    model_bytes: int
    vector_bytes: int
    registrations: list[str]  # the resolver's calls, e.g. Register_CONV_2D_INT8 or AddAdd


def elf_sizes(elf: Path) -> tuple[int, int, int]:
    """text, data, bss as ``arm-none-eabi-size`` (Berkeley format) prints them."""
    out = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return text, data, bss


def vector_bytes(firmware: Path) -> int:
    """Bytes of the embedded test vectors (inputs, expected outputs, labels) in test_vectors.cc."""
    source = (firmware / "test_vectors.cc").read_text()
    arrays = re.findall(r"(u?int\d+)_t \w+\[[^\]]*\] = \{([^}]*)\}", source)
    return sum(int(re.search(r"\d+", kind).group()) // 8 * len(body.split(",")) for kind, body in arrays
               if body.strip())


def cache_dir(kernels: str, work: Path) -> Path:
    """TFLM's objects, shared by all builds of a kernel set (the tests' SMPQ_FIRMWARE_BUILD_CACHE layout)."""
    cache = Path(os.environ.get("SMPQ_FIRMWARE_BUILD_CACHE") or work / "tflm-cache")
    return cache / (BOARD if kernels == "cmsis_nn" else f"{BOARD}-{kernels}")


def measure(case: str, policy: str, tflite: Path, tflm: Path, work: Path) -> list[Run]:
    firmware = tflite.parent / "firmware"
    model = tflite.read_bytes()
    spec = build_spec(model, build_test_vectors(model, count=1), name=f"{case} {policy}")
    result = generate_firmware(spec, load_board(BOARD), firmware)
    runs = []
    for kernels in KERNEL_SETS:
        objects = tflite.parent / f"build-{kernels}"
        elf, _ = build_firmware(firmware, objects, tflm, cache_dir(kernels, work), 2, 3600,
                                tflite.parent / f"make-{kernels}.log", kernels=kernels)
        text, _ = run_qemu(load_board(BOARD).port.qemu_machine, elf, 1800)
        (tflite.parent / f"report-{kernels}.txt").write_text(text)
        check = parse_self_check(text, str(elf))
        if not check.passed:
            raise SystemExit(f"{case} {policy} {kernels}: self-check failed:\n{text[-2000:]}")
        runs.append(Run(case, policy, kernels, [(op.op, op.instructions) for op in check.ops],
                        check.instructions_per_inference, check.arena_used, check.arena_size,
                        *elf_sizes(elf), len(model), vector_bytes(firmware),
                        [r.registration or r.method for r in result.registrations]))
        print(f"{case:14} {policy:6} {kernels:9} {check.instructions_per_inference:>12,} instructions, "
              f"arena {check.arena_used:,}", flush=True)
    return runs


def measure_cases(cases: tuple[str, ...], work: Path, tflm: Path, measured: tuple[str, ...] = POLICIES) -> list[Run]:
    """Measure the ``measured`` policies of ``cases``, keeping an earlier run's other measurements."""
    kept = load_runs(work) if (work / MEASUREMENTS).is_file() else []
    runs = [r for r in kept if r.case not in cases or r.policy not in measured]
    for case in cases:
        for policy, path in export_case(case, work, measured).items():
            runs.extend(measure(case, policy, path, tflm, work))
        runs.sort(key=lambda r: CASES.index(r.case))
        (work / MEASUREMENTS).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return runs


def load_runs(work: Path) -> list[Run]:
    return [Run(**{**r, "ops": [tuple(op) for op in r["ops"]]}) for r in json.loads((work / MEASUREMENTS).read_text())]


# ---- the fit ---------------------------------------------------------------------------------

# The work terms each kernel variant is fitted with (the others stay 0): what its loops scale with.
_ELEMENTWISE = {"add": ("outputs", "calls"), "average_pool_2d": ("taps", "copies", "outputs", "calls"),
                "max_pool_2d": ("taps", "copies", "outputs", "calls"), "pad": ("outputs", "rows", "calls"),
                "reshape": ("outputs", "calls"), "quantize": ("outputs", "calls"), "other": ("outputs", "calls")}
# DECODE's LUT loops: a table lookup per weight, a run per channel, set-up per call (the same code for both kernel sets).
_DECODE = {name: ("weights", "unrolled", "channels", "calls") for name in ("decode_lut2", "decode_lut3", "decode_lut")}
TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "cmsis_nn": {
        **{f"conv_1x1{s}_s{b}": ("macs", "outputs", "calls") for s in ("", "_strided") for b in (4, 8)},
        **{f"conv_s{b}": ("macs", "im2col", "copies", "outputs", "calls") for b in (4, 8)},
        "depthwise_3x3_s8": ("macs", "outputs", "calls"),
        # The general kernels copy each output's window (a kernel row at a time) before the MACs.
        **{f"depthwise_s{b}": ("macs", "copies", "outputs", "calls") for b in (4, 8)},
        **{f"fc_s{b}": ("macs", "outputs", "calls") for b in (4, 8)},
        # s16: the general loops (im2col for every conv, a window copy for the fast depthwise).
        "conv_s16": ("macs", "im2col", "copies", "outputs", "calls"),
        "depthwise_s16": ("macs", "copies", "outputs", "calls"),
        "fc_s16": ("macs", "outputs", "calls"),
        **_ELEMENTWISE,
        **_DECODE,
        # arm_pad_s8 copies the input a row (width x channels) at a time.
        "pad": ("outputs", "rows", "calls"),
    },
    "reference": {
        **{f"{kind}_s8": ("macs", "taps", "outputs", "calls") for kind in ("conv", "depthwise", "fc")},
        # INT4: the kernel first unpacks the whole filter into int8 (per weight), then runs the int8 loops.
        **{f"{kind}_s4": ("macs", "taps", "outputs", "weights", "calls") for kind in ("conv", "depthwise", "fc")},
        **{f"{kind}_s16": ("macs", "taps", "outputs", "calls") for kind in ("conv", "depthwise", "fc")},
        **_ELEMENTWISE,
        **_DECODE,
        # PadImpl tests every output element against the borders (copied ones test them all).
        "pad": ("inputs", "outputs", "pixels", "calls"),
    },
}
# Variants none of the cases runs, priced as a stated stand-in (a copy loop like PAD's).
STAND_INS = {"reshape": "pad", "other": "add"}
COEFFICIENT = {unit: f"per_{UNIT_COEFFICIENT.get(unit, unit)}" for unit in WORK_UNITS}


@dataclass(frozen=True)
class OpSample:
    """One profiled operator and the work the cost model sees in it."""

    case: str
    policy: str
    kernels: str
    index: int
    name: str
    op: str
    variant: str
    work: OpWork
    measured: int


def samples(runs: list[Run], work_dir: Path) -> list[OpSample]:
    """The runs' operators lined up with ``tflite_operators`` (checked against the .tflite's own
    operators and filter shapes, so a changed exporter cannot silently misalign the fit)."""
    out, graphs = [], {}
    for run in runs:
        graph = graphs.setdefault(run.case, case_graph(run.case))
        bits, wide = policies(graph)[run.policy]
        operators = tflite_operators(graph, bits, wide)
        model = TfliteModel.from_file(work_dir / run.case / run.policy / "model.tflite")
        real = [(o.name.removeprefix("CUSTOM:"), model.tensor(o.inputs[1]).shape if o.name in WEIGHTED else ())
                for o in model.operators()]
        ours = [(o.builtin, o.op.weight_shape if o.builtin in WEIGHTED else ()) for o in operators]
        profiled = [op for op, _ in run.ops]
        if real != ours or profiled != [name for name, _ in ours]:
            raise SystemExit(f"{run.case}: operators differ: model {real}, cost model {ours}, profile {profiled}")
        for index, (operator, (_, measured)) in enumerate(zip(operators, run.ops)):
            layer_bits = 8 if operator.builtin == "PAD" else bits.get(operator.op.name, 8)
            out.append(OpSample(run.case, run.policy, run.kernels, index, operator.name, operator.builtin,
                                kernel_variant(operator, layer_bits, run.kernels), op_work(operator, layer_bits), measured))
    return out


def fit_cycles(fit: list[OpSample], kernels: str) -> dict[str, KernelCycles]:
    """Per variant, non-negative least squares on relative error (each op counts alike, small or large)."""
    table = {}
    for variant, terms in TERMS[kernels].items():
        rows = [s for s in fit if s.kernels == kernels and s.variant == variant]
        if not rows:
            continue
        x = np.array([[getattr(s.work, t) / s.measured for t in terms] for s in rows], dtype=float)
        coef = nnls(x, np.ones(len(rows)))[0]
        table[variant] = KernelCycles(**{COEFFICIENT[t]: figure(c) for t, c in zip(terms, coef)})
    for variant, stand_in in STAND_INS.items():
        table.setdefault(variant, table[stand_in])
    return table


def figure(value: float) -> float:
    """A coefficient as the board files carry it: 4 significant digits, whole numbers from 1000."""
    return float(round(value)) if value >= 1000 else float(f"{value:.4g}")


def predicted(sample: OpSample, table: dict[str, KernelCycles]) -> int:
    return formula_cycles(sample.work, table[sample.variant])


# ---- memory -------------------------------------------------------------------------------------


def registered(run: Run) -> tuple[str, ...]:
    """The kernels the run's firmware linked, in ``cost.registered_kernels``' names: a weight-type
    variant, or the generic registration's INT4 and INT8 code (and s16 code where the policy has
    16x8 layers of the op)."""
    graph = case_graph(run.case)
    bits, wide = policies(graph)[run.policy]
    with_s16 = {o.builtin for o in tflite_operators(graph, bits, wide) if o.op.name in wide}
    names = set()
    for call in run.registrations:
        match = re.fullmatch(r"Register_(\w+)_(INT[48])", call)
        op = match.group(1) if match else METHOD_OPS[call].removeprefix("CUSTOM:")
        if run.kernels == "cmsis_nn" and op in VARIANT_OPS:
            generic = [f"{op}_INT4", f"{op}_INT8"] + ([f"{op}_INT16"] if op in with_s16 else [])
            names.update([f"{op}_{match.group(2)}"] if match else generic)
        else:
            names.add(op)
    return tuple(sorted(names))


def runtime_flash(run: Run) -> int:
    """The ELF's text + data less the model and the embedded test vectors."""
    return run.text + run.data - run.model_bytes - run.vector_bytes


def fit_runtime(runs: list[Run], kernels: str) -> RuntimeMemory:
    """Base flash and per-kernel flash (nnls over which kernels each firmware links), static RAM."""
    runs = [r for r in runs if r.kernels == kernels]
    names = sorted({k for r in runs for k in registered(r)})
    x = np.array([[1, *(k in registered(r) for k in names)] for r in runs], dtype=float)
    coef = nnls(x, np.array([runtime_flash(r) for r in runs], dtype=float))[0]
    ops = np.array([[1, len(r.ops)] for r in runs], dtype=float)
    static = nnls(ops, np.array([static_ram(r) for r in runs], dtype=float))[0]
    return RuntimeMemory(flash_base=round(coef[0]), flash_per_kernel=_on_quantize(names, x[:, 1:], coef[1:]),
                         static_ram=round(static[0]), static_ram_per_op=round(static[1]))


def _on_quantize(names: list[str], linked: np.ndarray, coef: np.ndarray) -> dict[str, int]:
    """Per-kernel flash, with the sum of the kernels every firmware links exactly when it links
    QUANTIZE (with CMSIS-NN: CONV_2D's and FULLY_CONNECTED's s16 code) put on QUANTIZE: only their
    sum is identified, and every policy with an int16 layer links QUANTIZE, so it pays that sum
    whichever of them it uses (nnls's split had charged a conv-only int16 policy nothing)."""
    out = dict(zip(names, coef))
    if "QUANTIZE" in out:
        quantize = linked[:, names.index("QUANTIZE")]
        together = [n for i, n in enumerate(names) if np.array_equal(linked[:, i], quantize)]
        total = sum(out[n] for n in together)
        out.update({n: 0.0 for n in together}, QUANTIZE=total)
    return {n: round(v) for n, v in out.items()}


def static_ram(run: Run) -> int:
    """data + bss less the arena array."""
    return run.data + run.bss - run.arena_size


def predicted_static_ram(run: Run, runtime: RuntimeMemory) -> int:
    return runtime.static_ram + runtime.static_ram_per_op * len(run.ops)


def arena_terms(case: str, policy: str, kernels: str) -> tuple[int, list[int]]:
    """Planned activations and scratch, and the overhead terms (1, tensors, ops, channels, DECODEs),
    as ``ArenaOverhead.bytes`` counts them: a DECODE's op and two tensors in its own term."""
    graph = case_graph(case)
    bits, wide = policies(graph)[policy]
    board = load_board(BOARD).model_copy(update={"kernels": kernels})  # scratch_bytes reads only .kernels
    n_ops, n_tensors, activations = tflite_layout(graph, bits, wide)
    scratch = {op.name: scratch_bytes(op, bits[op.name], board, op.name in wide) for op in graph.layers}
    channels = sum(op.out_channels for op in graph.layers if op.kind != "fc")
    decodes = sum(1 for b in bits.values() if is_lut(b))
    return arena_activation_peak(activations, scratch), [1, n_tensors - 2 * decodes, n_ops - decodes, channels, decodes]


def fit_arena(runs: list[Run], kernels: str) -> ArenaOverhead:
    rows = [(arena_terms(r.case, r.policy, kernels), r.arena_used) for r in runs if r.kernels == kernels]
    x = np.array([terms for (_, terms), _ in rows], dtype=float)
    y = np.array([used - peak for (peak, _), used in rows], dtype=float)
    return ArenaOverhead(*(round(c) for c in nnls(x, y)[0]))


def predicted_arena(run: Run, overhead: ArenaOverhead) -> int:
    peak, (_, tensors, ops, channels, decodes) = arena_terms(run.case, run.policy, run.kernels)
    return peak + overhead.bytes(tensors + 2 * decodes, ops + decodes, channels, decodes)


def predicted_flash(run: Run, runtime: RuntimeMemory) -> int:
    """Cost model's model flash + the runtime table + the test vectors this firmware embeds."""
    graph = case_graph(run.case)
    bits, wide = policies(graph)[run.policy]
    board = load_board(BOARD).with_candidates(list(CANDIDATES))  # every width a policy here uses
    model = estimate(graph, bits, board, wide=wide).model_flash_bytes
    return (model + runtime.flash_base + sum(runtime.flash_per_kernel.get(k, 0) for k in registered(run))
            + run.vector_bytes)


# ---- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """Everything fitted on the FIT cases, per kernel set."""

    cycles: dict[str, dict[str, KernelCycles]]
    arena: dict[str, ArenaOverhead]
    runtime: dict[str, RuntimeMemory]


def fit_all(runs: list[Run], ops: list[OpSample]) -> Fitted:
    fit_runs = [r for r in runs if r.case in FIT]
    fit_ops = [s for s in ops if s.case in FIT]
    return Fitted({k: fit_cycles(fit_ops, k) for k in KERNEL_SETS}, {k: fit_arena(fit_runs, k) for k in KERNEL_SETS},
                  {k: fit_runtime(fit_runs, k) for k in KERNEL_SETS})


def error(predicted_value: int, measured: int) -> float:
    return 100 * (predicted_value - measured) / measured


def role(case: str) -> str:
    return "fit" if case in FIT else "held out"


def run_ops(run: Run, ops: list[OpSample]) -> list[OpSample]:
    return [s for s in ops if (s.case, s.policy, s.kernels) == (run.case, run.policy, run.kernels)]


def summary_table(runs: list[Run], ops: list[OpSample], fitted: Fitted) -> str:
    lines = ["| kernels | cases | runs | total: largest error | ops | ops within 25 % | op: largest error |",
             "|---|---|---|---|---|---|---|"]
    for kernels in KERNEL_SETS:
        for cases in (FIT, HELD_OUT):
            chosen = [r for r in runs if r.kernels == kernels and r.case in cases]
            totals = [error(sum(predicted(s, fitted.cycles[kernels]) for s in run_ops(r, ops)), r.instructions)
                      for r in chosen]
            op_errors = [error(predicted(s, fitted.cycles[kernels]), s.measured)
                         for r in chosen for s in run_ops(r, ops)]
            within = sum(abs(e) <= 25 for e in op_errors)
            lines.append(f"| {kernels} | {role(cases[0])}: {', '.join(cases)} | {len(chosen)} | "
                         f"{max(totals, key=abs):+.1f} % | {len(op_errors)} | {within} | "
                         f"{max(op_errors, key=abs):+.1f} % |")
    return "\n".join(lines)


def totals_table(runs: list[Run], ops: list[OpSample], fitted: Fitted) -> str:
    lines = ["| case | role | policy | kernels | measured (instructions) | predicted | error |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        pred = sum(predicted(s, fitted.cycles[r.kernels]) for s in run_ops(r, ops))
        lines.append(f"| {r.case} | {role(r.case)} | {r.policy} | {r.kernels} | {r.instructions:,} | {pred:,} | "
                     f"{error(pred, r.instructions):+.1f} % |")
    return "\n".join(lines)


def op_table(ops: list[OpSample], fitted: Fitted) -> str:
    lines = ["| case | policy | kernels | op | TFLite op | kernel variant | measured | predicted | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in ops:
        if s.case in HELD_OUT:
            pred = predicted(s, fitted.cycles[s.kernels])
            lines.append(f"| {s.case} | {s.policy} | {s.kernels} | {s.index} {s.name} | {s.op} | {s.variant} | "
                         f"{s.measured:,} | {pred:,} | {error(pred, s.measured):+.1f} % |")
    return "\n".join(lines)


def formula_table(fitted: Fitted, ops: list[OpSample]) -> str:
    lines = ["| kernels | variant | fitted on (ops) | " + " | ".join(COEFFICIENT.values()) + " |",
             "|---|---|---|" + "---|" * len(COEFFICIENT)]
    for kernels, table in fitted.cycles.items():
        for variant, formula in table.items():
            n = sum(1 for s in ops if s.case in FIT and s.kernels == kernels and s.variant == variant)
            seen = str(n) if n else f"0 (as {STAND_INS[variant]})"
            lines.append(f"| {kernels} | {variant} | {seen} | "
                         + " | ".join(f"{getattr(formula, c):g}" for c in COEFFICIENT.values()) + " |")
    return "\n".join(lines)


def memory_table(runs: list[Run], fitted: Fitted) -> str:
    lines = ["| case | role | policy | kernels | arena firmware | predicted | error | text+data (ELF) | predicted | "
             "error | data+bss less arena array | predicted | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        arena = predicted_arena(r, fitted.arena[r.kernels])
        flash = predicted_flash(r, fitted.runtime[r.kernels])
        static, static_pred = static_ram(r), predicted_static_ram(r, fitted.runtime[r.kernels])
        lines.append(f"| {r.case} | {role(r.case)} | {r.policy} | {r.kernels} | {r.arena_used:,} | {arena:,} | "
                     f"{error(arena, r.arena_used):+.1f} % | {r.text + r.data:,} | {flash:,} | "
                     f"{error(flash, r.text + r.data):+.1f} % | {static:,} | {static_pred:,} | "
                     f"{error(static_pred, static):+.1f} % |")
    return "\n".join(lines)


def memory_summary(runs: list[Run], fitted: Fitted) -> str:
    lines = ["| kernels | cases | arena: largest error | flash (text+data): largest error | static RAM: largest error |",
             "|---|---|---|---|---|"]
    for kernels in KERNEL_SETS:
        for cases in (FIT, HELD_OUT):
            chosen = [r for r in runs if r.kernels == kernels and r.case in cases]
            arena = [error(predicted_arena(r, fitted.arena[kernels]), r.arena_used) for r in chosen]
            flash = [error(predicted_flash(r, fitted.runtime[kernels]), r.text + r.data) for r in chosen]
            ram = [error(predicted_static_ram(r, fitted.runtime[kernels]), static_ram(r)) for r in chosen]
            lines.append(f"| {kernels} | {role(cases[0])} | {max(arena, key=abs):+.2f} % | {max(flash, key=abs):+.2f} % "
                         f"| {max(ram, key=abs):+.2f} % |")
    return "\n".join(lines)


def misses(runs: list[Run], ops: list[OpSample], fitted: Fitted) -> str:
    """The held-out figures outside the targets (totals 10 %, ops 25 %, arena 2 %, flash 5 %)."""
    found: dict[tuple[str, str, str], list[float]] = {}
    held = [r for r in runs if r.case in HELD_OUT]
    for r in held:
        total = error(sum(predicted(s, fitted.cycles[r.kernels]) for s in run_ops(r, ops)), r.instructions)
        checks = [("total cycles", total, 10),
                  ("arena", error(predicted_arena(r, fitted.arena[r.kernels]), r.arena_used), 2),
                  ("flash", error(predicted_flash(r, fitted.runtime[r.kernels]), r.text + r.data), 5)]
        checks += [(f"op {s.name} ({s.op}, {s.variant})", error(predicted(s, fitted.cycles[r.kernels]), s.measured), 25)
                   for s in run_ops(r, ops)]
        for what, value, bound in checks:
            if abs(value) > bound:
                found.setdefault((r.case, r.kernels, what), []).append(value)
    if not found:
        return "Every held-out figure is within its target."
    return "\n".join(f"- {case}, {kernels}: {what} off by {min(v):+.1f} % to {max(v):+.1f} % over {len(v)} "
                     "policies" for (case, kernels, what), v in found.items())


def yaml_block(table: dict[str, KernelCycles], factor: float = 1.0) -> str:
    """The board file's ``cycles:`` entries for ``table`` scaled by ``factor``."""
    lines = []
    for variant, formula in table.items():
        terms = ", ".join(f"{c}: {figure(getattr(formula, c) * factor):g}" for c in COEFFICIENT.values()
                          if getattr(formula, c))
        lines.append(f"  {variant}: {{{terms}}}")
    return "\n".join(lines)


# ---- board files -----------------------------------------------------------------------------

# How a core's figures follow from the Cortex-M4 instruction counts (QEMU emulates only the M4 of
# mps2-an386): scaled by Arm's published CoreMark/MHz (M4 3.42, M7 5.01, M33 4.02, M0+ 2.46), the
# only figure here for the whole core; instructions stand in for cycles on the M4.
CORE_FACTORS: dict[str, tuple[float, str]] = {
    "cortex-m4": (1.0, "the Cortex-M4 figures themselves (instructions stand in for cycles)"),
    "cortex-m7": (round(3.42 / 5.01, 3), "derived: the Cortex-M4 figures x 0.683 = CoreMark/MHz M4 3.42 / M7 5.01 "
                  "(dual issue); not measured on an M7"),
    "cortex-m33": (round(3.42 / 4.02, 3), "derived: the Cortex-M4 figures x 0.851 = CoreMark/MHz M4 3.42 / M33 "
                   "4.02; not measured on an M33"),
    "cortex-m0plus": (round(3.42 / 2.46, 3), "derived: the Cortex-M4 reference-kernel figures x 1.39 = CoreMark/MHz "
                      "M4 3.42 / M0+ 2.46 (Thumb-1, no DSP); not measured on an M0+"),
}


def cycles_block(fitted: Fitted, kernels: str, core: str) -> str:
    factor, how = CORE_FACTORS[core]
    stand_ins = ", ".join(f"{v} as {s}" for v, s in STAND_INS.items())
    comment = (f"Fitted by bench/cycles.py ({datetime.date.today()}) to QEMU mps2-an386 instruction counts "
               f"(-icount shift=0, {kernels} kernels, TFLM 90b983c, CMSIS-NN 4ab83cc3); bench/RESULTS.md has the "
               f"fit and the held-out check. No bench case runs {' or '.join(STAND_INS)}: priced {stand_ins}. "
               f"Figures here: {how}.")
    return ("cycles:\n" + "".join(f"  # {line}\n" for line in textwrap.wrap(comment, 96))
            + yaml_block(fitted.cycles[kernels], factor) + "\n")


def write_board_files(fitted: Fitted) -> None:
    """Replace the ``cycles:`` block (the end of every built-in board file) with the fitted one."""
    for path in sorted(BOARDS_DIR.glob("*.yaml")):
        board = load_board(path)
        text = path.read_text()
        path.write_text(text[:text.index("\ncycles:") + 1] + cycles_block(fitted, board.kernels, board.core.value))


def shipped_differences(fitted: Fitted) -> list[str]:
    """Where smpq_edge's constants and the M4 board files differ from this fit."""
    out = []
    for kernels in KERNEL_SETS:
        if TARGET_ARENA[kernels] != fitted.arena[kernels]:
            out.append(f"cost.TARGET_ARENA[{kernels!r}] = {fitted.arena[kernels]}")
        shipped = RUNTIME[kernels]
        # Kernels no case registers (SOFTMAX) keep their separately measured entries.
        shipped = RuntimeMemory(shipped.flash_base, {k: v for k, v in shipped.flash_per_kernel.items()
                                                     if k in fitted.runtime[kernels].flash_per_kernel},
                                shipped.static_ram, shipped.static_ram_per_op)
        if shipped != fitted.runtime[kernels]:
            out.append(f"cost.RUNTIME[{kernels!r}] = {fitted.runtime[kernels]}")
    for path in sorted(BOARDS_DIR.glob("*.yaml")):
        board = load_board(path)
        factor = CORE_FACTORS[board.core.value][0]
        expected = {v: KernelCycles(**{c: figure(getattr(k, c) * factor) for c in COEFFICIENT.values()})
                    for v, k in fitted.cycles[board.kernels].items()}
        if board.cycles != expected:
            out.append(f"{path.name}: cycles differ from the fit (--write-boards)")
    return out


def report(runs: list[Run], ops: list[OpSample], fitted: Fitted) -> str:
    return (
        f"Command: `TFLM_DIR=../shared/tflm python bench/cycles.py` ({datetime.date.today()}, 2-core machine; "
        "TFLM 90b983c, CMSIS-NN 4ab83cc3, arm-none-eabi-gcc -O2). Each case exported untrained under int8, "
        "all-int4, a mixed policy (layers alternately int4/int8), a LUT policy (layers at 2, 3, 5, 6, 7 bits "
        "in turn, a DECODE before each) and an int16 policy (two layers in three w8a16, TFLM's 16x8 kernels, "
        "a QUANTIZE at each int8/int16 boundary; measured 2026-12-07 with `--policies int16`, the other "
        "policies' measurements kept from the 2026-12-06 run), built for qemu-mps2-an386 with one test "
        "vector, run under `qemu-system-arm -M mps2-an386 -icount shift=0`: the firmware's per-op profile in "
        "executed instructions (SysTick ticks x 40, 40-instruction resolution), its arena report and "
        f"`arm-none-eabi-size`. Fitted on {', '.join(FIT)}; checked on {', '.join(HELD_OUT)} (held out). "
        "dscnn_k5 and cnn_rgb are shapes built in the bench (5x5 and strided depthwise, a 3-channel 5x5 "
        "first layer, max pooling, a strided 1x1 convolution). Predicted totals are the sum over ops; the "
        "measured total is the whole inference (the interpreter's own work between ops included).\n\n"
        "### Cycles: summary\n\n" + summary_table(runs, ops, fitted)
        + "\n\nHeld-out figures outside the targets (totals 10 %, each op 25 %, arena 2 %, flash 5 %):\n\n"
        + misses(runs, ops, fitted)
        + "\n\n### Fitted formulas (instructions; the board files carry them)\n\n" + formula_table(fitted, ops)
        + "\n\n### Totals per inference\n\n" + totals_table(runs, ops, fitted)
        + "\n\n### Per op, held-out cases\n\n" + op_table(ops, fitted)
        + "\n\n### Memory on the target: summary\n\nArena: the firmware's `arena_used_bytes()` against "
        "`estimate()` with the 32-bit overhead (`cost.TARGET_ARENA`). Flash: text + data of the ELF against the "
        "cost model's .tflite size + `cost.RUNTIME` (TFLM core, application, the registered kernels) + the "
        "embedded test vectors. RAM: data + bss less the arena array against `RUNTIME[...].static_ram` (+ per op). "
        "The cost report gives these as `firmware_flash_bytes` / `firmware_ram_bytes` (test vectors not included); "
        "the budgets still count the board's `reserve` beside the model. Kernels every firmware links cannot be "
        "told apart from the base (0 in the table).\n\n"
        + memory_summary(runs, fitted) + "\n\n### Memory per run\n\n" + memory_table(runs, fitted)
        + f"\n\nFitted: arena {fitted.arena}; runtime {fitted.runtime}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="exports, firmware and builds")
    parser.add_argument("--reuse", action="store_true", help="fit the measurements of an earlier run")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES,
                        help="measure only these (the others' measurements are kept from an earlier run)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES,
                        help="measure only these policies of the cases (the others' measurements are kept)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--write-boards", action="store_true", help="write the fitted cycles into every board file")
    args = parser.parse_args()
    if args.reuse:
        runs = load_runs(args.work)
    else:
        tflm = os.environ.get("TFLM_DIR")
        if not tflm:
            raise SystemExit("set TFLM_DIR to a tflite-micro tree (here: ../shared/tflm)")
        args.work.mkdir(parents=True, exist_ok=True)
        runs = measure_cases(tuple(args.cases), args.work, Path(tflm).resolve(), tuple(args.policies))
    ops = samples(runs, args.work)
    fitted = fit_all(runs, ops)
    body = report(runs, ops, fitted)
    print(body)
    if args.write_boards:
        write_board_files(fitted)
    differences = shipped_differences(fitted)
    print("\n".join(["the shipped figures differ from this fit:", *differences]) if differences
          else "the shipped figures (cost.py, board files) are this fit's")
    if not args.no_write:
        if differences:
            raise SystemExit("not writing bench/RESULTS.md: the shipped figures are not the ones reported")
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
