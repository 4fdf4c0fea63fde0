"""``Dataset``, the splits every data loader produces (``data`` for built-ins, arrays and .npz
files, ``datafolders`` for folders), and the label checks they share."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.preprocess import Preprocessing


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # How the stored samples became these numbers (pixel scaling, audio front end, split), for
    # build.json and the report: the firmware must feed the model the same numbers.
    preprocessing: dict = field(default_factory=dict)
    # Content key of what was read (a file's or folder's hash; name and seed for built-ins), so a
    # resumed build can tell that the data changed.
    source_hash: str = ""
    class_names: tuple[str, ...] = ()
    # A key of ``task.TASKS``. For "reconstruction" the y arrays are anomaly labels (0 normal,
    # 1 anomalous; all 0 where none were given), num_classes is 0 and x_train holds only normal samples.
    task: str = "classification"
    # How 8-bit pixels became x, for image data (the sanity gate's probe inverts it); None otherwise.
    pixels: Preprocessing | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, channels first: (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    @property
    def input_description(self) -> str:
        """What one input value is, in words a firmware author can reproduce from the stored samples."""
        record = self.preprocessing
        if self.pixels is not None:
            text = self.pixels.describe()
        elif "pixels" in record:
            text = f"{record['pixels']} ({self.name})"
        elif record.get("kind") == "audio":
            text = (f"{record['coefficients']} MFCC coefficients per {record['window_ms']:g} ms frame every "
                    f"{record['hop_ms']:g} ms ({record['implementation']}; the whole front end is in build.json)")
        else:
            text = f"x as stored in {self.name} (cast to float32)"
        scaling = record.get("model_input_scaling")
        if scaling:  # folded into ``pixels`` already, else a step of its own
            text += f" (this includes {scaling})" if self.pixels is not None else f", then {scaling}"
        return text

    def summary(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "task": self.task,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
            "source_hash": self.source_hash,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
            "input_description": self.input_description,
        }


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1..3, 7', so a long gap reads in one short line."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:8]) + (", ..." if len(runs) > 8 else "")


def _classes_have(labels: list[int]) -> str:
    return f"class {labels[0]} has" if len(labels) == 1 else f"classes {_ranges(labels)} have"


def min_split_size(num_classes: int) -> int:
    # Below this an accuracy is too coarse to compare policies by (one sample is > 10 points).
    return max(10, num_classes)


def check_no_gaps(source: str, labels: np.ndarray, num_classes: int) -> None:
    present = set(np.unique(labels).tolist())
    missing = sorted(set(range(num_classes)) - present)
    if missing:
        what = f"label {missing[0]} is" if len(missing) == 1 else f"labels {_ranges(missing)} are"
        raise UserError(f"{source}: labels must be 0..K-1 with no gaps; {what} missing (found {_ranges(sorted(present))})")


def check_labels(source: str, labels: tuple[np.ndarray, np.ndarray, np.ndarray], num_classes: int) -> None:
    """Labels 0..K-1 with every class in training, and val/test large enough to measure accuracy on.

    Errors where a build could not be right (a label nobody can learn, a meaningless accuracy);
    a warning where it is only weaker (a class missing from val or test)."""
    train, val, test = labels
    check_no_gaps(source, np.concatenate(labels), num_classes)
    absent = sorted(set(range(num_classes)) - set(np.unique(train).tolist()))
    if absent:
        raise UserError(f"{source}: {_classes_have(absent)} no sample in the train split, so no model "
                        f"can learn them; give more samples of them (at least 3 per class, one per split)")
    for split, y in (("val", val), ("test", test)):
        if len(y) < min_split_size(num_classes):
            raise UserError(f"{source}: too few samples: the {split} split has {len(y)}, needs at least "
                            f"{min_split_size(num_classes)} (max(10, number of classes))")
        absent = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
        if absent:
            warnings.warn(f"{source}: {_classes_have(absent)} no sample in the {split} split", stacklevel=3)
