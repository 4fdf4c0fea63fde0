"""Cost model against reality: predicted model flash and tensor arena vs the exported .tflite's
length and TFLM's smallest working arena, for every example model under three policies.

The host TFLM interpreter runs the reference kernels, so predictions are made for a board with
reference kernels (rpi-pico); the CMSIS-NN scratch model cannot be checked on the host. With
``--fit`` it also prints least-squares overhead constants for ``smpq_edge/cost.py``.

    python bench/cost_model.py            # table into bench/RESULTS.md
    python bench/cost_model.py --fit      # also suggest FlatbufferOverhead / ArenaOverhead
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import FLATBUFFER, HOST_ARENA, arena_activation_peak, estimate, tflite_layout  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.export.exporter import export_model  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.network.quant import QuantNet  # noqa: E402
from smpq_edge.tflite.tflm import smallest_arena  # noqa: E402

CASES = [("digits_dense", "digits"), ("digits_cnn", "digits"), ("mnist1d_dscnn", "mnist1d"), ("dscnn_kws", "synthetic-kws"),
         ("resnet8", "synthetic-cifar")]
SECTION = "## Cost model against reality (bench/cost_model.py)"


def measure(model_name: str, data_name: str, board) -> list[dict]:
    torch.manual_seed(0)
    data = load_dataset(data_name)
    source = load_model(model_name, num_classes=data.num_classes)
    source.module.eval()
    graph = trace(source.module, source.input_shape)
    net = QuantNet(graph, source.module, (4, 8))
    net.train()
    with torch.no_grad():  # calibrated ranges; sizes do not depend on training
        for start in range(0, 256, 64):
            net(torch.from_numpy(data.x_train[start:start + 64]))
            net.commit_observations()
    net.eval()
    policies = {
        "int8": {op.name: 8 for op in graph.layers},
        "int4": {op.name: 4 for op in graph.layers},
        "mixed": {op.name: 4 if i % 2 == 0 else 8 for i, op in enumerate(graph.layers)},
    }
    exported = export_model(net, policies["mixed"], data.x_train[:64])
    rows = []
    for policy, bits in policies.items():
        tflite = exported.tflite if policy == "mixed" else exported.variant(net, bits)
        report = estimate(graph, bits, board, host=True)
        n_ops, n_tensors, activations = tflite_layout(graph, bits)
        scratch = {layer.name: layer.scratch_bytes for layer in report.layers}
        rows.append({
            "model": model_name, "policy": policy,
            "flash_pred": report.model_flash_bytes, "flash_real": len(tflite),
            "arena_pred": report.arena_bytes, "arena_real": smallest_arena(tflite, model_name),
            "n_ops": n_ops, "n_tensors": n_tensors,
            "channels": sum(op.out_channels for op in graph.layers if op.kind != "fc"),
            "peak": arena_activation_peak(activations, scratch),
            "flash_fixed_part": report.model_flash_bytes - FLATBUFFER.fixed - FLATBUFFER.per_tensor * n_tensors
            - FLATBUFFER.per_op * n_ops,
        })
    return rows


def fit(rows: list[dict]) -> None:
    flash_x = np.array([[1, r["n_tensors"], r["n_ops"]] for r in rows], dtype=float)
    flash_y = np.array([r["flash_real"] - r["flash_fixed_part"] for r in rows], dtype=float)
    arena_x = np.array([[1, r["n_tensors"], r["n_ops"], r["channels"]] for r in rows], dtype=float)
    arena_y = np.array([r["arena_real"] - r["peak"] for r in rows], dtype=float)
    # Non-negative: every table, tensor and operator costs bytes; a negative fit would be noise.
    flash_coef = nnls(flash_x, flash_y)[0]
    arena_coef = nnls(arena_x, arena_y)[0]
    print("FlatbufferOverhead(fixed=%d, per_tensor=%d, per_op=%d)" % tuple(np.round(flash_coef)))
    # The policies here have no LUT layer: per_decode stays the hand-measured one.
    print("ArenaOverhead(fixed=%d, per_tensor=%d, per_op=%d, per_channel=%d, per_decode=%d)"
          % (*np.round(arena_coef), HOST_ARENA.per_decode))


def table(rows: list[dict]) -> str:
    lines = ["| model | policy | flash predicted | flash .tflite | error | arena predicted | arena TFLM | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flash_err = 100 * (r["flash_pred"] - r["flash_real"]) / r["flash_real"]
        arena_err = 100 * (r["arena_pred"] - r["arena_real"]) / r["arena_real"]
        lines.append(f"| {r['model']} | {r['policy']} | {r['flash_pred']:,} | {r['flash_real']:,} | {flash_err:+.1f} % "
                     f"| {r['arena_pred']:,} | {r['arena_real']:,} | {arena_err:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="print fitted overhead constants")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    board = load_board("rpi-pico")
    rows = [row for model, data in CASES for row in measure(model, data, board)]
    print(table(rows))
    if args.fit:
        fit(rows)
    if not args.no_write:
        write_section(SECTION,
            f"Command: `python bench/cost_model.py` ({datetime.date.today()}, 2-core machine). Predicted "
            "by `smpq_edge.network.cost.estimate` for a reference-kernel board (rpi-pico, as the host TFLM runs); real: "
            "`len(model.tflite)` and the smallest arena the `tflite-micro` host interpreter accepts (64-bit host: "
            "TFLM's persistent structures hold 8-byte pointers there, so a 32-bit MCU needs somewhat less). "
            "Weights are calibrated but untrained: sizes do not depend on training.\n\n" + table(rows))


if __name__ == "__main__":
    main()
