"""``python -m smpq_edge``: a thin command line over the pipeline stages.

Each sub-command parses its arguments, calls one stage function and prints or writes its result.
A ``UserError`` from any stage becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Callable

from smpq_edge.api import DEFAULT_BOARD, DEFAULT_MODEL
from smpq_edge.common.errors import UserError
from smpq_edge.common.precision import PACKED_INT4, Precision, weight_form
from smpq_edge.common.records import kernel_code_text
from smpq_edge.inputs.preprocess import CHANNEL_ORDERS, INPUT_RANGES

COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    """Enrol a sub-command: the decorated function adds its arguments and returns its runner."""

    def register(setup):
        if name in COMMANDS:
            raise ValueError(f"command '{name}' registered twice")
        COMMANDS[name] = setup
        return setup

    return register


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


@command("boards")
def _boards(parser: argparse.ArgumentParser):
    """List the built-in board profiles, or show one ('boards show NAME')."""
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    parser.add_argument("name", nargs="?", help="board name or YAML path (with 'show')")

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.inputs.boards import board_names, load_board

        if args.action == "show":
            if not args.name:
                raise UserError("boards show: give a board name or YAML path")
            print(json.dumps(load_board(args.name).model_dump(mode="json"), indent=2))
            return 0
        rows = []
        for name in board_names():
            b = load_board(name)
            rows.append([name, b.core.value, f"{b.clock_mhz:g}", f"{b.flash_kb:g} / {b.ram_kb:g}",
                         f"{b.budgets.flash_kb:g} / {b.budgets.ram_kb:g} / {b.budgets.latency_ms:g}",
                         f"{b.reserve.flash_kb:g} / {b.reserve.ram_kb:g}", b.kernels, " ".join(b.candidates)])
        _print_table(rows, ["board", "core", "MHz", "flash / RAM KB", "budget KB / KB / ms", "reserve KB / KB",
                            "kernels", "candidates"])
        print("\nbudget: whole firmware (model + reserve) flash, RAM and latency; reserve: what the firmware "
              "needs besides the model. 'boards show NAME' prints a board in full, its description included.")
        return 0

    return run


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--board", default=DEFAULT_BOARD, help="board name or YAML path (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="example name, or a model file: .py, .onnx, .keras, .h5, .tflite, or a SavedModel folder")
    parser.add_argument("--data", default=None,
                        help="built-in data set, .npz file, or a folder of images or WAV files (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, training and sampling")
    parser.add_argument("--resize", action="store_true",
                        help="resize images to the model's input size (bilinear) instead of stopping")
    parser.add_argument("--name-pattern", default=None, metavar="PATTERN",
                        help="read label and group from file names, e.g. '{label}_{group}_{index}' (FSDD)")
    parser.add_argument("--split-by", choices=["sample", "group"], default="sample",
                        help="validation and test splits by sample (stratified) or by whole group, e.g. speaker")
    parser.add_argument("--task", choices=["classification", "reconstruction"], default=None,
                        help="classification (class labels y) or reconstruction (an autoencoder scored by MSE); "
                             "default: reconstruction for data without labels y, else classification")
    parser.add_argument("--logits", action="store_true",
                        help="drop a final Softmax: the exported model outputs logits (default: exported as "
                             "TFLM's int8 SOFTMAX)")
    parser.add_argument("--single-zero-point", action="store_true",
                        help="weights and biases keep one zero point per tensor instead of one per channel: "
                             "16 B less flash per output channel, which TFLM reads but LiteRT and other TFLite "
                             "tools refuse")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="wWaA",
                        help="per-layer precisions to choose among, e.g. 'w2a8 w4a8 w8a8 w8a16' (default: the "
                             "board's; w4a8 is packed INT4, w2/3/5/6/7a8 are LUT-compressed int8 that TFLM's DECODE "
                             "expands, w8a16 runs TFLM's 16x8 kernels on int16 activations)")
    add_preprocessing_arguments(parser)


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    """How image pixels become model inputs: part of a trained model's contract (preprocess.py)."""
    group = parser.add_argument_group("image preprocessing (pixels p in 0..255; what the model was trained on)")
    group.add_argument("--input-range", choices=list(INPUT_RANGES), default="0..1",
                       help="pixels scaled to this range: 0..1 is p / 255, -1..1 is p / 127.5 - 1 "
                            "(default: %(default)s)")
    group.add_argument("--mean", default=None, metavar="M[,M,M]",
                       help="per-channel mean subtracted after the range, as torchvision's Normalize")
    group.add_argument("--std", default=None, metavar="S[,S,S]", help="per-channel std divided by after the mean")
    group.add_argument("--channel-order", choices=list(CHANNEL_ORDERS), default="rgb",
                       help="channel order the model expects (default: %(default)s)")


