"""INT4 tensor packing as TFLM reads it (schema TensorType INT4 = 17).

The tensor is flattened row-major; element 2i sits in the low nibble of byte i and element 2i+1
in the high nibble, both two's complement. An odd count leaves the last high nibble 0.
"""

import numpy as np

INT4_MIN = -8
INT4_MAX = 7


def pack_int4(values: np.ndarray) -> bytes:
    """Pack integers in [-8, 7] two to a byte, low nibble first; raise ValueError otherwise."""
    flat = np.asarray(values).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"int4 values must be integers, got dtype {flat.dtype}")
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError(
            f"int4 values must lie in [{INT4_MIN}, {INT4_MAX}], got [{flat.min()}, {flat.max()}]"
        )
    nibbles = flat.astype(np.uint8) & 0x0F  # two's complement low 4 bits
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """Inverse of pack_int4: the first ``count`` int4 values of ``data`` as a flat int8 array."""
    needed = (count + 1) // 2
    if count < 0 or len(data) < needed:
        raise ValueError(f"{count} int4 values need {needed} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8, count=needed)
    nibbles = np.empty(2 * needed, dtype=np.uint8)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    # Sign-extend: nibbles 8..15 are -8..-1.
    values = nibbles[:count].astype(np.int8)
    values[values > INT4_MAX] -= 16
    return values
