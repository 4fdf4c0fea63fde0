"""ResNet-8 of MLPerf Tiny's image-classification benchmark (CIFAR-10, 32x32x3).

Same topology as the MLPerf Tiny reference (three residual stacks of 16, 32, 64 filters; a 1x1
strided convolution on the shortcut where the shape changes; 8x8 average pooling; a dense
classifier). CIFAR-10 cannot be downloaded here, so the default data is `synthetic-cifar`.
"""

import torch
from torch import nn

INPUT_SHAPE = (3, 32, 32)
DATASET = "synthetic-cifar"
PRETRAINED = False


class ResidualStack(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # The reference model's shortcut is a bare strided 1x1 convolution (no BatchNorm).
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


def build_model(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ResidualStack(16, 16, 1),
        ResidualStack(16, 32, 2),
        ResidualStack(32, 64, 2),
        nn.AvgPool2d(8),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )
