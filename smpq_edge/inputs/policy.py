"""The policy file: each quantisable layer's weight bit-width (and activation width), with the
figures behind the choice.

The search writes it; export reads it. It is meant to be edited by hand: change a layer's
``weight_bits`` and run ``export`` to try a policy without searching again, or set an int8-weight
layer's ``activation_bits`` to 16 to run it with TFLM's 16x8 kernels.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from smpq_edge.common.errors import UserError
from smpq_edge.common.fileio import read_json, write_json
from smpq_edge.common.precision import WIDE, ActivationBits, Precision, WeightBits, precision_refusal
from smpq_edge.common.vocabulary import WeightedKind


class LayerChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: WeightedKind
    weight_bits: WeightBits
    activation_bits: ActivationBits = 8
    params: int = Field(ge=0)
    flash_bytes: int | None = Field(default=None, ge=0)
    cycles: int | None = Field(default=None, ge=0)
    shapley: dict[str, float] | None = None  # candidate ("w4a8") -> Shapley value

    @model_validator(mode="after")
    def _runs_on_tflm(self) -> "LayerChoice":
        reason = precision_refusal(self.weight_bits, self.activation_bits)
        if reason:
            raise ValueError(reason)
        return self


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    board: str
    model: str
    method: str = "smpq"
    layers: list[LayerChoice] = Field(min_length=1)

    @property
    def bits(self) -> dict[str, int]:
        return {layer.name: layer.weight_bits for layer in self.layers}

    @property
    def precisions(self) -> dict[str, Precision]:
        """Each layer's weight and activation bits."""
        return {layer.name: Precision(layer.weight_bits, layer.activation_bits) for layer in self.layers}

    @property
    def wide(self) -> frozenset[str]:
        """The layers with int16 activations (TFLM's 16x8 kernels)."""
        return frozenset(layer.name for layer in self.layers if layer.activation_bits == WIDE)


def load_policy(path: str | Path) -> Policy:
    raw = read_json(Path(path), "policy file")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "top level"
        raise UserError(f"{path}: {where}: {error['msg']}") from None
    names = [layer.name for layer in policy.layers]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a layer is listed twice")
    return policy


def save_policy(policy: Policy, path: Path) -> Path:
    return write_json(path, policy.model_dump(mode="json"))
