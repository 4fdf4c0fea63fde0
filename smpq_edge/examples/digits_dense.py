"""A convolution and four dense layers for scikit-learn's 8x8 handwritten digits: the default
model of `smpq_edge build`, on the default board nucleo-l412kb (128 KB of flash, 32 KB of it left
for the model after the firmware's reserve).

All-int8 is 37.1 KB and does not fit; all-int4 is 20.7 KB. The first dense layer holds 16,384
weights, the next two 8,192 each: either the first or both of the others must give up int8,
and dense layers take int4 per tensor (TFLM's rule), so the choice costs accuracy one way or
the other. That is the choice the search measures and makes.
"""

from torch import nn

INPUT_SHAPE = (1, 8, 8)
DATASET = "digits"
PRETRAINED = False


def build_model(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )
