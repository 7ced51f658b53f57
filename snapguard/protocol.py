"""Typed, versioned messages between trainers and daemons, encoded as msgpack.

A message is one msgpack map `{"v": VERSION, "type": NAME, **fields}` in the first frame; bulk
bytes, where a message carries any, travel as further frames and are never decoded here. Decoding
checks the version, the type, the exact set of fields and every field's type before a message
object exists, so a handler only ever sees well-formed values. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from snapguard.errors import ProtocolError

VERSION = 4  # 2: Welcome.peers, StatusReport.memory_bytes, PeerFetch's fields; 3: Allocating; 4: Loading.reserved/slot
MAX_HEADER_BYTES = 16 << 20  # manifests of models with many tensors fit comfortably
MAX_FRAMES = 16
MAX_WORLD_SIZE = 1 << 24  # ranks in one job: far beyond any real one, small enough to loop over

_REGISTRY: dict[str, type["Message"]] = {}
LOCK_TOKEN = re.compile(r"[0-9a-f]{16}")  # names a trainer's lock file (`procs.TrainerLock`)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.TYPE = cls.__name__
        _REGISTRY[cls.__name__] = cls

    def check(self) -> None:
        """Value checks beyond types; subclasses raise ProtocolError naming the field."""


def _nonneg(msg: Message, *names: str) -> None:
    for n in names:
        if getattr(msg, n) < 0:
            raise ProtocolError(f"{msg.TYPE}.{n} must be >= 0, got {getattr(msg, n)}")


def _in_world(msg: Message) -> None:
    """`rank` and, where the message has it, `world_size` name a rank of a job of a sane size: the daemon loops
    over the ranks of a job."""
    world = getattr(msg, "world_size", None)
    if world is None:
        if not 0 <= msg.rank < MAX_WORLD_SIZE:
            raise ProtocolError(f"{msg.TYPE}.rank must be in 0..{MAX_WORLD_SIZE - 1}, got {msg.rank}")
        return
    if not 1 <= world <= MAX_WORLD_SIZE:
        raise ProtocolError(f"{msg.TYPE}.world_size must be in 1..{MAX_WORLD_SIZE}, got {world}")
    if not 0 <= msg.rank < world:
        raise ProtocolError(f"{msg.TYPE}.rank {msg.rank} is outside world_size {world}")


# ---- trainer -> daemon -------------------------------------------------------------------------

@dataclass(frozen=True)
class Ping(Message):
    pass


@dataclass(frozen=True)
class Hello(Message):
    """A trainer starts. `lock` names the file it holds locked while it runs (`procs.TrainerLock`); `pid` is for
    messages only (the daemon may see another PID namespace)."""
    job: str
    rank: int
    world_size: int
    pid: int
    lock: str

    def check(self):
        _nonneg(self, "pid")
        _in_world(self)
        if not LOCK_TOKEN.fullmatch(self.lock):
            raise ProtocolError(f"Hello.lock must be 16 lowercase hex digits, got {self.lock!r}")


@dataclass(frozen=True)
class Reserve(Message):
    """Allocate (and pre-fault) this rank's slots for shards of `nbytes` before training starts."""
    job: str
    rank: int
    world_size: int
    nbytes: int

    def check(self):
        _nonneg(self, "nbytes")
        _in_world(self)


@dataclass(frozen=True)
class Begin(Message):
    """Ask for a slot to write `step` into. The daemon answers Granted, or Wait while reuse is unsafe."""
    job: str
    rank: int
    world_size: int
    step: int
    nbytes: int

    def check(self):
        _nonneg(self, "step", "nbytes")
        _in_world(self)


@dataclass(frozen=True)
class Seal(Message):
    job: str
    rank: int
    step: int
    slot: int
    manifest: dict

    def check(self):
        _nonneg(self, "step", "slot")
        _in_world(self)


@dataclass(frozen=True)
class Inventory(Message):
    """Which steps this rank can restore. With `recheck`, the daemon first verifies every sealed slot's bytes
    again and drops those that changed; without it, it lists them as verified at seal (a restoring rank
    verifies the shard it loads as it copies it)."""
    job: str
    rank: int
    recheck: bool = True

    def check(self):
        _in_world(self)


