"""The daemon's slots: the pure reuse rule (plan_begin, common_step) and SlotTable on real shm files."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest

from snapguard.daemon.slots import FREE, SEALED, WRITING, SlotTable, common_step, plan_begin
from snapguard.errors import ChecksumError, ConfigError, LayoutError, ShmSpaceError
from snapguard.layout import MANIFEST_VERSION, Manifest, TensorEntry, chunk_checksums, manifest_digest

from conftest import SHM_ROOT, unique_id

# ---- the pure rule -------------------------------------------------------------------------------


def S(step: int) -> tuple[str, int]:
    return (SEALED, step)


W, F = (WRITING, 3), (FREE, -1)


@pytest.mark.parametrize(("slots", "step", "common", "want"), [
    ((F, F), 0, -1, ("grant", 0)),                  # first snapshot
    ((S(0), F), 1, -1, ("grant", 1)),               # a free slot is always safe
    ((F, S(0)), 1, -1, ("grant", 0)),
    ((S(2), W), 3, 1, ("grant", 1)),                # a slot left WRITING (its writer died) is reused first
    ((S(4), S(5)), 6, 5, ("grant", 0)),             # every rank holds 5: step 4's slot may go
    ((S(5), S(4)), 6, 5, ("grant", 1)),
    ((S(4), S(5)), 6, 4, ("wait", 5)),              # another rank has not sealed 5: keep 4, the shared step
    ((S(4), S(5)), 6, -1, ("wait", 5)),
    ((S(4), S(5), S(6)), 7, 5, ("grant", 0)),       # three slots: 4 may go once all hold 5 (or 6)
    ((S(4), S(5), S(6)), 7, 6, ("grant", 0)),
    ((S(4), S(5), S(6)), 7, 4, ("wait", 5)),
])
def test_plan_begin_reuses_a_sealed_slot_only_when_a_shared_step_stays(slots, step, common, want):
    d = plan_begin(tuple(slots), step, common)
    got = (d.action, d.slot if d.action == "grant" else d.need)
    assert got == want, d


@pytest.mark.parametrize("step", [5, 4, 0])
def test_plan_begin_refuses_a_step_that_is_not_newer(step):
    d = plan_begin((S(4), S(5)), step, 5)
    assert d.action == "error" and f"step {step} is not newer than step 5" in d.reason


def test_plan_begin_with_no_slots_is_an_error():
    assert plan_begin((), 0, -1).action == "error"


def reachable_without_shared_step(rule, ranks: int = 3, last_step: int = 5) -> list:
    """Every interleaving of `ranks` ranks, each alternately asking `rule` for a slot and sealing it, up to
    `last_step`: the reachable states in which every rank has sealed something, yet no step is sealed on
    all of them. A crash in such a state leaves nothing to restore (an unfinished copy is never sealed)."""
    def common(held):
        return common_step({r: [s for st, s in slots if st == SEALED] for r, slots in enumerate(held)}, ranks)

    start = (tuple((F, F) for _ in range(ranks)), (0,) * ranks)
    seen, todo, bad = {start}, [start], []
    while todo:
        held, nxt = todo.pop()
        if all(any(st == SEALED for st, _ in slots) for slots in held) and common(held) < 0:
            bad.append(held)
        for r in range(ranks):
            slots = list(held[r])
            writing = [i for i, (st, _) in enumerate(slots) if st == WRITING]
            n2 = nxt
            if writing:  # the copy finishes: seal
                slots[writing[0]] = S(slots[writing[0]][1])
            elif nxt[r] <= last_step:  # start the next step's copy, if the rule allows
                d = rule(tuple(slots), nxt[r], common(held))
                if d.action != "grant":
                    continue
                slots[d.slot] = (WRITING, nxt[r])
                n2 = tuple(s + 1 if k == r else s for k, s in enumerate(nxt))
            else:
                continue
            state = (tuple(tuple(slots) if k == r else held[k] for k in range(ranks)), n2)
            if state not in seen:
                seen.add(state)
                todo.append(state)
    assert len(seen) > 100, "the walk must really explore interleavings"
    return bad


def test_two_slots_never_leave_ranks_without_a_shared_step():
    assert reachable_without_shared_step(plan_begin) == []


def test_the_walk_catches_a_rule_that_reuses_slots_blindly():
    """The check above can fail: reusing the oldest slot without asking about other ranks loses the shared step."""
    def blind(slots, step, common):
        return plan_begin(slots, step, max(s for _, s in slots))

    bad = reachable_without_shared_step(blind)
    # DESIGN.md's example: one rank sealed 1 and 2 over step 0 while the others still copy step 1
    assert ((S(0), F), (S(0), F), (S(2), S(1))) in bad


def test_common_step():
    assert common_step({0: [3, 4], 1: [4, 5], 2: [4]}, 3) == 4
    assert common_step({0: [3, 4], 1: [4, 5]}, 3) == -1          # rank 2 holds nothing
    assert common_step({0: [3], 1: [4]}, 2) == -1
    assert common_step({}, 0) == -1
    assert common_step({0: [1, 9]}, 1) == 9


# ---- SlotTable on files --------------------------------------------------------------------------

@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(prefix=f"sgtest-{os.getpid()}-", dir=SHM_ROOT)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def table(shm_dir):
    t = SlotTable(unique_id("slots"), "n0", shm_dir)
    yield t
    t.stop_growing()


def reserved(table: SlotTable, rank: int, nbytes: int, timeout_s: float = 10.0) -> list:
    """`reserve` again until `rank`'s slots have grown in the grower threads, as the daemon does on every Reserve a
    Guard sends; its slots."""
    deadline = time.monotonic() + timeout_s
    while table.reserve(rank, nbytes) != (0, 0):
        assert time.monotonic() < deadline, f"rank {rank}'s slots did not grow to {nbytes} bytes in {timeout_s} s"
        time.sleep(0.01)
    return table.ranks[rank]


def payload(step: int, rank: int, n: int = 4096) -> bytes:
    return bytes((step * 31 + rank * 7 + i) % 251 for i in range(n))


def manifest_for(t: SlotTable, rank: int, world: int, step: int, data: bytes, chunk: int = 1024) -> Manifest:
    return Manifest(MANIFEST_VERSION, t.job, rank, world, step, len(data), chunk,
                    [TensorEntry("x", "uint8", [len(data)], 0, len(data))],
                    chunk_checksums(memoryview(data), len(data), chunk), msgpack.packb(["d", []]), time.time())


def write_and_seal(t: SlotTable, rank: int, step: int, world: int = 1) -> int:
    data = payload(step, rank)
    d = t.begin(rank, step, len(data))
    assert d.action == "grant", d
    slot = t.ranks[rank][d.slot]
    slot.buffer()[:len(data)] = data
    t.seal(rank, step, d.slot, manifest_for(t, rank, world, step, data))
    return d.slot


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_reserve_allocates_private_files_of_the_asked_size(table):
    done, total = table.reserve(0, 1 << 20)
    assert total == 2 << 20 and 0 <= done <= total, "it grows in the background"
    assert [s.state for s in table.ranks[0]] == ["allocating"] * 2, "until a later call takes the grown slots"
    slots = reserved(table, 0, 1 << 20)
    assert len(slots) == 2 and mode(table.dir) == 0o700
    for s in slots:
        assert os.path.getsize(s.path) == 1 << 20 and mode(s.path) == 0o600 and s.state == FREE
        assert os.stat(s.path).st_blocks * 512 >= 1 << 20, "slot memory must be allocated up front"
    assert table.used_bytes() == 2 << 20
    assert table.reserve(0, 1 << 10) == (0, 0)  # smaller: nothing shrinks or moves
    assert [s.capacity for s in table.ranks[0]] == [1 << 20, 1 << 20]


def test_seal_writes_the_manifest_last_and_private(table):
    i = write_and_seal(table, 0, 0)
    s = table.ranks[0][i]
    assert s.state == SEALED and s.step == 0 and mode(s.manifest_path) == 0o600
    with open(s.manifest_path, "rb") as f:
        assert Manifest.from_wire(msgpack.unpackb(f.read(), raw=False)) == s.manifest
    assert table.held() == {0: [0]} and table.common() == 0


def test_a_rank_ahead_waits_until_every_rank_sealed_the_step_it_would_keep(table):
    for step in (0, 1):
        write_and_seal(table, 0, step, world=2)
    write_and_seal(table, 1, 0, world=2)
    assert table.common() == 0
    d = table.begin(0, 2, 4096)  # rank 0 would overwrite step 0, the only step rank 1 shares
    assert (d.action, d.need) == ("wait", 1)
    assert table.held()[0] == [0, 1], "a refused begin must not touch the sealed slots"
    write_and_seal(table, 1, 1, world=2)
    assert table.common() == 1
    d = table.begin(0, 2, 4096)
    assert d.action == "grant" and table.ranks[0][d.slot].state == WRITING
    assert not os.path.exists(table.ranks[0][d.slot].manifest_path), "the commit marker goes before any write"
    assert table.held() == {0: [1], 1: [0, 1]} and table.common() == 1


def test_seal_refuses_what_was_not_granted_and_changes_nothing(table):
    write_and_seal(table, 0, 0)
    data = payload(1, 0)
    d = table.begin(0, 1, len(data))
    table.ranks[0][d.slot].buffer()[:len(data)] = data
    good = manifest_for(table, 0, 1, 1, data)
    other = 1 - d.slot
    cases = [
        (lambda: table.seal(0, 1, other, good), "is sealed for step 0, not being written for step 1"),
        (lambda: table.seal(0, 1, 5, good), "rank 0 has no slot 5"),
        (lambda: table.seal(3, 1, 0, good), "rank 3 has no slot 0"),
        (lambda: table.seal(0, 2, d.slot, good), "not being written for step 2"),
        (lambda: table.seal(0, 1, d.slot, dataclasses.replace(good, job="other")), "names job 'other'"),
        (lambda: table.seal(0, 1, d.slot, dataclasses.replace(good, nbytes=1 << 20, checksums=[0] * 1024)),
         "does not fit a slot of 4096 bytes"),
    ]
    for call, match in cases:
        with pytest.raises(LayoutError, match=match):
            call()
        assert table.held() == {0: [0]} and table.ranks[0][d.slot].state == WRITING
    table.seal(0, 1, d.slot, good)
    assert table.held() == {0: [0, 1]}


def test_seal_with_wrong_checksums_frees_the_slot_and_keeps_the_old_step(table):
    write_and_seal(table, 0, 0)
    data = payload(1, 0)
    d = table.begin(0, 1, len(data))
    table.ranks[0][d.slot].buffer()[:len(data)] = data
    bad = manifest_for(table, 0, 1, 1, data[:-1] + b"\x00")
    with pytest.raises(ChecksumError, match="shard for step 1 has checksum"):
        table.seal(0, 1, d.slot, bad)
    assert table.ranks[0][d.slot].state == FREE and table.held() == {0: [0]}


def test_verified_steps_drops_a_slot_whose_bytes_changed(table, caplog):
    for step in (0, 1):
        write_and_seal(table, 0, step)
    s1 = next(s for s in table.ranks[0] if s.step == 1)
    s1.buffer()[100] ^= 0xFF
    with caplog.at_level(logging.WARNING, logger="snapguard.daemon.slots"):
        steps, dropped = table.verified_steps(0)
    assert steps == [0] and len(dropped) == 1 and "shard for step 1" in dropped[0]
    assert "restore will use an older step" in caplog.text
    assert not os.path.exists(s1.manifest_path) and s1.state == FREE


def test_open_rewinds_the_rank_and_drop_forgets(table):
    for step in (0, 1):
        write_and_seal(table, 0, step)
    with pytest.raises(LayoutError, match=r"rank 0 holds no sealed step 7 \(it holds \[0, 1\]\)"):
        table.open(0, 7)
    assert table.held() == {0: [0, 1]}
    assert table.open(0, 0).step == 0
    assert table.held() == {0: [0]}
    table.drop(0, -1)
    assert table.sealed_steps(0) == [] and table.common() == -1
    assert not any(os.path.exists(s.manifest_path) for s in table.ranks[0])


def test_a_new_table_readopts_sealed_slots_and_nothing_else(table, shm_dir, caplog):
    for step in (0, 1):
        write_and_seal(table, 0, step, world=2)
    write_and_seal(table, 1, 0, world=2)
    d = table.begin(1, 1, 4096)  # rank 1 is mid-copy of step 1 when the daemon dies
    table.ranks[1][d.slot].buffer()[:10] = b"half-write"
    stray = os.path.join(table.dir, "r00001.s0.manifest.new")
    open(stray, "wb").write(b"torn")
    again = SlotTable(table.job, table.node, shm_dir)
    again.adopt()
    assert again.held() == {0: [0, 1], 1: [0]} and again.world_size == 2 and again.common() == 0
    assert not os.path.exists(stray)
    for r in (0, 1):
        for a, b in zip(table.ranks[r], again.ranks[r]):
            assert (a.path, a.capacity) == (b.path, b.capacity)
            if b.state == SEALED:
                assert a.manifest == b.manifest

    # corrupt rank 0's step 1 bytes and rank 1's manifest file: a third table refuses both, saying so
    s01 = next(s for s in again.ranks[0] if s.step == 1)
    s01.buffer()[7] ^= 1
    s10 = next(s for s in again.ranks[1] if s.step == 0)
    open(s10.manifest_path, "wb").write(b"\x81\xa1x\x01")
    third = SlotTable(table.job, table.node, shm_dir)
    with caplog.at_level(logging.WARNING, logger="snapguard.daemon.slots"):
        third.adopt()
    assert third.held() == {0: [0]} and third.sealed_steps(1) == []
    assert "not re-adopting rank 0 slot" in caplog.text and "not re-adopting rank 1 slot" in caplog.text


def test_the_jobs_epoch_outlives_the_daemon_in_a_private_file(table, shm_dir, caplog):
    """A restarted daemon keeps stamping its chunks with the timeline of the job's last restore."""
    write_and_seal(table, 0, 0)
    table.set_epoch(12345)
    path = os.path.join(table.dir, "epoch")
    assert mode(path) == 0o600
    again = SlotTable(table.job, table.node, shm_dir)
    again.adopt()
    assert again.epoch == 12345 and again.held() == {0: [0]}
    open(path, "w").write("not a number")
    third = SlotTable(table.job, table.node, shm_dir)
    with caplog.at_level(logging.WARNING, logger="snapguard.daemon.slots"):
        third.adopt()
    assert third.epoch == 0 and "cannot read the job's epoch" in caplog.text


