"""Shard layouts, manifests and checksums: pure data, checked without processes."""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import msgpack
import pytest
import torch
import xxhash

from snapguard.errors import ChecksumError, LayoutError
from hypothesis import given, settings
from hypothesis import strategies as st

from snapguard.layout import (ALIGN, DTYPE_SIZES, MANIFEST_VERSION, ChunkHasher, Manifest, TensorEntry, align,
                              chunk_checksums, plan_layout, verify_checksums)
from snapguard.guard import copy_verified


def test_align_rounds_up_to_64():
    assert [align(n) for n in (0, 1, 63, 64, 65, 128, 129)] == [0, 64, 64, 64, 128, 128, 192]


def test_plan_layout_places_tensors_aligned_back_to_back_without_overlap():
    specs = [("a", "float32", [3]), ("b", "bfloat16", [5, 7]), ("empty", "int64", [0, 4]),
             ("c", "uint8", [1]), ("d", "float64", [2, 3, 4]), ("flag", "bool", [])]
    lay = plan_layout(specs)
    assert [e.name for e in lay.entries] == [s[0] for s in specs]
    end = 0
    for e, (_, dtype, shape) in zip(lay.entries, specs):
        assert e.offset % ALIGN == 0
        assert e.offset >= end, f"{e.name} overlaps the tensor before it"
        assert e.nbytes == math.prod(shape) * DTYPE_SIZES[dtype]
        end = e.offset + e.nbytes
    assert lay.nbytes == align(end) and lay.nbytes % ALIGN == 0
    # packed as tight as alignment allows: each tensor starts at the first aligned byte after the last
    assert [e.offset for e in lay.entries] == [0, 64, 192, 192, 256, 448]


def test_plan_layout_signature_changes_with_shape_only_and_refuses_unknown_dtypes():
    a = plan_layout([("w", "float32", [4, 4])])
    assert a.signature == plan_layout([("w", "float32", [4, 4])]).signature
    assert a.signature != plan_layout([("w", "float32", [4, 5])]).signature
    assert a.signature != plan_layout([("w", "float16", [4, 4])]).signature
    with pytest.raises(LayoutError, match="'w' has dtype complex32"):
        plan_layout([("w", "complex32", [2])])


def make_manifest(nbytes: int = 1000, chunk: int = 256, **over) -> Manifest:
    lay = plan_layout([("x", "uint8", [nbytes - 100]), ("y", "float32", [10])])
    n = lay.nbytes
    fields = dict(version=MANIFEST_VERSION, job="j", rank=1, world_size=4, step=7, nbytes=n, chunk_size=chunk,
                  entries=list(lay.entries), checksums=[0] * math.ceil(n / chunk), tree=b"\x90", created=1.5,
                  meta={"k": 1})
    fields.update(over)
    return Manifest(**fields)


def test_manifest_roundtrips_through_msgpack():
    m = make_manifest(checksums=[1, 2, (1 << 64) - 1, 0])
    wire = msgpack.unpackb(msgpack.packb(m.to_wire(), use_bin_type=True), raw=False)
    back = Manifest.from_wire(wire)
    assert back == m
    back.validate(capacity=m.nbytes)


@pytest.mark.parametrize(("over", "match"), [
    ({"version": 2}, "manifest version 2, expected 1"),
    ({"rank": 4}, "out of range"),
    ({"step": -1}, "out of range"),
    ({"world_size": 0}, "out of range"),
    ({"chunk_size": 100}, "not a positive multiple of 64"),
    ({"chunk_size": 0}, "not a positive multiple of 64"),
    ({"checksums": [0, 0]}, "2 checksums for 1024 bytes, expected 4"),
    ({"nbytes": -64}, "does not fit"),
])
def test_manifest_validate_names_what_is_wrong(over, match):
    with pytest.raises(LayoutError, match=match):
        make_manifest(**over).validate()


def test_manifest_validate_refuses_a_shard_larger_than_its_slot():
    m = make_manifest()
    m.validate(capacity=m.nbytes)
    with pytest.raises(LayoutError, match=f"shard of {m.nbytes} bytes does not fit a slot of {m.nbytes - 64} bytes"):
        m.validate(capacity=m.nbytes - 64)


