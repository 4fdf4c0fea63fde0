"""Input preprocessing is the user's to state and is kept everywhere: a trained model fed other
numbers than it was trained on stops before any search, with the options and a working guess."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smpq_edge.cli import main
from smpq_edge.inputs.data import load_dataset
from smpq_edge.common.errors import UserError
from smpq_edge.inputs.models import load_model
from smpq_edge.inputs.preprocess import COMMON, InputAffine, Preprocessing
from smpq_edge.search.guard import check_trained
from smpq_edge.search.train import TrainConfig, seed_everything, train

MODEL_FILE = '''
from pathlib import Path

import torch

from smpq_edge.examples.digits_cnn import build_model as _digits_cnn

INPUT_SHAPE = (1, 8, 8)
PRETRAINED = True


def build_model(num_classes=10):
    model = _digits_cnn(10)
    model.load_state_dict(torch.load(Path(__file__).with_suffix(".pt"), weights_only=True))
    return model
'''


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SMPQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits_pixels(tmp_path_factory) -> Path:
    """scikit-learn's digits as a folder of 8-bit PNGs, one subfolder per class (60 per class)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit_pngs")
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir()
        for i, index in enumerate(np.flatnonzero(digits.target == label)[:60]):
            pixels = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_for_0_255(digits_pixels, tmp_path_factory) -> Path:
    """A model file whose trained weights expect pixels 0..255, as many trained models do."""
    folder = tmp_path_factory.mktemp("model")
    data = load_dataset(digits_pixels, seed=0, pixels=Preprocessing("0..255"))
    seed_everything(0)
    module = load_model("digits_cnn", num_classes=10).module
    train(module, data, TrainConfig(epochs=10, lr=1e-2), seed=0, progress=False)
    torch.save(module.state_dict(), folder / "pixels255.pt")
    (folder / "pixels255.py").write_text(MODEL_FILE, encoding="utf-8")
    return folder / "pixels255.py"


def test_each_common_preprocessing_inverts_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4)).astype(np.uint8)
    for preprocessing in COMMON:
        x = preprocessing.apply(pixels)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(preprocessing.invert(x), pixels)


def test_the_default_is_pixels_over_255_and_the_options_compose():
    pixels = np.array([0, 51, 255], np.uint8).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(Preprocessing().apply(pixels).ravel(), np.float32([0, 51, 255]) / np.float32(255))
    np.testing.assert_allclose(Preprocessing("-1..1").apply(pixels).ravel(), [-1, 51 / 127.5 - 1, 1], atol=1e-6)
    bgr = Preprocessing("0..255", mean=(1, 2, 3), std=(2,), channel_order="bgr").apply(pixels).ravel()
    np.testing.assert_allclose(bgr, [(255 - 1) / 2, (51 - 2) / 2, (0 - 3) / 2])
    text = Preprocessing("0..1", mean=(0.5,), std=(0.25,)).describe()
    assert text == "pixels p in 0..255 -> x = p / 255 (range 0..1), then (x - [0.5]) / [0.25] per channel, channels RGB"


