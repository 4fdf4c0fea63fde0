"""1 process vs 2 torchrun ranks (gloo) for the same search, measured in one run on this machine.

Three runs of `search --no-baselines` on the same model, data and seed:
  A  one process, 2 torch threads (how a user runs it on this 2-core machine);
  B  one process, 1 thread, `--shards 2` (the reference the 2-rank run must equal bit for bit);
  C  `torchrun --nproc_per_node 2`, 1 thread per rank.

    python bench/distributed.py [--model mnist1d_dscnn --data mnist1d] [--full]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402


def run(label: str, launcher: list[str], threads: int, extra: list[str], args, out: Path) -> dict:
    command = [*launcher, "-m", "smpq_edge", "search", "--model", args.model, "--data", args.data, "--seed", "0",
               "--no-baselines", "--out", str(out), *extra, *([] if args.full else ["--quick"])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    record = json.loads((out / "search.json").read_text())
    print(f"{label}: {seconds:.1f} s", flush=True)
    return {"label": label, "seconds": seconds, "shapley": record["shapley"]["mean"],
            "bits": record["methods"][0]["bits"], "acc": record["methods"][0]["test_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist1d_dscnn")
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--full", action="store_true", help="the default SearchConfig instead of --quick")
    args = parser.parse_args()
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    with tempfile.TemporaryDirectory() as folder:
        a = run("A: 1 process, 2 threads", python, 2, [], args, Path(folder) / "a")
        b = run("B: 1 process, 1 thread, --shards 2", python, 1, ["--shards", "2"], args, Path(folder) / "b")
        c = run("C: torchrun 2 ranks (gloo), 1 thread each", torchrun, 1, [], args, Path(folder) / "c")
    same = b["shapley"] == c["shapley"] and b["bits"] == c["bits"] and b["acc"] == c["acc"]
    rows = [f"| {r['label']} | {r['seconds']:.1f} | {r['seconds'] / a['seconds']:.2f} | {100 * r['acc']:.2f} |"
            for r in (a, b, c)]
    config = "default SearchConfig" if args.full else "SearchConfig.quick()"
    write_section("## 1 vs 2 ranks (bench/distributed.py)", "\n".join([
        f"Command: `python bench/distributed.py{' --full' if args.full else ''}` ({datetime.date.today()}, 2-core "
        f"x86-64 machine): `search --no-baselines` of {args.model} on {args.data}, seed 0, {config}, all three runs "
        "in one invocation.",
        "",
        "| run | seconds | vs A | SMPQ test accuracy % |", "|---|---|---|---|", *rows,
        "",
        f"B and C identical (Shapley table, bits, accuracy): **{'yes' if same else 'NO'}**.",
    ]))


if __name__ == "__main__":
    main()
