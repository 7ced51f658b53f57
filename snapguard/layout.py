"""Shard layouts and manifests: pure data, no torch, shared by trainers and daemons.

A shard is one contiguous byte buffer. Its manifest lists, for every tensor, where its bytes lie
(64-byte aligned), plus per-chunk xxh3-64 checksums of the whole used range and a msgpack tree of
the state that is not tensors. Manifests are msgpack maps, never pickles.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import msgpack
import xxhash

from snapguard.errors import ChecksumError, LayoutError, ManifestVersionError

ALIGN = 64
DEFAULT_CHUNK = 4 << 20
MANIFEST_VERSION = 1

DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
}


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in the shard."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Layout:
    entries: tuple[TensorEntry, ...]
    nbytes: int  # end of the last entry, rounded up to ALIGN

    @property
    def signature(self) -> tuple:
        return tuple((e.name, e.dtype, tuple(e.shape)) for e in self.entries)


def plan_layout(specs: Iterable[tuple[str, str, Sequence[int]]]) -> Layout:
    """Place tensors (name, dtype, shape) back to back, each at a 64-byte aligned offset."""
    entries = []
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_SIZES:
            raise LayoutError(f"tensor {name!r} has dtype {dtype}, which snapguard cannot snapshot")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append(TensorEntry(name, dtype, [int(s) for s in shape], offset, nbytes))
        offset = align(offset + nbytes)
    return Layout(tuple(entries), offset)


@dataclass(frozen=True)
class Manifest:
    """The layout of one sealed shard plus what is needed to trust and rebuild it."""

    version: int
    job: str
    rank: int
    world_size: int
    step: int
    nbytes: int
    chunk_size: int
    entries: list[TensorEntry]
    checksums: list[int]
    tree: bytes  # msgpack of the non-tensor state (see snapguard.state)
    created: float = 0.0
    meta: dict = field(default_factory=dict)

    def validate(self, capacity: int | None = None) -> None:
        """Refuse a manifest whose numbers do not add up; say what is wrong."""
        who = f"rank {self.rank} step {self.step}"
        if self.version != MANIFEST_VERSION:
            raise LayoutError(f"{who}: manifest version {self.version}, expected {MANIFEST_VERSION}")
        if self.step < 0 or self.rank < 0 or self.world_size < 1 or self.rank >= self.world_size:
            raise LayoutError(f"{who}: step/rank/world_size out of range (world_size {self.world_size})")
        if self.chunk_size < ALIGN or self.chunk_size % ALIGN:
            raise LayoutError(f"{who}: chunk size {self.chunk_size} is not a positive multiple of {ALIGN}")
        if self.nbytes < 0 or (capacity is not None and self.nbytes > capacity):
            raise LayoutError(f"{who}: shard of {self.nbytes} bytes does not fit a slot of {capacity} bytes")
        want = -(-self.nbytes // self.chunk_size)  # exact for any size (a float division is not past 2**53)
        if len(self.checksums) != want:
            raise LayoutError(f"{who}: {len(self.checksums)} checksums for {self.nbytes} bytes, expected {want}")
        end = 0
        names: set[str] = set()
        for e in self.entries:
            if e.name in names:  # a restore would copy both into the one live tensor of that name
                raise LayoutError(f"{who}: tensor {e.name!r} appears twice")
            names.add(e.name)
            if e.dtype not in DTYPE_SIZES:
                raise LayoutError(f"{who}: tensor {e.name!r} has unknown dtype {e.dtype!r}")
            if any(s < 0 for s in e.shape):
                raise LayoutError(f"{who}: tensor {e.name!r} has a negative dimension")
            if e.nbytes != _nbytes_within(e.shape, DTYPE_SIZES[e.dtype], self.nbytes):
                shape = e.describe() if len(e.shape) <= 16 else f"{e.dtype} of {len(e.shape)} dimensions"
                raise LayoutError(f"{who}: tensor {e.name!r} {shape} claims {e.nbytes} bytes")
            if e.offset % ALIGN or e.offset < end or e.offset + e.nbytes > self.nbytes:
                raise LayoutError(
                    f"{who}: tensor {e.name!r} at offset {e.offset} (+{e.nbytes}) overlaps, is unaligned,"
                    f" or runs past the shard end {self.nbytes}"
                )
            end = e.offset + e.nbytes

    def to_wire(self) -> dict:
        d = {
            "version": self.version, "job": self.job, "rank": self.rank, "world_size": self.world_size,
            "step": self.step, "nbytes": self.nbytes, "chunk_size": self.chunk_size,
            "entries": [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries],
            "checksums": list(self.checksums), "tree": self.tree, "created": self.created, "meta": self.meta,
        }
        d["digest"] = manifest_digest(d)
        return d

    @classmethod
    def from_wire(cls, d: object) -> "Manifest":
        """Build a manifest from decoded msgpack, checking every field's type."""
        if not isinstance(d, dict):
            raise LayoutError(f"manifest must be a map, got {type(d).__name__}")
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version != MANIFEST_VERSION:
            # Before the fields: another version may have others.
            raise ManifestVersionError(f"manifest version {version}, this snapguard reads version {MANIFEST_VERSION}")
        want = {"version": int, "job": str, "rank": int, "world_size": int, "step": int, "nbytes": int,
                "chunk_size": int, "entries": list, "checksums": list, "tree": bytes, "created": float,
                "meta": dict, "digest": int}
        # "digest" is optional: manifests written before it (the version is the same) are read as they were
        if not set(want) - {"digest"} <= set(d) <= set(want):
            raise LayoutError(f"manifest fields {sorted(map(str, d))} differ from {sorted(want)}")
        for k, t in want.items():
            if k not in d:
                continue
            v = d[k]
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                continue
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                raise LayoutError(f"manifest field {k!r} must be {t.__name__}, got {type(v).__name__}")
        entries = []
        for raw in d["entries"]:
            ok = (isinstance(raw, list) and len(raw) == 5 and isinstance(raw[0], str) and isinstance(raw[1], str)
                  and isinstance(raw[2], list) and all(_is_int(s) for s in raw[2])
                  and _is_int(raw[3]) and _is_int(raw[4]))
            if not ok:
                raise LayoutError(f"manifest entry {raw!r:.200} is not [name, dtype, shape, offset, nbytes]")
            entries.append(TensorEntry(raw[0], raw[1], list(raw[2]), raw[3], raw[4]))
        if not all(_is_int(c) and 0 <= c < 1 << 64 for c in d["checksums"]):
            raise LayoutError("manifest checksums must be unsigned 64-bit integers")
        if "digest" in d and d["digest"] != manifest_digest(d):
            raise ChecksumError(f"the manifest of rank {d['rank']} step {d['step']} does not match its digest: it"
                                " changed after it was written (its tensors' places and shapes, checksums or"
                                " non-tensor state cannot be trusted)")
        return cls(d["version"], d["job"], d["rank"], d["world_size"], d["step"], d["nbytes"], d["chunk_size"],
                   entries, list(d["checksums"]), d["tree"], float(d["created"]), dict(d["meta"]))


