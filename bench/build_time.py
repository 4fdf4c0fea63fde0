"""End-to-end time of the default `python -m smpq_edge build`, with each stage's share.

    python bench/build_time.py
"""

from __future__ import annotations

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


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "smpq_edge", "build", "--out", folder], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        total = time.perf_counter() - started
        record = json.loads((Path(folder) / "build.json").read_text())
        search = json.loads((Path(folder) / "search.json").read_text())
    stages = record["stages"]
    rows = [f"| {name} | {stage['seconds']:.1f} |" for name, stage in stages.items()]
    timings = search["timings"]
    search_rows = [f"| {name.removesuffix('_s')} | {seconds:.1f} |" for name, seconds in timings.items()]
    write_section("## Default build, end to end (bench/build_time.py)", "\n".join([
        f"Command: `python bench/build_time.py` ({datetime.date.today()}, 2-core x86-64 machine): runs "
        f"`python -m smpq_edge build` with no arguments ({search['model']}, {search['data']['name']}, "
        f"{search['board']}, full SearchConfig with baselines). Target: about a minute.",
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
