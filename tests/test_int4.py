"""INT4 packing against fixed bytes (the nibble order TFLM reads) and by round trip."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smpq_edge.export.int4 import INT4_MAX, INT4_MIN, pack_int4, unpack_int4


@pytest.mark.parametrize(
    "values, packed",
    [
        ([1, -1, 7, -8, 0], b"\xf1\x87\x00"),  # low nibble first; odd count pads a 0 high nibble
        ([-1], b"\x0f"),
        ([0, -1], b"\xf0"),
        ([-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7], bytes.fromhex("98badcfe10325476")),
        ([], b""),
    ],
)
def test_fixed_bytes(values, packed):
    assert pack_int4(np.array(values, dtype=np.int8)) == packed
    np.testing.assert_array_equal(unpack_int4(packed, len(values)), values)


def test_flattens_row_major():
    # An OHWI conv filter: the packed order is C order over (O, H, W, I).
    weights = np.arange(2 * 3 * 3 * 1, dtype=np.int8).reshape(2, 3, 3, 1) % 16 - 8
    assert pack_int4(weights) == pack_int4(weights.reshape(-1))
    assert pack_int4(weights) != pack_int4(weights.transpose(3, 1, 2, 0).reshape(-1))


@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=4, max_side=7), elements=st.integers(INT4_MIN, INT4_MAX)))
def test_round_trip(values):
    packed = pack_int4(values)
    assert len(packed) == (values.size + 1) // 2
    restored = unpack_int4(packed, values.size)
    assert restored.dtype == np.int8
    np.testing.assert_array_equal(restored.reshape(values.shape), values)


def test_accepts_wider_integer_dtypes():
    assert pack_int4(np.array([1, -1, 7, -8, 0], dtype=np.int64)) == b"\xf1\x87\x00"


@pytest.mark.parametrize("values", [[8], [-9], [0, 127], [-128]])
def test_rejects_out_of_range(values):
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array(values))


def test_rejects_non_integers():
    with pytest.raises(ValueError, match="integers"):
        pack_int4(np.array([0.5, 1.0]))


def test_unpack_rejects_short_data():
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_int4(b"\x00\x00", 5)