def test_remove_all_deletes_every_file_and_the_directory(table):
    write_and_seal(table, 0, 0)
    reserved(table, 1, 4096)
    assert os.listdir(table.dir)
    table.remove_all()
    assert not os.path.exists(table.dir)


def test_a_growth_that_ends_after_its_rank_was_removed_and_made_anew_with_fewer_slots_leaves_the_new_ones(shm_dir):
    """A rank's slots were growing (here: three, as under erasure coding) when the rank was removed (an old world's
    rank, retired) and made anew by a daemon of two slots per rank: the daemon's loop takes the finished growths
    without an IndexError (which would stop it), and leaves the new slots' files alone."""
    t = SlotTable(unique_id("regrow"), "n0", shm_dir, slots_per_rank=3)
    try:
        t.reserve(0, 1 << 20)
        growing = list(t._growing.values())
        assert len(growing) == 3
        for g in growing:
            g.future.result(10)
        t._remove_rank(0)
        t.slots_per_rank = 2
        t.reserve(0, 0)  # the rank anew: two empty slots
        t.settle_growth()
        assert [os.path.exists(s.path) for s in t.ranks[0]] == [True, True]
        assert not t._growing
    finally:
        t.stop_growing()


def test_a_configured_limit_refuses_slots_saying_how_much_is_needed_and_free(shm_dir):
    t = SlotTable(unique_id("limit"), "n0", shm_dir, shm_limit=3 << 20)
    with pytest.raises(ShmSpaceError) as e:
        t.reserve(0, 2 << 20)
    msg = str(e.value)
    assert "rank 0: 2 snapshot slot(s) of 2.0 MiB need 4.0 MiB more shared memory" in msg
    assert "the daemon's limit of 3.0 MiB leaves 3.0 MiB" in msg and "--shm-size" in msg
    assert [os.path.getsize(os.path.join(t.dir, n)) for n in os.listdir(t.dir)] == [0, 0], \
        "nothing may be allocated when the space is not there"
    reserved(t, 0, 1 << 20)  # what fits, fits
    assert t.used_bytes() == 2 << 20
    with pytest.raises(ShmSpaceError, match="leaves 1.0 MiB"):
        t.reserve(1, 1 << 20)


