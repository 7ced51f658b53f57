"""Splitting a shard of any length into k equal data chunks, and putting rebuilt chunks back.

Padding rule: the chunk length is ``ceil(nbytes / k)`` rounded up to a multiple of 64 bytes
(``CHUNK_ALIGN``). Chunk i holds shard bytes ``[i * chunk_len, (i + 1) * chunk_len)``; whatever lies
past the end of the shard reads as zero bytes. So the last chunks may be partly or wholly padding,
the total padding is ``k * chunk_len - nbytes`` (always less than ``64 * k`` bytes), and
the parity of a shard does not depend on how much memory sits behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from snapguard.codec.buffers import address, as_uint8_array
from snapguard.errors import CodecError

CHUNK_ALIGN = 64
"""Every chunk length is a multiple of this many bytes (a cache line, and what SIMD kernels like)."""


@dataclass(frozen=True)
class ShardChunks:
    """How a shard of ``nbytes`` bytes maps onto ``k`` data chunks of ``chunk_len`` bytes each."""

    nbytes: int
    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise CodecError(f"a shard splits into k >= 1 chunks, got k={self.k!r}")
        if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int) or self.nbytes < 0:
            raise CodecError(f"shard length must be an int >= 0, got {self.nbytes!r}")

    @property
    def chunk_len(self) -> int:
        """``ceil(nbytes / k)`` rounded up to a multiple of CHUNK_ALIGN (0 for an empty shard)."""
        per_chunk = -(-self.nbytes // self.k)
        return -(-per_chunk // CHUNK_ALIGN) * CHUNK_ALIGN

    @property
    def padding(self) -> int:
        """Zero bytes appended to the shard to fill k chunks."""
        return self.k * self.chunk_len - self.nbytes

    @property
    def whole_chunks(self) -> int:
        """How many leading chunks lie entirely inside the shard (those are views, never copies)."""
        return self.k if self.chunk_len == 0 else min(self.k, self.nbytes // self.chunk_len)

    @property
    def scratch_len(self) -> int:
        """Bytes of scratch ``split`` needs for the chunks that reach past the end of the shard."""
        return (self.k - self.whole_chunks) * self.chunk_len

    def span(self, index: int) -> tuple[int, int]:
        """The shard bytes ``[start, stop)`` that chunk ``index`` carries; the rest of it is padding."""
        if not 0 <= index < self.k:
            raise CodecError(f"chunk index {index} out of range for k={self.k}")
        start = min(index * self.chunk_len, self.nbytes)
        return start, min(start + self.chunk_len, self.nbytes)

    def split(self, shard: Any, scratch: Any = None) -> list[np.ndarray]:
        """The k data chunks of ``shard`` as uint8 arrays.

        Whole chunks are views into ``shard``. Chunks that reach past its end are copied into
        ``scratch`` (at least ``scratch_len`` writable bytes, e.g. a reused buffer) and zero padded;
        without ``scratch`` a buffer of that size is allocated.
        """
        data = self._check_shard(shard, writable=False)
        if scratch is None:
            tail = np.empty(self.scratch_len, dtype=np.uint8)
        else:
            tail = as_uint8_array(scratch, "scratch buffer", writable=True)
            if len(tail) < self.scratch_len:
                raise CodecError(f"scratch buffer holds {len(tail)} bytes, split needs {self.scratch_len}")
        chunks = []
        for index in range(self.k):
            start, stop = self.span(index)
            if index < self.whole_chunks:
                chunks.append(data[start:stop])
                continue
            offset = (index - self.whole_chunks) * self.chunk_len
            chunk = tail[offset : offset + self.chunk_len]
            chunk[: stop - start] = data[start:stop]
            chunk[stop - start :] = 0
            chunks.append(chunk)
        return chunks

    def join(self, chunks: Sequence[Any], shard: Any) -> None:
        """Copy the shard bytes of each chunk (padding dropped) into ``shard``, skipping chunks that
        already are views of their place in it. ``chunks`` maps k positions, in order."""
        out = self._check_shard(shard, writable=True)
        if len(chunks) != self.k:
            raise CodecError(f"joining needs k={self.k} chunks, got {len(chunks)}")
        for index, chunk in enumerate(chunks):
            piece = as_uint8_array(chunk, f"data chunk {index}", writable=False)
            if len(piece) != self.chunk_len:
                raise CodecError(f"data chunk {index} holds {len(piece)} bytes, expected {self.chunk_len}")
            start, stop = self.span(index)
            target = out[start:stop]
            if stop > start and address(piece) != address(target):
                target[:] = piece[: stop - start]

    def _check_shard(self, shard: Any, writable: bool) -> np.ndarray:
        data = as_uint8_array(shard, "shard", writable=writable)
        if len(data) != self.nbytes:
            raise CodecError(f"shard holds {len(data)} bytes, this split was planned for {self.nbytes}")
        return data

