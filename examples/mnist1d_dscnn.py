"""A 1-D depthwise-separable CNN (keyword-spotting style) for mnist1d, 8 quantisable layers.

The 40-sample sequences are (1, 40, 1) images, so every convolution is a plain 2-D one with a
(k, 1) kernel, which TFLite runs as CONV_2D / DEPTHWISE_CONV_2D. Eight layers with two
candidates each give 256 policies: small enough to enumerate as an oracle for the search.
"""

from torch import nn

INPUT_SHAPE = (1, 40, 1)
DATASET = "mnist1d"
PRETRAINED = False


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, (kernel, 1), stride=(stride, 1), padding=(kernel // 2, 0), groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def build_model(num_classes: int = 10) -> nn.Module:
    width = 32
    layers = _conv_bn_relu(1, width, 5, stride=2)
    for _ in range(3):
        layers += _conv_bn_relu(width, width, 3, groups=width)  # depthwise
        layers += _conv_bn_relu(width, width, 1)  # pointwise
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
