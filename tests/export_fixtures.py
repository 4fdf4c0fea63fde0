"""Shared export fixtures: a small trained digits CNN converted once per test process.

Import the fixtures into a test module (``from export_fixtures import digits_int8``). The
conversion is cached at module level because pytest would otherwise build a session fixture
once per importing module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from smpq_edge.tflite import tflm
from smpq_edge.export.onnx_to_tflite import Int8Tflite, export_int8

CALIBRATION_SAMPLES = 64
TEST_SAMPLES = 300
TRAIN_EPOCHS = 15
SEED = 0


class DigitsNet(nn.Module):
    """conv 3x3 + BatchNorm, depthwise 3x3, pointwise 1x1, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.pointwise(x))
        return self.fc(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class DigitsCase:
    module: nn.Module
    export: Int8Tflite
    calibration: np.ndarray  # float32 NCHW
    x_test: np.ndarray  # float32 NCHW
    y_test: np.ndarray


def _train(x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(SEED)
    module = DigitsNet()
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    # Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine spinning
    # OpenMP threads made this loop 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(TRAIN_EPOCHS):
            for batch in torch.randperm(len(x)).split(64):
                optimiser.zero_grad()
                nn.functional.cross_entropy(module(xt[batch]), yt[batch]).backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return module.eval()


@functools.lru_cache(maxsize=None)
def digits_case() -> DigitsCase:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW in [0, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    test, train = order[:TEST_SAMPLES], order[TEST_SAMPLES:]
    module = _train(x[train], y[train])
    calibration = x[train][:CALIBRATION_SAMPLES]
    export = export_int8(module, (1, *x.shape[1:]), calibration)
    return DigitsCase(module, export, calibration, x[test], y[test])


def quantise_input(case: DigitsCase, x_nchw: np.ndarray) -> np.ndarray:
    """Float NCHW batch -> the int8 NHWC batch the .tflite takes (the product's quantiser)."""
    return tflm.quantise_input(x_nchw, tflm.TflmRunner(case.export.tflite).input)


@pytest.fixture(scope="session")
def digits_int8() -> DigitsCase:
    return digits_case()