def sealed_step0(table: SlotTable, data: bytes, chunk: int):
    """Rank 0 of a one-rank job seals step 0 holding `data` (checksummed in chunks of `chunk` bytes); its slot."""
    d = table.begin(0, 0, len(data))
    slot = table.ranks[0][d.slot]
    slot.buffer()[:len(data)] = data
    table.seal(0, 0, d.slot, manifest_for(table, 0, 1, 0, data, chunk=chunk))
    return slot


def test_chunks_on_their_way_are_read_out_before_their_slot_is_handed_out(table):
    """A daemon reads a step's chunks out of the slots a piece at a time while sending them. Before a trainer may
    overwrite one of those slots, the daemon reads the rest (`read_all`): what is sent is the sealed step,
    never what the trainer writes next."""
    import numpy as np

    from snapguard.daemon.protect import PIECE, Protector

    data = np.random.default_rng(0).integers(0, 256, PIECE + 4096, dtype=np.uint8).tobytes()
    slot = sealed_step0(table, data, 1 << 20)
    p = Protector(table, ["n0", "n1"], "n0", 1)  # k = 1: the one chunk is the whole shard, in two pieces

    def sent(read_all_first: bool) -> bytes:
        out = p.chunks_to_send(0)
        assert list(out.cursor) == ["n1"]
        got = []
        got.append(out.next_for("n1").data.tobytes())  # the first piece is read and on its way
        out.handed("n1")
        if read_all_first:
            out.read_all()
        slot.buffer()[:len(data)] = bytes(len(data))  # the trainer writes its next step into the slot
        while (piece := out.next_for("n1")) is not None:
            got.append(piece.data.tobytes())
            out.handed("n1")
        slot.buffer()[:len(data)] = data
        return b"".join(got)

    assert sent(read_all_first=True)[:len(data)] == data
    assert sent(read_all_first=False)[:len(data)] != data, "the tail was read after the slot was overwritten"


