"""Data sets: seeded, disjoint splits in float32 NCHW; user .npz files checked with one-line errors."""

import functools
from collections import Counter

import numpy as np
import pytest

from smpq_edge.inputs.data import BUILTIN_DATASETS, Dataset, load_dataset, load_npz
from smpq_edge.common.errors import UserError

EXPECTED_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40, 1), "synthetic-cifar": (3, 32, 32),
                   "synthetic-kws": (1, 49, 10)}


@functools.lru_cache(maxsize=None)
def builtin(name: str, seed: int) -> Dataset:
    # mnist1d is generated on the fly (seconds), so each (name, seed) is made once per session.
    return load_dataset(name, seed)


def rows(x: np.ndarray, y: np.ndarray) -> Counter:
    return Counter((xi.tobytes(), int(yi)) for xi, yi in zip(x, y))


def splits(d: Dataset):
    return [(d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)]


def test_registry_covers_the_documented_sets():
    assert set(BUILTIN_DATASETS) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_shapes_and_types(name):
    d = builtin(name, 0)
    assert d.name == name and d.input_shape == EXPECTED_SHAPES[name]
    for x, y in splits(d):
        assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == EXPECTED_SHAPES[name]
        assert y.dtype == np.int64 and y.shape == (len(x),) and len(x) > 0
        assert y.min() >= 0 and y.max() < d.num_classes
        assert np.isfinite(x).all()
    # Every class is present in training, or a classifier could not learn it.
    assert set(np.unique(d.y_train)) == set(range(d.num_classes))


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_splits_are_disjoint(name):
    seen = Counter()
    for x, y in splits(builtin(name, 0)):
        seen.update(rows(x, y))
    # No sample (image and label) occurs twice across or within the splits.
    assert max(seen.values()) == 1