@dataclass(frozen=True)
class Open(Message):
    """Hand out the sealed shard of `step` for restore, and forget this rank's newer steps. `epoch` names the
    timeline that starts at `step`: every rank of the job restores the same step with the same epoch."""
    job: str
    rank: int
    step: int
    epoch: int = 0

    def check(self):
        _nonneg(self, "step", "epoch")
        _in_world(self)


@dataclass(frozen=True)
class Drop(Message):
    """Forget every sealed step of this rank newer than `keep_upto` (-1: all of them, a fresh start); `epoch` as
    for Open."""
    job: str
    rank: int
    keep_upto: int
    epoch: int = 0

    def check(self):
        _nonneg(self, "epoch")
        _in_world(self)
        if self.keep_upto < -1:
            raise ProtocolError(f"Drop.keep_upto must be >= -1, got {self.keep_upto}")


@dataclass(frozen=True)
class Status(Message):
    pass


@dataclass(frozen=True)
class Shutdown(Message):
    """Stop the daemon; with remove=True its shared memory files are deleted too."""
    remove: bool = True


# ---- daemon -> trainer -------------------------------------------------------------------------

@dataclass(frozen=True)
class Ok(Message):
    info: dict = field(default_factory=dict)


MAX_ERROR_CHARS = 8192  # an error's text may quote what a bad request sent: kept far below decode's 1 MiB per string


@dataclass(frozen=True)
class Error(Message):
    code: str
    message: str

    def __post_init__(self):
        if len(self.message) > MAX_ERROR_CHARS:  # its head and tail say what was wrong; a reply must stay decodable
            cut = len(self.message) - MAX_ERROR_CHARS
            half = MAX_ERROR_CHARS // 2
            object.__setattr__(self, "message", f"{self.message[:half]} ... ({cut} characters left out) ..."
                                                f" {self.message[-half:]}")


@dataclass(frozen=True)
class Welcome(Message):
    node: str
    pid: int
    shm_dir: str
    peers: list[str] = field(default_factory=list)  # the other nodes whose daemons this one is a peer of


@dataclass(frozen=True)
class Granted(Message):
    slot: int
    path: str
    capacity: int


@dataclass(frozen=True)
class Allocating(Message):
    """Reply to Reserve: the daemon grows this rank's slots in the background, `done` of `total` bytes so far; ask
    again (the reply to a Reserve once no slot needs to grow is Ok, with the slots)."""
    done: int
    total: int

    def check(self):
        _nonneg(self, "done", "total")


@dataclass(frozen=True)
class Wait(Message):
    """Reuse of the oldest slot must wait until every rank has sealed `need`, or (`disk`) until the step it holds
    is written to disk."""
    need: int
    common: int
    disk: int = -1  # the step whose slot would be taken, were it not being written to disk; -1: none


@dataclass(frozen=True)
class Sealed(Message):
    step: int
    common: int  # newest step every rank of the job holds sealed, -1 if none


@dataclass(frozen=True)
class Steps(Message):
    steps: list[int]
    dropped: list[str]  # why sealed steps were refused (checksum mismatch), for the trainer to report
    old_world: list[int] = field(default_factory=list)  # [world size, step]: what the node last sealed of a job of
    # another world size (one that restarted with another number of ranks), which it keeps but cannot restore, in
    # memory or else on disk; [] if none
    persisted: list[int] = field(default_factory=list)  # of `steps`, those only on disk (`--persist-dir`): restored
    # from there when memory holds no step that every rank can restore


@dataclass(frozen=True)
class Shard(Message):
    path: str
    manifest: dict


@dataclass(frozen=True)
class Loading(Message):
    """The answer to Open while the daemon brings the step into a slot in the background: ask again. `source`
    "disk": it reads the rank's shard from disk, `done` of `total` bytes so far; "peers": it rebuilds the node's
    shards (all its ranks') from its peers, `done` of `total` bytes decoded so far. With `slot` > 0 it is still
    reserving the memory of the slots to write into first, `reserved` of `slot` bytes so far (`done` is 0)."""
    step: int
    done: int
    total: int
    source: str = "disk"
    reserved: int = 0
    slot: int = 0

    def check(self):
        _nonneg(self, "step", "done", "total", "reserved", "slot")
        if self.done > self.total:
            raise ProtocolError(f"Loading.done {self.done} exceeds Loading.total {self.total}")
        if self.reserved > self.slot:
            raise ProtocolError(f"Loading.reserved {self.reserved} exceeds Loading.slot {self.slot}")
        if self.source not in ("disk", "peers"):
            raise ProtocolError(f"Loading.source {self.source!r} is neither 'disk' nor 'peers'")