def test_a_step_whose_slot_changed_since_its_seal_is_dropped_not_sent_to_its_parity_holders(table):
    """Parity of bytes that no longer match their manifest would count the step as protected, and a rebuild from it
    would give back bytes that fail their checksums: the daemon checks a step's slots before its chunks go out."""
    from snapguard.daemon.protect import Protector

    data = bytes(range(256)) * 64
    slot = sealed_step0(table, data, 4096)
    p = Protector(table, ["n0", "n1"], "n0", 1)
    assert p.chunks_to_send(0) is not None
    slot.buffer()[5000] ^= 0x10  # a bit flipped in memory after the seal
    assert p.chunks_to_send(0) is None
    assert table.sealed_steps(0) == [] and p.full_steps() == []


def test_a_fetch_of_a_chunk_whose_slot_changed_since_its_seal_is_refused_and_the_slot_dropped(table):
    """A rebuild of another node fetches this node's chunks in pieces: bytes that no longer match their manifest
    must not be served (the rebuild would fail its checksums and give up on the step); refused, the rebuild asks
    another peer."""
    from snapguard import protocol as P
    from snapguard.daemon.protect import Protector
    from snapguard.errors import ChecksumError

    data = bytes(range(256)) * 256  # 64 KiB: 16 checksum chunks of 4 KiB
    slot = sealed_step0(table, data, 4096)
    p = Protector(table, ["n0", "n1"], "n0", 1)
    c, pos = next((w.index, ref.position) for w in p.plan.codewords for ref in w.chunks
                  if ref.node == p.me and not ref.parity)

    def fetch(offset: int, length: int):
        return p.serve_fetch(P.PeerFetch("j", "n1", 1, 1, step=0, codeword=c, position=pos, offset=offset,
                                         length=length))

    reply, got = fetch(0, len(data))
    assert got.tobytes() == data
    slot.buffer()[40000] ^= 0x10  # a bit flipped in memory after the seal: chunk 9
    reply, got = fetch(0, 32768)  # chunks 0-7: served
    assert got.tobytes() == data[:32768]
    with pytest.raises(ChecksumError, match=r"rank 0: shard for step 0 has checksum .* in chunk 9 \(bytes 36864..\)"):
        fetch(36000, 4000)  # ends in chunk 9
    assert table.sealed_steps(0) == []


