"""The erasure codec: one contract, run against every backend, with reedsolo as the reference."""

from __future__ import annotations

import itertools
import mmap

import numpy as np
import pytest
import reedsolo
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapguard.codec import CHUNK_ALIGN, Codec, ShardChunks, backends
from snapguard.codec import gf256
from snapguard.codec.backend_isal import STRIPE_BYTES as ISAL_STRIPE
from snapguard.codec.backend_isal import load_isal
from snapguard.codec.backend_numpy import STRIPE_BYTES as NUMPY_STRIPE
from snapguard.errors import CodecError, SnapGuardError

# Every backend, always: pyeclib (which bundles ISA-L) and torch are declared dependencies, so a
# backend that cannot load here must fail its tests, never skip them.
BACKENDS = ("isal", "numpy", "torch")
SHAPES = [(2, 1), (3, 1), (4, 2), (6, 3), (8, 2)]

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def random_chunks(rng: np.random.Generator, count: int, length: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(count)]


def reference_parity(data: list[bytes], m: int, positions: range | list[int]) -> list[bytes]:
    """The parity reedsolo appends at each byte position, as m byte strings."""
    rs = reedsolo.RSCodec(m)
    columns = [bytes(rs.encode(bytes(chunk[j] for chunk in data))[len(data) :]) for j in positions]
    return [bytes(col[p] for col in columns) for p in range(m)]


def encode_new(codec: Codec, data: list[np.ndarray]) -> list[np.ndarray]:
    parity = [np.full(len(data[0]), 0xAA, dtype=np.uint8) for _ in range(codec.m)]
    codec.encode(data, parity)
    return parity


# --- bytes identical to reedsolo -------------------------------------------------------------


@FAST
@given(st.data())
def test_parity_is_reedsolos(backend: str, draw: st.DataObject) -> None:
    k = draw.draw(st.integers(1, 12), label="k")
    m = draw.draw(st.integers(1, 5), label="m")
    length = draw.draw(st.integers(0, 80), label="length")
    data = [draw.draw(st.binary(min_size=length, max_size=length), label=f"data {i}") for i in range(k)]
    parity = [bytearray(b"\x55" * length) for _ in range(m)]
    Codec(k, m, backend).encode(data, parity)
    assert [bytes(p) for p in parity] == reference_parity(data, m, range(length))


@FAST
@given(k=st.integers(1, 12), length=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_single_parity_is_plain_xor(backend: str, k: int, length: int, seed: int) -> None:
    data = random_chunks(np.random.default_rng(seed), k, length)
    (parity,) = encode_new(Codec(k, 1, backend), data)
    assert np.array_equal(parity, np.bitwise_xor.reduce(np.stack(data), axis=0))
    assert reference_parity(data, 1, range(length)) == [parity.tobytes()]


def test_parity_is_reedsolos_across_stripe_boundaries(backend: str) -> None:
    """A buffer longer than every backend's stripe, checked against reedsolo around each stripe edge."""
    k, m = 5, 3
    length = 2 * ISAL_STRIPE + 4 * NUMPY_STRIPE + 37
    data = random_chunks(np.random.default_rng(7), k, length)
    parity = encode_new(Codec(k, m, backend), data)
    edges = {e + d for stripe in (ISAL_STRIPE, NUMPY_STRIPE) for e in range(stripe, length, stripe) for d in (-1, 0)}
    positions = sorted(edges | {0, length - 1} | set(np.random.default_rng(8).integers(0, length, 64).tolist()))
    assert [bytes(p[positions]) for p in parity] == reference_parity(data, m, positions)


def test_generator_matrix_matches_reedsolo_on_unit_messages() -> None:
    for k, m in [(1, 1), (4, 2), (10, 4), (200, 55)]:
        rs = reedsolo.RSCodec(m)
        gen = gf256.generator_matrix(k, m)
        for i in range(k):
            unit = bytes(int(j == i) for j in range(k))
            assert bytes(gen[:, i]) == bytes(rs.encode(unit)), (k, m, i)


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "m"), SHAPES)
def test_every_erasure_pattern_up_to_m_is_rebuilt(backend: str, k: int, m: int) -> None:
    codec = Codec(k, m, backend)
    data = random_chunks(np.random.default_rng(k * 10 + m), k, 1000)
    full = data + encode_new(codec, data)
    for count in range(1, m + 1):
        for erased in itertools.combinations(range(k + m), count):
            chunks = [None if i in erased else full[i] for i in range(k + m)]
            rebuilt = codec.decode(chunks)
            assert sorted(rebuilt) == list(erased)
            for i in erased:
                assert np.asarray(rebuilt[i]).tobytes() == full[i].tobytes(), (erased, i)


