"""The Python API (``smpq_edge.api``): the pipeline from in-memory models and arrays, with the
command line's options as keywords."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import smpq_edge
from smpq_edge.api import Options, load_inputs
from smpq_edge.common.errors import UserError


@pytest.fixture(scope="module")
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as a user holds them: (N, 64) features in 0..1 and labels."""
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


@pytest.fixture(scope="module")
def trained_mlp(digits_arrays) -> nn.Module:
    """A small MLP trained in memory, as a user's notebook would leave it."""
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in digits_arrays)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def test_build_from_a_torch_module_and_numpy_arrays(tmp_path, trained_mlp, digits_arrays):
    result = smpq_edge.build(trained_mlp, digits_arrays, board="nucleo-l412kb", out=tmp_path / "b", quick=True,
                             no_baselines=True, log=lambda line: None)
    assert list(result.policy) == [layer.name for layer in result.cost.layers] and len(result.policy) == 2
    assert set(result.policy.values()) <= {"w4a8", "w8a8"}
    accuracy = result.accuracy
    assert accuracy["float"] > 0.9, "the trained MLP is scored on the SDK's test split of the arrays"
    assert abs(accuracy["emulator"] - accuracy["shipped"]) < 0.01, "TFLM runs what the fake-quant network scored"
    assert result.cost.flash_total_bytes <= result.cost.flash_budget_bytes
    for name, path in result.paths.items():
        assert path.exists(), name
    arguments = json.loads(result.paths["build.json"].read_text())["arguments"]
    assert arguments["model"] == "<in-memory Sequential>" and arguments["quick"] is True
    # The exported model takes the user's (N, 64) rows, not the (N, 1, 64, 1) the SDK works in.
    from smpq_edge.tflite.flatbuffer import TfliteModel

    model = TfliteModel.from_file(result.paths["model.tflite"])
    assert list(model.tensor(model.inputs[0]).shape) == [1, 64]


def test_a_resumed_build_of_the_same_module_skips_every_stage(tmp_path, trained_mlp, digits_arrays):
    options = dict(out=tmp_path / "b", quick=True, no_baselines=True, log=lambda line: None)
    smpq_edge.build(trained_mlp, digits_arrays, **options)
    again = smpq_edge.build(trained_mlp, digits_arrays, resume=True, **options)
    assert all(stage.skipped for stage in again.stages.values())
    changed = nn.Sequential(*trained_mlp)
    with torch.no_grad():
        changed[0].bias.add_(0.01)
    third = smpq_edge.build(changed, digits_arrays, resume=True, **options)
    assert not third.stages["search"].skipped, "other weights are another model"


def test_unknown_option_is_one_line():
    with pytest.raises(UserError, match="unknown option 'flash_kbb'; options: .*flash_kb"):
        Options.of({"flash_kbb": 60})


@pytest.mark.parametrize("data, complaint", [
    ((np.zeros((10, 4)), np.zeros(10), np.zeros(10)), "expected \\(x, y\\) or \\(x,\\) NumPy arrays"),
    (([0.0] * 10,), "expected \\(x, y\\) or \\(x,\\) NumPy arrays"),
    ((np.zeros((40, 4), np.float32), np.zeros(40, np.int64)), "data arrays: y holds a single class"),
])
def test_bad_arrays_are_one_line(data, complaint, trained_mlp):
    with pytest.raises(UserError, match=complaint):
        load_inputs(trained_mlp, data, Options())


def test_a_model_that_is_not_a_model_is_one_line(digits_arrays):
    with pytest.raises(UserError, match="expected a torch.nn.Module, a keras.Model, a file or an example name"):
        load_inputs(object(), digits_arrays, Options())


def test_in_memory_keras_model(digits_arrays):
    """A keras.Model object goes through the same importer as a .keras file."""
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10)], name="notebook_mlp")
    inputs = load_inputs(model, digits_arrays, Options(), log=lambda line: None)
    assert inputs.source.name == "notebook_mlp" and inputs.source.content_key.startswith("sha256:")
    x = torch.from_numpy(digits_arrays[0][:5])
    expected = model(digits_arrays[0][:5]).numpy()
    got = inputs.source.module(x.reshape(5, *inputs.source.input_shape))
    np.testing.assert_allclose(got.detach().numpy().reshape(5, 10), expected, atol=1e-4)


def test_channels_last_images_meet_a_keras_model_that_scales_its_input():
    """Images held (N, H, W, C), as Keras users hold them, for a Keras CNN that starts with its
    own Rescaling: moved to (N, C, H, W), then scaled as the model would (this used to crash)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                              keras.layers.Dense(10)], name="nhwc_cnn")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (200, 8, 8, 3)).astype(np.float32), np.arange(200) % 10
    inputs = load_inputs(model, (x, y), Options(), log=lambda line: None)
    assert inputs.data.input_shape == (3, 8, 8) and "channels last" in inputs.data.preprocessing["x"]
    rows = inputs.data.x_train[:3]
    expected = model(np.transpose(rows, (0, 2, 3, 1)) * 255.0).numpy()  # the data arrives scaled by 1/255
    got = inputs.source.module(torch.from_numpy(rows)).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
