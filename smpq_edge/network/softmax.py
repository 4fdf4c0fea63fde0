"""TFLM's int8 SOFTMAX, bit for bit, in numpy (written from tensorflow/lite/kernels/internal/
reference/softmax.h, micro/kernels/softmax_common.cc and gemmlowp's fixedpoint.h).

The exporter appends this operator to a model whose source ended in a Softmax; the emulator
applies it to the fake-quant network's logits so both sides compare int8 probabilities.

Every value is an int32 held in int64 arrays. The reference kernel in outline, per row:

- Prepare: the input scale (float32, as TFLM stores it) times beta times 2^26 becomes a Q31
  multiplier and left shift (PreprocessSoftmaxScaling, 5 integer bits for the scaled difference),
  and diff_min = -floor(31 * 2^26 / 2^left_shift) (CalculateInputRadius): smaller differences
  from the row maximum give exp = 0 and output -128.
- Each difference d = x - max >= diff_min is scaled to Q5.26 (SaturatingRoundingDoublingHighMul
  of d << left_shift), exp'd to Q0.31 by gemmlowp's exp_on_negative_values, and summed in Q12.19.
- 1 / sum by GetReciprocal (Newton-Raphson in Q2.29), then each output is
  RoundingDivideByPOT(reciprocal * exp, bits) - 128, clamped to int8.

CMSIS-NN's arm_softmax_s8 (the kernel the firmware links with cmsis_nn kernels) computes the same
steps with the same rounding on cores without MVE (arm_nn_softmax_common_s8), so the firmware
gives these bytes too; the QEMU self-check of a softmax model confirms it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smpq_edge.common.errors import UserError
from smpq_edge.network.fixedpoint import quantize_multiplier

# TFLM accepts an int8 SOFTMAX only with this output quantisation (softmax_common.cc).
OUTPUT_SCALE = 1.0 / 256
OUTPUT_ZERO_POINT = -128
BETA = 1.0

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_SCALED_DIFF_INTEGER_BITS = 5  # Q5.26 input to exp
_ACCUMULATION_INTEGER_BITS = 12  # Q12.19 sum of exps
# gemmlowp's exp_on_negative_values: exp(-2^k) in Q0.31 for k = -2..4, applied per set bit.
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535),
               (3, 720401), (4, 242))


@dataclass(frozen=True)
class SoftmaxParams:
    """What TFLM's Prepare computes from the input scale and beta."""

    multiplier: int
    left_shift: int
    diff_min: int


def softmax_params(input_scale: float, beta: float = BETA) -> SoftmaxParams:
    """PreprocessSoftmaxScaling and CalculateInputRadius (double-rounding build, as the
    tflite-micro wheel and the firmware are compiled)."""
    real = min(beta * float(np.float32(input_scale)) * (1 << (31 - _SCALED_DIFF_INTEGER_BITS)), (1 << 31) - 1.0)
    if not real > 1.0:  # TFLM's QuantizeMultiplierGreaterThanOne check would abort the device
        raise UserError(f"softmax input scale {input_scale:.3g} is too small for TFLM's int8 SOFTMAX (needs > 2^-26)")
    multiplier, shift = quantize_multiplier(np.float64(real))
    left_shift = int(shift)
    radius = ((1 << _SCALED_DIFF_INTEGER_BITS) - 1) * (1 << (31 - _SCALED_DIFF_INTEGER_BITS)) / (1 << left_shift)
    return SoftmaxParams(int(multiplier), left_shift, -int(np.floor(radius)))


def _wrap(x: np.ndarray) -> np.ndarray:
    """int32 wrap-around of an int64 array (C++ int32 addition)."""
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def _high_mul(a, b) -> np.ndarray:
    """SaturatingRoundingDoublingHighMul: a * b / 2^31, ties away from zero; MIN * MIN saturates."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    product = a * b
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    quotient = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C++ division truncates
    return np.where((a == _INT32_MIN) & (b == _INT32_MIN), _INT32_MAX, quotient)


def _divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    """RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def _saturating_mul_pot(x: np.ndarray, exponent: int) -> np.ndarray:
    """SaturatingRoundingMultiplyByPOT for a positive exponent: x * 2^exponent, saturated."""
    threshold = (1 << (31 - exponent)) - 1
    return np.where(x > threshold, _INT32_MAX, np.where(x < -threshold, _INT32_MIN, x << exponent))


def _exp_on_quarter_interval(a: np.ndarray) -> np.ndarray:
    """exp(a) for a in [-1/4, 0), Q0.31: Taylor series around -1/8."""
    constant, one_third = 1895147668, 715827883  # exp(-1/8), 1/3
    x = a + (1 << 28)
    x2 = _high_mul(x, x)
    x3 = _high_mul(x2, x)
    x4 = _high_mul(x2, x2)
    tail = _divide_by_pot(_high_mul(_divide_by_pot(x4, 2) + x3, one_third) + x2, 1)
    return constant + _high_mul(constant, x + tail)


def exp_on_negative_values(a: np.ndarray) -> np.ndarray:
    """exp of Q5.26 values <= 0, in Q0.31 (gemmlowp, 5 integer bits)."""
    fractional = 31 - _SCALED_DIFF_INTEGER_BITS
    quarter = 1 << (fractional - 2)
    shifted = (a & (quarter - 1)) - quarter  # a mod 1/4, minus 1/4: in [-1/4, 0)
    result = _exp_on_quarter_interval(_saturating_mul_pot(shifted, _SCALED_DIFF_INTEGER_BITS))
    remainder = shifted - a
    for exponent, multiplier in _EXP_BARREL:
        bit = (remainder >> (fractional + exponent)) & 1
        result = np.where(bit == 1, _high_mul(result, multiplier), result)
    return np.where(a == 0, _INT32_MAX, result)


def _one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """1 / (1 + a) for a in [0, 1), Q0.31 in and out: Newton-Raphson in Q2.29."""
    total = a + _INT32_MAX
    half_denominator = np.where(total >= 0, (total + 1) // 2, -((-total + 1) // 2))  # RoundingHalfSum
    x = 1515870810 + _high_mul(half_denominator, -1010580540)  # 48/17 - 32/17 * d
    for _ in range(3):
        x = x + _saturating_mul_pot(_high_mul(x, (1 << 29) - _high_mul(half_denominator, x)), 2)
    return _saturating_mul_pot(x, 1)


def softmax_int8(x: np.ndarray, params: SoftmaxParams) -> np.ndarray:
    """TFLM's int8 SOFTMAX over the last axis of ``x`` (int8), output scale 1/256, zero point -128."""
    x = np.asarray(x).astype(np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    kept = diff >= params.diff_min
    scaled = _high_mul(np.where(kept, diff, 0) << params.left_shift, params.multiplier)
    exps = np.where(kept, exp_on_negative_values(scaled), 0)
    total = _wrap(_divide_by_pot(exps, _ACCUMULATION_INTEGER_BITS).sum(axis=-1, keepdims=True))  # Q12.19
    headroom = 32 - np.frexp(total.astype(np.float64))[1].astype(np.int64)  # CountLeadingZeros of a positive sum
    reciprocal = _one_over_one_plus_x((total << headroom) - (1 << 31))
    exponent = _ACCUMULATION_INTEGER_BITS - headroom + 31 - 8
    out = _divide_by_pot(_high_mul(reciprocal, exps), exponent) + OUTPUT_ZERO_POINT
    return np.where(kept, np.clip(out, -128, 127), -128).astype(np.int8)
