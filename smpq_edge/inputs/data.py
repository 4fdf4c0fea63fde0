"""Data sets: built-in ones that work offline, the user's ``.npz`` files and folders of images or WAV
files (``datafolders.py``).

Every data set comes out as float32 NCHW arrays with fixed, seeded train/val/test splits, so the
search, the finetune and the emulator all see the same samples for a given seed.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from smpq_edge.common.errors import UserError
from smpq_edge.inputs.dataset import Dataset, check_labels, min_split_size
from smpq_edge.inputs.preprocess import InputAffine, Preprocessing

MAX_CLASSES = 1000


def _split(x: np.ndarray, y: np.ndarray, fractions: tuple[float, float], seed: int):
    """Seeded shuffle, then cut into (train, val, test) with the given val and test fractions."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_val, n_test = (int(round(f * len(y))) for f in fractions)
    val, test, train = np.split(order, [n_val, n_val + n_test])
    return x[train], y[train], x[val], y[val], x[test], y[test]


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    return Dataset("digits", *_split(x, digits.target.astype(np.int64), (0.2, 0.2), seed), num_classes=10)


def _mnist1d(seed: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed  # the generator's own seed, so a different seed is a different draw
    raw = make_dataset(args)
    # Sequences become (C=1, H=40, W=1) images so that TFLite sees plain 2-D convolutions.
    def as_images(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, :, None]

    x_train, y_train = as_images(raw["x"]), raw["y"].astype(np.int64)
    n_val = len(y_train) // 5
    order = np.random.default_rng(seed).permutation(len(y_train))
    val, train = order[:n_val], order[n_val:]
    return Dataset(
        "mnist1d",
        x_train[train], y_train[train], x_train[val], y_train[val],
        as_images(raw["x_test"]), raw["y_test"].astype(np.int64), num_classes=10,
    )


def _synthetic(name: str, shape: tuple[int, int, int], num_classes: int, size: int) -> Callable[[int], Dataset]:
    """Learnable stand-in data of a real model's input shape, for speed and pipeline checks only:
    each class is a fixed random pattern plus noise. No download is possible here."""

    def make(seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        patterns = rng.normal(size=(num_classes, *shape)).astype(np.float32)
        y = rng.integers(0, num_classes, size=size)
        x = 0.6 * patterns[y] + rng.normal(size=(size, *shape)).astype(np.float32)
        return Dataset(name, *_split(x.astype(np.float32), y.astype(np.int64), (0.1, 0.2), seed), num_classes=num_classes)

    return make


BUILTIN_DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "synthetic-cifar": _synthetic("synthetic-cifar", (3, 32, 32), 10, 4000),
    "synthetic-kws": _synthetic("synthetic-kws", (1, 49, 10), 12, 4000),
}


def _check_arrays(source: str, x: np.ndarray, y: np.ndarray, split: str) -> None:
    if x.ndim not in (2, 3, 4):
        raise UserError(f"{source}: {split} x has shape {x.shape}; expected (N, C, H, W), (N, H, W) or (N, L)")
    if len(x) == 0:
        raise UserError(f"{source}: {split} split has no samples")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{source}: {split} y has shape {y.shape}; expected ({len(x)},) to match x")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{source}: {split} x has dtype {x.dtype}; expected numbers")
    if not np.isfinite(x).all():
        raise UserError(f"{source}: {split} x contains NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.array_equal(y, np.round(y)):
            raise UserError(f"{source}: {split} y must hold integer class labels")
    if y.min() < 0:
        raise UserError(f"{source}: {split} y has negative labels (smallest {int(y.min())}); labels must be 0..K-1")
    if y.max() >= MAX_CLASSES:
        raise UserError(f"{source}: {split} y has labels up to {int(y.max())}; at most {MAX_CLASSES} classes "
                        f"(labels 0..{MAX_CLASSES - 1})")


def _as_nchw(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if x.ndim == 2:  # (N, L) sequences, like mnist1d
        return x[:, None, :, None]
    if x.ndim == 3:  # (N, H, W) single-channel images
        return x[:, None, :, :]
    return x


def load_npz(path: Path, seed: int) -> Dataset:
    """A user's data: ``x``, ``y`` and optionally ``x_val``/``y_val`` and ``x_test``/``y_test``.
    Missing splits are cut from ``x``/``y`` with the seed (val 20 %, test 20 %)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # np.load also reads a bare .npy array
            raise UserError(f"{path}: a single array, not an .npz archive; save with numpy.savez(path, x=..., y=...)")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None
    if "x" not in arrays:
        raise UserError(f"{path}: missing array 'x' (found: {', '.join(sorted(arrays)) or 'none'})")
    return _from_arrays(arrays, str(path), path.stem, seed, f"sha256:{file_sha256(path)}",
                        {"format": "npz", "x": "as stored, cast to float32"})


def from_arrays(data: tuple, seed: int = 0, sample_shape: tuple[int, ...] | None = None) -> Dataset:
    """In-memory data (the Python API): ``(x, y)`` with class labels, or ``(x,)`` for an
    autoencoder; split as an .npz's x and y are (val 20 %, test 20 %, seeded). Images held
    channels last (N, H, W, C), as Keras and image libraries hold them, are moved to the model's
    (C, H, W) where ``sample_shape`` (the model's input) says that is what they are."""
    if not isinstance(data, tuple) or len(data) not in (1, 2) or not all(isinstance(a, np.ndarray) for a in data):
        raise UserError("data: expected (x, y) or (x,) NumPy arrays, a file, a folder or a built-in name")
    arrays = dict(zip(("x", "y"), data))
    layout = "as given"
    if sample_shape and len(sample_shape) == 3 and arrays["x"].ndim == 4 \
            and arrays["x"].shape[1:] == (*sample_shape[1:], sample_shape[0]) != tuple(sample_shape):
        arrays["x"], layout = arrays["x"].transpose(0, 3, 1, 2), "channels last (N, H, W, C) moved to (N, C, H, W)"
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(key.encode() + str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return _from_arrays(arrays, "data arrays", "arrays", seed, f"sha256:{digest.hexdigest()}",
                        {"format": "arrays", "x": f"{layout}, cast to float32"})


def _from_arrays(arrays: dict[str, np.ndarray], source: str, name: str, seed: int, source_hash: str,
                 preprocessing: dict) -> Dataset:
    """The splits of x and y (and of any x_val/y_val, x_test/y_test given), checked; ``source``
    names the data in every error."""
    if "y" not in arrays:
        return _unlabelled(source, name, arrays, seed, source_hash, preprocessing)
    splits = {"train": ("x", "y"), "val": ("x_val", "y_val"), "test": ("x_test", "y_test")}
    for split, (xk, yk) in splits.items():
        if (xk in arrays) != (yk in arrays):
            raise UserError(f"{source}: '{xk}' and '{yk}' must be given together")
        if xk in arrays:
            _check_arrays(source, arrays[xk], arrays[yk], split)
    given = {s: (_as_nchw(arrays[xk]), arrays[yk].astype(np.int64)) for s, (xk, yk) in splits.items() if xk in arrays}
    shapes = {s: xy[0].shape[1:] for s, xy in given.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"{source}: splits have different sample shapes {shapes}")
    x, y = given["train"]
    if "val" in given and "test" in given:
        parts = (x, y, *given["val"], *given["test"])
    else:
        fractions = (0.0 if "val" in given else 0.2, 0.0 if "test" in given else 0.2)
        x_tr, y_tr, x_va, y_va, x_te, y_te = _split(x, y, fractions, seed)
        x_va, y_va = given.get("val", (x_va, y_va))
        x_te, y_te = given.get("test", (x_te, y_te))
        parts = (x_tr, y_tr, x_va, y_va, x_te, y_te)
    for split, labels in zip(("train", "val", "test"), parts[1::2]):
        if len(labels) == 0:
            raise UserError(f"{source}: too few samples to make a {split} split")
    num_classes = int(max(labels.max() for labels in parts[1::2])) + 1
    if num_classes < 2:
        raise UserError(f"{source}: y holds a single class; a classifier needs at least two")
    check_labels(source, parts[1::2], num_classes)
    return Dataset(name, *parts, num_classes=num_classes, source_hash=source_hash, preprocessing=preprocessing)


# Reconstruction data: x without class labels y, optionally with anomaly labels per split.
_UNLABELLED_SPLITS = {"train": ("x", "anomaly"), "val": ("x_val", "anomaly_val"), "test": ("x_test", "anomaly_test")}


def _unlabelled(path: str, name: str, arrays: dict[str, np.ndarray], seed: int, source_hash: str,
                preprocessing: dict) -> Dataset:
    """An ``.npz`` without ``y``: data for an autoencoder. ``anomaly`` (and ``anomaly_val``,
    ``anomaly_test``) mark samples normal (0) or anomalous (1), for the ROC AUC; missing ones count
    as normal. Training uses the normal samples of the train split only, the usual setting for
    anomaly detection: the model learns to reconstruct normal data."""
    if "y_val" in arrays or "y_test" in arrays:
        raise UserError(f"{path}: has y_val or y_test but no y; give class labels y for every split, or none")
    given = {}
    for split, (xk, ak) in _UNLABELLED_SPLITS.items():
        if xk not in arrays:
            if ak in arrays:
                raise UserError(f"{path}: '{ak}' is given without '{xk}'")
            continue
        x = arrays[xk]
        _check_arrays(path, x, np.zeros(len(x), dtype=np.int64), split)
        anomaly = arrays.get(ak, np.zeros(len(x), dtype=np.int64))
        if anomaly.shape != (len(x),):
            raise UserError(f"{path}: {ak} has shape {anomaly.shape}; expected ({len(x)},) to match {xk}")
        if not np.isin(anomaly, (0, 1)).all():
            raise UserError(f"{path}: {ak} must hold 0 (normal) or 1 (anomalous) per sample")
        given[split] = (_as_nchw(x), anomaly.astype(np.int64))
    shapes = {s: xa[0].shape[1:] for s, xa in given.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"{path}: splits have different sample shapes {shapes}")
    x, anomaly = given["train"]
    fractions = (0.0 if "val" in given else 0.2, 0.0 if "test" in given else 0.2)
    x_tr, a_tr, x_va, a_va, x_te, a_te = _split(x, anomaly, fractions, seed)
    x_va, a_va = given.get("val", (x_va, a_va))
    x_te, a_te = given.get("test", (x_te, a_te))
    normal = a_tr == 0
    for split, labels in (("train", a_tr[normal]), ("val", a_va), ("test", a_te)):
        if (labels == 0).sum() < min_split_size(0):
            raise UserError(f"{path}: too few normal samples: the {split} split has {int((labels == 0).sum())}, "
                            f"needs at least {min_split_size(0)}")
    return Dataset(name, x_tr[normal], a_tr[normal], x_va, a_va, x_te, a_te, num_classes=0,
                   source_hash=source_hash, task="reconstruction",
                   preprocessing={**preprocessing, "train": "normal samples only (anomaly == 0)"})


def with_task(data: Dataset, task: str | None) -> Dataset:
    """The data for ``task`` (``--task``); None keeps the data's own: classification where it has
    class labels, reconstruction where it has none. Class labels are ignored for reconstruction
    (every sample counts as normal, so no AUC)."""
    if task is None or task == data.task:
        return data
    if task == "classification":
        raise UserError(f"--task classification: data {data.name} has no class labels (an .npz needs an array y)")
    if task != "reconstruction":
        raise UserError(f"--task must be classification or reconstruction, not '{task}'")
    zeros = {f"y_{split}": np.zeros(len(getattr(data, f"y_{split}")), dtype=np.int64) for split in ("train", "val", "test")}
    return replace(data, **zeros, num_classes=0, class_names=(), task="reconstruction")


def with_input_affine(data: Dataset, affine: InputAffine | None) -> Dataset:
    """The data as a model that starts with its own input scaling reads it, once that scaling is
    taken out of the model (``ModelSource.input_affine``): every split scaled, and the scaling
    recorded with the rest of the preprocessing (for image data folded into ``pixels``, so the
    sanity gate's probe and the firmware's README see one preprocessing)."""
    if affine is None:
        return data
    scaled = {f"x_{split}": affine.apply(getattr(data, f"x_{split}")) for split in ("train", "val", "test")}
    pixels = affine.after(data.pixels) if data.pixels is not None else None
    record = {**data.preprocessing, "model_input_scaling": affine.describe()}
    return replace(data, **scaled, pixels=pixels, preprocessing=record)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _with_origin(data: Dataset, name: str, seed: int) -> Dataset:
    """Built-ins are generated from name and seed, so those two are their content key."""
    preprocessing = {"builtin": name, "seed": seed}
    if name == "digits":
        preprocessing["pixels"] = "value / 16, float32 in [0, 1]"
    return replace(data, source_hash=f"builtin:{name}:seed={seed}", preprocessing=preprocessing)


def check_data_argument(name_or_path: str | Path) -> None:
    """``load_dataset``'s one-line error for data that is neither built in nor there, without
    reading anything (so the CLI says it before the heavy imports)."""
    text = str(name_or_path)
    if text in BUILTIN_DATASETS or Path(text).exists():
        return
    if text.endswith(".npz"):
        raise UserError(f"{text}: data file not found")
    raise UserError(f"unknown data set '{text}'; built-in: {', '.join(BUILTIN_DATASETS)} "
                    f"(or give an .npz file or a folder of images or WAV files)")


def load_dataset(name_or_path: str | Path, seed: int = 0, *, channels: int | None = None,
                 size: tuple[int, int] | None = None, resize: bool = False, name_pattern: str | None = None,
                 split_by: str = "sample", front_end=None, pixels: Preprocessing = Preprocessing()) -> Dataset:
    """A built-in data set by name (``digits``, ``mnist1d``, ...), an ``.npz`` file, or a folder of
    images or WAV files (see ``datafolders.load_folder`` for the folder options). ``pixels`` turns
    an image folder's pixels into model inputs; other data is fed as stored."""
    text = str(name_or_path)
    if not pixels.is_default and not Path(text).is_dir():
        raise UserError(f"{pixels.options()} applies to a folder of images; data '{text}' is fed as stored "
                        "(scale an .npz's x before saving it)")
    if split_by not in ("sample", "group"):
        raise UserError(f"split_by must be 'sample' or 'group', not '{split_by}'")
    if split_by == "group" and not Path(text).is_dir():
        raise UserError(f"{text}: a group split needs a folder whose file names carry the group "
                        f"(name_pattern with {{group}})")
    if text in BUILTIN_DATASETS:
        return _with_origin(BUILTIN_DATASETS[text](seed), text, seed)
    if Path(text).is_dir():
        from smpq_edge.inputs.datafolders import AudioFrontEnd, ImageOptions, load_folder

        return load_folder(Path(text), seed, image=ImageOptions(channels, size, resize),
                           front_end=front_end or AudioFrontEnd(), name_pattern=name_pattern, split_by=split_by,
                           pixels=pixels)
    if text.endswith(".npz") or Path(text).exists():
        return load_npz(Path(text), seed)
    raise UserError(f"unknown data set '{text}'; built-in: {', '.join(BUILTIN_DATASETS)} "
                    f"(or give an .npz file or a folder of images or WAV files)")
