"""Torch layers the model importers build where ``torch.nn`` has none: what the tracer
(``network.graph``) keeps whole and the exporter writes as the TFLite operator it stands for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one dimension (before, after): the extra pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A Conv2d with TensorFlow's SAME padding (top, left, bottom, right), which is asymmetric for
    stride 2 on even sizes and which torch's ``padding`` cannot state. Models imported from
    TensorFlow need it to compute what the original computes; TFLite then runs it as SAME."""

    def __init__(self, *args, same_pads: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.same_pads = tuple(same_pads)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        top, left, bottom, right = self.same_pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, self.stride, 0, self.dilation, self.groups)