def test_a_step_on_its_way_holds_a_window_of_pieces_out_of_the_slots_not_a_copy_of_them(table):
    """g=3, m=1: node n0's blob of 12 pieces is two chunks of 6, each for one parity holder. Pieces are read out of
    the slots only as the window of 8 lets them out: a holder that has its pieces of the window waits for the
    other holder (the slowest paces both), the window moves on as ZeroMQ is done with pieces, and their buffers
    are reused. Each holder gets every byte of its chunk, in order, each piece with its checksum."""
    import numpy as np
    import xxhash

    from snapguard.daemon.protect import PIECE, Protector

    data = np.random.default_rng(1).integers(0, 256, 12 * PIECE, dtype=np.uint8)
    d = table.begin(0, 0, len(data))
    np.frombuffer(table.ranks[0][d.slot].buffer(), np.uint8, len(data))[:] = data
    table.seal(0, 0, d.slot, manifest_for(table, 0, 1, 0, data.tobytes(), chunk=16 << 20))
    p = Protector(table, ["n0", "n1", "n2"], "n0", 1)
    out = p.chunks_to_send(0)
    assert sorted(out.cursor) == ["n1", "n2"] and len(out.pieces) == 12 and out.window == 8
    got: dict[str, list] = {"n1": [], "n2": []}
    in_flight = []  # (holder, piece) handed out, whose copies ZeroMQ has not let go of yet

    def hand(holder: str) -> int:
        n = 0
        while (piece := out.next_for(holder)) is not None:
            fields = piece.fields
            assert fields["checksum"] == xxhash.xxh3_64_intdigest(piece.data) and fields["offset"] % PIECE == 0
            got[holder].append((fields["codeword"], fields["offset"], piece.data.tobytes()))
            out.handed(holder)
            in_flight.append((holder, piece))
            n += 1
        return n

    def read_out() -> int:
        return sum(piece.buf is not None for piece in out.pieces)

    assert hand("n1") == 4 and read_out() == 4, "n1's pieces among the first 8, read as they are handed out"
    assert out.wants("n1") and hand("n1") == 0, "the window is n1's to move on only with n2's pieces in it"
    assert hand("n2") == 4 and read_out() == 8
    buffers = {id(piece.buf) for piece in out.pieces if piece.buf is not None}
    first = out.pieces[0].holders[0]
    other = ({"n1", "n2"} - {first}).pop()
    assert out.holding_back() == [first]
    for holder, piece in [x for x in in_flight if x[0] == other]:  # the other holder took all of its pieces...
        out.left(piece, holder)
    in_flight = [x for x in in_flight if x[0] == first]
    assert out.head == 0 and out.holding_back() == [first], "...and the window waits for the first holder alone"
    out.left(*reversed(in_flight.pop(0)))  # ZeroMQ is done with the first piece: the window moves on
    assert out.head == 2 and read_out() == 6 and out.holding_back() == [first]
    assert hand("n1") + hand("n2") == 2 and read_out() == 8
    while in_flight:
        out.left(*reversed(in_flight.pop(0)))
        hand("n1"), hand("n2")
        assert read_out() <= 8
        buffers |= {id(piece.buf) for piece in out.pieces if piece.buf is not None}
    assert out.done and read_out() == 0 and not out.wants("n1") and not out.wants("n2")
    assert len(buffers) == 8, "every piece went out in one of the window's 8 buffers"
    sc_len = 6 * PIECE
    chunks = {}
    for holder, pieces in got.items():
        assert [off for _, off, _ in pieces] == [i * PIECE for i in range(6)], "a holder's pieces come in order"
        chunks[holder] = b"".join(b for _, _, b in pieces)
    assert sorted(chunks.values()) == sorted([data[:sc_len].tobytes(), data[sc_len:].tobytes()])


