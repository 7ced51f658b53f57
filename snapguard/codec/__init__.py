"""Erasure coding of shards: systematic Reed-Solomon over GF(2^8), plain XOR when m == 1.

The code is the one ``reedsolo`` defines (see ``gf256``): byte j of the k data chunks is a message
of k symbols, and byte j of the m parity chunks is what ``reedsolo.RSCodec(m)`` appends to it.
With m == 1 that is the XOR of the data chunks. Any m erased chunks, data or parity, can be
rebuilt from any k survivors; more is refused with a CodecError naming the chunks.

Chunks are numbered 0..k+m-1: data chunks first (0..k-1), then parity chunks (k..k+m-1).

The bytes are computed by a backend; all give identical bytes:

- ``isal``: Intel ISA-L through ctypes (the system's libisal, else the copy in the pyeclib wheel);
  over 20 GB/s per core on the dev VM (bench/ec.py). ``auto`` picks it when it loads.
- ``numpy``: table lookups in NumPy, the portable fallback (about 1 GB/s; XOR-only codes far more).
- ``torch``: the same lookups on uint8 tensors, for shards that live on a GPU.

Buffers are the caller's: the codec writes parity and rebuilt chunks in place and allocates nothing
large. Chunks are NumPy arrays or anything with the buffer protocol (bytearray, memoryview, an mmap
of shared memory); the torch backend also takes tensors. Since every byte position is coded on its
own, a caller may stream: code bytes ``[a, b)`` of every chunk, then the next range, through the
same methods. ``accumulate`` also lets parity be built one data chunk at a time as chunks arrive.

A Codec is immutable apart from a cache of decode tables; it may be shared between threads, and
the ISA-L backend releases the GIL while it works. Outputs must not overlap inputs.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from snapguard.codec.backend_isal import IsalBackend, load_isal
from snapguard.codec.backend_numpy import NumpyBackend
from snapguard.codec.chunks import CHUNK_ALIGN, ShardChunks
from snapguard.codec.gf256 import MAX_CODEWORD, decode_matrix, generator_matrix
from snapguard.errors import CodecError

__all__ = ["CHUNK_ALIGN", "Codec", "CodecError", "ShardChunks", "backends"]

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("isal", "numpy", "torch")

_DECODE_CACHE_SIZE = 256
"""Decode tables kept per Codec, one per (survivors, targets) pattern; cleared when full."""


def backends() -> tuple[str, ...]:
    """The backends that can run on this host, in ``BACKEND_NAMES`` order."""
    available = []
    try:
        load_isal()
        available.append("isal")
    except CodecError:
        pass
    available.append("numpy")
    if importlib.util.find_spec("torch") is not None:
        available.append("torch")
    return tuple(available)


def _make_backend(name: str) -> Any:
    if name == "auto":
        try:
            return IsalBackend()
        except CodecError as exc:
            logger.warning("ISA-L unavailable, erasure coding falls back to the slow NumPy backend: %s", exc)
            return NumpyBackend()
    if name == "isal":
        return IsalBackend()
    if name == "numpy":
        return NumpyBackend()
    if name == "torch":
        from snapguard.codec.backend_torch import TorchBackend

        return TorchBackend()
    raise CodecError(f"unknown codec backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}")


def _check_size(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CodecError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Codec:
    """A (k, m) erasure code bound to one backend.

    ``Codec(k, m, backend="auto")``: k data chunks, m parity chunks, ``k + m <= 255``; backend is
    ``"auto"`` (ISA-L if it loads, else NumPy), ``"isal"``, ``"numpy"`` or ``"torch"``. Asking for
    ``"isal"`` where it cannot load raises CodecError rather than quietly running slower.
    """

    def __init__(self, k: int, m: int, backend: str = "auto") -> None:
        self._k = _check_size("k (data chunks)", k, 1)
        self._m = _check_size("m (parity chunks)", m, 1)
        if k + m > MAX_CODEWORD:
            raise CodecError(f"k + m must be at most {MAX_CODEWORD} over GF(2^8), got k={k}, m={m}")
        self._backend = _make_backend(backend)
        self._encode_tables = self._backend.prepare(generator_matrix(k, m)[k:])
        self._decode_tables: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}
        # encode tables of some parity rows, for accumulate; all rows in order are the encode tables
        self._row_tables: dict[tuple[int, ...], Any] = {tuple(range(m)): self._encode_tables}

    @property
    def k(self) -> int:
        """Data chunks per codeword."""
        return self._k

    @property
    def m(self) -> int:
        """Parity chunks per codeword: how many erasures can be rebuilt."""
        return self._m

    @property
    def n(self) -> int:
        """Chunks per codeword, k + m."""
        return self._k + self._m

    @property
    def backend(self) -> str:
        """Name of the backend doing the work: ``isal``, ``numpy`` or ``torch``."""
        return self._backend.name

    def __repr__(self) -> str:
        return f"Codec(k={self._k}, m={self._m}, backend={self.backend!r})"

    def encode(self, data: Sequence[Any], parity: Sequence[Any]) -> None:
        """Write the parity of ``data`` (k chunks) into ``parity`` (m writable chunks), all one length."""
        srcs = self._wrap_list(data, self._k, "data", writable=False)
        dsts = self._wrap_list(parity, self._m, "parity", writable=True)
        if self._common_length(srcs + dsts):
            self._backend.apply(self._encode_tables, [b for _, b in srcs], [b for _, b in dsts])

    def accumulate(self, index: int, chunk: Any, parity: Sequence[Any], rows: Sequence[int] | None = None) -> None:
        """Fold data chunk ``index`` into ``parity``: ``parity ^= (its share of the parity)``.

        Start from zeroed parity buffers; once each of the k data chunks has been folded in once,
        in any order, ``parity`` holds exactly what ``encode`` writes. Lets a parity holder code
        chunks as they arrive from different nodes, without holding all k at once. ``rows`` picks
        which parity chunks ``parity`` holds (default: all m, in order): a node that keeps one parity
        chunk of a codeword computes only that one.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._k:
            raise CodecError(f"data chunk index must be in 0..{self._k - 1}, got {index!r}")
        rows = tuple(range(self._m)) if rows is None else tuple(rows)
        if not rows or len(set(rows)) != len(rows) or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r < self._m for r in rows):
            raise CodecError(f"parity rows must be distinct ints in 0..{self._m - 1}, got {list(rows)!r}")
        tables = self._row_tables.get(rows)
        if tables is None:
            matrix = generator_matrix(self._k, self._m)[self._k:]
            tables = self._row_tables[rows] = self._backend.prepare(matrix[list(rows)])
        src = (f"data chunk {index}", self._backend.wrap(chunk, f"data chunk {index}", False))
        if len(parity) != len(rows):
            raise CodecError(f"expected {len(rows)} parity chunks (rows {list(rows)}), got {len(parity)}")
        dsts = [(f"parity chunk {r}", self._backend.wrap(b, f"parity chunk {r}", True)) for r, b in zip(rows, parity)]
        if self._common_length([src] + dsts):
            self._backend.update(tables, index, src[1], [b for _, b in dsts])

    def decode(self, chunks: Sequence[Any | None], out: Mapping[int, Any] | None = None) -> dict[int, Any]:
        """Rebuild erased chunks from the survivors.

        ``chunks`` has k + m entries in chunk order, ``None`` for each erased one. Rebuilds into
        ``out`` (chunk number -> writable buffer of the chunks' length; only erased chunks, and any
        subset of them, e.g. just the data) or, without ``out``, into new buffers for every erased
        chunk. Returns ``{chunk number: buffer}`` for what was rebuilt. More than m erasures raise
        CodecError naming them.
        """
        if len(chunks) != self.n:
            raise CodecError(
                f"decode needs {self.n} entries (k={self._k} data, m={self._m} parity; None if erased), "
                f"got {len(chunks)}"
            )
        erased = [i for i, chunk in enumerate(chunks) if chunk is None]
        if len(erased) > self._m:
            raise CodecError(
                f"cannot rebuild {len(erased)} erased chunks ({self._describe(erased)}): "
                f"a k={self._k}, m={self._m} code rebuilds at most {self._m}"
            )
        survivors = tuple(i for i, chunk in enumerate(chunks) if chunk is not None)[: self._k]
        srcs = [(self._name(i), self._backend.wrap(chunks[i], self._name(i), False)) for i in survivors]
        targets = tuple(sorted(out)) if out is not None else tuple(erased)
        for target in targets:
            if target not in erased:
                raise CodecError(
                    f"out names chunk {target!r}, which is not erased; only erased chunks "
                    f"({self._describe(erased) or 'none'}) can be rebuilt"
                )
        if not targets:
            return {}
        if out is None:
            length = len(srcs[0][1])
            rebuilt = {t: self._backend.empty(length, srcs[0][1]) for t in targets}
            dsts = [(self._name(t), rebuilt[t]) for t in targets]
        else:
            rebuilt = {t: out[t] for t in targets}
            dsts = [(self._name(t), self._backend.wrap(out[t], self._name(t), True)) for t in targets]
        if self._common_length(srcs + dsts):
            self._backend.apply(self._decoder(survivors, targets), [b for _, b in srcs], [b for _, b in dsts])
        return rebuilt

    def _decoder(self, survivors: tuple[int, ...], targets: tuple[int, ...]) -> Any:
        key = (survivors, targets)
        tables = self._decode_tables.get(key)
        if tables is None:
            tables = self._backend.prepare(decode_matrix(self._k, self._m, survivors, targets))
            if len(self._decode_tables) >= _DECODE_CACHE_SIZE:
                self._decode_tables.clear()
            self._decode_tables[key] = tables
        return tables

    def _name(self, index: int) -> str:
        return f"data chunk {index}" if index < self._k else f"parity chunk {index - self._k} (chunk {index})"

    def _describe(self, indices: Sequence[int]) -> str:
        return ", ".join(self._name(i) for i in indices)

    def _wrap_list(
        self, buffers: Sequence[Any], count: int, kind: str, writable: bool
    ) -> list[tuple[str, Any]]:
        if len(buffers) != count:
            expected = f"k={self._k}" if kind == "data" else f"m={self._m}"
            raise CodecError(f"expected {expected} {kind} chunks, got {len(buffers)}")
        names = [f"{kind} chunk {i}" for i in range(count)]
        return [(name, self._backend.wrap(b, name, writable)) for name, b in zip(names, buffers)]

    @staticmethod
    def _common_length(named: Sequence[tuple[str, Any]]) -> int:
        """Check every buffer has the first one's length and lives on its device; return that length."""
        first_name, first = named[0]
        length, device = len(first), str(getattr(first, "device", "cpu"))
        for name, buf in named[1:]:
            if len(buf) != length:
                raise CodecError(
                    f"{name} holds {len(buf)} bytes but {first_name} holds {length}; all chunks must have one length"
                )
            if str(getattr(buf, "device", "cpu")) != device:
                raise CodecError(
                    f"{name} is on {buf.device} but {first_name} is on {device}; all chunks must share a device"
                )
        return length