def test_digits_splits_partition_the_whole_set():
    from sklearn.datasets import load_digits

    digits = load_digits()
    original = rows((digits.images / 16.0).astype(np.float32)[:, None], digits.target)
    together = Counter()
    for x, y in splits(builtin("digits", 0)):
        together.update(rows(x, y))
    assert together == original
    d = builtin("digits", 0)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1797 - 2 * 359, 359, 359)
    assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) == 0.0


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_is_seeded(name):
    again = BUILTIN_DATASETS[name](0)  # a fresh build, not the cached one
    for (x1, y1), (x2, y2) in zip(splits(builtin(name, 0)), splits(again)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = builtin(name, 1)
    assert rows(other.x_val, other.y_val) != rows(builtin(name, 0).x_val, builtin(name, 0).y_val)


def test_unknown_dataset_name():
    with pytest.raises(UserError, match=r"unknown data set 'cifar10'; built-in: digits, mnist1d"):
        load_dataset("cifar10")


# --- user .npz files ---------------------------------------------------------------------------

def save(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def labelled(n: int, shape=(1, 4, 4), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float64), np.arange(n) % classes


def test_npz_x_y_only_is_split_by_seed(tmp_path):
    x, y = labelled(50)
    path = save(tmp_path, x=x, y=y)
    d = load_dataset(str(path), seed=3)
    assert d.name == "data" and d.num_classes == 3 and d.input_shape == (1, 4, 4)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (30, 10, 10)
    assert all(xs.dtype == np.float32 and ys.dtype == np.int64 for xs, ys in splits(d))
    together = Counter()
    for xs, ys in splits(d):
        together.update(rows(xs, ys))
    assert together == rows(x.astype(np.float32), y)
    same, other = load_npz(path, seed=3), load_npz(path, seed=6)
    np.testing.assert_array_equal(same.x_val, d.x_val)
    assert not np.array_equal(other.x_val, d.x_val)


def test_npz_with_val_and_test_given_uses_them_as_is(tmp_path):
    x, y = labelled(20)
    xv, yv = labelled(10, seed=1)
    xt, yt = labelled(12, seed=2)
    d = load_npz(save(tmp_path, x=x, y=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt), seed=0)
    np.testing.assert_array_equal(d.x_train, x.astype(np.float32))
    np.testing.assert_array_equal(d.y_val, yv)
    np.testing.assert_array_equal(d.x_test, xt.astype(np.float32))


def test_npz_with_val_only_cuts_test_from_train(tmp_path):
    x, y = labelled(50)
    xv, yv = labelled(10, seed=1)
    d = load_npz(save(tmp_path, x=x, y=y, x_val=xv, y_val=yv), seed=0)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (40, 10, 10)
    np.testing.assert_array_equal(d.x_val, xv.astype(np.float32))


@pytest.mark.parametrize("shape,expected", [((40,), (1, 40, 1)), ((8, 6), (1, 8, 6)), ((3, 8, 6), (3, 8, 6))])
def test_npz_reshaped_to_nchw(tmp_path, shape, expected):
    x = np.arange(50 * int(np.prod(shape)), dtype=np.float64).reshape(50, *shape)
    d = load_npz(save(tmp_path, x=x, y=np.arange(50) % 2), seed=0)
    assert d.input_shape == expected
    # Only axes of size one are added: each sample keeps its values in their order.
    originals = {row.tobytes() for row in x.reshape(50, -1).astype(np.float32)}
    for xs, _ in splits(d):
        assert {row.tobytes() for row in xs.reshape(len(xs), -1)} <= originals


def test_npz_float_labels_holding_integers_are_accepted(tmp_path):
    x, y = labelled(50)
    d = load_npz(save(tmp_path, x=x, y=y.astype(np.float32)), seed=0)
    assert d.y_train.dtype == np.int64 and d.num_classes == 3


def _x(n=20):
    return labelled(n)[0]


def _y(n=20):
    return labelled(n)[1]


BAD_NPZ = [
    # Without y the data is an autoencoder's (tests/test_reconstruction.py), but not with y_val alone.
    ("y-val-without-y", dict(x=_x(), x_val=_x(5), y_val=_y(5)), "has y_val or y_test but no y"),
    ("missing-x", dict(y=_y()), "missing array 'x'"),
    ("nan", dict(x=np.where(np.arange(20)[:, None, None, None] == 3, np.nan, _x()), y=_y()), "NaN"),
    ("infinite", dict(x=np.full((20, 1, 4, 4), np.inf), y=_y()), "infinite"),
    ("empty", dict(x=np.zeros((0, 1, 4, 4)), y=np.zeros(0, dtype=np.int64)), "train split has no samples"),
    ("negative-label", dict(x=_x(), y=_y() - 1), "train y has negative labels (smallest -1)"),
    ("label-too-large", dict(x=_x(), y=_y() + 5000), "labels up to 5002; at most 1000 classes"),
    ("mismatched-lengths", dict(x=_x(), y=_y(19)), "train y has shape (19,); expected (20,)"),
    ("float-labels", dict(x=_x(), y=_y() + 0.5), "integer class labels"),
    ("string-x", dict(x=np.array([["a"]] * 20), y=_y()), "expected numbers"),
    ("one-dim-x", dict(x=np.zeros(20), y=_y()), "expected (N, C, H, W), (N, H, W) or (N, L)"),
    ("five-dim-x", dict(x=np.zeros((20, 1, 1, 4, 4)), y=_y()), "expected (N, C, H, W)"),
    ("two-dim-y", dict(x=_x(), y=_y()[:, None]), "train y has shape (20, 1)"),
    ("single-class", dict(x=_x(), y=np.zeros(20, dtype=np.int64)), "single class"),
    ("too-few-samples", dict(x=_x(2), y=_y(2)), "too few samples"),
    ("shapes-differ-between-splits", dict(x=_x(), y=_y(), x_val=np.zeros((5, 1, 5, 5)), y_val=_y(5)),
     "splits have different sample shapes"),
    ("val-x-without-y", dict(x=_x(), y=_y(), x_val=_x(5)), "'x_val' and 'y_val' must be given together"),
    ("bad-test-labels", dict(x=_x(), y=_y(), x_test=_x(5), y_test=-_y(5) - 1), "test y has negative labels"),
    ("object-array", None, "not a readable .npz"),
]


@pytest.mark.parametrize("arrays,expected", [pytest.param(a, e, id=i) for i, a, e in BAD_NPZ])
def test_bad_npz(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    if arrays is None:  # a pickled object array cannot be read without allow_pickle
        np.savez(path, x=np.array([object()] * 20, dtype=object), y=_y())
    else:
        np.savez(path, **arrays)
    with pytest.raises(UserError) as info:
        load_dataset(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


@pytest.mark.parametrize("content,expected", [
    (b"this is not a zip file", "not a readable .npz"),
    (b"", "not a readable .npz"),
    (b"PK\x03\x04 truncated", "not a readable .npz"),
    (None, "a single array, not an .npz archive"),
])
def test_npz_not_an_archive(tmp_path, content, expected):
    path = tmp_path / "broken.npz"
    if content is None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((20, 4)))
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_npz(path, seed=0)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and expected in message


def test_npz_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(UserError) as info:
        load_dataset(str(path))
    assert str(info.value) == f"{path}: data file not found"


# --- labels 0..K-1 and splits large enough (issue #14) ------------------------------------------

def npz_error(tmp_path, **arrays) -> str:
    path = save(tmp_path, **arrays)
    with pytest.raises(UserError) as info:
        load_npz(path, seed=0)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_labels_with_a_gap_name_the_missing_ones(tmp_path):
    y = np.arange(100) % 10
    y[y == 9] = 42
    message = npz_error(tmp_path, x=_x(100), y=y)
    assert "labels must be 0..K-1 with no gaps; labels 9..41 are missing (found 0..8, 42)" in message


def test_labels_starting_at_one(tmp_path):
    message = npz_error(tmp_path, x=_x(60), y=np.arange(60) % 3 + 1)
    assert "label 0 is missing (found 1..3)" in message


def test_class_absent_from_train_is_an_error(tmp_path):
    x, y = labelled(30, classes=2)
    xv, yv = labelled(12, seed=1)
    message = npz_error(tmp_path, x=x, y=y, x_val=xv, y_val=yv, x_test=xv, y_test=yv)
    assert "class 2 has no sample in the train split" in message


@pytest.mark.parametrize("n,classes,expected", [
    (40, 3, "too few samples: the val split has 8, needs at least 10 (max(10, number of classes))"),
    (60, 15, "the val split has 12, needs at least 15"),
])
def test_splits_too_small_name_the_minimum(tmp_path, n, classes, expected):
    x, y = labelled(n, classes=classes)
    assert expected in npz_error(tmp_path, x=x, y=y)


def test_class_absent_from_test_is_a_warning(tmp_path):
    x, y = labelled(30)
    xt, yt = labelled(12, classes=2, seed=2)
    with pytest.warns(UserWarning, match="class 2 has no sample in the test split"):
        d = load_npz(save(tmp_path, x=x, y=y, x_val=x[:12], y_val=y[:12], x_test=xt, y_test=yt), seed=0)
    assert d.num_classes == 3


# --- provenance: source_hash and preprocessing --------------------------------------------------

def test_npz_source_hash_is_the_file_sha256(tmp_path):
    import hashlib

    x, y = labelled(50)
    path = save(tmp_path, x=x, y=y)
    d = load_npz(path, seed=0)
    assert d.source_hash == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_npz(path, seed=1).source_hash == d.source_hash
    save(tmp_path, x=x + 1, y=y)
    assert load_npz(path, seed=0).source_hash != d.source_hash
    assert d.summary()["source_hash"] == d.source_hash and d.summary()["preprocessing"]["format"] == "npz"


def test_builtin_source_hash_is_name_and_seed():
    d = builtin("digits", 0)
    assert d.source_hash == "builtin:digits:seed=0" and builtin("digits", 1).source_hash != d.source_hash
    assert d.preprocessing["pixels"] == "value / 16, float32 in [0, 1]"


def test_dataset_built_the_old_way_still_works():
    x, y = np.zeros((4, 1, 2, 2), np.float32), np.arange(4)
    d = Dataset("old", x, y, x, y, x, y, 4)
    assert d.preprocessing == {} and d.source_hash == "" and d.class_names == ()
    assert d.summary()["train"] == 4