def test_a_restore_forgets_what_the_peers_held_of_the_timeline_left_behind(table):
    """Rank 0 is served here, rank 1 by peer n1, which last said it holds steps 2 and 3. The job restores step 2
    and rank 0 seals its new step 3. Until n1 says what it holds after its own rewind, its old step 3 must not
    make step 3 common: rank 0 would then overwrite step 2, the only step both ranks hold."""
    from snapguard import protocol as P
    from snapguard.daemon.protect import Protector

    table.note_world(2, 0)
    for step in (2, 3):
        write_and_seal(table, 0, step, world=2)
    p = Protector(table, ["n0", "n1"], "n0", 1)
    p.note_peer(P.PeerHeld(job=table.job, node="n1", boot=1, seq=1, held=[[1, 2, 3]], parity=[]), time.monotonic())
    assert table.common() == 3
    table.open(0, 2)  # what the daemon does on Open: forget rank 0's newer steps, then rewind
    p.rewind(2, epoch=7)
    write_and_seal(table, 0, 3, world=2)  # the new timeline's step 3
    assert table.common() == 2
    assert table.plan(0, 4)[0].action == "wait", "the slot of step 2 must not be handed out"


# ---- what lies in the shared, world-writable directory -------------------------------------------

@pytest.fixture
def victim():
    """A directory of ours that another user would like us to chmod and empty: 0755, holding files."""
    d = tempfile.mkdtemp(prefix=f"sgvictim-{os.getpid()}-", dir="/tmp")
    os.chmod(d, 0o755)
    for name in ("precious.txt", "r00000.s0.data", "r00000.s0.data.new"):
        with open(os.path.join(d, name), "w") as f:
            f.write("keep me")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_symlink_planted_at_the_slot_directory_is_refused_and_its_target_left_alone(table, victim):
    os.symlink(victim, table.dir)  # another user may do this in /dev/shm before the daemon starts
    for call in (table.adopt, lambda: table.reserve(0, 4096), lambda: table.set_epoch(3)):
        with pytest.raises(ConfigError, match="is a symlink or not a directory"):
            call()
    table.remove_all()
    assert os.path.islink(table.dir)
    assert mode(victim) == 0o755 and sorted(os.listdir(victim)) == ["precious.txt", "r00000.s0.data",
                                                                      "r00000.s0.data.new"]


