"""The portable backend: NumPy table lookups, for hosts where ISA-L cannot be loaded.

A product ``c * x`` over GF(2^8) is one lookup in row c of the 256 x 256 multiplication table;
coefficients 0 and 1 skip the lookup, so the XOR code (m == 1, every coefficient 1) is pure
``bitwise_xor``. Work runs in stripes so the scratch (an index array and a product array) stays
small and in cache; the scratch is allocated per call, which keeps the backend thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapguard.codec.buffers import as_uint8_array
from snapguard.codec.gf256 import mul_table

STRIPE_BYTES = 1 << 16
"""Bytes of each chunk per step; the index scratch is 8x this."""


@dataclass(frozen=True)
class NumpyTables:
    """A rows x k coding matrix and, per source column, whether any coefficient needs a lookup."""

    matrix: np.ndarray
    needs_lookup: tuple[bool, ...]


def prepare_matrix(matrix: np.ndarray) -> NumpyTables:
    """What the table-lookup backends (NumPy and torch) precompute for one coding matrix."""
    matrix = np.array(matrix, dtype=np.uint8)
    matrix.flags.writeable = False
    return NumpyTables(matrix, tuple(bool((col > 1).any()) for col in matrix.T))


class NumpyBackend:
    """Coding with NumPy on host memory; buffers are anything ``as_uint8_array`` accepts.

    The stripe loop lives here once; the torch backend subclasses this and replaces only the
    element-wise primitives (``_table``, ``_scratch``, ``_to_index``, ``_lookup``, ``_xor_into``,
    ``_copy``, ``_zero``).
    """

    name = "numpy"
    stripe_bytes = STRIPE_BYTES

    wrap = staticmethod(as_uint8_array)
    prepare = staticmethod(prepare_matrix)

    @staticmethod
    def empty(nbytes: int, like: Any) -> np.ndarray:
        """A fresh host buffer for a rebuilt chunk."""
        return np.empty(nbytes, dtype=np.uint8)

    def apply(self, prepared: NumpyTables, srcs: Sequence[Any], dsts: Sequence[Any]) -> None:
        """``dsts = M @ srcs``."""
        self._run(prepared, list(enumerate(srcs)), dsts, overwrite=True)

    def update(self, prepared: NumpyTables, index: int, src: Any, dsts: Sequence[Any]) -> None:
        """``dsts ^= M[:, index] * src``."""
        self._run(prepared, [(index, src)], dsts, overwrite=False)

    def _run(
        self, prepared: NumpyTables, sources: list[tuple[int, Any]], dsts: Sequence[Any], overwrite: bool
    ) -> None:
        """Stripe by stripe, fold every source into the outputs (which start from zero if ``overwrite``)."""
        length = len(dsts[0])
        width = min(self.stripe_bytes, length)
        lookup = any(prepared.needs_lookup[index] for index, _ in sources)
        positions, product = self._scratch(width, dsts[0]) if lookup else (None, None)
        table = self._table(dsts[0])
        columns = [(index, src, [int(c) for c in prepared.matrix[:, index]]) for index, src in sources]
        for start in range(0, length, self.stripe_bytes):
            stop = min(start + self.stripe_bytes, length)
            outs = [dst[start:stop] for dst in dsts]
            # An output still "fresh" takes its first term by copy (or lookup) rather than zero + XOR.
            fresh = [overwrite] * len(outs)
            for index, src, column in columns:
                piece = src[start:stop]
                if prepared.needs_lookup[index]:
                    idx = positions[: stop - start]
                    self._to_index(idx, piece)
                for row, (coef, out) in enumerate(zip(column, outs)):
                    if coef == 0:
                        continue
                    if coef == 1:
                        term = piece
                    else:
                        term = out if fresh[row] else product[: stop - start]
                        self._lookup(table[coef], idx, term)
                    if fresh[row]:
                        if term is not out:
                            self._copy(out, term)
                    else:
                        self._xor_into(out, term)
                    fresh[row] = False
            for out, untouched in zip(outs, fresh):
                if untouched:
                    self._zero(out)

    # Element-wise primitives, replaced by the torch backend.

    def _table(self, like: Any) -> np.ndarray:
        return mul_table()

    @staticmethod
    def _scratch(width: int, like: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(width, dtype=np.intp), np.empty(width, dtype=np.uint8)

    @staticmethod
    def _to_index(idx: np.ndarray, piece: np.ndarray) -> None:
        np.copyto(idx, piece, casting="unsafe")

    @staticmethod
    def _lookup(row: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
        np.take(row, idx, out=out)

    @staticmethod
    def _xor_into(out: np.ndarray, term: np.ndarray) -> None:
        np.bitwise_xor(out, term, out=out)

    @staticmethod
    def _copy(out: np.ndarray, term: np.ndarray) -> None:
        np.copyto(out, term)

    @staticmethod
    def _zero(out: np.ndarray) -> None:
        out.fill(0)
