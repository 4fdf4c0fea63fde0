"""TFLM's fixed-point arithmetic (tensorflow/lite/kernels/internal: quantization_util.cc,
common.cc), shared by the quantised network's integer paths, the op kinds' integer executors and
the softmax port."""

from __future__ import annotations

import numpy as np
import torch

INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# TFLM's int8 ADD scales both inputs by 2^20 before rescaling them (add_common.cc).
ADD_LEFT_SHIFT = 20


def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QuantizeMultiplier, vectorised over non-negative doubles: real = multiplier * 2^(shift - 31)
    with a 31-bit multiplier; multipliers below 2^-31 flush to zero."""
    real = np.asarray(real, dtype=np.float64)
    mantissa, shift = np.frexp(real)
    fixed = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)  # TfLiteRound: half away from zero
    carry = fixed == 2**31
    fixed, shift = np.where(carry, fixed // 2, fixed), shift.astype(np.int64) + carry
    flushed = (real == 0) | (shift < -31)
    return np.where(flushed, 0, fixed), np.where(flushed, 0, shift)


class Requantiser:
    """TFLM's MultiplyByQuantizedMultiplier(int32 x, multiplier, shift) per channel, in the
    double-rounding form the tflite-micro wheel runs (its single-rounding form differs at ties):
    h = SaturatingRoundingDoublingHighMul(x * 2^left, multiplier), x * multiplier / 2^31 rounded
    half up; then RoundingDivideByPOT(h, right), h / 2^right rounded half away from zero. An int32
    bias added to x first is folded in. As TFLM, assumes x * 2^left fits int32.

    Both roundings make one shift, since floor((floor(v / 2^31) + c) / 2^r) equals
    floor((v + c * 2^31) / 2^(31+r)) for integers v, c: RoundingDivideByPOT is that with
    c = 2^(r-1), less 1 where h < 0."""

    def __init__(self, multiplier: np.ndarray, shift: np.ndarray, view: tuple[int, ...] = (-1,),
                 bias: np.ndarray | None = None, device: torch.device | str = "cpu"):
        multiplier, shift = np.asarray(multiplier, np.int64), np.asarray(shift, np.int64)
        left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
        scaled = multiplier << left
        bias = np.zeros_like(scaled) if bias is None else np.asarray(bias, np.int64)
        shape = np.broadcast_shapes(scaled.shape, bias.shape)  # a per-tensor multiplier, a bias per channel

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(np.broadcast_to(a, shape))).reshape(view).to(device)

        self.multiplier = tensor(scaled)
        self.offset = tensor(bias * scaled + 2**30 + (((1 << right) >> 1) << 31))
        self.shift = tensor(31 + right)
        # h < 0 exactly when (x + bias) * multiplier < -2^30, i.e. x < this; no x (int32) where
        # the multiplier is 0 or right is 0 (no tie to move).
        moves = (scaled > 0) & (right > 0)
        self.negative_below = tensor(np.where(moves, -(2**30 // np.maximum(scaled, 1)) - bias, -(2**40)))

    @classmethod
    def of_scales(cls, real: np.ndarray, view: tuple[int, ...] = (-1,), bias: np.ndarray | None = None,
                  device: torch.device | str = "cpu") -> "Requantiser":
        """For effective scales in double, through QuantizeMultiplier."""
        return cls(*quantize_multiplier(real), view, bias, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The requantised int64 ``x`` (overwritten)."""
        minus_one_if_negative = (x - self.negative_below).bitwise_right_shift_(63)  # cheaper than torch.where
        x = x.mul_(self.multiplier).add_(self.offset).add_(minus_one_if_negative, alpha=2**31)
        return x.bitwise_right_shift_(self.shift)


class WideRequantiser:
    """TFLM's MultiplyByQuantizedMultiplier(int64 x, multiplier, shift) per channel, which the 16x8
    conv, depthwise and fully connected kernels requantise their int64 accumulators with (and
    CMSIS-NN's arm_nn_requantize_s64 with an int64 bias, the same sums): the multiplier reduced to
    16 bits, round(m / 2^16) (0x7FFF at the top), then (x * reduced + 2^(s-1)) >> s with
    s = 15 - shift. An int64 bias added to x first is folded in; |x| < 2^47 keeps it in int64."""

    def __init__(self, multiplier: np.ndarray, shift: np.ndarray, view: tuple[int, ...] = (-1,),
                 bias: np.ndarray | None = None, device: torch.device | str = "cpu"):
        multiplier, shift = np.asarray(multiplier, np.int64), np.asarray(shift, np.int64)
        reduced = np.where(multiplier < 0x7FFF0000, (multiplier + (1 << 15)) >> 16, 0x7FFF)
        total = 15 - shift
        bias = np.zeros_like(reduced) if bias is None else np.asarray(bias, np.int64)
        shape = np.broadcast_shapes(reduced.shape, bias.shape)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(np.broadcast_to(a, shape))).reshape(view).to(device)

        self.multiplier = tensor(reduced)
        self.offset = tensor(bias * reduced + (np.int64(1) << (total - 1)))
        self.shift = tensor(total)

    @classmethod
    def of_scales(cls, real: np.ndarray, view: tuple[int, ...] = (-1,), bias: np.ndarray | None = None,
                  device: torch.device | str = "cpu") -> "WideRequantiser":
        return cls(*quantize_multiplier(real), view, bias, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The requantised int64 ``x`` (overwritten)."""
        return x.mul_(self.multiplier).add_(self.offset).bitwise_right_shift_(self.shift)
