"""Bulk copies (`snapguard.memcopy`): the streaming-store copy of `snapguard._stream` and the memmove it falls back to
give the same bytes, whatever the sizes and alignments of a slot's pieces and a tensor's."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import pytest
import torch

from snapguard import memcopy

COPIES = {"memmove": ctypes.memmove}
if memcopy.native():
    from snapguard import _stream

    COPIES["default"] = memcopy.stream_copy
    COPIES.update({kind: functools.partial(lambda d, s, n, kind: _stream.copy(d, s, n, kind), kind=kind)
                   for kind in _stream.kinds()})


def test_the_streaming_copy_is_built_where_snapguard_was_installed_with_a_c_compiler():
    # Set-up builds it (pyproject.toml); the build is optional for users, so a failed one would otherwise pass
    # unnoticed here and every snapshot would copy with memmove.
    assert memcopy.native(), memcopy.STREAM_KIND
    if sys.platform == "linux" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert memcopy.STREAM_KIND == "streaming stores (avx2)"
        assert _stream.kinds() == ["avx2", "sse2", "memcpy"]


@pytest.mark.parametrize("copy", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("size", [0, 1, 63, 4095, 4096, 4097, 128 * 1024 + 37, 3 << 20])
@pytest.mark.parametrize("dst_shift,src_shift", [(0, 0), (1, 0), (0, 17), (63, 5), (32, 32)])
def test_a_copy_gives_the_source_bytes_and_touches_nothing_around_them(copy, size, dst_shift, src_shift):
    src = torch.randint(0, 256, (size + 128,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    mm = mmap.mmap(-1, size + 4096)  # page-aligned, like a slot
    dst = torch.frombuffer(mm, dtype=torch.uint8)
    dst.fill_(0x5A)
    copy(dst.data_ptr() + 64 + dst_shift, src.data_ptr() + src_shift, size)
    lo, hi = 64 + dst_shift, 64 + dst_shift + size
    assert torch.equal(dst[lo:hi], src[src_shift:src_shift + size])
    assert bool((dst[:lo] == 0x5A).all()) and bool((dst[hi:] == 0x5A).all()), "bytes outside the range changed"
    del dst
    mm.close()


@pytest.mark.skipif(not memcopy.native(), reason="the extension's own argument checks")
def test_the_streaming_copy_refuses_a_negative_length_and_null_addresses_and_copies_overlaps_like_memmove():
    buf = torch.arange(256, dtype=torch.uint8).repeat(64)  # 16 KiB
    want = buf.clone()
    want[100:100 + 8192] = buf[0:8192].clone()
    memcopy.stream_copy(buf.data_ptr() + 100, buf.data_ptr(), 8192)  # overlapping: memmove's answer
    assert torch.equal(buf, want)
    with pytest.raises(ValueError, match="negative length"):
        memcopy.stream_copy(buf.data_ptr(), buf.data_ptr(), -1)
    with pytest.raises(ValueError, match="null address"):
        memcopy.stream_copy(0, buf.data_ptr(), 16)
    with pytest.raises(ValueError, match="kind avx1024 is not one this CPU runs"):
        memcopy.stream_copy(buf.data_ptr(), buf.data_ptr() + 8192, 16, "avx1024")
    memcopy.stream_copy(0, 0, 0)  # nothing to copy: nothing read


def test_address_view_reads_the_bytes_at_an_address():
    t = torch.arange(10, dtype=torch.int32)
    v = memcopy.address_view(t.data_ptr(), t.numel() * 4)
    assert v.format == "B" and bytes(v) == t.numpy().tobytes()
