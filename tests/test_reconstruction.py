"""Task kind "reconstruction": a dense autoencoder on 2-D (N, F) data built end to end, scored by
MSE (the coalition value is minus the MSE) and by the ROC AUC of its per-sample error against
anomaly labels; data without class labels selects the task; one-line errors for what cannot be."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from smpq_edge.inputs.boards import load_board
from smpq_edge.cli import main
from smpq_edge.inputs.data import load_dataset, with_task
from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models import load_model
from smpq_edge.search.runner import SearchConfig, run_search
from smpq_edge.search.smpq import score
from smpq_edge.search.train import TrainConfig, seed_everything, train
from smpq_edge.inputs.task import CLASSIFICATION, RECONSTRUCTION, task_of
from smpq_edge.tflite.tflm import TflmRunner, quantise_input

FEATURES = 32

AUTOENCODER = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 32, 1)


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 32))

    def forward(self, x):
        return self.decoder(self.encoder(torch.flatten(x, 1)))


def build_model():
    return AutoEncoder()
'''


def _manifold_data(path, seed: int = 0) -> None:
    """Normal samples lie near a 3-dimensional subspace of R^32 (noise 0.05); anomalies are
    isotropic with the same expected norm, so only a model that learned the subspace tells them
    apart: a reconstruction no better than zero gives both an error of about 1 per value."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(3, FEATURES)) / np.sqrt(3)

    def normal(n: int) -> np.ndarray:
        return (rng.normal(size=(n, 3)) @ basis + 0.05 * rng.normal(size=(n, FEATURES))).astype(np.float32)

    def anomalous(n: int) -> np.ndarray:
        return rng.normal(size=(n, FEATURES)).astype(np.float32)

    x = np.concatenate([normal(1500), anomalous(100)])
    anomaly = np.r_[np.zeros(1500), np.ones(100)].astype(np.int64)
    x_test = np.concatenate([normal(150), anomalous(50)])
    anomaly_test = np.r_[np.zeros(150), np.ones(50)].astype(np.int64)
    np.savez(path, x=x, anomaly=anomaly, x_test=x_test, anomaly_test=anomaly_test)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ae")
    (folder / "ae.py").write_text(AUTOENCODER)
    _manifold_data(folder / "ae.npz")
    return folder


@pytest.fixture(scope="module")
def built(files):
    """One quick build, baselines included (HAWQ and DMPQ train and score with the task's loss)."""
    out = files / "build"
    torch.set_num_threads(1)
    assert main(["build", "--model", str(files / "ae.py"), "--data", str(files / "ae.npz"), "--quick",
                 "--out", str(out)]) == 0
    return out


def test_unlabelled_npz_is_reconstruction_data_trained_on_normal_samples(files):
    data = load_dataset(files / "ae.npz", seed=0)
    assert data.task == "reconstruction" and task_of(data) is RECONSTRUCTION and data.num_classes == 0
    assert (data.y_train == 0).all(), "training uses the normal samples only"
    assert len(data.y_train) + (data.y_val == 0).sum() == 1500  # the anomalous 100 of x dropped from train
    assert (data.y_val == 1).sum() > 0 and (data.y_test == 1).sum() == 50


def test_build_reports_mse_and_auc(built, capsys):
    from smpq_edge.cli import _print_build_summary

    search = json.loads((built / "search.json").read_text())
    emulation = json.loads((built / "emulation.json").read_text())
    assert search["task"] == emulation["task"] == "reconstruction"
    assert search["shapley"]["value"] == "neg_mse", "the value the table was scored by, not the configured one"
    for name in ("float", "ptq_int8", "shipped"):
        assert search["reference"][name]["test_acc"] < 0, "scores are minus the MSE"
    # The data guarantee: zero reconstruction gives about 1 per value for either kind; a model that
    # learned the 3-dimensional subspace gets far below that on the normal samples only.
    assert -emulation["accuracy"] < 0.3
    assert emulation["auc"] > 0.9 and search["reference"]["shipped"]["test_auc"] > 0.9
    assert {m["method"] for m in search["methods"]} == {"smpq", "dmpq", "hawq", "uniform8", "uniform4"}
    _print_build_summary(built)
    out = capsys.readouterr().out
    assert "test MSE" in out and "test MSE to float" in out and "test ROC AUC (anomalies)" in out
    assert "accuracy" not in out
    markdown = (built / "report.md").read_text()
    assert "## Reconstruction error" in markdown and "test ROC AUC" in markdown
    assert "accuracy" not in markdown.replace("accuracy_vs_flash.png", "")


def test_emulated_score_is_minus_the_mse_of_the_tflm_outputs(built, files):
    """Recomputed here from the .tflite on the TFLM interpreter, normal test samples only."""
    data = load_dataset(files / "ae.npz", seed=0)
    runner = TflmRunner((built / "model.tflite").read_bytes())
    raw = runner.run(quantise_input(data.x_test, runner.input, "model.tflite")).reshape(len(data.x_test), -1)
    out = (raw.astype(np.float64) - runner.output.zero_point) * runner.output.scale
    normal = data.y_test == 0
    mse = ((out[normal] - data.x_test[normal].reshape(normal.sum(), -1)) ** 2).mean()
    emulation = json.loads((built / "emulation.json").read_text())
    assert emulation["accuracy"] == pytest.approx(-mse, rel=1e-9)
    assert emulation["label_agreement"] == pytest.approx(0.0, abs=1e-9), "TFLM = the fake-quant network"


