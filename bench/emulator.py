"""Emulator fidelity and speed.

Fidelity: digits_cnn and mnist1d_dscnn, briefly trained, exported under a mixed policy (every
other layer int4); TFLM accuracy vs the torch fake-quant network on the whole test split, label
agreement, mean |output difference|. Speed: ResNet-8 (mixed, calibrated weights) over 10,000
synthetic 32x32x3 inputs, one worker vs two (one TFLM interpreter per process), measured in one
run on this machine.

    python bench/emulator.py
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.emulator import emulate, run_tflm  # noqa: E402
from smpq_edge.export.exporter import export_model  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.network.quant import QuantNet  # noqa: E402
from smpq_edge.search.runner import weight_params  # noqa: E402
from smpq_edge.search.train import TrainConfig, seed_everything, train  # noqa: E402
from smpq_edge.tflite.tflm import TflmRunner, quantise_input  # noqa: E402

SPEED_SAMPLES = 10_000


def mixed_net(model_name: str, data, float_epochs: int, qat_epochs: int) -> tuple[QuantNet, dict]:
    seed_everything(0)
    source = load_model(model_name, num_classes=data.num_classes)
    if float_epochs:
        train(source.module, data, TrainConfig(epochs=float_epochs, lr=1e-2), 0, progress=False)
    source.module.eval()
    graph = trace(source.module, source.input_shape)
    bits = {op.name: 4 if i % 2 == 0 else 8 for i, op in enumerate(graph.layers)}
    net = QuantNet(graph, source.module, (4, 8))
    net.set_policy(bits)
    net.train()
    with torch.no_grad():
        for start in range(0, 512, 128):
            net(torch.from_numpy(data.x_train[start:start + 128]))
            net.commit_observations()
    if qat_epochs:
        train(net, data, TrainConfig(epochs=qat_epochs, lr=5e-4), 0, params=weight_params(net), progress=False)
    return net.eval(), bits


def fidelity_rows() -> list[str]:
    rows = []
    for model_name, data_name in (("digits_cnn", "digits"), ("mnist1d_dscnn", "mnist1d")):
        data = load_dataset(data_name, seed=0)
        net, bits = mixed_net(model_name, data, float_epochs=10, qat_epochs=2)
        exported = export_model(net, bits, data.x_train[:256])
        result = emulate(exported.tflite, data.x_test, data.y_test, net, source=model_name, progress=False)
        rows.append(f"| {model_name} | {result.samples} | {100 * result.torch_accuracy:.2f} | {100 * result.accuracy:.2f} "
                    f"| {100 * (result.accuracy - result.torch_accuracy):+.2f} | {100 * result.label_agreement:.2f} "
                    f"| {result.mean_abs_output_delta:.4f} | {result.output_scale:.4f} |")
        print(rows[-1], flush=True)
    return rows


def speed_rows() -> list[str]:
    data = load_dataset("synthetic-cifar", seed=0)
    net, bits = mixed_net("resnet8", data, float_epochs=0, qat_epochs=0)
    exported = export_model(net, bits, data.x_train[:64])
    x = np.random.default_rng(0).normal(size=(SPEED_SAMPLES, 3, 32, 32)).astype(np.float32)
    batch = quantise_input(x, TflmRunner(exported.tflite).input)
    rows, seconds = [], {}
    for workers in (1, 2):
        outputs, seconds[workers] = run_tflm(exported.tflite, batch, source="resnet8", workers=workers, progress=False)
        rows.append(f"| resnet8 (mixed) | {SPEED_SAMPLES:,} | {workers} | {seconds[workers]:.1f} "
                    f"| {SPEED_SAMPLES / seconds[workers]:.0f} |")
        print(rows[-1], flush=True)
    rows.append(f"\nTwo workers vs one: {seconds[1] / seconds[2]:.2f}x faster.")
    return rows


def main() -> None:
    fidelity = fidelity_rows()
    speed = speed_rows()
    write_section("## Emulator (bench/emulator.py)", "\n".join([
        f"Command: `python bench/emulator.py` ({datetime.date.today()}, 2-core x86-64 machine, host `tflite-micro` "
        "interpreter, reference kernels).",
        "",
        "Fidelity on the whole test split, policy: every other layer int4 (first layer int4), float 10 epochs + "
        "QAT 2 epochs. Accuracies in %; |Δ| in dequantised logits (one output step given for scale).",
        "",
        "| model | test samples | torch fake-quant | TFLM | difference | label agreement | mean abs diff | output step |",
        "|---|---|---|---|---|---|---|---|",
        *fidelity,
        "",
        f"Speed: {SPEED_SAMPLES:,} inputs (target: under 2 minutes on 2 cores).",
        "",
        "| model | inputs | workers | seconds | inferences/s |",
        "|---|---|---|---|---|",
        *speed,
    ]))


if __name__ == "__main__":
    main()
