"""A 2-rank CPU search (torchrun, gloo) gives exactly the single-process result for the same seed."""

import json
import os
import subprocess
import sys

import numpy as np


def _search(out, *launcher, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same threads per process: same kernel summation order
    command = [*launcher, "-m", "smpq_edge", "search", "--quick", "--no-baselines", "--seed", "5", "--out", str(out),
               *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "search.json").read_text())


def test_two_rank_gloo_search_equals_single_process(tmp_path):
    single = _search(tmp_path / "one", sys.executable, extra=("--shards", "2"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    double = _search(tmp_path / "two", *torchrun)
    assert double["config"]["warmup"]["shards"] == 2
    np.testing.assert_allclose(np.array(double["shapley"]["mean"], dtype=float),
                               np.array(single["shapley"]["mean"], dtype=float), rtol=0, atol=1e-9)
    assert double["alpha_history"][-1]["alpha"] == single["alpha_history"][-1]["alpha"]
    assert double["methods"][0]["bits"] == single["methods"][0]["bits"]
    assert double["methods"][0]["test_acc"] == single["methods"][0]["test_acc"]
