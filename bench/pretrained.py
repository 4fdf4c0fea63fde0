"""A trained model written elsewhere, as users hold it: a Keras ResNet-8 (MLPerf Tiny's
architecture) trained here in TensorFlow on the real CIFAR-10 images, on raw pixels 0..255 as
many trained models expect, saved as .keras, .h5, float .tflite and tf2onnx .onnx, then built
with the SDK from each file and the image folder itself, with ``--input-range 0..255``.

For each format: the float model, the TFLite converter's full-integer int8 with a representative
data set (what users do today), and the SDK's shipped model: accuracy on the held-out test split
(TFLM interpreter for both int8 models), model bytes, arena, the policy, and each stage's time.
Also: the same build without ``--input-range`` must stop at the sanity gate, with the hint.

    python bench/pretrained.py [--epochs 10] [--work /tmp/smpq_pretrained] [--reuse]

``--reuse`` keeps what an earlier run left in the work folder (the trained model files, finished
builds) and redoes only what is missing.

Needs ../shared/data/cifar10/train. Keras trains on the SDK's own training split of the folder
(seed 0: 30,000 images) and watches its validation split, so the SDK's builds from the folder
score on 10,000 test images neither side trained on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write_section  # noqa: E402
from smpq_edge.inputs.boards import load_board  # noqa: E402
from smpq_edge.network.cost import estimate, uniform  # noqa: E402
from smpq_edge.inputs.data import load_dataset  # noqa: E402
from smpq_edge.emulator import emulate  # noqa: E402
from smpq_edge.network.graph import trace  # noqa: E402
from smpq_edge.inputs.models import load_model  # noqa: E402
from smpq_edge.inputs.preprocess import Preprocessing  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
BOARD = "nucleo-l4r5zi"
PIXELS = Preprocessing("0..255")  # the model below is trained on raw pixels, no rescaling layer
FORMATS = (".keras", ".h5", ".tflite")

# Keras side, in a child so TensorFlow's state stays out of this process.
_TRAIN = r"""
import sys, numpy as np, tensorflow as tf, keras, tf2onnx
from keras import layers
work, epochs = sys.argv[1], int(sys.argv[2])
d = np.load(f"{work}/cifar.npz")
nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
x, y, xv, yv, xt, yt = nhwc(d["x"]), d["y"], nhwc(d["x_val"]), d["y_val"], nhwc(d["x_test"]), d["y_test"]  # 0..255
keras.utils.set_random_seed(0)
def block(x, filters, stride):
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", kernel_regularizer=keras.regularizers.l2(1e-4))(x)
    y = layers.Activation("relu")(layers.BatchNormalization()(y))
    y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same", kernel_regularizer=keras.regularizers.l2(1e-4))(y))
    if stride != 1:
        x = layers.Conv2D(filters, 1, strides=stride, padding="same", kernel_regularizer=keras.regularizers.l2(1e-4))(x)
    return layers.Activation("relu")(layers.Add()([x, y]))
inp = keras.Input((32, 32, 3))
h = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(inp)))
for filters, stride in ((16, 1), (32, 2), (64, 2)):
    h = block(h, filters, stride)
h = layers.Flatten()(layers.AveragePooling2D(pool_size=h.shape[1:3])(h))
model = keras.Model(inp, layers.Dense(10, activation="softmax")(h))
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=64, epochs=epochs, validation_data=(xv, yv), verbose=2)
print("FLOAT_TEST_ACC", model.evaluate(xt, yt, verbose=0)[1])
model.save(f"{work}/resnet8.keras")
model.save(f"{work}/resnet8.h5")
open(f"{work}/resnet8.tflite", "wb").write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
open(f"{work}/resnet8.onnx", "wb").write(proto.SerializeToString())
conv = tf.lite.TFLiteConverter.from_keras_model(model)
conv.optimizations = [tf.lite.Optimize.DEFAULT]
conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(0, 5000, 10))
conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
conv.inference_input_type = conv.inference_output_type = tf.int8
open(f"{work}/resnet8_converter_int8.tflite", "wb").write(conv.convert())
"""


def prepare_data(work: Path) -> Path:
    """The SDK's own splits of the CIFAR folder, pixels 0..255, for Keras to train on."""
    data = load_dataset(CIFAR, seed=0, channels=3, size=(32, 32), pixels=PIXELS)
    path = work / "cifar.npz"
    np.savez(path, x=data.x_train, y=data.y_train, x_val=data.x_val, y_val=data.y_val, x_test=data.x_test,
             y_test=data.y_test)
    return path