def preprocessing_options(args: argparse.Namespace) -> dict:
    from smpq_edge.api import PREPROCESSING_OPTIONS

    return {name: getattr(args, name) for name in PREPROCESSING_OPTIONS}


def options_from(args: argparse.Namespace) -> dict:
    """The parsed flags that are ``api.Options`` (the API's keywords)."""
    from smpq_edge.api import Options

    return {f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}


# `cost`'s exit code when the policy is over a budget: a script can tell "does not fit" (3) from
# a bad argument (2) and from fits (0).
OVER_BUDGET_EXIT = 3


@command("cost")
def _cost(parser: argparse.ArgumentParser):
    """Flash, RAM and cycle cost per layer of a model under a policy on a board."""
    add_model_arguments(parser)
    parser.add_argument("--bits", default="8", help="uniform weight bits (2 to 8, a candidate of the board or of "
                                                    "--candidates), or a policy.json path")
    parser.add_argument("--json", action="store_true", help="print the cost report as JSON")

    def run(args: argparse.Namespace) -> int:
        # The model sized to the data's classes, as `search` sizes it: the same model gets priced.
        from smpq_edge.api import Options, load_inputs

        inputs = load_inputs(args.model, args.data, Options.of(options_from(args)))
        board, source = inputs.board, inputs.source
        from smpq_edge.network.cost import estimate, uniform
        from smpq_edge.network.graph import trace
        from smpq_edge.inputs.policy import load_policy
        from smpq_edge.common.precision import WEIGHT_BITS

        graph = trace(source.module, source.input_shape, output_softmax=source.output_softmax)
        uniform_bits = args.bits in {str(b) for b in WEIGHT_BITS}
        if uniform_bits and int(args.bits) not in board.weight_bits:
            raise UserError(f"--bits {args.bits}: not a candidate on board {board.name} ({' '.join(board.candidates)}); "
                            f"add it with --candidates w{args.bits}a8 ...")
        wide = frozenset()  # the layers a policy file runs on int16 activations
        if uniform_bits:
            bits = uniform(graph, int(args.bits))
        elif args.bits.endswith(".json") or os.path.exists(args.bits):
            policy = load_policy(args.bits)
            bits, wide = policy.bits, policy.wide
        else:
            raise UserError(f"--bits: expected 2 to 8 or a policy .json file, got '{args.bits}'")
        try:
            report = estimate(graph, bits, board, wide=wide)
        except UserError as exc:
            if uniform_bits:
                raise
            raise UserError(f"{args.bits}: {exc}") from None  # name the policy file at fault
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
            return 0 if all(report.fits.values()) else OVER_BUDGET_EXIT
        rows = [[l.name, l.kind, l.weight_bits, 16 if l.name in wide else 8, l.params, l.macs, l.flash_bytes,
                 l.scratch_bytes, l.cycles] for l in report.layers]
        _print_table(rows, ["layer", "kind", "bits", "act bits", "params", "MACs", "flash B", "scratch B", "cycles"])
        fits = report.fits
        print()
        code = kernel_code_text(report.extra_kernels)
        print(f"board {board.name}: model {report.model_flash_bytes} B + reserve {report.reserve_flash_bytes} B{code} = "
              f"{report.flash_total_bytes} B flash of {report.flash_budget_bytes} B ({'ok' if fits['flash'] else 'OVER'})")
        print(f"arena {report.arena_bytes} B + reserve {report.reserve_ram_bytes} B = {report.ram_total_bytes} B RAM "
              f"of {report.ram_budget_bytes} B ({'ok' if fits['ram'] else 'OVER'})")
        print(f"{report.cycles} cycles = {report.latency_ms:.2f} ms at {board.clock_mhz:g} MHz, budget "
              f"{board.budgets.latency_ms:g} ms ({'ok' if fits['cycles'] else 'OVER'})")
        return 0 if all(fits.values()) else OVER_BUDGET_EXIT

    return run


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flash-kb", type=float, help="whole-firmware flash budget (default: the board's)")
    parser.add_argument("--ram-kb", type=float, help="whole-firmware RAM budget (default: the board's)")
    parser.add_argument("--latency-ms", type=float, help="latency budget (default: the board's)")


def add_search_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    add_model_arguments(parser)
    add_budget_arguments(parser)
    parser.add_argument("--out", default=out_default, help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few epochs only: a first look, not final accuracy")
    parser.add_argument("--no-baselines", action="store_true", help="skip the DMPQ, HAWQ and uniform baselines")
    parser.add_argument("--ptq", action="store_true",
                        help="no training at all: choose the policy on the calibrated network of a trained model "
                             "and export it as it is (for a model without its training data)")
    parser.add_argument("--allow-chance-accuracy", action="store_true",
                        help="go on with a trained model that scores no better than chance on the data (the build "
                             "stops otherwise, before any search: usually the preprocessing is wrong)")


@command("search")
def _search(parser: argparse.ArgumentParser):
    """Find per-layer weight bit-widths with SMPQ under the board's budgets; write policy.json."""
    add_search_arguments(parser, out_default="out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to train and score coalitions (default: %(default)s); under torchrun, "
                             "cuda uses one GPU per rank with NCCL, cpu uses gloo")
    parser.add_argument("--shards", type=int, default=None,
                        help="gradient shards per batch (default: the number of torchrun processes); the same "
                             "seed and shard count give the same result on any number of processes")

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.api import search

        result = search(args.model, args.data, out=args.out, device=args.device, shards=args.shards,
                        **options_from(args))
        if result is None:  # not the main rank of a torchrun job
            return 0
        _print_methods(result)
        _print_floor(result)
        print(f"wrote {os.path.join(args.out, 'policy.json')}, {os.path.join(args.out, 'search.json')}")
        return 0

    return run


def rerank_note(search, task) -> None:
    """When measuring the K best on validation replaced the selection's optimum, both figures."""
    chosen = next((i for i, k in enumerate(search.k_best) if k.chosen), 0)
    if chosen:
        top, pick = search.k_best[0], search.k_best[chosen]
        widths = set(pick.policy.values())
        uniform = widths.pop() if len(widths) == 1 else None
        which = (f"the uniform {weight_form(uniform.weights)}{' int16-activation' if uniform.wide else ''} policy"
                 if uniform else f"the K-best policy #{chosen + 1}")
        print(f"note: the re-rank on validation picked {which} "
              f"({pick.text}, validation {task.metric} {task.show(pick.val_acc)}) over "
              f"the best by {top.source} ({top.text}, {task.show(top.val_acc)})")


def _print_floor(search) -> None:
    from smpq_edge.inputs.task import TASKS

    task = TASKS[search.task]
    for check in search.stage_checks:
        if check.undone:
            print(f"note: {check.stage} made validation {task.metric} worse, {task.show(check.val_acc_before)} to "
                  f"{task.show(check.val_acc_after)}; it was undone")
    rerank_note(search, task)
    if search.floor_action:
        print(f"\n{search.floor_action.message}")
    print(f"\n{search.floor_check.sentence(task)}")


def _print_methods(search) -> None:
    """SMPQ's pick next to the baselines under the same budgets (when the search ran them)."""
    from smpq_edge.search.baselines import uniform_name
    from smpq_edge.inputs.task import TASKS

    if len(search.methods) < 2:
        return
    task = TASKS[search.task]
    names = [layer.name for layer in search.shipped.cost.layers]
    rows = [[m.method, m.text, f"{m.cost.model_flash_bytes:,} B", task.show(m.test_acc)] for m in search.methods]
    # A uniform baseline the search tried and did not record was over a budget; the others (uniform
    # int3 beside the default uniform8 and uniform4) were not run.
    tried = set(search.config.get("baselines", ()))
    uniform = [Precision.parse(name) for name in search.candidates if not Precision.parse(name).wide]
    rows += [[uniform_name(c.weights), " ".join(str(c.weights) for _ in names),
              "over budget" if uniform_name(c.weights) in tried else "not run", "-"]
             for c in uniform if uniform_name(c.weights) not in {m.method for m in search.methods}]
    trained = "post-training, nothing trained" if search.post_training else "after each one's finetune"
    print(f"\nmethods under the same budgets (bits of layers {' '.join(names)}; fake-quant test {task.metric}, "
          f"{trained}):")
    _print_table(rows, ["method", "bits", "model flash", f"test {task.metric}"])


def _print_build_summary(out, stages: dict | None = None) -> None:
    from smpq_edge.common.records import read_emulation, read_firmware, read_search
    from smpq_edge.inputs.policy import load_policy
    from smpq_edge.inputs.task import TASKS
    from smpq_edge.report import int16_note

    search = read_search(out / "search.json")
    emulation = read_emulation(out / "emulation.json")
    ref, shipped = search.reference, search.shipped
    task = TASKS[search.task]
    show = task.show
    cost = shipped.cost
    print()
    rows = [
        [f"test {task.metric}", show(ref["float"].test_acc), show(ref["ptq_int8"].test_acc),
         show(ref["shipped"].test_acc), show(emulation.accuracy)],
        [f"validation {task.metric}", show(ref["float"].val_acc), show(ref["ptq_int8"].val_acc),
         show(ref["shipped"].val_acc), "-"],
        [f"test {task.agreement_metric}", show(ref["float"].test_agreement), show(ref["ptq_int8"].test_agreement),
         show(ref["shipped"].test_agreement), "-"],
    ]
    if emulation.auc is not None:
        rows.append(["test ROC AUC (anomalies)", *(f"{ref[k].test_auc:.4f}" for k in ("float", "ptq_int8", "shipped")),
                     f"{emulation.auc:.4f}"])
    _print_table(rows, ["", "float", "PTQ int8 (floor)", "shipped (fake-quant)", "shipped (TFLM emulator)"])
    print()

    def use(total: int, budget: int) -> str:
        return f"{100 * total / budget:.0f} %"

    # The flash row counts the exported .tflite, which the firmware embeds byte for byte, not the
    # prediction the selector used: the two differ by the file's names and alignment.
    flash_total = cost.flash_total_with(emulation.model_bytes)
    _print_table([
        ["flash", f".tflite {emulation.model_bytes:,} B (predicted {cost.model_flash_bytes:,})",
         cost.reserve_flash_text(), f"{flash_total:,} B", f"{cost.flash_budget_bytes:,} B",
         use(flash_total, cost.flash_budget_bytes)],
        ["RAM", f"arena {cost.arena_bytes:,} B (*)", f"{cost.reserve_ram_bytes:,} B",
         f"{cost.ram_total_bytes:,} B", f"{cost.ram_budget_bytes:,} B", use(cost.ram_total_bytes, cost.ram_budget_bytes)],
        ["latency", f"{cost.cycles:,} cycles", "-", f"{cost.latency_ms:.2f} ms", f"{cost.cycle_budget:,} cycles",
         use(cost.cycles, cost.cycle_budget)],
    ], ["", "model", "board reserve", "whole firmware", "budget", "use"])
    print(_arena_note(search, cost, emulation, read_firmware(out / "firmware" / "firmware.json")))
    if flash_total > cost.flash_budget_bytes:
        print(f"WARNING: the exported model.tflite is {emulation.model_bytes - cost.model_flash_bytes:,} B larger than "
              f"predicted, which puts the firmware {flash_total - cost.flash_budget_bytes:,} B over the flash budget; "
              f"give a --flash-kb below {cost.flash_budget_bytes / 1024:g} to leave that room")
    print("\nweights per layer: " + ", ".join(f"{layer.name} ({layer.kind}) {weight_form(layer.weight_bits)}"
                                          for layer in cost.layers))
    if (out / "policy.json").exists() and (wide := load_policy(out / "policy.json").wide):
        print(int16_note(wide, frozenset(search.shipped.int16)))
    _print_methods(search)
    _print_floor(search)
    if stages:
        print("\n" + stage_times(stages))
    print(f"\nbuild folder: {out}  (report: {out / 'report.html'}, firmware: {out / 'firmware'})")


def stage_times(stages: dict) -> str:
    """One line of each build stage's wall time (a stage --resume skipped shows the earlier run's)."""
    parts = [f"{name} {stage.seconds:.1f} s" + (" (skipped; earlier run)" if stage.skipped else "")
             for name, stage in stages.items()]
    ran = sum(stage.seconds for stage in stages.values() if not stage.skipped)
    return f"wall time per stage: {', '.join(parts)}; {ran:.1f} s in all this run"


KERNEL_NAMES = {"cmsis_nn": "CMSIS-NN", "reference": "TFLM reference"}


def _arena_note(search, cost, emulation, firmware) -> str:
    """What each of the three arena figures is: the prediction for the board's kernels, the
    firmware's allocation (that plus a margin) and the host's measurement with other kernels."""
    int4 = any(layer.weight_bits == PACKED_INT4 for layer in cost.layers)
    target = f"{KERNEL_NAMES[search.kernels]} kernels" if search.kernels else "its kernels"
    arena = firmware.arena
    return (f"(*) the arena predicted for board {search.board} with {target}; the firmware allocates "
            f"{arena.size:,} B (that, or its basis, plus a {arena.margin:,} B margin); the host TFLM interpreter "
            f"ran the model in {emulation.arena_bytes:,} B with TFLM's reference kernels and 64-bit pointers"
            + (", unpacking each INT4 filter into an int8 copy in the arena" if int4 else ""))


@command("build")
def _build(parser: argparse.ArgumentParser):
    """Search, export, emulate, generate firmware and report, in one output folder."""
    add_search_arguments(parser, out_default="build")
    parser.add_argument("--resume", action="store_true", help="skip stages whose inputs are unchanged")

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.api import build

        result = build(args.model, args.data, out=args.out, resume=args.resume, **options_from(args))
        _print_build_summary(result.out, result.stages)
        return 0

    return run


@command("export")
def _export(parser: argparse.ArgumentParser):
    """Export the searched policy to a mixed int4/int8 .tflite (reads policy.json and quantnet.pt)."""
    add_model_arguments(parser)
    parser.add_argument("--out", default="out", help="folder holding policy.json and quantnet.pt (default: %(default)s)")
    parser.add_argument("--calibration", type=int, default=256, help="training samples for onnx2tf's calibration")

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.api import export

        out = args.out
        result = export(args.model, args.data, out=out, calibration=args.calibration, **options_from(args))
        print(f"wrote {os.path.join(out, 'model.tflite')} ({len(result.tflite)} B), "
              f"{os.path.join(out, 'model_int8.tflite')} ({len(result.tflite_int8)} B)")
        if result.wide:
            from smpq_edge.report import int16_note

            print(int16_note(result.wide))
        for note in result.notes:
            print(f"note: {note}")
        return 0

    return run


@command("emulate")
def _emulate(parser: argparse.ArgumentParser):
    """Run a .tflite in TFLM over the test split: on-device accuracy, arena and speed."""
    parser.add_argument("model_file", metavar="MODEL.tflite", help="the .tflite to run")
    parser.add_argument("--data", default="digits", help="built-in data set name or .npz file (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_preprocessing_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.api import emulate
        from smpq_edge.inputs.task import TASKS

        result = emulate(args.model_file, args.data, seed=args.seed, **preprocessing_options(args))
        if args.json:
            print(result.model_dump_json(indent=2))
        else:
            task = TASKS[result.task]
            auc = "" if result.auc is None else f", ROC AUC {result.auc:.4f}"
            print(f"{args.model_file}: TFLM {task.metric} {task.show(result.accuracy)}{auc} on {result.samples} test "
                  f"samples, arena {result.arena_bytes} B, model {result.model_bytes} B, "
                  f"{result.inferences_per_second:.0f} inferences/s on the host")
        return 0

    return run


@command("firmware")
def _firmware(parser: argparse.ArgumentParser):
    """C/C++ firmware sources for a board from a .tflite: model array, op resolver, arena, self-check."""
    parser.add_argument("model", help="int8-in/int8-out .tflite file")
    parser.add_argument("--board", default=DEFAULT_BOARD, help="board name or YAML path (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder for the sources")
    parser.add_argument("--data", default=None,
                        help="data set for the self-check vectors (its test split); default: random int8 inputs")
    parser.add_argument("--vectors", type=int, default=20, help="test vectors to embed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split or random inputs")
    parser.add_argument("--margin", type=int, default=None,
                        help="tensor arena margin in bytes over the measured arena (default: 25%%, at least 1024)")
    add_preprocessing_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.api import firmware

        result = firmware(args.model, out=args.out, board=args.board, data=args.data, vectors=args.vectors,
                          seed=args.seed, margin=args.margin, **preprocessing_options(args))
        print(f"firmware for {result.board} ({result.port} port) in {result.out_dir}")
        for registration in result.registrations:
            print(f"  {registration.call}: {registration.reason}")
        print(f"tensor arena {result.arena_size} B = {result.arena_estimate} B {result.arena_basis} + margin "
              f"{result.arena_margin} B; {result.vectors} test vectors; {len(result.files)} files")
        print(f"build: make -C {result.out_dir} TFLM_DIR=/path/to/tflite-micro (see README.md there)")
        return 0

    return run


@command("validate")
def _validate(parser: argparse.ArgumentParser):
    """Run a build's firmware self-check on target (QEMU, or a flashed board's serial port) and compare it with the cost model."""
    parser.add_argument("build_dir", metavar="BUILD_DIR", help="a build folder (with firmware/ and search.json)")
    parser.add_argument("--tflm-dir", default=None, help="tflite-micro checkout to build against (default: $TFLM_DIR)")
    parser.add_argument("--port", default=None,
                        help="serial port of a board already flashed with the firmware, e.g. /dev/ttyACM0 "
                             "(default: build and run on QEMU, for a board with a QEMU port)")
    parser.add_argument("--baud", type=int, default=115200, help="serial baud rate (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the QEMU run (default 300) or the serial report (default 60)")
    parser.add_argument("--tflm-build", default=None,
                        help="folder for TFLM's compiled objects and libtflm.a (default: BUILD_DIR/validation-build); "
                             "builds for the same board may share one, so that TFLM compiles once")

    def run(args: argparse.Namespace) -> int:
        from smpq_edge.firmware.validate import RESULT_FILE, summary_lines, validate

        result = validate(args.build_dir, tflm_dir=args.tflm_dir, port=args.port, tflm_build_dir=args.tflm_build,
                          timeout_s=args.timeout, baud=args.baud)
        for line in summary_lines(result):
            print(line)
        print(f"written: {os.path.join(args.build_dir, RESULT_FILE)}")
        return 0 if result.passed else 1

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smpq_edge",
        description="Shapley-value mixed int4/int8 quantisation for TensorFlow Lite Micro boards.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, setup in COMMANDS.items():
        doc = (setup.__doc__ or "").strip()
        sub_parser = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        sub_parser.set_defaults(run=setup(sub_parser), parser=sub_parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an unknown option is reported with its command's usage (argparse's top-level
    parser would show the list of commands instead)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (getattr(args, "parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# Libraries' warnings (deprecations, layout hints) are for their developers, not for the user's
# terminal; the SDK's own warnings (a class missing from a split) still show.
QUIET_LIBRARIES = r"(matplotlib|torch|tensorflow|keras|tf_keras|onnx|onnx2tf|tf2onnx|google|absl|numpy|scipy|sklearn)"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", module=QUIET_LIBRARIES + r"(\..*)?$")
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except UserError as exc:
        # One line, whatever the message holds (a user's exception text, a file name with a newline).
        message = " ".join(str(exc).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (`boards | head`): stop quietly, as other command-line tools
        # do; stdout goes to /dev/null so Python's flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