@pytest.mark.parametrize(("k", "m"), SHAPES)
def test_more_than_m_erasures_raise_naming_the_chunks(backend: str, k: int, m: int) -> None:
    codec = Codec(k, m, backend)
    full = random_chunks(np.random.default_rng(1), k + m, 128)
    erased = list(range(k - 1, k + m))[: m + 1]
    chunks = [None if i in erased else full[i] for i in range(k + m)]
    with pytest.raises(CodecError) as info:
        codec.decode(chunks)
    message = str(info.value)
    assert f"cannot rebuild {m + 1} erased chunks" in message
    assert f"data chunk {k - 1}" in message
    for p in range(len(erased) - 1):
        assert f"parity chunk {p} (chunk {k + p})" in message
    assert isinstance(info.value, SnapGuardError)


def test_decode_into_caller_buffers_rebuilds_only_what_is_asked(backend: str) -> None:
    k, m = 4, 2
    codec = Codec(k, m, backend)
    data = random_chunks(np.random.default_rng(3), k, 4096 + 5)
    full = data + encode_new(codec, data)
    chunks = [None, full[1], full[2], full[3], None, full[5]]
    target = bytearray(len(data[0]))
    rebuilt = codec.decode(chunks, out={0: target})
    assert list(rebuilt) == [0] and rebuilt[0] is target
    assert bytes(target) == data[0].tobytes()
    with pytest.raises(CodecError, match="out names chunk 1, which is not erased"):
        codec.decode(chunks, out={1: bytearray(len(data[0]))})


def test_streaming_by_byte_range_or_chunk_by_chunk_equals_one_call(backend: str) -> None:
    k, m, length = 6, 3, 10_000
    codec = Codec(k, m, backend)
    data = random_chunks(np.random.default_rng(4), k, length)
    whole = encode_new(codec, data)
    by_range = [np.zeros(length, dtype=np.uint8) for _ in range(m)]
    for start in range(0, length, 768):
        codec.encode([d[start : start + 768] for d in data], [p[start : start + 768] for p in by_range])
    by_chunk = [np.zeros(length, dtype=np.uint8) for _ in range(m)]
    for index in [3, 0, 5, 1, 4, 2]:
        codec.accumulate(index, data[index], by_chunk)
    assert all(np.array_equal(p, w) for p, w in zip(by_range, whole))
    assert all(np.array_equal(p, w) for p, w in zip(by_chunk, whole))


def test_a_holder_of_some_parity_rows_computes_exactly_those_rows(backend: str) -> None:
    # A parity holder keeps one row of a codeword: folding chunks into that row alone must give the
    # bytes encode writes for it, for every row and any subset, in any order.
    k, m, length = 4, 3, 5_000
    codec = Codec(k, m, backend)
    data = random_chunks(np.random.default_rng(11), k, length)
    whole = encode_new(codec, data)
    for rows in ([0], [1], [2], [2, 0], [0, 1, 2]):
        parity = [np.zeros(length, dtype=np.uint8) for _ in rows]
        for index in [2, 0, 3, 1]:
            codec.accumulate(index, data[index], parity, rows=rows)
        assert all(np.array_equal(p, whole[r]) for p, r in zip(parity, rows)), rows
    for bad in ([], [3], [1, 1], [True]):
        with pytest.raises(CodecError, match="parity rows must be distinct ints in 0..2"):
            codec.accumulate(0, data[0], [np.zeros(length, dtype=np.uint8)], rows=bad)
    with pytest.raises(CodecError, match=r"expected 1 parity chunks \(rows \[1\]\), got 2"):
        codec.accumulate(0, data[0], [np.zeros(length, np.uint8)] * 2, rows=[1])


# --- buffers ---------------------------------------------------------------------------------


def test_buffer_protocol_objects_and_mmap(backend: str) -> None:
    k, m, length = 3, 2, 640
    rng = np.random.default_rng(6)
    data = random_chunks(rng, k, length)
    expected = encode_new(Codec(k, m, "numpy"), data)
    inputs = [data[0].tobytes(), memoryview(bytearray(data[1].tobytes())), data[2].view(np.uint32)]
    shm = mmap.mmap(-1, m * length)
    parity = [memoryview(shm)[p * length : (p + 1) * length] for p in range(m)]
    Codec(k, m, backend).encode(inputs, parity)
    assert [bytes(p) for p in parity] == [e.tobytes() for e in expected]
    parity = None
    shm.close()