@dataclass(frozen=True)
class StatusReport(Message):
    node: str
    job: str
    pid: int
    shm_dir: str
    shm_used: int
    shm_free: int
    ranks: list[dict]
    common: int
    sealed: int = -1  # newest step every local rank holds sealed
    protected: int = -1  # with erasure coding: newest step protected across the EC group
    peers: list[str] = field(default_factory=list)
    parity: list[list[int]] = field(default_factory=list)  # complete parity held: [codeword, position, step]
    rejected: int = 0  # peer messages refused (authentication, replay, checksum, stale step)
    parity_bytes: int = 0  # memory held for parity, complete and under construction
    sent_bytes: int = 0  # chunk bytes sent to parity holders since start
    persist_dir: str = ""  # where sealed steps are persisted (`--persist-dir`); each rank's "persisted" lists them
    memory_bytes: int = 0  # the daemon's resident memory besides the slots: parity, chunks on their way, its heap


# ---- encoding ----------------------------------------------------------------------------------

def fields_of(msg: Message) -> dict:
    """A message's fields by name, as they travel (without the version and type)."""
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def encode(msg: Message) -> bytes:
    return msgpack.packb({"v": VERSION, "type": msg.TYPE, **fields_of(msg)}, use_bin_type=True)


def decode(frame: bytes, expect: tuple[type[Message], ...] | None = None) -> Message:
    """Decode and validate one header frame; raise ProtocolError saying what is wrong."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        d = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=MAX_HEADER_BYTES,
                            max_str_len=1 << 20, max_array_len=1 << 22, max_map_len=1 << 16)
    except Exception as e:  # msgpack raises several types for malformed or truncated input
        raise ProtocolError(f"message is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError(f"message must be a map, got {type(d).__name__}")
    if type(d.get("v")) is not int or d["v"] != VERSION:  # not 4.0, nor True for 1
        raise ProtocolError(f"message version {d.get('v')!r} is not supported (this side speaks {VERSION})")
    cls = _REGISTRY.get(d.get("type")) if isinstance(d.get("type"), str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {d.get('type')!r}")
    if expect is not None and cls not in expect:
        raise ProtocolError(f"unexpected {cls.TYPE}, expected one of {[c.TYPE for c in expect]}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(d) - set(fields) - {"v", "type"}
    if extra:
        raise ProtocolError(f"{cls.TYPE} has unknown fields {sorted(map(str, extra))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ProtocolError(f"{cls.TYPE} lacks field {name!r}")
        kwargs[name] = _check(d[name], hints[name], f"{cls.TYPE}.{name}")
    msg = cls(**kwargs)
    msg.check()
    return msg


def _check(v: Any, t: Any, where: str) -> Any:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(t):
            try:
                return _check(v, alt, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where} has type {type(v).__name__}, expected {t}")
    if t is type(None):
        if v is None:
            return v
    elif origin is list:
        if isinstance(v, list):
            (item,) = typing.get_args(t)
            return [_check(x, item, f"{where}[{i}]") for i, x in enumerate(v)]
    elif t is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif t is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif t in (str, bytes, bool, dict):
        if isinstance(v, t):
            return v
    else:
        raise ProtocolError(f"{where}: no validator for {t}")
    raise ProtocolError(f"{where} has type {type(v).__name__}, expected {getattr(t, '__name__', t)}")


# ---- daemon <-> daemon (TCP, every frame authenticated with the job's secret) -----------------

@dataclass(frozen=True)
class PeerMessage(Message):
    """Base of daemon-to-daemon requests: who sends, and a (boot, seq) pair that only ever grows; `to_boot`: the
    receiver's boot as the sender last heard it (0: not yet), so a receiver can tell a message sent to an earlier
    run of itself."""
    job: str
    node: str
    boot: int
    seq: int
    to_boot: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class PeerHeld(PeerMessage):
    """What the sender holds now: sealed steps per local rank ([rank, step, ...]) and complete parity ([codeword,
    position, step]); and the newest step whose chunks it sent (-1: none), which the others send too."""
    held: list[list[int]]
    parity: list[list[int]]
    sending: int = -1

    def check(self):
        # shapes and signs here; codewords and positions against the receiver's EC plan in `Protector.note_peer`
        for row in self.held:
            if not row or not 0 <= row[0] < MAX_WORLD_SIZE or min(row) < 0:
                raise ProtocolError(f"PeerHeld.held row {row[:8]} is not [rank, step, ...] with a rank in"
                                    f" 0..{MAX_WORLD_SIZE - 1} and steps >= 0")
        for row in self.parity:
            if len(row) != 3 or min(row) < 0:
                raise ProtocolError(f"PeerHeld.parity row {row[:8]} is not [codeword, position, step] of values >= 0")
        if self.sending < -1:
            raise ProtocolError(f"PeerHeld.sending must be >= -1, got {self.sending}")


@dataclass(frozen=True)
class PeerChunk(PeerMessage):
    """A piece of one data chunk of the sender's node shard of `step`, bytes [offset, offset + piece length) of the
    chunk, for the parity holder of `codeword`; the bytes follow in one frame, `checksum` is theirs."""
    step: int
    codeword: int
    position: int
    chunk_len: int
    checksum: int
    offset: int = 0
    epoch: int = 0  # the sender's timeline (`Open.epoch`): a holder takes chunks of its own only
    # the sender's node shard, {"nbytes": L, "ranks": [[rank, offset, manifest], ...]}: with the piece at offset 0
    blob: dict = field(default_factory=dict)

    def check(self):
        _nonneg(self, "step", "codeword", "position", "chunk_len", "offset", "epoch")


@dataclass(frozen=True)
class PeerInventory(PeerMessage):
    """Ask a peer what it holds, and which node shards of `asker` it knows the layout of."""
    asker: str


@dataclass(frozen=True)
class PeerFetch(PeerMessage):
    """Ask for bytes [offset, offset + length) of one chunk (data or parity) of one codeword at one step: fewer
    where the chunk ends sooner, none past its end (a shorter chunk of a codeword counts as zeros up to the parity's
    length). A rebuild fetches a chunk in pieces, so that neither side holds or checks a whole chunk at once."""
    step: int
    codeword: int
    position: int
    offset: int
    length: int

    def check(self):
        _nonneg(self, "step", "codeword", "position", "offset")
        if self.length < 1:
            raise ProtocolError(f"PeerFetch.length must be >= 1, got {self.length}")


def check_blob(blob: dict, what: str) -> None:
    """A node's blob layout as its chunks carry it, {"nbytes": L, "ranks": [[rank, offset, manifest], ...]}: held by
    the parity holders and handed back to that node to rebuild from, so it is checked wherever it arrives."""
    nbytes, ranks = blob.get("nbytes"), blob.get("ranks")
    ok = type(nbytes) is int and nbytes >= 0 and type(ranks) is list
    for row in ranks if ok else ():
        ok = (type(row) is list and len(row) == 3 and type(row[0]) is int and type(row[1]) is int
              and 0 <= row[0] < MAX_WORLD_SIZE and 0 <= row[1] <= nbytes and type(row[2]) is dict)
        if not ok:
            break
    if not ok:
        raise ProtocolError(f"{what} is malformed: {str(blob)[:200]}")


@dataclass(frozen=True)
class PeerStock(Message):
    node: str
    sealed: list[int]  # steps for which every local rank holds a sealed shard
    parity: list[list[int]]  # complete parity chunks: [codeword, position, step]
    blobs: dict  # str(step) -> the asker's node-shard layout, as sent with its chunks

    def check(self):
        # A reply the asker rebuilds from: a malformed one is refused like a forged one (the peer counts as lost).
        if any(s < 0 for s in self.sealed):
            raise ProtocolError(f"PeerStock.sealed holds a negative step: {self.sealed[:8]}")
        for row in self.parity:
            if len(row) != 3 or min(row) < 0:
                raise ProtocolError(f"PeerStock.parity row {row[:8]} is not [codeword, position, step] of values >= 0")
        for step, blob in self.blobs.items():
            if not (isinstance(step, str) and step.isascii() and step.isdigit()) or not isinstance(blob, dict):
                raise ProtocolError(f"PeerStock.blobs maps {str(step)[:20]!r} to a {type(blob).__name__}: expected"
                                    " a step (decimal string) -> blob layout")
            check_blob(blob, f"PeerStock.blobs[{step}]")


@dataclass(frozen=True)
class PeerData(Message):
    """The answer to a PeerFetch: the bytes follow in one frame, `checksum` is theirs."""
    step: int
    codeword: int
    position: int
    offset: int
    checksum: int
