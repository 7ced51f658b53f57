"""The torch backend: the same table lookups as the NumPy backend, on uint8 tensors of any device.

Meant for shards that already sit on a GPU. XOR terms (coefficient 1, so all of the m == 1 code)
are ``torch.bitwise_xor`` in place; other products are a gather (``index_select``) from the row of
the multiplication table, with the table copied once to each device it is used on. Stripes are
larger than the NumPy backend's, since a GPU wants big kernels; the scratch is one int32 index
and one uint8 product per stripe.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from snapguard.codec.backend_numpy import NumpyBackend
from snapguard.codec.buffers import as_uint8_array
from snapguard.codec.gf256 import mul_table
from snapguard.errors import CodecError


class TorchBackend(NumpyBackend):
    """Coding with torch; buffers are tensors (any dtype, contiguous) or host buffers, all on one device."""

    name = "torch"
    stripe_bytes = 1 << 22

    def __init__(self) -> None:
        self._tables: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def wrap(obj: Any, what: str, writable: bool) -> torch.Tensor:
        """A flat uint8 view of a contiguous tensor, or of a host buffer (shared, not copied)."""
        if isinstance(obj, torch.Tensor):
            if not obj.is_contiguous():
                raise CodecError(f"{what}: tensor of shape {tuple(obj.shape)} is not contiguous; pass a contiguous one")
            flat = obj.detach().reshape(-1)
            return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
        arr = as_uint8_array(obj, what, writable)
        with warnings.catch_warnings():
            # A read-only input is only ever read; torch warns about any non-writable array.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    @staticmethod
    def empty(nbytes: int, like: torch.Tensor) -> torch.Tensor:
        """A fresh buffer for a rebuilt chunk, on the device of ``like``."""
        return torch.empty(nbytes, dtype=torch.uint8, device=like.device)

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        table = self._tables.get(like.device)
        if table is None:
            table = torch.from_numpy(np.array(mul_table())).to(like.device)
            self._tables[like.device] = table
        return table

    @staticmethod
    def _scratch(width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.empty(width, dtype=torch.int32, device=like.device),
            torch.empty(width, dtype=torch.uint8, device=like.device),
        )

    @staticmethod
    def _to_index(idx: torch.Tensor, piece: torch.Tensor) -> None:
        idx.copy_(piece)

    @staticmethod
    def _lookup(row: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(row, 0, idx, out=out)

    @staticmethod
    def _xor_into(out: torch.Tensor, term: torch.Tensor) -> None:
        out.bitwise_xor_(term)

    @staticmethod
    def _copy(out: torch.Tensor, term: torch.Tensor) -> None:
        out.copy_(term)

    @staticmethod
    def _zero(out: torch.Tensor) -> None:
        out.zero_()
