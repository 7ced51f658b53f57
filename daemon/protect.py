"""Erasure-coded protection of this node's shards across an EC group of daemons.

A node's shard of a step is the concatenation of its local ranks' sealed shards (each at a
64-byte aligned offset): its "blob". The blob splits into k = g - m data chunks
(`snapguard.codec.ShardChunks`), and `snapguard.stripes.plan_stripes` says which codeword each
chunk belongs to and which nodes hold that codeword's m parity chunks. After every local rank has
sealed a step, the daemon sends each chunk to its parity holders; a holder folds chunks into its
parity as they arrive (`Codec.accumulate`) and counts the step protected for that codeword once all
k have arrived. Protection never blocks training: holders keep complete parity down to the newest step
protected across the whole group, plus a few newer steps still arriving; older ones are dropped. When
protection falls behind, members skip steps together (`Protector.choose_step`): a codeword's parity
completes only if all of its data chunks are of one step.

Restore after a node is lost: the replacement daemon asks every peer what it holds, computes which
steps it can rebuild (for every codeword with one of its chunks, k chunks of that step must survive),
fetches the chunks of the agreed step, decodes, and writes and seals its ranks' slots as if its
trainers had.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import xxhash

from snapguard import protocol as P
from snapguard.codec import Codec, ShardChunks
from snapguard.errors import ChecksumError, LayoutError, ProtocolError, SnapGuardError, UnrecoverableError
from snapguard.faults import fault_point
from snapguard.layout import Manifest, align, checksum_mismatch
from snapguard.stripes import plan_stripes, recoverable

from snapguard.daemon.slots import Slot, SlotTable

log = logging.getLogger(__name__)

MAX_PENDING_STEPS = 4  # steps a holder accumulates at once per codeword, besides its newest complete one
# Complete parity a holder keeps of steps newer than the group's protected step, per parity chunk it holds: the
# newest KEEP_COMPLETE_STEPS of them, and more while they fit in `keep_bytes` (--ec-keep-mib). A holder that
# lags completes the steps the others did a little later; how much later is bounded by what the queues between
# a sender and it hold, a few pieces (`RECV_HWM`, the daemon's read-ahead), far less than the default 256 MiB.
# A holder that stops completing steps altogether would otherwise make every other holder keep all of them.
KEEP_COMPLETE_STEPS = 4
KEEP_COMPLETE_BYTES = 256 << 20


PIECE = 16 << 20  # chunks travel in pieces of this size: folding one in keeps the daemon's loop busy for milliseconds


@dataclass
class ParityEntry:
    step: int
    buf: np.ndarray
    want: dict[int, int] = field(default_factory=dict)  # data position -> its chunk's length
    pieces: set[tuple[int, int]] = field(default_factory=set)  # (position, offset) folded in, never twice
    blobs: dict[str, dict] = field(default_factory=dict)  # node -> its blob layout at this step

    def complete(self, k: int) -> bool:
        """All k data chunks folded in: every piece of each (pieces are PIECE long but the last, and distinct)."""
        have = collections.Counter(pos for pos, _ in self.pieces)
        return len(self.want) == k and all(have[p] == -(-n // PIECE) for p, n in self.want.items())


def read_parts(parts: list[tuple[int, Slot, int]], start: int, stop: int, out) -> None:
    """Copy bytes [start, stop) of the blob made of `parts` ((offset in the blob, slot, bytes)) into out, zero
    beyond the blob's end. It reads the slots whatever their state now: the caller knows they are unchanged."""
    out = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out
    out[:] = 0
    for off, slot, n in parts:
        lo, hi = max(start, off), min(stop, off + n)
        if lo < hi:
            out[lo - start:hi - start] = np.frombuffer(slot.buffer(), np.uint8, hi - lo, lo - off)


def write_parts(parts: list[tuple[int, Slot, int]], start: int, data: np.ndarray) -> None:
    """Copy `data`, bytes [start, start + len(data)) of the blob made of `parts` (as `read_parts` takes them), into
    the slots that hold them; bytes of the blob no part holds are skipped."""
    stop = start + len(data)
    for off, slot, n in parts:
        lo, hi = max(start, off), min(stop, off + n)
        if lo < hi:
            np.frombuffer(slot.buffer(), np.uint8, hi - lo, lo - off)[:] = data[lo - start:hi - start]


def part_view(parts: list[tuple[int, Slot, int]], start: int, stop: int) -> np.ndarray | None:
    """Bytes [start, stop) of the blob made of `parts` (as `read_parts` takes them), as a writable view of the one
    slot that holds them all; None where they span slots or reach past the blob's end."""
    for off, slot, n in parts:
        if off <= start and stop <= off + n:
            return np.frombuffer(slot.buffer(), np.uint8, stop - start, start - off)
    return None


PIECES_IN_FLIGHT = 8  # at least this many pieces of a node's chunks may be out of the slots on their way at once


@dataclass
class OutgoingPiece:
    """One piece of one of this node's chunks, for every holder of the chunk's parity."""
    start: int  # offset in the blob
    length: int
    fields: dict  # its PeerChunk fields, the same for every holder; the checksum is added as it is read
    holders: list[str]
    buf: np.ndarray | None = None  # its bytes, once read out of the slots
    left: set[str] = field(default_factory=set)  # holders whose copy ZeroMQ is done with

    @property
    def data(self) -> memoryview:
        return memoryview(self.buf)[:self.length]


