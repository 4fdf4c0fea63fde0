"""End-to-end time of a `python -m smpq_edge build`, with each stage's share.

    python bench/build_time.py                  # the default build (no arguments)
    python bench/build_time.py --case ptq-resnet8
    python bench/build_time.py --case pretrained-resnet8
    python bench/build_time.py --case ptq-resnet8-lut

``ptq-resnet8`` is the post-training build of issue 20's speed target: ResNet-8 (examples/resnet8,
marked trained) on the 50,000 CIFAR-10 JPEGs of ../shared/data, nucleo-l4r5zi with a flash budget
between all-int4 and all-int8 (model at most 64 KB of 85 KB int8). Its weights are the example's
initial ones: post-training quantisation trains nothing, so the time does not depend on them,
and --allow-chance-accuracy lets the untrained model past the sanity gate. The image folder is
decoded once beforehand (as a second build of the same folder reads it from the cache).
``pretrained-resnet8`` is the same build with the pretrained schedule (a gentle finetune of the
search's pick) instead of ``--ptq``; it trains, so its time is per epoch of the schedule, not of
the weights' quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
TRAINED_RESNET8 = """from smpq_edge.examples.resnet8 import INPUT_SHAPE, build_model  # noqa: F401
PRETRAINED = True
"""
CASES = {
    "default": ("## Default build, end to end (bench/build_time.py)", []),
    "ptq-resnet8": ("## Post-training ResNet-8 on the CIFAR-10 folder, end to end (bench/build_time.py --case ptq-resnet8)",
                    ["--ptq", "--data", str(CIFAR), "--board", "nucleo-l4r5zi", "--flash-kb", "160",
                     "--allow-chance-accuracy"]),
    # Issue 21's speed target: the same post-training build choosing among four weight widths
    # (LUT-2, LUT-3, INT4, int8). At 170 KB LUT layers are a real option: all-int4 fits (53.7 KB +
    # the 96 KB reserve) and so do int8 layers mixed with 2- and 3-bit ones, DECODE's 22 KB included.
    "ptq-resnet8-lut": ("## Post-training ResNet-8 over four weight widths, end to end "
                        "(bench/build_time.py --case ptq-resnet8-lut)",
                        ["--ptq", "--data", str(CIFAR), "--board", "nucleo-l4r5zi", "--flash-kb", "170",
                         "--candidates", "w2a8", "w3a8", "w4a8", "w8a8", "--allow-chance-accuracy"]),
    "pretrained-resnet8": ("## Pretrained-schedule ResNet-8 on the CIFAR-10 folder, end to end "
                           "(bench/build_time.py --case pretrained-resnet8)",
                           ["--data", str(CIFAR), "--board", "nucleo-l4r5zi", "--flash-kb", "160",
                            "--allow-chance-accuracy"]),
}


def run(case: str, folder: Path) -> float:
    arguments = list(CASES[case][1])
    if "resnet8" in case:
        model = folder / "resnet8_trained.py"
        model.write_text(TRAINED_RESNET8)
        arguments += ["--model", str(model)]
        # Decode the folder into the cache first (a cost paid once per folder, not per build).
        subprocess.run([sys.executable, "-c", f"from smpq_edge.inputs.data import load_dataset; "
                        f"load_dataset({str(CIFAR)!r}, channels=3, size=(32, 32))"], check=True, cwd=ROOT)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smpq_edge", "build", "--out", str(folder / "out"), *arguments], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="default")
    case = parser.parse_args().case
    with tempfile.TemporaryDirectory() as tmp:
        total = run(case, Path(tmp))
        record = json.loads((Path(tmp) / "out" / "build.json").read_text())
        search = json.loads((Path(tmp) / "out" / "search.json").read_text())
    stages = record["stages"]
    rows = [f"| {name} | {stage['seconds']:.1f} |" for name, stage in stages.items()]
    search_rows = [f"| {name.removesuffix('_s')} | {seconds:.1f} |" for name, seconds in search["timings"].items()]
    command = "python bench/build_time.py" + ("" if case == "default" else f" --case {case}")
    heading, arguments = CASES[case]
    write_section(heading, "\n".join([
        f"Command: `{command}` ({datetime.date.today()}, 2-core x86-64 machine): runs "
        f"`{' '.join(['python -m smpq_edge build', *(a if '/' not in a else Path(a).name for a in arguments)])}` "
        f"({search['model']}, {search['data']['name']}: {search['data']['train']:,} / {search['data']['val']:,} / "
        f"{search['data']['test']:,} samples, {search['board']}).",
        "",
        f"Wall time, process start to exit: **{total:.1f} s**.",
        "",
        "| stage | seconds |", "|---|---|", *rows,
        "",
        "Inside the search stage:",
        "",
        "| part | seconds |", "|---|---|", *search_rows,
    ]))
    print(f"build: {total:.1f} s")


if __name__ == "__main__":
    main()
