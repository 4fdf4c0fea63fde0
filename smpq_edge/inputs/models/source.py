"""``ModelSource``: a model as every importer hands it on, a torch module with what the file
said about it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from smpq_edge.common.errors import UserError

if TYPE_CHECKING:  # torch is imported where a model is built, so that a bad argument fails fast
    from torch import nn

    from smpq_edge.inputs.preprocess import InputAffine


@dataclass
class ModelSource:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    default_data: str | None
    pretrained: bool
    origin: str  # the file it was read from
    notes: tuple[str, ...] = ()  # what the import changed, for the user (e.g. a dropped final Softmax)
    # The model ended in a Softmax over its classes. It is kept out of ``module`` so that search and
    # training see logits (cross-entropy wants them); the exporter appends TFLM's int8 SOFTMAX.
    output_softmax: bool = False
    # One sample's input shape as the model file declares it, where that is not ``input_shape``'s
    # (C, H, W): (F,) for an (N, F) input. The exported model takes it this way.
    file_input_shape: tuple[int, ...] | None = None
    # The model's own input scaling (a Keras Rescaling or Normalization), taken out of ``module``:
    # the data is scaled instead (``data.with_input_affine``), so TFLM's int8 input covers it.
    input_affine: InputAffine | None = None
    # What a resumed build compares for a model that is no file (``from_module``): its weights' hash.
    content_key: str = ""

    def as_logits(self) -> ModelSource:
        """The model without its final Softmax (``--logits``), with the one-line notice."""
        if not self.output_softmax:
            return self
        note = "final Softmax dropped (--logits): the model outputs logits (same top-1 class)"
        return replace(self, output_softmax=False, notes=(*self.notes, note))

    def check_input(self, shape: tuple[int, ...], data_name: str) -> None:
        """One line naming both shapes, before tracing runs into torch's own shape error."""
        if tuple(shape) != tuple(self.input_shape):
            raise UserError(f"model {self.name} expects input {tuple(self.input_shape)}, data {data_name} has "
                            f"{tuple(shape)}")