def test_firmware_of_the_dense_autoencoder_checks_outputs_without_labels(built):
    vectors = (built / "firmware" / "test_vectors.cc").read_text()
    labels = vectors.split("g_test_labels")[1].split("};")[0]
    assert set(labels.split("=", 1)[1].replace("{", "").replace(",", " ").split()) == {"-1"}
    assert "SMPQ_TEST_OUTPUT_SIZE" in vectors


def test_a_trained_autoencoder_keeps_its_floor_and_a_wrecking_stage_is_undone(files):
    """The pretrained schedule distils to the float model's reconstruction; Adam at a learning
    rate of 1 wrecks it, and the guard, comparing MSE, undoes every stage."""
    data = load_dataset(files / "ae.npz", seed=0)
    seed_everything(0)
    source = load_model(files / "ae.py")
    train(source.module, data, TrainConfig(epochs=8, lr=1e-2), seed=0, progress=False)
    wreck = TrainConfig(epochs=1, lr=1.0, distill=1.0)
    config = replace(SearchConfig.quick().for_pretrained(), warmup=wreck, search=wreck, finetune=wreck, baselines=())
    trained = replace(source, module=copy.deepcopy(source.module), pretrained=True)
    record = run_search(trained, data, load_board("nucleo-l4r5zi"), config=config, seed=0, progress=False,
                        log=lambda _: None).record.model_dump(mode="json")
    assert record["task"] == "reconstruction"
    for check in record["stage_checks"]:
        assert check["undone"] and check["val_acc_after"] < check["val_acc_before"] - check["standard_error"]
    floor = record["floor_check"]
    assert not floor["below_floor"] and floor["floor_val_acc"] < 0
    reference = record["reference"]
    # Calibration-only int8 of a trained autoencoder stays close to float; undone stages keep it.
    assert -reference["ptq_int8"]["test_acc"] < 2 * -reference["float"]["test_acc"]
    assert reference["shipped"]["test_auc"] > 0.9


def test_coalition_value_is_minus_the_mse():
    outputs = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # 2 coalitions, 2 samples
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert score(outputs, target, "neg_mse").tolist() == [-(1 + 4 + 1 + 1) / 4, -(1 + 1) / 4]


def test_reconstruction_scores_normal_samples_and_auc_ranks_errors():
    x = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    predicted = np.zeros_like(x)
    y = np.array([0, 0, 1, 1])
    assert RECONSTRUCTION.per_sample(predicted, x, y).tolist() == [0.0, -1.0]
    assert RECONSTRUCTION.auc(predicted, x, y) == 0.625  # errors 0, 1 (normal) vs 0, 4 (anomalous)
    assert RECONSTRUCTION.auc(predicted, x, np.zeros(4, dtype=int)) is None
    assert RECONSTRUCTION.show(-0.01234) == "0.01234" and CLASSIFICATION.show(0.975) == "97.50 %"


def test_task_option_and_its_errors(files, capsys):
    digits = load_dataset("digits", seed=0)
    as_autoencoder = with_task(digits, "reconstruction")
    assert as_autoencoder.task == "reconstruction" and (as_autoencoder.y_test == 0).all()
    with pytest.raises(UserError, match="has no class labels"):
        with_task(load_dataset(files / "ae.npz", seed=0), "classification")
    # The default digits CNN has 10 outputs, not its input's 64 values.
    assert main(["search", "--task", "reconstruction", "--quick", "--out", str(files / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has 10 outputs but data digits has 64 values per sample" in err
    assert main(["search", "--model", "digits_cnn", "--data", str(files / "ae.npz"), "--out", str(files / "y")]) == 2
    captured = capsys.readouterr()
    assert "note: task reconstruction: data ae has no class labels y" in captured.out


@pytest.mark.parametrize("arrays, expected", [
    ({"x": np.zeros((40, 4)), "anomaly": np.full(40, 0.5)}, "anomaly must hold 0 \\(normal\\) or 1"),
    ({"x": np.zeros((40, 4)), "anomaly": np.zeros(39)}, r"anomaly has shape \(39,\); expected \(40,\)"),
    ({"x": np.zeros((40, 4)), "anomaly_test": np.zeros(40)}, "'anomaly_test' is given without 'x_test'"),
    ({"x": np.zeros((40, 4)), "y_val": np.zeros(40)}, "has y_val or y_test but no y"),
    ({"x": np.zeros((40, 4)), "anomaly": np.r_[np.zeros(5), np.ones(35)]}, "too few normal samples"),
])
def test_bad_reconstruction_npz(tmp_path, arrays, expected):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=expected):
        load_dataset(path, seed=0)
