"""Search speed: batched vs one-at-a-time Shapley coalition evaluation, and a full run_search's wall time.

Part (a): on a quickly trained supernet (a couple of float epochs, one warm-up epoch), the same
``monte_carlo_shapley`` call as one alpha update of the search (its permutations, truncation and
groups) is run twice: ``batched=True`` with ``CoalitionValue.__call__`` (each call's coalitions
walked as a prefix tree, ``QuantNet.coalition_logits``), and ``batched=False`` with
``CoalitionValue.one_at_a_time`` (one ordinary forward per coalition, sequential walk). Reports
coalitions per second for both, the speed ratio, whether the estimates are identical, and the
ratio of the layer MACs each way computes for the coalitions it was given: the speed-up an exact
evaluation could reach if time were proportional to MACs.

Part (b): wall time of a full ``run_search`` of resnet8 on synthetic-cifar with the default
``SearchConfig`` minus baselines (``--full-config quick`` uses ``SearchConfig.quick()`` instead,
reported as such).

    python bench/search_speed.py                      # (a) and (b)
    python bench/search_speed.py --skip-full          # (a) only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.network.quant import QuantNet  # noqa: E402
from smpq_edge.search.runner import SearchConfig, run_search, warm_supernet  # noqa: E402
from smpq_edge.search.shapley import monte_carlo_shapley  # noqa: E402
from smpq_edge.search.smpq import CoalitionValue, ShapleyConfig, validation_batch  # noqa: E402
from smpq_edge.search.train import TrainConfig, seed_everything, train  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## Search speed (bench/search_speed.py)"

CASES = [("digits_cnn", "digits"), ("mnist1d_dscnn", "mnist1d"), ("resnet8", "synthetic-cifar")]


def quick_supernet(model: str, data_name: str, seed: int, float_epochs: int, warmup_epochs: int):
    seed_everything(seed)
    data = load_dataset(data_name, seed)
    source = load_model(model, num_classes=data.num_classes)
    graph = trace(source.module, data.input_shape)
    train(source.module, data, TrainConfig(epochs=float_epochs, lr=1e-2), seed, progress=False)
    source.module.eval()
    net = warm_supernet(source.module, graph, data, load_board("nucleo-l4r5zi").weight_bits,
                        TrainConfig(epochs=warmup_epochs, lr=2e-3), seed)
    return net, data


def timed_shapley(net: QuantNet, value: CoalitionValue, permutations: int, truncation: float, seed: int,
                  batched: bool):
    """The estimate, its seconds, and the layer MACs its evaluations computed."""
    groups = np.repeat(np.arange(len(net.graph.layers)), len(net.candidates))
    calls: list[np.ndarray] = []
    fn = value if batched else value.one_at_a_time

    def recorded(masks: np.ndarray) -> np.ndarray:
        calls.append(masks)
        return fn(masks)

    net.set_policy(None)
    t0 = time.perf_counter()
    est = monte_carlo_shapley(recorded, len(net.players()), permutations, groups=groups, truncation=truncation,
                              seed=seed, max_batch=value.max_batch, batched=batched)
    seconds = time.perf_counter() - t0
    return est, seconds, sum(computed_macs(net, masks, shared=batched) for masks in calls)


def computed_macs(net: QuantNet, masks: np.ndarray, shared: bool) -> int:
    """Layer MACs (per sample) to score ``masks`` in one call: each layer once per coalition, or,
    shared, once per distinct prefix of layer choices (what ``coalition_logits`` runs)."""
    macs = np.array([op.macs for op in net.graph.layers])
    if not shared:
        return int(len(masks) * macs.sum())
    choices = masks.reshape(len(masks), len(macs), -1)
    prefixes = [len(np.unique(choices[:, :d + 1].reshape(len(masks), -1), axis=0)) for d in range(len(macs))]
    return int(np.dot(prefixes, macs))


def speed_case(model: str, data_name: str, permutations: int, seed: int, args) -> dict:
    t0 = time.perf_counter()
    net, data = quick_supernet(model, data_name, seed, args.float_epochs, args.warmup_epochs)
    prep = time.perf_counter() - t0
    shapley = ShapleyConfig()
    x, y = validation_batch(data, shapley.val_samples, seed)
    value = CoalitionValue(net, x, y)
    batched, t_b, macs_b = timed_shapley(net, value, permutations, shapley.truncation, seed, batched=True)
    single, t_s, macs_s = timed_shapley(net, value, permutations, shapley.truncation, seed, batched=False)
    both = ~np.isnan(batched.mean) | ~np.isnan(single.mean)
    same_nan = np.array_equal(np.isnan(batched.mean), np.isnan(single.mean))
    diff = float(np.nanmax(np.abs(batched.mean - single.mean))) if both.any() else 0.0
    identical = bool(same_nan and np.array_equal(batched.mean[both], single.mean[both])
                     and np.array_equal(batched.count, single.count))
    row = {
        "model": model, "data": data_name, "layers": len(net.graph.layers), "players": len(net.players()),
        "val_samples": len(y), "permutations": permutations,
        "full_value": batched.full_value,
        "batched": {"coalitions": batched.n_coalitions, "calls": batched.n_calls, "seconds": t_b,
                    "coalitions_per_s": batched.n_coalitions / t_b},
        "one_at_a_time": {"coalitions": single.n_coalitions, "calls": single.n_calls, "seconds": t_s,
                          "coalitions_per_s": single.n_coalitions / t_s},
        # Work-normalised: the batched path evaluates each distinct coalition once.
        "speedup_wall": t_s / t_b,
        "speedup_per_coalition": (single.n_coalitions / t_s) and (batched.n_coalitions / t_b) / (single.n_coalitions / t_s),
        "mac_ratio": macs_s / macs_b,
        "identical": identical, "max_abs_diff": diff, "prep_seconds": prep,
    }
    print(json.dumps(row), flush=True)
    return row


def full_search(args) -> dict:
    config = SearchConfig() if args.full_config == "default" else SearchConfig.quick()
    config = replace(config, baselines=())
    data = load_dataset("synthetic-cifar", args.seed)
    source = load_model("resnet8", num_classes=data.num_classes)
    t0 = time.perf_counter()
    result = run_search(source, data, load_board("nucleo-l4r5zi"), config=config, seed=args.seed, progress=False)
    wall = time.perf_counter() - t0
    record = result.record
    out = {"config": args.full_config, "wall_s": wall, "timings": record.timings,
           "smpq_test_acc": record.methods[0].test_acc, "float_test_acc": record.float_test_acc,
           "bits": record.methods[0].bits}
    print(json.dumps(out), flush=True)
    return out


def write_results(rows: list[dict], full: dict | None, args, command: str) -> None:
    lines = [SECTION, "",
             f"Command: `{command}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
             f"(torch threads {torch.get_num_threads()}), CPU only; torch {torch.__version__}. Date: "
             f"{datetime.date.today().isoformat()}.  ",
             f"Supernets: {args.float_epochs} float epochs + {args.warmup_epochs} warm-up epoch(s), seed {args.seed}, "
             f"board nucleo-l4r5zi (w4a8/w8a8), validation batch {ShapleyConfig().val_samples} samples (or the whole "
             f"val split if smaller), truncation {ShapleyConfig().truncation}, never-empty-layer groups. Same "
             "`monte_carlo_shapley` call both ways, as one alpha update: batched = `CoalitionValue.__call__` "
             "(each call's distinct coalitions walked as a prefix tree, each layer once per distinct prefix); one "
             "at a time = `CoalitionValue.one_at_a_time` with `batched=False` (sequential walk, one forward per "
             "coalition).", "",
             "| model | players | perms | batched coalitions | batched s | batched coal/s | one-at-a-time coalitions "
             "| one-at-a-time s | one-at-a-time coal/s | wall speed-up | per-coalition speed-up | MAC ratio "
             "| identical | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, s = r["batched"], r["one_at_a_time"]
        lines.append(f"| {r['model']} ({r['data']}) | {r['players']} | {r['permutations']} | {b['coalitions']} | "
                     f"{b['seconds']:.2f} | {b['coalitions_per_s']:.1f} | {s['coalitions']} | {s['seconds']:.2f} | "
                     f"{s['coalitions_per_s']:.1f} | {r['speedup_wall']:.2f}x | {r['speedup_per_coalition']:.2f}x | "
                     f"{r['mac_ratio']:.2f}x | {'yes' if r['identical'] else 'NO'} | {r['max_abs_diff']:.3g} |")
    lines += ["", "Wall speed-up = one-at-a-time seconds / batched seconds for the same estimate (the batched path "
              "also skips duplicate coalitions); per-coalition speed-up compares coalitions per second. MAC ratio = "
              "layer MACs of the one-at-a-time evaluations / layer MACs of the batched ones (each layer once per "
              "distinct prefix of choices, per call): how much less arithmetic the batched path does. It is the "
              "most an exact evaluation can save by sharing work; the rest of a wall speed-up comes from cheaper "
              "work per layer."]
    if full is not None:
        t = full["timings"]
        lines += ["", f"Full `run_search`, resnet8 on synthetic-cifar, seed {args.seed}, "
                  f"{'default `SearchConfig()`' if full['config'] == 'default' else '**reduced** `SearchConfig.quick()` (NOT the default config)'}"
                  f" with `baselines=()`: **{full['wall_s'] / 60:.1f} min** wall on {os.cpu_count()} cores "
                  "(target for the default config: under 15 min).", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
        lines += ["", f"Float test accuracy {full['float_test_acc']:.4f}, SMPQ after finetune {full['smpq_test_acc']:.4f}."]
    elif args.full_note:
        lines += ["", args.full_note]
    write_section(SECTION, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-epochs", type=int, default=2)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--permutations", type=int, default=ShapleyConfig().permutations,
                   help="permutations per estimate (default: the search's, per alpha update)")
    p.add_argument("--skip-full", action="store_true", help="skip part (b), the full resnet8 run_search")
    p.add_argument("--full-config", choices=("default", "quick"), default="default")
    p.add_argument("--full-note", default="", help="text for RESULTS.md when --skip-full")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/search_speed.py " + " ".join(sys.argv[1:])
    rows = [speed_case(m, d, args.permutations, args.seed, args) for m, d in CASES]
    full = None if args.skip_full else full_search(args)
    if not args.no_write:
        write_results(rows, full, args, command.strip())
    if not all(r["identical"] for r in rows):
        print("WARNING: batched and one-at-a-time Shapley estimates differ", file=sys.stderr)


if __name__ == "__main__":
    main()