class PiecePool:
    """Piece-sized buffers, reused step after step: fresh memory is slow to touch the first time."""

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        return self._free.pop() if self._free else np.empty(PIECE, np.uint8)

    def give(self, buf: np.ndarray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


class OutgoingStep:
    """This node's chunks of one step on their way to the parity holders, piece by piece, in a window that
    moves along: a holder is handed the pieces it needs from the window only, and the window moves on past the
    pieces every holder's copy of which has left. A piece's bytes are read out of the slots into a buffer of the
    pool as it is first handed out, or a few ahead (`read_some`), and the buffer goes back as the window moves
    on past it. So a step on its way holds `window` pieces out of the slots, not a copy of the node's chunks;
    only before a trainer may overwrite one of the slots is the rest read out at once (`read_all`)."""

    def __init__(self, step: int, parts: list[tuple[int, Slot, int]], pieces: list[OutgoingPiece], pool: PiecePool):
        self.step, self.parts, self.pieces, self.pool = step, parts, pieces, pool
        self.window = pool.keep  # the pool keeps a buffer for every piece of the window
        self.head = 0  # every piece before it has left for every holder
        self.cursor = {h: 0 for p in pieces for h in p.holders}  # holder -> the first piece it may still need
        self.total = sum(p.length * len(p.holders) for p in pieces)

    @property
    def slots(self) -> list[Slot]:
        return [slot for _, slot, _ in self.parts]

    @property
    def done(self) -> bool:
        return self.head == len(self.pieces)

    def read(self, piece: OutgoingPiece) -> None:
        if piece.buf is None:
            piece.buf = self.pool.take()
            read_parts(self.parts, piece.start, piece.start + piece.length, piece.buf[:piece.length])
            piece.fields["checksum"] = xxhash.xxh3_64_intdigest(piece.data)

    def read_some(self, n: int) -> None:
        """Read up to `n` pieces of the window ahead of handing them out."""
        for piece in [p for p in self.pieces[self.head:self.head + self.window] if p.buf is None][:n]:
            self.read(piece)

    def read_all(self) -> None:
        for piece in self.pieces[self.head:]:
            self.read(piece)

    def next_for(self, holder: str) -> OutgoingPiece | None:
        """The next piece `holder` needs, read; None when it needs none (`wants` says whether for now, or for good).
        Call `handed` once it is on its way."""
        i = self.cursor[holder]
        while i < len(self.pieces) and holder not in self.pieces[i].holders:
            i += 1
        self.cursor[holder] = i
        if i >= min(len(self.pieces), self.head + self.window):
            return None
        piece = self.pieces[i]
        self.read(piece)
        return piece

    def handed(self, holder: str) -> None:
        self.cursor[holder] += 1

    def holding_back(self) -> list[str]:
        """The holders whose copies of the window's first piece have not left: those the window waits for."""
        if self.done:
            return []
        first = self.pieces[self.head]
        return sorted(set(first.holders) - first.left)

    def wants(self, holder: str) -> bool:
        """Whether `holder` has pieces still to be handed to it."""
        return any(holder in p.holders for p in self.pieces[self.cursor[holder]:])

    def left(self, piece: OutgoingPiece, holder: str) -> None:
        """ZeroMQ is done with `holder`'s copy of `piece`; the window moves on past the pieces done with."""
        piece.left.add(holder)
        while self.head < len(self.pieces) and len(self.pieces[self.head].left) == len(self.pieces[self.head].holders):
            done = self.pieces[self.head]
            self.pool.give(done.buf)
            done.buf = None
            self.head += 1


class Protector:
    def __init__(self, table: SlotTable, group: list[str], node: str, m: int, backend: str = "auto",
                 keep_bytes: int = KEEP_COMPLETE_BYTES):
        if node not in group:
            raise LayoutError(f"node {node!r} is not in its EC group {group}")
        if len(set(group)) != len(group):
            raise LayoutError(f"EC group {group} names a node twice")
        self.table, self.group, self.node = table, list(group), node
        self.plan = plan_stripes(len(group), m)
        self.g, self.m, self.k = len(group), m, len(group) - m
        self.me = group.index(node)
        self.codec = Codec(self.k, m, backend)
        # A parity chunk is held in memory whole: a peer's chunk_len beyond this machine's memory is a bad message.
        self.max_chunk_len = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.who = table.who
        # parity this node holds: (codeword, position) -> {step: entry}
        self.parity: dict[tuple[int, int], dict[int, ParityEntry]] = {}
        for c in self.plan.codewords:
            for ref in c.chunks[self.k:]:
                if ref.node == self.me:
                    self.parity[(c.index, ref.position)] = {}
        self.remote_parity: dict[str, set[tuple[int, int, int]]] = {}
        self.remote_sealed: dict[str, set[int]] = {}
        self.remote_ranks: dict[str, set[int]] = {}  # node -> the ranks whose steps it reported last
        self.remote_sending: dict[str, tuple[int, float]] = {}  # node -> (newest step it sent chunks of, when heard)
        # buffers of the pieces on their way: a window of twice this node's chunks, at least PIECES_IN_FLIGHT
        self._pool = PiecePool(max(PIECES_IN_FLIGHT, 2 * self.k))
        self._spare: np.ndarray | None = None  # the parity buffer of the last dropped step, for a next step's parity
        self.sent_step = -1
        self.sent_bytes = 0
        self.rejected: list[str] = []
        self.failed_rebuilds: set[int] = set()  # steps whose rebuilt bytes failed their checksums: never offered again
        self.keep_bytes = keep_bytes
        self._capped_at = -2  # the protected step when prune() last said it dropped complete parity above it
        # The newest step protected across the group so far (this timeline). The protected step falls back when a
        # member reports less parity (a replacement node starts with none): the step it fell from is the one a lost
        # node is rebuilt to, so parity at or below this mark is never dropped to keep newer steps within bounds.
        self._protected_high = -1

    # ---- what this node holds ------------------------------------------------------------------

    def full_steps(self) -> list[int]:
        """Steps for which every local rank of the job as it is now holds a sealed shard."""
        ranks = self.table.local_ranks()
        if not ranks:
            return []
        return sorted(set.intersection(*(set(self.table.sealed_steps(r)) for r in ranks)))

    def blob_parts(self, step: int) -> tuple[int, list[tuple[int, Slot, int]]]:
        """This node's blob at `step`: its length, and its parts for `read_parts`."""
        parts, offset = [], 0
        for rank in self.table.local_ranks():
            slot = next((s for s in self.table.ranks.get(rank, []) if self.table.current(s) and s.step == step), None)
            if slot is None:
                raise LayoutError(f"rank {rank} holds no sealed step {step}")
            parts.append((offset, slot, slot.manifest.nbytes))
            offset = align(offset + slot.manifest.nbytes)
        return offset, parts

    def blob_layout(self, step: int) -> tuple[dict, list[tuple[int, Slot, int]]]:
        """This node's blob at `step`: its layout (sent with its chunks), and its parts for `read_parts`."""
        nbytes, parts = self.blob_parts(step)
        return {"nbytes": nbytes, "ranks": [[slot.rank, off, slot.manifest.to_wire()] for off, slot, _ in parts]}, parts

    def parity_bytes(self) -> int:
        return sum(e.buf.nbytes for steps in self.parity.values() for e in steps.values())

    def complete_parity(self) -> list[list[int]]:
        return [[c, pos, step] for (c, pos), steps in self.parity.items()
                for step, e in steps.items() if e.complete(self.k)]

    def protected_step(self) -> int:
        """Newest step whose parity is complete on every holder of every codeword of the group (-1: none)."""
        have: dict[tuple[int, int], set[int]] = {}
        for c, pos, step in self.complete_parity():
            have.setdefault((c, pos), set()).add(step)
        for node, entries in self.remote_parity.items():
            for c, pos, step in entries:
                holder = self.plan.codewords[c].chunks[pos].node
                if self.group[holder] == node:
                    have.setdefault((c, pos), set()).add(step)
        steps = None
        for c in self.plan.codewords:
            for ref in c.chunks[self.k:]:
                s = have.get((c.index, ref.position), set())
                steps = s if steps is None else steps & s
        return max(steps) if steps else -1

    def rewind(self, step: int, epoch: int) -> list[int]:
        """The job restored `step` (-1: started afresh) and names the timeline that begins there `epoch`; return
        the steps whose parity this drops.

        Parity of steps newer than `step` belongs to the timeline training has left: those steps are trained
        again, and their new bytes may differ (training need not be deterministic). Pieces of them may still be
        on their way, and new pieces folded into old ones would make parity of neither timeline, so this node
        drops that parity and from now on takes only chunks of `epoch`. Every rank of the job opens the same step
        with the same epoch before any of them trains on, so no chunk of the new timeline is sent before every
        daemon knows its epoch."""
        dropped: set[int] = set()
        for steps in self.parity.values():
            for st in [st for st in steps if st > step]:
                self._spare = steps.pop(st).buf
                dropped.add(st)
        self.table.set_epoch(epoch)
        self._protected_high = min(self._protected_high, step)
        self.failed_rebuilds = {s for s in self.failed_rebuilds if s <= step}  # newer ones are trained again
        self.sent_step = min(self.sent_step, step)
        self.remote_sending = {n: (s, at) for n, (s, at) in self.remote_sending.items() if s <= step}
        # What the peers' ranks held of the timeline left behind: until each peer's next PeerHeld (a daemon sends
        # one as it rewinds), those steps must not count toward common(), or a rank here that sealed its new
        # step + 1 could reuse the slot of `step` while the other nodes' ranks hold nothing newer.
        self.table.remote = {r: {s for s in steps if s <= step} for r, steps in self.table.remote.items()}
        self.remote_sealed = {n: {s for s in steps if s <= step} for n, steps in self.remote_sealed.items()}
        return sorted(dropped)

    # ---- sending -------------------------------------------------------------------------------

    def choose_step(self, now: float, fresh_s: float) -> int | None:
        """The step whose chunks to send next, or None. Parity of a step completes only if every member sends
        that same step, so a node that falls behind joins the newest step a peer (heard from within `fresh_s`)
        is sending, if it holds it; otherwise it sends its own newest full step, and the others join it."""
        full = self.full_steps()
        if not full:
            return None
        ahead = [s for s, at in self.remote_sending.values() if now - at < fresh_s and s > self.sent_step]
        join = [s for s in ahead if s in full]
        if join:
            return max(join)
        if any(s > full[-1] for s in ahead):
            return None  # a peer sends a step this node has not sealed yet: join it once sealed
        return full[-1] if full[-1] > self.sent_step else None

    def chunks_to_send(self, step: int) -> OutgoingStep | None:
        """Every chunk of this node at `step`, for each of its parity holders, in pieces: the first piece of each
        chunk, then the second of each, and so on, so that a window of them holds pieces for every holder. The
        bytes are read out of the slots as `OutgoingStep` is asked for them.

        None, and nothing is sent, if a slot of the step no longer matches its manifest (memory that changed since
        the seal): parity of those bytes would count the step as protected, and a rebuild from it would give back
        bytes that fail their checksums. The slot is dropped, as a restore's check would drop it."""
        layout, parts = self.blob_layout(step)
        if any(self.table.check_sealed(slot) for _, slot, _ in parts):
            return None
        sc = ShardChunks(layout["nbytes"], self.k)
        chunks = []
        for word in self.plan.codewords:
            for ref in word.chunks[:self.k]:
                if ref.node == self.me:
                    chunks.append(({"step": step, "codeword": word.index, "position": ref.position,
                                    "chunk_len": sc.chunk_len, "epoch": self.table.epoch},
                                   ref.index * sc.chunk_len, [self.group[h.node] for h in word.chunks[self.k:]]))
        pieces = [OutgoingPiece(start + off, min(PIECE, sc.chunk_len - off),
                                {**fields, "offset": off, **({} if off else {"blob": layout})}, holders)
                  for off in range(0, sc.chunk_len, PIECE) for fields, start, holders in chunks]
        return OutgoingStep(step, parts, pieces, self._pool)

    # ---- receiving -----------------------------------------------------------------------------

    def accept_chunk(self, msg: P.PeerChunk, data: bytes) -> None:
        """Fold one piece of a data chunk into the parity this node holds; refuse anything that does not fit."""
        if msg.codeword >= len(self.plan.codewords) or msg.position >= self.k:
            raise ProtocolError(f"chunk for codeword {msg.codeword} position {msg.position} is outside g={self.g}, k={self.k}")
        if msg.chunk_len > self.max_chunk_len:
            raise ProtocolError(f"chunk of step {msg.step} from {msg.node} is {msg.chunk_len} bytes long, more than this"
                                f" machine's memory ({self.max_chunk_len} bytes) could hold as parity")
        word = self.plan.codewords[msg.codeword]
        if self.group[word.chunks[msg.position].node] != msg.node:
            raise ProtocolError(f"node {msg.node} does not own position {msg.position} of codeword {msg.codeword}")
        mine = [pos for (c, pos) in self.parity if c == msg.codeword]
        if not mine:
            raise ProtocolError(f"this node holds no parity of codeword {msg.codeword}")
        end = msg.offset + len(data)
        if not data or len(data) > PIECE or end > msg.chunk_len or (end < msg.chunk_len and len(data) != PIECE):
            raise ProtocolError(f"piece of {len(data)} bytes at offset {msg.offset} does not fit a chunk of"
                                f" {msg.chunk_len} bytes in pieces of {PIECE}")
        if msg.offset % PIECE:
            raise ProtocolError(f"piece at offset {msg.offset} is not on a {PIECE}-byte boundary")
        if msg.epoch != self.table.epoch:
            raise ProtocolError(f"chunk of step {msg.step} from {msg.node} is of timeline {msg.epoch}, and this node's"
                                f" is {self.table.epoch}: the job restored a step since, or {msg.node} has not yet")
        if xxhash.xxh3_64_intdigest(data) != msg.checksum:
            raise ChecksumError(f"chunk of step {msg.step} codeword {msg.codeword} from {msg.node} fails its checksum")
        if msg.offset == 0:
            P.check_blob(msg.blob, "chunk's blob layout")
        for pos in mine:
            steps = self.parity[(msg.codeword, pos)]
            done = [s for s, e in steps.items() if e.complete(self.k)]
            if done and msg.step < max(done):
                raise ProtocolError(f"chunk of step {msg.step} from {msg.node} is older than step {max(done)}, whose parity"
                                    " is complete here")
            e = steps.get(msg.step)
            if e is None:
                e = steps[msg.step] = ParityEntry(msg.step, self._zeros(msg.chunk_len))
            if (msg.position, msg.offset) in e.pieces:
                raise ProtocolError(f"duplicate chunk of step {msg.step} codeword {msg.codeword} position {msg.position}"
                                    f" at offset {msg.offset}")
            if e.want.setdefault(msg.position, msg.chunk_len) != msg.chunk_len:
                raise ProtocolError(f"chunk of step {msg.step} position {msg.position} was {e.want[msg.position]} bytes"
                                    f" long, now {msg.chunk_len}")
            if len(e.buf) < msg.chunk_len:  # shards of unequal size share the largest chunk length
                e.buf = np.concatenate([e.buf, np.zeros(msg.chunk_len - len(e.buf), np.uint8)])
            # Only the parity row this node keeps, folded straight into it.
            self.codec.accumulate(msg.position, np.frombuffer(data, np.uint8), [e.buf[msg.offset:end]],
                                  rows=[pos - self.k])
            e.pieces.add((msg.position, msg.offset))
            if msg.offset == 0:
                e.blobs[msg.node] = msg.blob
            pending = sorted(st for st, x in steps.items() if not x.complete(self.k))
            # Older steps still arriving are refused once a newer one is complete (above), so never complete: drop
            # them now, not once the group's protected step passes them. Keep at most MAX_PENDING_STEPS of the rest.
            dead = [st for st in pending if st < msg.step] if e.complete(self.k) else []
            for old in dead + [st for st in pending if st not in dead][:-MAX_PENDING_STEPS]:
                self._spare = steps.pop(old).buf

    def _zeros(self, n: int) -> np.ndarray:
        """A zeroed parity buffer, reusing a dropped step's: fresh memory costs a page fault per page."""
        buf, self._spare = self._spare, None
        if buf is None or len(buf) != n:
            return np.zeros(n, np.uint8)
        buf.fill(0)
        return buf

    def prune(self) -> None:
        """Drop parity older than the group's protected step. Codewords complete at different paces, so a
        codeword's older complete parity stays until one step is complete on every holder of every
        codeword: until then, that older step may be the only one a lost node can be rebuilt to. Of the complete
        steps newer than any step protected so far, the newest few are kept (KEEP_COMPLETE_STEPS, `keep_bytes`):
        only the newest steps are still sealed in the ranks' slots, the others could never be restored, and while
        some holder stops completing steps the protected step stays where it is."""
        floor = self.protected_step()
        self._protected_high = max(self._protected_high, floor)
        capped: set[int] = set()  # complete steps past the newest kept on some parity chunk: never protected here
        for steps in self.parity.values():
            newer = sorted((st for st, e in steps.items() if st > self._protected_high and e.complete(self.k)),
                           reverse=True)
            held = 0
            for i, st in enumerate(newer):
                held += steps[st].buf.nbytes
                if i >= KEEP_COMPLETE_STEPS and held > self.keep_bytes:
                    capped.update(newer[i:])
                    break
        for steps in self.parity.values():
            for st in [st for st in steps if st < floor or st in capped]:
                self._spare = steps.pop(st).buf
        if capped and self._capped_at != floor:
            self._capped_at = floor
            log.warning("%s protection has not passed step %d while this node completed parity of many newer steps:"
                        " some member of the group completes no newer step, or only steps long gone here (a holder"
                        " that gets no chunks, a sender far behind; its log says why). Of the newer steps' complete"
                        " parity this node keeps the newest %d, or as many as fit in --ec-keep-mib %d; dropped now:"
                        " %d step(s), %d to %d", self.who, floor, KEEP_COMPLETE_STEPS, self.keep_bytes >> 20,
                        len(capped), min(capped), max(capped))

    def note_peer(self, msg: P.PeerHeld, now: float) -> None:
        """Take what a peer holds. Decoding checked the rows' shapes (`PeerHeld.check`); this checks that the parity a
        member of this group reports is parity it holds under this node's plan, which a member started with another
        --ec-group or --ec-m breaks. A message that does not fit raises ProtocolError and changes nothing."""
        member = msg.node in self.group  # a node of another EC group reports parity of that group's plan
        for c, pos, _ in msg.parity if member else ():
            if c >= len(self.plan.codewords) or not self.k <= pos < self.g:
                raise ProtocolError(f"{msg.node} reports parity at codeword {c} position {pos}: this node's plan (g={self.g},"
                                    f" m={self.m}) has codewords 0..{self.g - 1} with parity at positions {self.k}..{self.g - 1};"
                                    " are the daemons of the group started alike?")
            holder = self.group[self.plan.codewords[c].chunks[pos].node]
            if holder != msg.node:
                raise ProtocolError(f"{msg.node} reports parity of codeword {c} position {pos}, which {holder} holds in EC"
                                    f" group {self.group} with m={self.m}: are the daemons of the group started alike?")
        self.remote_parity[msg.node] = {(c, p, s) for c, p, s in msg.parity} if member else set()
        self.remote_sending[msg.node] = (msg.sending, now)
        for rank in self.remote_ranks.get(msg.node, set()) - {row[0] for row in msg.held}:
            self.table.remote.pop(rank, None)  # a rank it no longer serves (the job restarted with other ranks)
        self.remote_ranks[msg.node] = {row[0] for row in msg.held}
        self.table.remote.update({row[0]: set(row[1:]) for row in msg.held})
        ranks = [set(row[1:]) for row in msg.held]
        self.remote_sealed[msg.node] = set.intersection(*ranks) if ranks else set()

    def stock(self, asker: str) -> P.PeerStock:
        blobs = {}
        for steps in self.parity.values():
            for step, e in steps.items():
                if e.complete(self.k) and asker in e.blobs:
                    blobs[str(step)] = e.blobs[asker]
        return P.PeerStock(self.node, self.full_steps(), self.complete_parity(), blobs)

    def serve_fetch(self, msg: P.PeerFetch) -> tuple[P.PeerData, np.ndarray]:
        """The bytes of one piece of a chunk this node holds (`P.PeerFetch`), in a buffer of their own: ZeroMQ sends
        it in place, after the parity buffer may hold another step or the slot another shard."""
        word = self.plan.codewords[msg.codeword] if msg.codeword < self.g else None
        if word is None or msg.position >= self.g or self.group[word.chunks[msg.position].node] != self.node:
            raise ProtocolError(f"this node holds no chunk at codeword {msg.codeword} position {msg.position}")
        if msg.length > PIECE:
            raise ProtocolError(f"a fetch asks for at most {PIECE} bytes at once, not {msg.length}")
        ref = word.chunks[msg.position]
        if ref.parity:
            e = self.parity[(msg.codeword, msg.position)].get(msg.step)
            if e is None or not e.complete(self.k):
                raise LayoutError(f"no complete parity of codeword {msg.codeword} for step {msg.step}")
            data = e.buf[msg.offset:msg.offset + msg.length].copy()
        else:
            nbytes, parts = self.blob_parts(msg.step)  # not its layout: every piece served would build the manifests
            chunk_len = ShardChunks(nbytes, self.k).chunk_len
            start = ref.index * chunk_len + min(msg.offset, chunk_len)
            data = np.empty(min(msg.length, (ref.index + 1) * chunk_len - start), np.uint8)
            read_parts(parts, start, start + len(data), data)
            self._check_served(parts, start, start + len(data))
        return P.PeerData(msg.step, msg.codeword, msg.position, msg.offset, xxhash.xxh3_64_intdigest(data)), data

    def _check_served(self, parts: list[tuple[int, Slot, int]], start: int, stop: int) -> None:
        """Check the slots' bytes [start, stop) of the blob just read for a fetch against their manifests, whole
        checksum chunks at a time: a slot that changed since its seal would rebuild another node with bytes that
        fail their checksums, and the rebuild would give up on the step though another peer could serve it. Such a
        slot is dropped, and the fetch refused (the rebuild asks another peer)."""
        for off, slot, n in parts:
            lo, hi = max(start, off) - off, min(stop, off + n) - off
            if lo >= hi:
                continue
            man, buf = slot.manifest, slot.buffer()
            cs = man.chunk_size
            for c in range(lo // cs, (hi - 1) // cs + 1):
                have = xxhash.xxh3_64_intdigest(buf[c * cs:min((c + 1) * cs, man.nbytes)])
                if have != man.checksums[c]:
                    why = checksum_mismatch(man, c, have, f"{self.who} rank {slot.rank}")
                    self.table.check_sealed(slot)  # drops it, saying so
                    raise why

    # ---- recovery ------------------------------------------------------------------------------

    def rebuildable(self, stocks: dict[str, P.PeerStock]) -> dict[int, dict]:
        """Steps this node can rebuild from the peers' stocks: step -> its blob layout. A step whose blob holds a
        manifest that fails its digest (changed in a peer's memory since it was sent) is as bad as rotten bytes:
        never offered again (`rebuild_failed`)."""
        out = {}
        candidates: dict[int, dict] = {}
        for st in stocks.values():
            for step, blob in st.blobs.items():
                candidates[int(step)] = blob
        for step, blob in candidates.items():
            if step in self.failed_rebuilds or self._sources(step, stocks) is None:
                continue
            try:
                for _, _, wire in blob["ranks"]:
                    Manifest.from_wire(wire)
            except ChecksumError as e:
                self.rebuild_failed(step, e)
                continue
            out[step] = blob
        return out

    def _sources(self, step: int, stocks: dict[str, P.PeerStock]) -> dict[int, list[tuple[int, str]]] | None:
        """For each codeword holding a chunk of this node: k (position, node) pairs that have it at `step`."""
        plan = {}
        for word in self.plan.codewords:
            if not any(ref.node == self.me and not ref.parity for ref in word.chunks):
                continue
            have = []
            for ref in word.chunks:
                name = self.group[ref.node]
                st = stocks.get(name)
                if name == self.node or st is None:
                    continue
                if (not ref.parity and step in st.sealed) or (ref.parity and [word.index, ref.position, step] in st.parity):
                    have.append((ref.position, name))
            if len(have) < self.k:
                return None
            plan[word.index] = have[:self.k]
        return plan

    def explain_loss(self, stocks: dict[str, P.PeerStock]) -> str:
        """Why this node's shards cannot be rebuilt, naming the lost nodes, or "" if nothing was ever protected."""
        known = sorted(int(s) for st in stocks.values() for s in st.blobs)
        if not known:
            return ""
        step = known[-1]
        lost = [i for i, name in enumerate(self.group)
                if name == self.node or name not in stocks or step not in stocks[name].sealed]
        try:
            recoverable(self.plan, lost)
        except UnrecoverableError as e:
            names = ", ".join(self.group[i] for i in lost)
            return f"step {step} of node {self.node} cannot be rebuilt: nodes {names} are lost or lack it. {e}"
        return f"step {step} of node {self.node} cannot be rebuilt: some parity of it is missing"

    def rebuild_failed(self, step: int, e: ChecksumError) -> None:
        """Rebuilt bytes of `step` failed their checksums (a peer's slot or parity holds bytes that changed after
        they were sealed, or a peer answered with another chunk), or a manifest of it that a peer keeps fails its
        digest (`rebuildable`): the step is never offered again, so that the restore that asked for it plans again
        with an older step."""
        self.failed_rebuilds.add(step)
        log.warning("%s step %d cannot be rebuilt: %s; it is not offered again, restore must use an older step",
                    self.who, step, e)


class Rebuild:
    """This node's shards of one step, rebuilt from its peers while the daemon serves on, a piece at a time: a
    piece is bytes [offset, offset + PIECE) of this node's chunk of one codeword, decoded from the same bytes of k
    other chunks of that codeword, each fetched from the peer that holds it. Up to WINDOW pieces are on their way
    or being decoded at once, across the codewords, so that every peer serves some. A thread of its own decodes
    each piece once its k parts are in and writes it into the ranks' slots (the first touch of their fresh memory
    is most of the time a rebuild takes, and the daemon's loop serves on meanwhile); the slots are taken when the
    rebuild begins (`begin`) and sealed, as if their trainers had, once every piece is in (`finish`). Besides the
    slots, it holds at most WINDOW * k pieces. A peer that does not answer within the timeout, or refuses, counts
    as lost, and the parts still needed come from the others if enough survive (else an UnrecoverableError).
    Rebuilt bytes are sealed only if they match the checksums the trainer recorded (else a ChecksumError, see
    `Protector.rebuild_failed`)."""

    WINDOW = 4

    def __init__(self, p: Protector, step: int, blob: dict, stocks: dict[str, P.PeerStock]):
        self.p, self.step, self.blob, self.stocks = p, step, blob, dict(stocks)
        self.who = p.who
        self.sources = self._plan()
        self.sc = ShardChunks(blob["nbytes"], p.k)
        self.parts: list[tuple[int, Slot, int]] = []  # (offset in the blob, slot, bytes) of each shard rebuilt
        self._writing: list[tuple[int, int, Manifest]] = []  # (rank, slot index, manifest): taken, not sealed yet
        self._out = np.empty(0, np.uint8)
        # this node's (position, chunk index) in each codeword rebuilt: a node's chunks are in distinct codewords
        self.mine = {c: next((ref.position, ref.index) for ref in p.plan.codewords[c].chunks
                             if ref.node == p.me and not ref.parity) for c in self.sources}
        n = self.sc.chunk_len
        # pieces left to fetch, (codeword, offset): each offset of every codeword before the next offset
        self.todo = collections.deque((c, off) for off in range(0, n, PIECE) for c in sorted(self.sources))
        self.got: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # piece on its way -> position -> its bytes
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rebuild")  # starts at first use
        self._decoding: collections.deque[concurrent.futures.Future] = collections.deque()  # pieces handed to it
        self.asked: dict[bytes, tuple[str, P.PeerFetch, float]] = {}  # request id -> (node, request, sent at)
        self.ranks = [rank for rank, _, _ in blob["ranks"]]
        self.total = blob["nbytes"]
        self.done = 0  # bytes of the blob decoded
        self.lost: list[str] = []  # "node: why", for each peer counted as lost
        self.started = time.monotonic()

    def begin(self) -> None:
        """Take a free slot for each rank's shard to rebuild (a rank whose shard is intact here keeps it)."""
        table = self.p.table
        try:
            for rank, offset, wire in self.blob["ranks"]:
                man = Manifest.from_wire(wire)
                if man.step in table.sealed_steps(rank):
                    continue  # only another local rank's shard was lost (e.g. found corrupt): this one is intact
                index = table.install_begin(rank, man)
                self._writing.append((rank, index, man))
                slot = table.ranks[rank][index]
                slot.buffer()  # mapped here: the decoding thread only writes into it
                self.parts.append((offset, slot, man.nbytes))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Free the slots taken and not sealed: their bytes are no step."""
        for rank, index, _ in self._writing:
            self.p.table.abort(rank, index)
        self._writing, self.parts = [], []

    def _plan(self) -> dict[int, list[tuple[int, str]]]:
        sources = self.p._sources(self.step, self.stocks)
        if sources is None:
            lost = f" (peers counted as lost: {'; '.join(self.lost)})" if self.lost else ""
            raise UnrecoverableError(f"{self.who} step {self.step} cannot be rebuilt: fewer than k={self.p.k} chunks"
                                     f" of some codeword survive{lost}")
        return sources

    def pump(self, net, now: float, timeout_s: float) -> bool:
        """Ask for the parts of the pieces at hand, take the replies that came (`net.take_answers` read them),
        decode the pieces complete; True once every piece is decoded."""
        while self._decoding and self._decoding[0].done():
            self._decoding.popleft().result()  # raises what the decoding raised
        while self.todo and len(self.got) + len(self._decoding) < self.WINDOW:
            self.got[self.todo.popleft()] = {}
        pending = {(req.codeword, req.offset, req.position) for _, req, _ in self.asked.values()}
        for (c, off), parts in self.got.items():
            for pos, node in self.sources[c]:
                if pos in parts or (c, off, pos) in pending:
                    continue
                req = P.PeerFetch(**net.header(node), step=self.step, codeword=c, position=pos, offset=off,
                                  length=self._width(off))
                try:
                    self.asked[net.ask(node, req)] = (node, req, now)
                except SnapGuardError as e:
                    self._lose(net, node, str(e))
                    return False
        for rid, (node, req, at) in list(self.asked.items()):
            try:
                got = net.answer(rid, req, P.PeerData)
            except SnapGuardError as e:  # a refusal, or the wrong kind of answer
                self._lose(net, node, str(e))
                return False
            if got is None:
                if now - at > timeout_s:
                    self._lose(net, node, f"peer {node} did not answer the fetch of chunk {req.position} of codeword"
                                          f" {req.codeword} (bytes {req.offset}..{req.offset + req.length}) within"
                                          f" {timeout_s:.1f} s")
                    return False
                continue
            del self.asked[rid]
            self._take(node, req, *got)
        for c, off in [key for key, parts in self.got.items() if len(parts) == self.p.k]:
            self._decoding.append(self._decoder.submit(self._decode, c, off, self.got.pop((c, off))))
        return not self.todo and not self.got and not self._decoding

    def _take(self, node: str, req: P.PeerFetch, reply: P.PeerData, bulk: list) -> None:
        s, c, pos, off = req.step, req.codeword, req.position, req.offset
        if (reply.step, reply.codeword, reply.position, reply.offset) != (s, c, pos, off) or len(bulk) != 1 \
                or len(bulk[0]) > req.length:
            raise ChecksumError(f"{self.who} peer {node} answered the fetch of chunk {pos} of codeword {c} of step {s}"
                                f" at offset {off} with chunk {reply.position} of codeword {reply.codeword} of step"
                                f" {reply.step} at offset {reply.offset}, in {len(bulk)} frame(s) of"
                                f" {sum(len(b) for b in bulk)} bytes ({req.length} asked)")
        if xxhash.xxh3_64_intdigest(bulk[0]) != reply.checksum:
            raise ChecksumError(f"{self.who} chunk {pos} of codeword {c} from {node} fails its checksum")
        self.got[c, off][pos] = np.frombuffer(bulk[0], np.uint8)

    def _lose(self, net, node: str, why: str) -> None:
        """Count `node` as lost: plan the parts still needed from the other peers. What the others were asked for
        and still serve the new plan stays on its way."""
        log.warning("%s rebuilding step %d: %s; counting peer %s as lost", self.who, self.step, why, node)
        self.lost.append(f"{node}: {why}")
        self.stocks.pop(node, None)
        self.sources = self._plan()
        keep = {c: {pos for pos, _ in have} for c, have in self.sources.items()}
        for rid, (asked, req, _) in list(self.asked.items()):
            if asked == node or req.position not in keep[req.codeword]:
                net.cancel(rid)
                del self.asked[rid]
        for (c, off), parts in self.got.items():
            self.got[c, off] = {pos: x for pos, x in parts.items() if pos in keep[c]}

    def _width(self, off: int) -> int:
        """The length of the pieces at `off` of this node's chunks (the last one of a chunk is shorter)."""
        return min(PIECE, self.sc.chunk_len - off)

    def _decode(self, c: int, off: int, parts: dict[int, np.ndarray]) -> None:
        """Decode this node's piece at `off` of codeword `c` from the k parts fetched, into its slots (in the
        decoding thread: the codec and NumPy's copies let the daemon's loop run meanwhile). A piece that lies in
        one rank's slot is decoded straight into it; one that spans two slots, or the blob's end, goes through a
        buffer."""
        p = self.p
        width = self._width(off)
        chunks: list = [None] * p.g
        for pos, x in parts.items():  # a shorter chunk (of a smaller shard) is zeros up to the parity's length
            chunks[pos] = x if len(x) == width else np.concatenate([x, np.zeros(width - len(x), np.uint8)])
        pos, index = self.mine[c]
        start = index * self.sc.chunk_len + off
        out = part_view(self.parts, start, start + width)
        if out is not None:
            p.codec.decode(chunks, {pos: out})
        else:
            if len(self._out) < width:
                self._out = np.empty(width, np.uint8)
            p.codec.decode(chunks, {pos: self._out[:width]})
            write_parts(self.parts, start, self._out[:width])
        before, self.done = self.done, min(self.total, self.done + width)
        if before < self.total // 2 <= self.done:
            fault_point("daemon.rebuild.mid", self.step)

    def finish(self) -> None:
        """Seal the ranks' slots, each once its bytes match their checksums."""
        self._decoder.shutdown()
        table = self.p.table
        while self._writing:
            rank, index, man = self._writing[0]
            try:
                table.seal(rank, man.step, index, man)
            except ChecksumError:
                self._writing.pop(0)  # the table freed that slot
                raise
            self._writing.pop(0)
        peers = sorted({n for have in self.sources.values() for _, n in have})
        log.warning("%s rebuilt step %d of ranks %s from peers %s in %.2f s", self.who, self.step, self.ranks, peers,
                    time.monotonic() - self.started)

    def _drop_asks(self, net) -> None:
        for rid in self.asked:
            net.cancel(rid)
        self.asked = {}

    def cancel(self, net) -> None:
        """Give up: drop the fetches on their way, wait for the piece being decoded (a few milliseconds; the
        others are dropped), and free the slots not sealed."""
        self._drop_asks(net)
        for f in self._decoding:
            f.cancel()
        self._decoder.shutdown(wait=True)
        self._decoding.clear()
        self.abort()
