"""The bulk backend: Intel ISA-L's erasure-code kernels called through ctypes on the caller's buffers.

ISA-L multiplies by any coding matrix over GF(2^8) with polynomial 0x11d (the field reedsolo
uses), so we hand it our own matrices from ``gf256`` instead of its native ones: ``ec_init_tables``
expands a rows x k matrix into lookup tables, ``ec_encode_data`` computes ``dst = M @ src`` and
``ec_encode_data_update`` adds one source's contribution. ctypes releases the GIL around each
call, so several threads may code different byte ranges at once.

The library is found, in this order: the system's (``ctypes.util.find_library("isal")``, then
``libisal.so.2``), then the copy bundled in the pyeclib wheel (``pyeclib.libs/libisal*.so*`` next to
the installed pyeclib package). A candidate is used only if it has every symbol we call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapguard.codec.buffers import address, as_uint8_array
from snapguard.errors import CodecError

REQUIRED_SYMBOLS = ("ec_init_tables", "ec_encode_data", "ec_encode_data_update")

STRIPE_BYTES = 1 << 20
"""Bytes of each chunk per ISA-L call: large enough that the ctypes overhead vanishes, small enough
that the pointer arithmetic never nears ISA-L's ``int`` length."""

_BUNDLED = re.compile(r"pyeclib\.libs/libisal[^/]*\.so[^/]*$")
_PTRS = ctypes.POINTER(ctypes.c_void_p)


def _candidates() -> Iterator[str]:
    """Library names or paths to try, system first, then pyeclib's bundled copy."""
    system = ctypes.util.find_library("isal")
    if system:
        yield system
    yield "libisal.so.2"
    try:
        dist = importlib.metadata.distribution("pyeclib")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if _BUNDLED.search(str(file).replace("\\", "/")):
                yield str(dist.locate_file(file))
    spec = importlib.util.find_spec("pyeclib")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(location).parent.glob("pyeclib.libs/libisal*.so*")):
            yield str(path)


@functools.cache
def load_isal() -> tuple[ctypes.CDLL, str]:
    """Load ISA-L and declare the signatures we use; returns ``(library, where it was found)``.

    Raises CodecError listing every candidate tried and why it was refused.
    """
    tried = []
    for candidate in dict.fromkeys(_candidates()):
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        missing = [name for name in REQUIRED_SYMBOLS if not hasattr(lib, name)]
        if missing:
            tried.append(f"{candidate}: lacks {', '.join(missing)}")
            continue
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.ec_init_tables.restype = None
        lib.ec_encode_data.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, _PTRS, _PTRS,
        ]
        lib.ec_encode_data.restype = None
        lib.ec_encode_data_update.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, _PTRS,
        ]
        lib.ec_encode_data_update.restype = None
        return lib, candidate
    raise CodecError(
        "Intel ISA-L not found: install libisal2 or the pyeclib wheel (which bundles it); tried "
        + ("; ".join(tried) or "nothing (no candidate paths)")
    )


@dataclass(frozen=True)
class IsalTables:
    """ISA-L's expanded tables for one rows x k coding matrix (32 bytes per coefficient)."""

    rows: int
    k: int
    tables: np.ndarray


class IsalBackend:
    """Coding with ISA-L on host memory; buffers are anything ``as_uint8_array`` accepts."""

    name = "isal"

    def __init__(self) -> None:
        self._lib, self.library = load_isal()

    wrap = staticmethod(as_uint8_array)

    @staticmethod
    def empty(nbytes: int, like: Any) -> np.ndarray:
        """A fresh host buffer for a rebuilt chunk."""
        return np.empty(nbytes, dtype=np.uint8)

    def prepare(self, matrix: np.ndarray) -> IsalTables:
        """Expand a rows x k coding matrix into ISA-L's tables."""
        rows, k = matrix.shape
        coefficients = np.ascontiguousarray(matrix, dtype=np.uint8)
        tables = np.zeros(32 * rows * k, dtype=np.uint8)
        self._lib.ec_init_tables(k, rows, address(coefficients), address(tables))
        return IsalTables(rows, k, tables)

    def apply(self, prepared: IsalTables, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray]) -> None:
        """``dsts = M @ srcs`` over all bytes, one stripe per call."""
        src_base = [address(s) for s in srcs]
        dst_base = [address(d) for d in dsts]
        length = len(srcs[0])
        src_ptrs = (ctypes.c_void_p * len(srcs))()
        dst_ptrs = (ctypes.c_void_p * len(dsts))()
        tables = address(prepared.tables)
        for start in range(0, length, STRIPE_BYTES):
            src_ptrs[:] = [a + start for a in src_base]
            dst_ptrs[:] = [a + start for a in dst_base]
            count = min(STRIPE_BYTES, length - start)
            self._lib.ec_encode_data(count, prepared.k, prepared.rows, tables, src_ptrs, dst_ptrs)

    def update(self, prepared: IsalTables, index: int, src: np.ndarray, dsts: Sequence[np.ndarray]) -> None:
        """``dsts ^= M[:, index] * src``: fold one source into partially computed outputs."""
        src_base = address(src)
        dst_base = [address(d) for d in dsts]
        dst_ptrs = (ctypes.c_void_p * len(dsts))()
        tables = address(prepared.tables)
        for start in range(0, len(src), STRIPE_BYTES):
            dst_ptrs[:] = [a + start for a in dst_base]
            count = min(STRIPE_BYTES, len(src) - start)
            self._lib.ec_encode_data_update(
                count, prepared.k, prepared.rows, index, tables, src_base + start, dst_ptrs
            )
