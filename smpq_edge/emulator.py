"""The emulate stage: run a ``.tflite`` in TFLM (the host build of the on-device runtime) over a
data split, and compare it with the torch fake-quant network it was exported from.

Inputs are quantised exactly as the firmware does it (NCHW -> NHWC, round(x / scale) + zero
point, clamped to int8). The split is cut into chunks that two worker processes run, each with its
own TFLM interpreter (the interpreter is single-threaded and not shareable across processes).

A model that ends in TFLM's int8 SOFTMAX is scored on those int8 probabilities, as the firmware's
self-check scores it (first index of the largest byte): softmax is monotone, but two classes can
saturate to the same byte. The fake-quant network outputs logits; the comparison puts them on the
SOFTMAX input's int8 grid and applies the same integer softmax (``smpq_edge.network.softmax``) first.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from smpq_edge.common.errors import UserError
from smpq_edge.tflite.flatbuffer import TfliteModel
from smpq_edge.common.records import EmulationRecord
from smpq_edge.network.softmax import OUTPUT_SCALE, OUTPUT_ZERO_POINT, softmax_int8, softmax_params
from smpq_edge.inputs.task import CLASSIFICATION, Task
from smpq_edge.tflite.tflm import TensorSpec, TflmRunner, quantise_input, smallest_arena

WORKERS = 2
CHUNK = 64

_runner: TflmRunner | None = None  # one per worker process


def _init_worker(model_bytes: bytes, source: str) -> None:
    global _runner
    _runner = TflmRunner(model_bytes, source=source)


def _run_chunk(batch: np.ndarray) -> np.ndarray:
    return _runner.run(batch)


def run_tflm(model_bytes: bytes, batch: np.ndarray, *, source: str = "<model>", workers: int = WORKERS,
             progress: bool = True) -> tuple[np.ndarray, float]:
    """Raw int8 outputs of TFLM for an input-ready int8 ``batch``, and the wall time it took."""
    chunks = [batch[i:i + CHUNK] for i in range(0, len(batch), CHUNK)]
    outputs: list[np.ndarray] = []
    bar = tqdm(total=len(batch), desc="TFLM", unit="inf", leave=False, disable=None if progress else True)
    started = time.perf_counter()
    if workers <= 1 or len(chunks) <= 1:
        runner = TflmRunner(model_bytes, source=source)
        for chunk in chunks:
            outputs.append(runner.run(chunk))
            bar.update(len(chunk))
    else:
        # fork, not spawn: spawn re-imports the caller's __main__, which breaks unguarded scripts.
        # The children only run numpy and TFLM, never torch, so torch's threads do not matter.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(model_bytes, source)) as pool:
            for out in pool.map(_run_chunk, chunks):
                outputs.append(out)
                bar.update(len(out))
    elapsed = time.perf_counter() - started
    bar.close()
    return np.concatenate(outputs), elapsed


def _torch_logits(net, x: np.ndarray) -> np.ndarray:
    import torch

    from smpq_edge.search.train import PREDICT_BATCH

    net.eval()
    with torch.no_grad():
        return torch.cat([net(torch.from_numpy(np.ascontiguousarray(x[i:i + PREDICT_BATCH])))
                          for i in range(0, len(x), PREDICT_BATCH)]).numpy()


def _final_softmax_input(model: TfliteModel) -> tuple[float, int] | None:
    """(scale, zero point) of the logits a final SOFTMAX reads, or None without one."""
    operators = model.operators()
    last = operators[-1] if operators else None
    if last is None or last.name != "SOFTMAX" or last.outputs[0] != model.outputs[0]:
        return None
    q = model.tensor(last.inputs[0]).quantization
    return q.scales[0], q.zero_points[0]


def _torch_outputs(net, x: np.ndarray, softmax_input: tuple[float, int] | None) -> np.ndarray:
    """The fake-quant network's outputs as the model's output: its logits, or TFLM's integer
    softmax of them (on the SOFTMAX input's grid), dequantised."""
    logits = _torch_logits(net, x).astype(np.float64)
    if softmax_input is None:
        return logits
    scale, zero_point = softmax_input
    q = np.clip(np.round(logits / scale) + zero_point, -128, 127).astype(np.int8)
    return (softmax_int8(q, softmax_params(scale)).astype(np.float64) - OUTPUT_ZERO_POINT) * OUTPUT_SCALE


def emulate(tflite_bytes: bytes, x: np.ndarray, y: np.ndarray, net=None, *, source: str = "<model>",
            workers: int = WORKERS, progress: bool = True, measure_arena: bool = True,
            task: Task = CLASSIFICATION) -> EmulationRecord:
    """On-device numbers of ``tflite_bytes`` on the split (``x`` float32 NCHW, ``y`` the labels
    ``task`` scores with: classes, or anomaly labels).

    ``net`` (a ``QuantNet`` set to the model's policy) adds the torch fake-quant comparison.
    """
    model = TfliteModel.from_bytes(tflite_bytes, source)  # one-line UserError on a bad file
    (in_index,), (out_index,) = model.inputs, model.outputs
    inp, out = model.tensor(in_index), model.tensor(out_index)
    if inp.type != "INT8" or out.type != "INT8" or inp.quantization is None or out.quantization is None:
        raise UserError(f"{source}: expected an int8 input and output, got {inp.type} and {out.type}")
    x = np.asarray(x, dtype=np.float32)
    in_spec = TensorSpec(tuple(inp.shape), np.dtype(np.int8), inp.quantization.scales[0],
                         inp.quantization.zero_points[0])
    out_scale, out_zp = out.quantization.scales[0], out.quantization.zero_points[0]
    raw, elapsed = run_tflm(tflite_bytes, quantise_input(x, in_spec, source), source=source, workers=workers,
                            progress=progress)
    outputs = (raw.reshape(len(x), -1).astype(np.float64) - out_zp) * out_scale
    predicted = task.predict(outputs)
    y = np.asarray(y)
    torch_acc = agreement = mean_delta = max_delta = None
    if net is not None:
        reference = _torch_outputs(net, x, _final_softmax_input(model))
        torch_acc = task.score(task.predict(reference), x, y)
        agreement = task.agreement(predicted, task.predict(reference))
        delta = np.abs(reference - outputs)
        mean_delta, max_delta = float(delta.mean()), float(delta.max())
    return EmulationRecord(
        samples=len(x),
        accuracy=task.score(predicted, x, y),
        torch_accuracy=torch_acc,
        label_agreement=agreement,
        mean_abs_output_delta=mean_delta,
        max_abs_output_delta=max_delta,
        arena_bytes=smallest_arena(tflite_bytes, source) if measure_arena else -1,
        model_bytes=len(tflite_bytes),
        inferences_per_second=len(x) / elapsed if elapsed > 0 else float("inf"),
        workers=workers if len(x) > CHUNK else 1,
        input_scale=float(in_spec.scale), input_zero_point=int(in_spec.zero_point),
        output_scale=float(out_scale), output_zero_point=int(out_zp),
        task=task.name, auc=task.auc(predicted, x, y),
    )
