"""Turning caller buffers into flat uint8 NumPy views without copying."""

from __future__ import annotations

from typing import Any

import numpy as np

from snapguard.errors import CodecError


def as_uint8_array(obj: Any, what: str, writable: bool) -> np.ndarray:
    """A 1-D uint8 view of the bytes of ``obj``, never a copy.

    ``obj`` may be a C-contiguous NumPy array of any dtype or anything with the buffer protocol
    (bytes, bytearray, memoryview, mmap, ...). ``what`` names it in error messages, e.g.
    ``"parity chunk 1"``. Raises CodecError when the bytes are not contiguous or, with
    ``writable``, cannot be written.
    """
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise CodecError(f"{what}: array of shape {obj.shape} is not C-contiguous; pass a contiguous one")
        arr = obj.reshape(-1).view(np.uint8)
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise CodecError(
                f"{what}: {type(obj).__name__} does not expose the buffer protocol; "
                "pass a NumPy array, bytearray, memoryview or mmap"
            ) from None
        if not view.c_contiguous:
            raise CodecError(f"{what}: memoryview of shape {view.shape} is not C-contiguous; pass a contiguous one")
        arr = np.frombuffer(view, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise CodecError(f"{what}: {type(obj).__name__} is read-only, but the codec writes its output there")
    return arr


def address(arr: np.ndarray) -> int:
    """The address of the first byte of an array, for handing to C."""
    return arr.__array_interface__["data"][0]
