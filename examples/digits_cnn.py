"""A small CNN for scikit-learn's 8x8 handwritten digits: the default model of `smpq_edge build`.

A model file for smpq_edge defines `build_model()` returning a torch.nn.Module, `INPUT_SHAPE`
(channels, height, width) and, optionally, `DATASET` (the data it is meant for) and
`PRETRAINED = True` when `build_model()` loads trained weights (otherwise the build trains it).
"""

from torch import nn

INPUT_SHAPE = (1, 8, 8)
DATASET = "digits"
PRETRAINED = False


def build_model(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, bias=False),  # pointwise
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )
