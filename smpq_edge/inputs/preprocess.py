"""How 8-bit image pixels become the numbers a model was trained on: part of the model's contract.

A model trained on pixels 0..255 that is fed pixels / 255 scores at chance, and nothing in the
data says which one it wants, so the user states it (``--input-range``, ``--mean``, ``--std``,
``--channel-order``) and every record, the report and the firmware's README repeat it. The
float value of pixel p in channel c is ``(lo + p / 255 * (hi - lo) - mean[c]) / std[c]``, with
``lo..hi`` the input range, after channels are put in ``channel_order``; the exported model's
int8 input quantisation is of that value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from smpq_edge.common.errors import UserError

INPUT_RANGES: dict[str, tuple[float, float]] = {"0..1": (0.0, 1.0), "0..255": (0.0, 255.0), "-1..1": (-1.0, 1.0)}
ChannelOrder = Literal["rgb", "bgr"]
CHANNEL_ORDERS: tuple[str, ...] = ("rgb", "bgr")
RANGE_FORMULAS = {"0..1": "p / 255", "0..255": "p", "-1..1": "p / 127.5 - 1"}


@dataclass(frozen=True)
class Preprocessing:
    input_range: str = "0..1"
    mean: tuple[float, ...] | None = None  # per channel, in the input range's units (torchvision's Normalize)
    std: tuple[float, ...] | None = None
    channel_order: ChannelOrder = "rgb"

    def __post_init__(self) -> None:
        if self.input_range not in INPUT_RANGES:
            raise UserError(f"--input-range must be one of {', '.join(INPUT_RANGES)}, not '{self.input_range}'")
        if self.channel_order not in CHANNEL_ORDERS:
            raise UserError(f"--channel-order must be rgb or bgr, not '{self.channel_order}'")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise UserError(f"--std must be positive, got {', '.join(f'{s:g}' for s in self.std)}")

    @property
    def is_default(self) -> bool:
        return self == Preprocessing()

    def per_channel(self, values: tuple[float, ...] | None, default: float, channels: int, option: str) -> np.ndarray:
        """``values`` as one float32 per channel: one value serves every channel."""
        if values is None:
            return np.full(channels, default, np.float32)
        if len(values) not in (1, channels):
            raise UserError(f"{option} gives {len(values)} values; the images have {channels} channel(s): "
                            f"give 1 or {channels}")
        return np.broadcast_to(np.asarray(values, np.float32), (channels,)).copy()

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """float32 NCHW model inputs from uint8 NCHW pixels (channels stored RGB, or grey)."""
        channels = pixels.shape[1]
        if self.channel_order == "bgr" and channels == 3:
            pixels = pixels[:, ::-1]
        lo, hi = INPUT_RANGES[self.input_range]
        mean = self.per_channel(self.mean, 0.0, channels, "--mean")[None, :, None, None]
        std = self.per_channel(self.std, 1.0, channels, "--std")[None, :, None, None]
        # A division, so that the default is exactly the pixels / 255 that earlier builds used.
        x = np.divide(pixels, np.float32(255 / (hi - lo)), dtype=np.float32) + np.float32(lo)
        return ((x - mean) / std).astype(np.float32, copy=False)

    def describe(self) -> str:
        """One line a user and a firmware author can both act on."""
        text = f"pixels p in 0..255 -> x = {RANGE_FORMULAS[self.input_range]} (range {self.input_range})"
        if self.mean is not None or self.std is not None:
            mean = ", ".join(f"{m:g}" for m in self.mean or (0.0,))
            std = ", ".join(f"{s:g}" for s in self.std or (1.0,))
            text += f", then (x - [{mean}]) / [{std}] per channel"
        return text + f", channels {self.channel_order.upper()}"

    def invert(self, x: np.ndarray) -> np.ndarray:
        """The uint8 RGB pixels ``apply`` made ``x`` from (for the sanity gate's probe)."""
        channels = x.shape[1]
        lo, hi = INPUT_RANGES[self.input_range]
        mean = self.per_channel(self.mean, 0.0, channels, "--mean")[None, :, None, None]
        std = self.per_channel(self.std, 1.0, channels, "--std")[None, :, None, None]
        pixels = np.clip(np.rint((x * std + mean - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8)
        return pixels[:, ::-1] if self.channel_order == "bgr" and channels == 3 else pixels

    def options(self) -> str:
        """The command-line options that select this preprocessing."""
        parts = [f"--input-range {self.input_range}"]
        if self.mean is not None:
            parts.append("--mean " + ",".join(f"{m:g}" for m in self.mean))
        if self.std is not None:
            parts.append("--std " + ",".join(f"{s:g}" for s in self.std))
        if self.channel_order != "rgb":
            parts.append(f"--channel-order {self.channel_order}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "formula": self.describe()}


# What trained image models commonly expect, tried in this order by the sanity gate's probe.
COMMON: tuple[Preprocessing, ...] = (
    Preprocessing("0..1"),
    Preprocessing("0..255"),
    Preprocessing("-1..1"),
    Preprocessing("0..1", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # torchvision's ImageNet
    Preprocessing("0..255", mean=(103.939, 116.779, 123.68), channel_order="bgr"),  # Keras' "caffe" mode
)


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); one line naming the option when it is not numbers."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{option}: expected numbers separated by commas (one per channel), got '{text}'") from None
    if not all(np.isfinite(values)):
        raise UserError(f"{option}: values must be finite, got '{text}'")
    return values


@dataclass(frozen=True)
class InputAffine:
    """A model's own input scaling, ``x * scale + offset``: a Keras ``Rescaling`` or
    ``Normalization`` layer, or the constant Mul/Add/Sub/Div an ONNX graph starts with.

    TFLM's int8 input is a quantisation of whatever the first layer reads, so the scaling is taken
    out of the network and applied to the data instead: the exported model then takes the scaled
    values, and its input quantisation (stated with this scaling in the firmware's README) says how
    raw values map to int8. ``scale`` and ``offset`` broadcast to one sample, channels first."""

    scale: np.ndarray
    offset: np.ndarray
    nodes: tuple[str, ...]  # the model's own names for what was taken out

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale[None] + self.offset[None]).astype(np.float32, copy=False)

    def describe(self) -> str:
        def values(a: np.ndarray) -> str:
            flat = a.reshape(-1)
            return ", ".join(f"{v:.6g}" for v in (flat[:1] if np.all(flat == flat[0]) else flat))

        return f"x * [{values(self.scale)}] + [{values(self.offset)}] (the model's own {', '.join(self.nodes)})"

    def after(self, pixels: Preprocessing) -> Preprocessing:
        """``pixels`` followed by this scaling, as one preprocessing (``invert`` stays exact):
        ((x - m) / s) * a + b = (x - (m - b s / a)) / (s / a), per channel."""
        def per_channel(a: np.ndarray) -> bool:
            return a.size == 1 or a.ndim == 3 and a.shape[1:] == (1, 1)

        if not (per_channel(self.scale) and per_channel(self.offset)) or np.any(self.scale <= 0):
            raise UserError(f"the model's input scaling {self.describe()} is not a positive scale per channel, "
                            "which image data needs")
        count = max(self.scale.size, self.offset.size, len(pixels.mean or ()), len(pixels.std or ()))

        def channels(values) -> np.ndarray:
            return np.broadcast_to(np.asarray(values, np.float64).reshape(-1), (count,))

        a, b = channels(self.scale), channels(self.offset)
        mean, std = channels(pixels.mean or (0.0,)), channels(pixels.std or (1.0,))
        return Preprocessing(pixels.input_range, tuple((mean - b * std / a).tolist()), tuple((std / a).tolist()),
                             pixels.channel_order)
