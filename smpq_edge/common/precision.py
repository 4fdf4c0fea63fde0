"""The precisions a layer can take in TFLM, named as candidates ("w4a8": 4-bit weights, int8
activations), and how each is stored and run.

- ``w8a8``: int8 weights, read by the int8 kernels.
- ``w4a8``: packed INT4 weights, read as they are by CMSIS-NN's s4 kernels (the reference kernels
  unpack them into an arena scratch buffer).
- ``w2a8``, ``w3a8``, ``w5a8``, ``w6a8``, ``w7a8``: int8 values on a b-bit grid, stored as b-bit
  indices into value tables (one per output channel, or one for the tensor) by tflite-micro's
  compression tool; TFLM's DECODE operator expands them into an int8 tensor in the arena before
  the layer's int8 kernel runs. A LUT cannot hold an INT4 tensor, so 4 bits stay packed INT4.

Activations are int8 for every search candidate. A layer may also run TFLM's 16x8 kernels
(``w8a16``: int16 activations in and out, int8 weights, int64 bias), set in the policy file
(``activation_bits: 16``); the exporter puts a QUANTIZE at each int8/int16 boundary. The search
does not choose w8a16 yet. TFLM has no int4 activations, and its 16x8 kernels take int8 weights
only.
"""

from __future__ import annotations

import re
from typing import Literal

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
LUT_BITS = (2, 3, 5, 6, 7)
PACKED_INT4 = 4
WeightBits = Literal[2, 3, 4, 5, 6, 7, 8]
ActivationBits = Literal[8, 16]
WIDE = 16  # int16 activations (TFLM's 16x8 kernels)
CANDIDATES: tuple[str, ...] = tuple(f"w{b}a8" for b in WEIGHT_BITS)
_NAME = re.compile(r"^w(\d+)a(\d+)$")
# TFLM's DECODE is a custom operator of this name: the resolver's, the profile's and (after
# "CUSTOM:") the .tflite's.
DECODE_OP = "TFLM_DECODE"


def candidate_bits(name: str) -> int:
    """The weight bits of a candidate name, or a one-line reason TFLM cannot run it (ValueError)."""
    if name in CANDIDATES:
        return int(name[1:-2])
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"'{name}' is not a candidate name (wWaA: W weight bits, A activation bits; "
                         f"known: {', '.join(CANDIDATES)})")
    weights, activations = int(match[1]), int(match[2])
    reason = precision_refusal(weights, activations) or (
        "the search does not choose int16 activations yet; set the layer's activation_bits to 16 in "
        "policy.json and run export")
    raise ValueError(f"{name}: {reason} (candidates: {', '.join(CANDIDATES)})")


def precision_refusal(weight_bits: int, activation_bits: int) -> str | None:
    """Why TFLM cannot run a layer of these weight and activation widths, or None where it can."""
    if activation_bits not in (8, WIDE):
        return f"TFLM has no {activation_bits}-bit activations (int8, or int16 with int8 weights)"
    if weight_bits not in WEIGHT_BITS:
        return f"TFLM runs weights of 2 to 8 bits, not {weight_bits}"
    if activation_bits == WIDE and weight_bits != 8:
        return (f"TFLM's 16x8 kernels take int8 weights only, not {weight_bits}-bit ones "
                f"(w{weight_bits}a16 is a hybrid model TFLM refuses)")
    return None


def is_lut(bits: int) -> bool:
    """Whether ``bits``-bit weights are stored LUT-compressed (DECODE expands them before the layer)."""
    return bits in LUT_BITS


def kernel_bits(bits: int) -> int:
    """The weight width the layer's kernel reads: 4 for packed INT4, else 8 (LUT layers are decoded to int8)."""
    return PACKED_INT4 if bits == PACKED_INT4 else 8


def lut_levels(bits: int) -> int:
    """Values in a ``bits``-bit layer's value table: the symmetric grid -(2^(b-1)-1) .. 2^(b-1)-1
    that the fake quantisation uses, one index left unused."""
    return 2 ** bits - 1


def weight_form(bits: int) -> str:
    """How a layer's weights are stored, for people: "int8", "int4", "int3 LUT"."""
    return f"int{bits} LUT" if is_lut(bits) else f"int{bits}"