@pytest.mark.parametrize("args,expected", [
    (["--mean", "0.5,x"], "--mean: expected numbers separated by commas"),
    (["--std", "0"], "--std must be positive"),
    (["--mean", "0.1,0.2,0.3"], "--mean gives 3 values; the images have 1 channel(s)"),
])
def test_bad_preprocessing_options_are_one_line(digits_pixels, model_for_0_255, tmp_path, capsys, args, expected):
    code = main(["search", "--ptq", "--model", str(model_for_0_255), "--data", str(digits_pixels),
                 "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_preprocessing_of_non_image_data_is_refused():
    with pytest.raises(UserError, match="--input-range 0..255 applies to a folder of images; data 'digits'"):
        load_dataset("digits", pixels=Preprocessing("0..255"))


def test_a_model_at_chance_stops_with_the_working_range(digits_pixels, model_for_0_255, tmp_path, capsys):
    code = main(["search", "--ptq", "--quick", "--model", str(model_for_0_255), "--data", str(digits_pixels),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "no better than chance" in err and "pixels p in 0..255 -> x = p / 255 (range 0..1)" in err
    assert "with --input-range 0..255 it scores" in err and "--allow-chance-accuracy" in err
    assert not (tmp_path / "o").exists()


def test_the_stated_range_passes_the_gate(digits_pixels, model_for_0_255):
    source = load_model(model_for_0_255)
    data = load_dataset(digits_pixels, seed=0, pixels=Preprocessing("0..255"))
    check = check_trained(source, data, allow=False)
    assert not check.at_chance and check.accuracy > 0.5  # chance is 0.1
    assert data.preprocessing["input"]["input_range"] == "0..255"


def test_allowed_at_chance_goes_on_loudly_and_records_the_preprocessing(digits_pixels, model_for_0_255, tmp_path,
                                                                       capsys):
    out = tmp_path / "o"
    code = main(["search", "--ptq", "--quick", "--no-baselines", "--allow-chance-accuracy", "--model",
                 str(model_for_0_255), "--data", str(digits_pixels), "--out", str(out)])
    assert code == 0
    assert "WARNING: model pixels255 scores" in capsys.readouterr().out
    data = json.loads((out / "search.json").read_text())["data"]
    assert data["preprocessing"]["input"]["input_range"] == "0..1"
    assert data["input_description"].startswith("pixels p in 0..255 -> x = p / 255")


def test_a_models_own_input_scaling_composes_with_the_preprocessing():
    """((x - m) / s) * a + b as one preprocessing: the same numbers, and its pixels invert exactly."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4)).astype(np.uint8)
    affine = InputAffine(np.float32([0.5, 2, 4]).reshape(3, 1, 1), np.float32([-1, 0, 0.25]).reshape(3, 1, 1),
                         ("normalization",))
    for pre in (Preprocessing(), Preprocessing("0..255", mean=(1, 2, 3), std=(2,), channel_order="bgr")):
        composed = affine.after(pre)
        np.testing.assert_allclose(composed.apply(pixels), affine.apply(pre.apply(pixels)), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(composed.invert(composed.apply(pixels)), pixels)
    with pytest.raises(UserError, match="not a positive scale per channel"):
        InputAffine(np.float32([-1]).reshape(1, 1, 1), np.zeros((1, 1, 1), np.float32), ("mul",)).after(Preprocessing())


class _ScalesItsInput(torch.nn.Module):
    """The 0..255 digits model behind its own ``x * 255``: it takes pixels / 255, the default range."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x * 255.0)


def test_a_model_that_scales_its_own_input_builds_at_the_range_it_takes(digits_pixels, model_for_0_255, tmp_path):
    """The leading Mul is taken out of the network (TFLM has no int8 op for it, and the int8 input
    quantises whatever the first layer reads), the data is scaled instead, the sanity gate passes at
    the default range, and the records say what the exported model's input is."""
    path = tmp_path / "scaled.onnx"
    torch.onnx.export(_ScalesItsInput(load_model(model_for_0_255).module.eval()), torch.zeros(1, 1, 8, 8),
                      str(path), dynamo=False)
    source = load_model(path)
    assert source.input_affine is not None and float(source.input_affine.scale.reshape(-1)[0]) == 255
    out = tmp_path / "o"
    assert main(["search", "--ptq", "--quick", "--no-baselines", "--model", str(path), "--data", str(digits_pixels),
                 "--out", str(out)]) == 0
    record = json.loads((out / "search.json").read_text())["data"]
    assert record["input_description"].startswith("pixels p in 0..255 -> x = p / 255 (range 0..1), then (x - [0]) / [0.00392157]")
    assert "(this includes x * [255] + [0] (the model's own " in record["input_description"]