_DIGESTED = ("version", "job", "rank", "world_size", "step", "nbytes", "chunk_size", "entries", "checksums", "tree",
             "created", "meta")


def manifest_digest(d: dict) -> int:
    """xxh3 of a wire manifest's fields but its digest, in a fixed order. The chunk checksums cover a shard's bytes;
    this covers what says where its tensors are and what they are, their checksums, and the non-tensor state."""
    return xxhash.xxh3_64_intdigest(msgpack.packb([d[k] for k in _DIGESTED], use_bin_type=True))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def default_hash_threads() -> int:
    """Threads that hash a shard: half the cores this process may run on, 1 to 8. On a small machine that is
    one, since the cores are training's; on a GPU node, whose cores mostly wait on the device, several threads
    hash a step's gigabytes about as fast as the device-to-host copy delivers them (bench/gpu.py)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def in_threads(n: int, threads: int, work: Callable[[int, int], None], name: str) -> None:
    """Call work(first, last) on contiguous runs of range(n): the first run in this thread, the others in
    threads of their own (at most `threads` in all). Once all are done, raise a ChecksumError one of them
    raised, else the first error."""
    k = max(1, min(threads, n))
    cuts = [n * i // k for i in range(k + 1)]
    errors: list[BaseException] = []

    def run(first: int, last: int) -> None:
        try:
            work(first, last)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=run, args=(cuts[i], cuts[i + 1]), name=f"{name}-{i}", daemon=True)
               for i in range(1, k)]
    for w in workers:
        w.start()
    run(cuts[0], cuts[1])
    for w in workers:
        w.join()
    if errors:
        raise next((e for e in errors if isinstance(e, ChecksumError)), errors[0])


def _nbytes_within(shape, itemsize: int, limit: int) -> int:
    """The bytes of a tensor of `shape`, or `limit + 1` once they pass `limit`: a manifest from the wire may claim a
    shape of any length and size, whose full product would hold up the daemon for minutes."""
    if 0 in shape:
        return 0
    n = itemsize
    for dim in shape:
        n *= dim
        if n > limit:
            return limit + 1
    return n


def chunk_checksums(buf: memoryview, nbytes: int, chunk_size: int = DEFAULT_CHUNK, threads: int = 1) -> list[int]:
    """xxh3-64 of each chunk of buf[:nbytes]; `threads` take contiguous runs of at least two chunks. xxhash
    releases the GIL on inputs over 64 KiB, so this runs beside training, and the threads in parallel."""
    view = memoryview(buf)[:nbytes]
    if len(view) < nbytes:  # slicing would clamp, and the missing chunks would hash as empty ones
        raise LayoutError(f"cannot checksum {nbytes} bytes of a buffer of {len(view)}")
    starts = range(0, nbytes, chunk_size)
    sums = [0] * len(starts)

    def work(first: int, last: int) -> None:
        for c in range(first, last):
            sums[c] = xxhash.xxh3_64_intdigest(view[starts[c]:starts[c] + chunk_size])

    in_threads(len(starts), min(threads, len(starts) // 2), work, "snapguard-hash")
    return sums


class ChunkHasher:
    """The checksums of `chunk_checksums`, computed while the buffer is being filled front to back.

    `advance(end)` hashes buf[hashed:end] once those bytes are final. `advance(end, source)` hashes the last
    len(source) of them from `source` instead: the bytes a copy into the buffer just read, which are still in
    the CPU cache (a copy with streaming stores leaves the buffer's copy of them out of it). Called right after
    each piece of a copy, it costs a third of a separate pass over memory.
    """

    def __init__(self, buf: memoryview, nbytes: int, chunk_size: int = DEFAULT_CHUNK):
        self.view = memoryview(buf)[:nbytes]
        self.nbytes, self.chunk_size = nbytes, chunk_size
        self.pos = 0
        self.state = xxhash.xxh3_64()
        self.sums: list[int] = []

    def advance(self, end: int, source: memoryview | None = None) -> None:
        start = end - len(source) if source is not None else end  # buf[start:end] is in `source`
        end = min(end, self.nbytes)
        while self.pos < end:
            chunk_end = min((self.pos // self.chunk_size + 1) * self.chunk_size, self.nbytes)
            stop = min(end, chunk_end)
            if self.pos < start:
                stop = min(stop, start)
                self.state.update(self.view[self.pos:stop])
            else:
                self.state.update(source[self.pos - start:stop - start])
            self.pos = stop
            if stop == chunk_end:
                self.sums.append(self.state.intdigest())
                self.state.reset()

    def finish(self) -> list[int]:
        self.advance(self.nbytes)
        return self.sums


def verify_checksums(buf: memoryview, manifest: Manifest, who: str = "", threads: int = 1) -> None:
    """Raise ChecksumError naming the first chunk whose bytes differ from what was sealed."""
    got = chunk_checksums(buf, manifest.nbytes, manifest.chunk_size, threads)
    for i, (want, have) in enumerate(zip(manifest.checksums, got, strict=True)):
        if want != have:
            raise checksum_mismatch(manifest, i, have, who)


def checksum_mismatch(manifest: Manifest, chunk: int, have: int, who: str = "") -> ChecksumError:
    """The error for chunk `chunk` of a shard hashing to `have` instead of its sealed checksum."""
    return ChecksumError(
        f"{who or f'rank {manifest.rank}'}: shard for step {manifest.step} has checksum {have:016x} in chunk {chunk}"
        f" (bytes {chunk * manifest.chunk_size}..), sealed as {manifest.checksums[chunk]:016x}"
    )