def flash_budget_kb(model_file: Path) -> float:
    """Whole-firmware flash halfway between the all-int4 and the all-int8 model (reserve added)."""
    source = load_model(model_file)
    graph = trace(source.module, source.input_shape)
    board = load_board(BOARD)
    four, eight = (estimate(graph, uniform(graph, b), board) for b in (4, 8))
    return (four.flash_total_bytes + eight.flash_total_bytes) / 2 / 1024


def build(model_file: Path, data: Path, out: Path, flash_kb: float, extra: list[str], reuse: bool) -> dict:
    started = time.perf_counter()
    if not (reuse and (out / "report.html").is_file()):
        _run_build(model_file, data, out, flash_kb, extra)
    return _read_build(out, time.perf_counter() - started)


def _command(model_file: Path, out: Path, flash_kb: float, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "smpq_edge", "build", "--model", str(model_file), "--data", str(CIFAR),
            "--board", BOARD, "--flash-kb", f"{flash_kb:.2f}", "--no-baselines", "--out", str(out), *extra]


def _run_build(model_file: Path, data: Path, out: Path, flash_kb: float, extra: list[str]) -> None:
    command = _command(model_file, out, flash_kb, ["--input-range", PIXELS.input_range, *extra])
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"build of {model_file} failed: {result.stderr.strip().splitlines()[-1:]}")
    (out / "stdout.txt").write_text(result.stdout)


def _read_build(out: Path, wall_s: float) -> dict:
    record = json.loads((out / "build.json").read_text())
    search = json.loads((out / "search.json").read_text())
    emulation = json.loads((out / "emulation.json").read_text())
    stdout = (out / "stdout.txt").read_text() if (out / "stdout.txt").is_file() else ""
    return {"wall_s": sum(v.get("seconds", 0) for v in record["stages"].values()) if wall_s < 1 else wall_s,
            "stages_s": {k: v["seconds"] for k, v in record["stages"].items() if "seconds" in v},
            "bits": next(m["bits"] for m in search["methods"] if m["method"] == search["shipped_method"]),
            "reference": search["reference"],
            "floor_check": search["floor_check"], "stage_checks": search["stage_checks"],
            "emulator_acc": emulation["accuracy"], "model_bytes": emulation["model_bytes"],
            "arena_bytes": emulation["arena_bytes"], "notes": [line for line in stdout.splitlines()
                                                              if line.startswith(("note:", "WARNING"))]}


