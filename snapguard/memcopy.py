"""Bulk copies between a process's tensors and shared-memory slots.

`stream_copy(dst, src, n)` copies with non-temporal (streaming) stores where `snapguard._stream` was built with
the package (it needs a C compiler at install time): the destination is written without first being read into
the cache, one pass over its memory instead of two, and the copy leaves training's working set in the cache.
Its loads are ordinary, so the source is in the cache right after a copy, where hashing it is cheap. Without the
extension it is `ctypes.memmove`, which gives the same bytes. Both release the GIL.
"""

from __future__ import annotations

import ctypes
from typing import Callable

try:
    from snapguard import _stream
except ImportError:  # not built: no C compiler when the package was installed
    _stream = None

stream_copy: Callable[[int, int, int], object]
if _stream is not None:
    stream_copy = _stream.copy
    STREAM_KIND = f"streaming stores ({_stream.kind()})"
else:
    stream_copy = ctypes.memmove
    STREAM_KIND = "memmove (snapguard._stream is not built: no C compiler when snapguard was installed)"


def native() -> bool:
    """Whether `stream_copy` is the extension's."""
    return _stream is not None


def address_view(address: int, nbytes: int) -> memoryview:
    """The `nbytes` bytes at `address` of this process, as a memoryview that does not own them (the caller keeps
    the tensor or mapping there alive while it uses the view)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
