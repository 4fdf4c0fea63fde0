"""A convolution and four dense layers for scikit-learn's 8x8 handwritten digits: the default
model of `smpq_edge build`, on the default board nucleo-l412kb (128 KB of flash, 16 KB of it left
for the model after the firmware's reserve).

All-int8 is 19.9 KB and does not fit; all-int4 is 12.0 KB. The first dense layer holds 7,680
weights, the next two 3,840 each: either the first or both of the others must give up int8,
and dense layers take int4 per tensor (TFLM's rule), so the choice costs accuracy one way or
the other. That is the choice the search measures and makes.
"""

from torch import nn

INPUT_SHAPE = (1, 8, 8)
DATASET = "digits"
PRETRAINED = False


def build_model(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(192, 40),
        nn.ReLU(),
        nn.Linear(40, 96),
        nn.ReLU(),
        nn.Linear(96, 40),
        nn.ReLU(),
        nn.Linear(40, num_classes),
    )