def without_the_range(work: Path, flash_kb: float) -> dict:
    """The same build without --input-range: it must stop at the sanity gate, quickly, with the hint."""
    started = time.perf_counter()
    result = subprocess.run(_command(work / "resnet8.keras", work / "build_no_range", flash_kb, ["--ptq"]),
                            capture_output=True, text=True, cwd=ROOT)
    return {"exit": result.returncode, "seconds": time.perf_counter() - started,
            "message": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "",
            "folder_left": (work / "build_no_range").exists()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/smpq_pretrained"))
    parser.add_argument("--modes", nargs="+", default=["ptq"], choices=["ptq", "qat"])
    parser.add_argument("--reuse", action="store_true", help="keep the trained model and finished builds")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    data = args.work / "cifar.npz"
    if not (args.reuse and data.is_file()):
        prepare_data(args.work)
    timings["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    float_file = args.work / "float_test_acc.txt"
    if not (args.reuse and float_file.is_file() and (args.work / "resnet8_converter_int8.tflite").is_file()):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        trained = subprocess.run([sys.executable, "-c", _TRAIN, str(args.work), str(args.epochs)], env=env,
                                 capture_output=True, text=True)
        if trained.returncode != 0:
            raise SystemExit(trained.stderr[-3000:])
        float_file.write_text(next(line.split()[1] for line in trained.stdout.splitlines()
                                   if line.startswith("FLOAT_TEST")))
    float_acc = float(float_file.read_text())
    timings["keras_train_s"] = time.perf_counter() - t0
    split = np.load(data)
    converter = (args.work / "resnet8_converter_int8.tflite").read_bytes()
    conv = emulate(converter, split["x_test"], split["y_test"], source="converter int8", progress=False)
    budget = flash_budget_kb(args.work / "resnet8.keras")
    gate = without_the_range(args.work, budget)
    print(f"without --input-range: exit {gate['exit']} after {gate['seconds']:.1f} s: {gate['message']}", flush=True)
    runs = {}
    for mode in args.modes:
        for suffix in FORMATS:
            if mode == "qat" and suffix != ".keras":
                continue  # the same import (checked by the PTQ runs); one trained build is enough here
            out = args.work / f"build_{mode}_{suffix[1:]}"
            runs[f"{mode} {suffix}"] = build(args.work / f"resnet8{suffix}", data, out, budget,
                                             ["--ptq"] if mode == "ptq" else [], args.reuse)
            print(f"{mode} {suffix}: {runs[f'{mode} {suffix}']['emulator_acc']:.4f}", flush=True)
    (args.work / "results.json").write_text(json.dumps({"float": float_acc, "converter": conv.to_dict(),
                                                       "runs": runs, "timings": timings, "gate": gate}, indent=2))
    write_section("## A trained Keras ResNet-8 on CIFAR-10 pixels 0..255, from .keras, .h5 and .tflite (bench/pretrained.py)",
                  report(args, float_acc, conv, converter, budget, runs, timings, gate))


def report(args, float_acc, conv, converter: bytes, budget: float, runs: dict, timings: dict, gate: dict) -> str:
    rows = [f"| float (Keras) | {100 * float_acc:.2f} | – | – | – | – |",
            f"| TFLite converter, full-integer int8 | {100 * conv.accuracy:.2f} | {len(converter):,} | "
            f"{conv.arena_bytes:,} | all int8 | – |"]
    for name, run in runs.items():
        bits = " ".join(str(b) for b in run["bits"].values())
        rows.append(f"| SDK {name} | {100 * run['emulator_acc']:.2f} | {run['model_bytes']:,} | "
                    f"{run['arena_bytes']:,} | {bits} | {run['wall_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in run['stages_s'].items())}) |")
    policies = {name: tuple(run["bits"].values()) for name, run in runs.items() if name.startswith("ptq")}
    same = len(set(policies.values())) <= 1
    floors = [f"{name}: PTQ int8 (SDK) {100 * run['reference']['ptq_int8']['test_acc']:.2f} %, shipped fake-quant "
              f"{100 * run['reference']['shipped']['test_acc']:.2f} %, undone stages "
              f"{[c['stage'] for c in run['stage_checks'] if c['undone']] or 'none'}" for name, run in runs.items()]
    return (f"Command: `python bench/pretrained.py --epochs {args.epochs}` ({datetime.date.today()}, 2-core x86-64, "
            f"CPU only). Keras ResNet-8 (functional: 16/32/64 filters, stride-2 SAME convolutions, residual adds, "
            f"softmax) trained {args.epochs} epochs (Adam 1e-3, batch 64, no augmentation) on raw pixels 0..255 of the "
            f"SDK's 30,000-image training split of `../shared/data/cifar10/train` (seed 0); the builds read the "
            f"folder itself with `--input-range 0..255` and score the 10,000 test images. Board {BOARD}, "
            f"whole-firmware flash budget {budget:.1f} KB (halfway between the all-int4 and the all-int8 model plus "
            f"the board's reserve), `--no-baselines`. 'ptq' = `--ptq` (no training), 'qat' = the pretrained schedule "
            f"(distillation, lr / 20, checked stages).\n\n"
            f"Without `--input-range` the `--ptq` build from `.keras` exited {gate['exit']} after "
            f"{gate['seconds']:.1f} s, output folder left: {'yes' if gate['folder_left'] else 'no'}, saying:\n\n"
            f"    {gate['message']}\n\n"
            "| model | test accuracy % (TFLM for int8 models) | model bytes | arena B | bits per layer | wall time (stages, s) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nAll three formats give the same policy under `--ptq`: {'yes' if same else 'NO'}.\n\n"
            + "\n".join(f"- {line}" for line in floors)
            + f"\n\nData decode + cache {timings['data_s']:.0f} s; Keras training and conversions "
              f"{timings['keras_train_s']:.0f} s{' (reused from an earlier run)' if args.reuse else ''}. "
              f"Raw figures: `{args.work}/results.json` (not kept in the repo).")


if __name__ == "__main__":
    main()