@pytest.mark.parametrize("what", ["file", "open-dir"])
def test_a_slot_directory_that_is_not_a_private_directory_is_refused(table, what):
    if what == "file":
        open(table.dir, "w").close()
        match = "is a symlink or not a directory"
    else:  # others could have planted files in it before we came
        os.mkdir(table.dir)
        os.chmod(table.dir, 0o777)
        match = "is writable by others"
    with pytest.raises(ConfigError, match=match):
        table.adopt()


def test_remove_all_deletes_only_the_files_a_table_writes(table, caplog):
    write_and_seal(table, 0, 0)
    table.set_epoch(7)
    ours = os.path.join(table.dir, "r00000.s1.manifest.new")
    open(ours, "wb").close()
    foreign = os.path.join(table.dir, "notes.txt")
    open(foreign, "w").close()
    with caplog.at_level(logging.WARNING, logger="snapguard.daemon.slots"):
        table.remove_all()
    assert os.listdir(table.dir) == ["notes.txt"]
    assert "holds files snapguard did not write (notes.txt)" in caplog.text


@pytest.mark.parametrize("how", ["limit", "fallocate"])
def test_a_begin_refused_for_lack_of_memory_keeps_every_sealed_step(shm_dir, monkeypatch, how):
    """The optimizer creates its state on the first step, so a rank's second Begin may ask for far more memory.
    If that is not there, the refusal must leave the sealed steps as they were."""
    t = SlotTable(unique_id("space"), "n0", shm_dir, shm_limit=1 << 20 if how == "limit" else None)
    for step in (0, 1):
        write_and_seal(t, 0, step)
    if how == "fallocate":  # the free-space check passes, then the memory is gone (another job took it)
        def no_space(fd, offset, length):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "posix_fallocate", no_space)

    def files():
        return {name: open(os.path.join(t.dir, name), "rb").read() for name in sorted(os.listdir(t.dir))}

    before = files()
    with pytest.raises(ShmSpaceError):
        t.begin(0, 2, 2 << 20)
    assert t.held() == {0: [0, 1]} and [s.state for s in t.ranks[0]] == [SEALED, SEALED]
    assert files() == before, "not one file may change"
    again = SlotTable(t.job, t.node, shm_dir)
    again.adopt()
    assert again.held() == {0: [0, 1]}
    monkeypatch.undo()
    assert t.begin(0, 2, 4096).action == "grant"  # what fits is still granted


