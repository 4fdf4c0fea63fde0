"""The precisions a layer can take in TFLM, named as candidates ("w4a8": 4-bit weights, int8
activations), and how each is stored and run.

- ``w8a8``: int8 weights, read by the int8 kernels.
- ``w4a8``: packed INT4 weights, read as they are by CMSIS-NN's s4 kernels (the reference kernels
  unpack them into an arena scratch buffer).
- ``w2a8``, ``w3a8``, ``w5a8``, ``w6a8``, ``w7a8``: int8 values on a b-bit grid, stored as b-bit
  indices into value tables (one per output channel, or one for the tensor) by tflite-micro's
  compression tool; TFLM's DECODE operator expands them into an int8 tensor in the arena before
  the layer's int8 kernel runs. A LUT cannot hold an INT4 tensor, so 4 bits stay packed INT4.

- ``w8a16``: int8 weights, int16 activations in and out, int64 bias: TFLM's 16x8 kernels. The
  exporter puts a QUANTIZE at each int8/int16 boundary. A search candidate like the others, or set
  by hand in the policy file (``activation_bits: 16``).

TFLM has no int4 activations, and its 16x8 kernels take int8 weights only.

The search keys a layer's choices by ``Precision`` (weight bits, activation bits); the stages after
it (cost model, exporter) take the weight bits per layer and the set of int16-activation layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
LUT_BITS = (2, 3, 5, 6, 7)
PACKED_INT4 = 4
WeightBits = Literal[2, 3, 4, 5, 6, 7, 8]
ActivationBits = Literal[8, 16]
WIDE = 16  # int16 activations (TFLM's 16x8 kernels)
CANDIDATES: tuple[str, ...] = tuple(f"w{b}a8" for b in WEIGHT_BITS)  # the int8-activation ones
INT16_CANDIDATES: tuple[str, ...] = ("w8a16",)
_NAME = re.compile(r"^w(\d+)a(\d+)$")
# TFLM's DECODE is a custom operator of this name: the resolver's, the profile's and (after
# "CUSTOM:") the .tflite's.
DECODE_OP = "TFLM_DECODE"


@dataclass(frozen=True, order=True)
class Precision:
    """A layer's candidate: weight bits and activation bits. Ordered by weight bits, then
    activation bits (w2a8 < ... < w8a8 < w8a16): narrow to wide, as the search's priors read it."""

    weights: int
    activations: int = 8

    @property
    def name(self) -> str:
        return f"w{self.weights}a{self.activations}"

    @property
    def wide(self) -> bool:
        """Whether the layer runs TFLM's 16x8 kernels (int16 activations)."""
        return self.activations == WIDE

    @classmethod
    def of(cls, choice: int | Precision) -> Precision:
        """``choice`` itself, or for weight bits ``b`` the int8-activation candidate w{b}a8."""
        return choice if isinstance(choice, Precision) else cls(int(choice))

    @classmethod
    def parse(cls, name: str) -> Precision:
        """The candidate a name gives, or a one-line reason TFLM cannot run it (ValueError)."""
        known = ", ".join(CANDIDATES + INT16_CANDIDATES)
        match = _NAME.match(name)
        if not match:
            raise ValueError(f"'{name}' is not a candidate name (wWaA: W weight bits, A activation bits; "
                             f"known: {known})")
        weights, activations = int(match[1]), int(match[2])
        reason = precision_refusal(weights, activations)
        if reason:
            raise ValueError(f"{name}: {reason} (candidates: {known})")
        return cls(weights, activations)


def floor_precision(candidates: Iterable[Precision]) -> Precision:
    """The search's reference and floor: the widest weights with int8 activations (w8a8 where it
    is a candidate). The floor stays the int8 model a user expects, not the int16 one."""
    return max(c for c in candidates if not c.wide)


def weight_bits_of(policy: Mapping[str, Precision]) -> dict[str, int]:
    """A policy's weight bits per layer, as the cost model and the exporter take them."""
    return {name: c.weights for name, c in policy.items()}


def policy_text(policy: Mapping[str, Precision]) -> str:
    """Per layer, in order, its weight bits ("8 4 8"); an int16-activation layer as "8a16"."""
    return " ".join(f"{c.weights}a{c.activations}" if c.wide else str(c.weights) for c in policy.values())


def wide_layers(policy: Mapping[str, Precision]) -> frozenset[str]:
    """A policy's int16-activation layers."""
    return frozenset(name for name, c in policy.items() if c.wide)


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