def test_torch_backend_takes_tensors_and_allocates_on_their_device() -> None:
    k, m = 4, 2
    codec = Codec(k, m, "torch")
    data = [torch.from_numpy(d) for d in random_chunks(np.random.default_rng(9), k, 512)]
    parity = [torch.empty(512, dtype=torch.uint8) for _ in range(m)]
    codec.encode(data, parity)
    rebuilt = codec.decode([None, data[1], None, data[3], parity[0], parity[1]])
    assert isinstance(rebuilt[0], torch.Tensor)
    assert torch.equal(rebuilt[0], data[0]) and torch.equal(rebuilt[2], data[2])


def test_inputs_are_validated_with_precise_errors(backend: str) -> None:
    codec = Codec(2, 1, backend)
    a, b = bytes(64), bytes(64)
    with pytest.raises(CodecError, match="parity chunk 0: bytes is read-only"):
        codec.encode([a, b], [bytes(64)])
    with pytest.raises(CodecError, match="data chunk 1 holds 63 bytes but data chunk 0 holds 64"):
        codec.encode([a, b[:63]], [bytearray(64)])
    with pytest.raises(CodecError, match="expected k=2 data chunks, got 3"):
        codec.encode([a, b, b], [bytearray(64)])
    with pytest.raises(CodecError, match="expected m=1 parity chunks, got 2"):
        codec.encode([a, b], [bytearray(64), bytearray(64)])
    with pytest.raises(CodecError, match="not C-contiguous"):
        codec.encode([np.zeros(128, np.uint8)[::2], b], [bytearray(64)])
    with pytest.raises(CodecError, match="decode needs 3 entries"):
        codec.decode([a, b])
    with pytest.raises(CodecError, match=r"data chunk index must be in 0\.\.1, got 2"):
        codec.accumulate(2, a, [bytearray(64)])


@pytest.mark.parametrize(
    ("k", "m", "backend_name", "message"),
    [
        (0, 1, "auto", "k \\(data chunks\\) must be an int >= 1, got 0"),
        (2, 0, "auto", "m \\(parity chunks\\) must be an int >= 1, got 0"),
        (True, 1, "auto", "got True"),
        (200, 56, "auto", "k \\+ m must be at most 255 over GF\\(2\\^8\\), got k=200, m=56"),
        (2, 1, "cuda", "unknown codec backend 'cuda'; choose one of auto, isal, numpy, torch"),
    ],
)
def test_bad_configuration_is_refused(k: int, m: int, backend_name: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        Codec(k, m, backend_name)


def test_isal_is_found_and_auto_picks_it() -> None:
    lib, where = load_isal()
    assert "isal" in where and hasattr(lib, "ec_encode_data")
    assert backends() == BACKENDS
    assert Codec(4, 2).backend == "isal"


# --- splitting a shard into chunks -----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(nbytes=st.integers(0, 5000), k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_split_pads_with_zeros_and_join_restores_the_shard(nbytes: int, k: int, seed: int) -> None:
    shard = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    layout = ShardChunks(nbytes, k)
    assert layout.chunk_len % CHUNK_ALIGN == 0
    assert 0 <= layout.padding < CHUNK_ALIGN * k
    assert k * layout.chunk_len == nbytes + layout.padding
    chunks = layout.split(shard)
    assert [len(c) for c in chunks] == [layout.chunk_len] * k
    assert np.concatenate(chunks).tobytes() == shard.tobytes() + bytes(layout.padding)
    for chunk in chunks[: layout.whole_chunks]:
        assert np.shares_memory(chunk, shard) or nbytes == 0
    restored = np.zeros(nbytes, dtype=np.uint8)
    layout.join(chunks, restored)
    assert np.array_equal(restored, shard)
    scratch = bytearray(b"\xff" * layout.scratch_len)
    assert np.concatenate(layout.split(shard.tobytes(), scratch)).tobytes() == shard.tobytes() + bytes(layout.padding)


def test_split_refuses_a_short_scratch_or_a_wrong_length() -> None:
    layout = ShardChunks(100, 4)
    with pytest.raises(CodecError, match="scratch buffer holds 10 bytes, split needs 192"):
        layout.split(bytes(100), bytearray(10))
    with pytest.raises(CodecError, match="shard holds 99 bytes, this split was planned for 100"):
        layout.split(bytes(99))
    with pytest.raises(CodecError, match="k >= 1"):
        ShardChunks(100, 0)