def test_job_and_node_ids_never_share_a_slot_directory(shm_dir):
    """With '-' between them, job 'a-b' on node 'c' and job 'a' on node 'b-c' used one directory: their daemons
    (with different sockets and locks) overwrote each other's slots."""
    a, b = SlotTable("a-b", "c", shm_dir), SlotTable("a", "b-c", shm_dir)
    assert a.dir != b.dir
    write_and_seal(a, 0, 0)
    b.adopt()
    assert b.held() == {} and a.held() == {0: [0]}
    with pytest.raises(ConfigError, match="node id 'x@y' is not valid"):
        SlotTable("a", "x@y", shm_dir)


def test_adopt_refuses_a_manifest_of_another_job_or_rank(table, shm_dir, caplog):
    for step in (0, 1):
        write_and_seal(table, 0, step)
    s0, s1 = table.ranks[0]
    with open(s0.manifest_path, "rb") as f:
        wire = msgpack.unpackb(f.read(), raw=False)
    with open(s0.manifest_path, "wb") as f:
        other = {**wire, "job": "other"}  # another job's intact manifest, copied here
        f.write(msgpack.packb({**other, "digest": manifest_digest(other)}, use_bin_type=True))
    for suffix in (".data", ".manifest"):  # rank 0's shard, under rank 1's name
        os.rename(s1.path[:-len(".data")] + suffix, os.path.join(table.dir, "r00001.s1" + suffix))
    again = SlotTable(table.job, table.node, shm_dir)
    with caplog.at_level(logging.WARNING, logger="snapguard.daemon.slots"):
        again.adopt()
    assert again.held() == {} and again.sealed_steps(0) == again.sealed_steps(1) == []
    assert f"its manifest names job 'other' rank 0, the file is job {table.job!r} rank 0's" in caplog.text
    assert f"its manifest names job {table.job!r} rank 0, the file is job {table.job!r} rank 1's" in caplog.text


def test_snapshots_of_another_manifest_version_stop_the_daemon_and_stay(table, shm_dir, tmp_path):
    """A daemon of another snapguard version (its manifests have another version, and other fields) left sealed
    slots: a daemon cannot read them, and must not throw them away as it does a corrupt one. It stops, saying whose
    they are and what to do, and every file stays for the daemon of that version."""
    for step in (0, 1):
        write_and_seal(table, 0, step)
    s0 = table.ranks[0][0]
    with open(s0.manifest_path, "rb") as f:
        wire = msgpack.unpackb(f.read(), raw=False)
    with open(s0.manifest_path, "wb") as f:
        f.write(msgpack.packb({**wire, "version": MANIFEST_VERSION + 1, "codec": "zstd"}, use_bin_type=True))
    files = {n: open(os.path.join(table.dir, n), "rb").read() for n in os.listdir(table.dir)}
    assert sum(n.endswith(".manifest") for n in files) == 2
    want = f"manifest version {MANIFEST_VERSION + 1}, this snapguard reads version {MANIFEST_VERSION}"
    with pytest.raises(ConfigError, match=want + ".*restart that version's daemon.*nothing was removed"):
        SlotTable(table.job, table.node, shm_dir).adopt()
    proc = subprocess.run([sys.executable, "-m", "snapguard.daemon", "--job", table.job, "--node", table.node,
                           "--shm-dir", shm_dir, "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and want in proc.stderr and table.dir in proc.stderr, proc.stderr
    assert {n: open(os.path.join(table.dir, n), "rb").read() for n in os.listdir(table.dir)} == files