@pytest.mark.parametrize(("entry", "match"), [
    (TensorEntry("y", "float32", [10], 64, 40), "overlaps, is unaligned"),      # overlaps x
    (TensorEntry("y", "float32", [10], 970, 40), "overlaps, is unaligned"),     # unaligned
    (TensorEntry("y", "float32", [10], 1024, 40), "runs past the shard end"),  # past the end
    (TensorEntry("y", "float32", [10], 960, 44), "claims 44 bytes"),           # size does not match shape
    (TensorEntry("y", "float32", [-10], 960, 40), "negative dimension"),
    (TensorEntry("y", "pyobject", [10], 960, 40), "unknown dtype 'pyobject'"),
    (TensorEntry("x", "float32", [10], 960, 40), "tensor 'x' appears twice"),  # both would be copied into live x
])
def test_manifest_validate_refuses_bad_entries(entry, match):
    m = make_manifest()
    with pytest.raises(LayoutError, match=match):
        make_manifest(entries=[m.entries[0], entry]).validate()


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d.pop("tree"), "differ from"),
    (lambda d: d.update(extra=1), "differ from"),
    (lambda d: d.update(rank=True), "'rank' must be int, got bool"),
    (lambda d: d.update(step="7"), "'step' must be int, got str"),
    (lambda d: d.update(tree="text"), "'tree' must be bytes"),
    (lambda d: d.update(entries=[["x", "uint8", [4], 0]]), "is not \\[name, dtype, shape, offset, nbytes\\]"),
    (lambda d: d.update(entries=[["x", "uint8", [4.0], 0, 4]]), "is not \\[name, dtype"),
    (lambda d: d.update(entries=[["x", "uint8", [4], False, 4]]), "is not \\[name, dtype"),
    (lambda d: d.update(checksums=[1 << 64]), "unsigned 64-bit"),
    (lambda d: d.update(checksums=[-1]), "unsigned 64-bit"),
])
def test_manifest_from_wire_checks_every_field_type(mutate, match):
    d = make_manifest().to_wire()
    mutate(d)
    with pytest.raises(LayoutError, match=match):
        Manifest.from_wire(d)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(tree=d["tree"][:-1] + b"\x91"),
    lambda d: d["entries"][1].__setitem__(3, d["entries"][1][3] + 64),  # y's bytes are 64 further on
    lambda d: d["entries"][0][2].__setitem__(0, 450),  # x is a view of other bytes
    lambda d: d["checksums"].__setitem__(2, 5),
    lambda d: d.update(step=8),
    lambda d: d.update(meta={"k": 2}),
    lambda d: d.update(digest=d["digest"] ^ 1),
], ids=["tree", "offset", "shape", "checksum", "step", "meta", "digest"])
def test_a_manifest_that_changed_after_it_was_written_fails_its_digest(mutate):
    """Every field of a manifest counts: a changed one that still makes sense on its own is refused."""
    d = make_manifest(checksums=[1, 2, 3, 4]).to_wire()
    Manifest.from_wire(copy.deepcopy(d))
    mutate(d)
    with pytest.raises(ChecksumError, match="rank 1 step [78] does not match its digest"):
        Manifest.from_wire(d)


def test_a_manifest_written_before_digests_is_read_as_it_was():
    d = make_manifest(checksums=[1, 2, 3, 4]).to_wire()
    del d["digest"]
    assert Manifest.from_wire(d) == make_manifest(checksums=[1, 2, 3, 4])


def test_manifest_from_wire_refuses_non_maps():
    for bad in (None, [], b"manifest", 3):
        with pytest.raises(LayoutError, match="manifest must be a map"):
            Manifest.from_wire(bad)


def test_chunk_checksums_are_xxh3_of_each_chunk_of_the_used_range():
    data = bytes(range(256)) * 40 + b"tail-after-nbytes"
    nbytes = 10_000
    got = chunk_checksums(memoryview(data), nbytes, 4096)
    want = [xxhash.xxh3_64_intdigest(data[i:min(i + 4096, nbytes)]) for i in range(0, nbytes, 4096)]
    assert got == want and len(got) == 3
    assert chunk_checksums(memoryview(b""), 0, 4096) == []


def test_checksums_of_more_bytes_than_the_buffer_holds_are_an_error_not_empty_chunks():
    """Slicing would clamp to the buffer, and the missing chunks would hash as empty ones."""
    with pytest.raises(LayoutError, match="cannot checksum 1024 bytes of a buffer of 512"):
        chunk_checksums(bytes(512), 1024, 256)
    assert len(chunk_checksums(bytes(1024), 1024, 256)) == 4


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 3000), chunk=st.sampled_from([1, 7, 64, 512, 4096]),
       cuts=st.lists(st.integers(0, 3100), max_size=12), seed=st.integers(0, 255))
def test_hashing_while_copying_gives_the_checksums_of_the_finished_buffer(nbytes, chunk, cuts, seed):
    # The trainer fills a slot front to back, hashing each piece as it lands: any sequence of cut points,
    # repeated, backwards or past the end, must give exactly the checksums of one pass over the result.
    final = bytes((seed + i * 31) % 256 for i in range(nbytes + 10))
    buf = bytearray(len(final))
    h = ChunkHasher(memoryview(buf), nbytes, chunk)
    done = 0
    for cut in cuts:
        buf[done:max(done, cut)] = final[done:max(done, cut)]
        done = max(done, cut)
        h.advance(cut)
    buf[:] = final
    assert h.finish() == chunk_checksums(memoryview(final), nbytes, chunk)


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 3000), chunk=st.sampled_from([1, 7, 64, 512, 4096]),
       pieces=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 900)), max_size=8), seed=st.integers(0, 255))
def test_hashing_the_source_of_each_piece_gives_the_checksums_of_the_finished_buffer(nbytes, chunk, pieces, seed):
    # The trainer hashes each tensor's piece from the tensor, right after copying it, and the alignment gaps between
    # tensors from the slot. The slot here never gets the pieces' bytes (it holds others): only the gaps' bytes
    # may be read from it.
    final = bytes((seed + i * 31) % 256 for i in range(nbytes + 10))
    buf = bytearray(b"\xa5" * len(final))
    h = ChunkHasher(memoryview(buf), nbytes, chunk)
    at = 0
    for gap, size in pieces:
        buf[at:at + gap] = final[at:at + gap]  # padding, as the slot holds it
        start = min(at + gap, nbytes)
        end = min(start + size, nbytes)
        h.advance(end, memoryview(final)[start:end])
        at = end
    buf[at:] = final[at:]
    assert h.finish() == chunk_checksums(memoryview(final), nbytes, chunk)


@pytest.mark.parametrize("nbytes", [0, 511, 512, 513, 40 * 512, 40 * 512 + 7])
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_chunk_checksums_in_threads_equal_one_pass(nbytes, threads):
    data = random.Random(nbytes).randbytes(nbytes + 9)
    assert chunk_checksums(memoryview(data), nbytes, 512, threads) == chunk_checksums(memoryview(data), nbytes, 512)


@pytest.mark.parametrize("threads", [1, 4])
def test_verify_checksums_names_the_chunk_whose_bytes_changed(threads):
    buf = bytearray(bytes(range(256)) * 16)
    m = dataclasses.replace(make_manifest(), nbytes=len(buf), chunk_size=512,
                            entries=[TensorEntry("x", "uint8", [len(buf)], 0, len(buf))],
                            checksums=chunk_checksums(memoryview(buf), len(buf), 512))
    m.validate(capacity=len(buf))
    verify_checksums(memoryview(buf), m, threads=threads)
    buf[1500] ^= 0x01  # one bit, in chunk 2
    buf[3000] ^= 0x01  # and one in chunk 5: the first is named
    with pytest.raises(ChecksumError, match=r"rank 1: shard for step 7 has checksum [0-9a-f]{16} in chunk 2"
                                            r" \(bytes 1024\.\.\), sealed as [0-9a-f]{16}"):
        verify_checksums(memoryview(buf), m, threads=threads)


def _shard_with(sizes: list[int], chunk: int, seed: int = 0) -> tuple[bytearray, Manifest]:
    """A filled slot of float32 tensors of these element counts, and its manifest."""
    layout = plan_layout([(f"t{i}", "float32", [n]) for i, n in enumerate(sizes)])
    data = bytearray(random.Random(seed).randbytes(layout.nbytes + 100))
    m = dataclasses.replace(make_manifest(), nbytes=layout.nbytes, chunk_size=chunk, entries=list(layout.entries),
                            checksums=chunk_checksums(memoryview(data), layout.nbytes, chunk))
    return data, m


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_copy_verified_puts_every_entry_bytes_into_its_target(threads):
    data, m = _shard_with([1000, 0, 17, 4096, 3, 2500], chunk=1024)
    buf = torch.frombuffer(data, dtype=torch.uint8)
    targets = [torch.full((e.shape[0],), -1.0) for e in m.entries]
    copy_verified(buf, m, targets, threads=threads)
    for e, t in zip(m.entries, targets):
        assert t.numpy().tobytes() == bytes(data[e.offset:e.offset + e.nbytes]), e.name


@pytest.mark.parametrize("threads", [1, 2])
def test_copy_verified_never_copies_a_byte_of_a_corrupt_chunk(threads):
    data, m = _shard_with([3000, 5000], chunk=4096)  # 32 KiB in 8 chunks; t1 spans chunks 2-7
    bad = 5
    data[bad * 4096 + 10] ^= 0x40
    buf = torch.frombuffer(data, dtype=torch.uint8)
    targets = [torch.zeros(e.shape[0]) for e in m.entries]
    with pytest.raises(ChecksumError, match=rf"rank 1: shard for step 7 has checksum [0-9a-f]{{16}} in chunk {bad}"):
        copy_verified(buf, m, targets, threads=threads)
    t1, e1 = targets[1].numpy().view("u1"), m.entries[1]
    lo = bad * 4096 - e1.offset  # the corrupt chunk's first byte within t1
    assert not t1[lo:lo + 4096].any(), "no byte of the corrupt chunk may reach a target"
    if threads == 1:  # chunks are checked in order: those before the corrupt one are copied, none after
        assert t1[:lo].tobytes() == bytes(data[e1.offset:e1.offset + lo]) and not t1[lo:].any()
