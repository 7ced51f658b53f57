"""Daemon-to-daemon traffic is authenticated: a real daemon refuses forged, replayed, stale and corrupt chunks.

The test plays the second node of a g=2, m=1 group over real ZeroMQ TCP, with its own PeerNet.
Node "a" (the daemon under test) holds the parity of codeword 0, whose one data chunk is node "b"'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np
import psutil
import pytest
import torch
import xxhash
import zmq
import zmq.utils.monitor

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.procs import free_port
from snapguard.config import Endpoint
from snapguard.daemon.peers import (AuthError as PeerAuthError, ConnectionGate, PeerNet, open_frames,
                                    present_credentials, recv_frames, require_credentials, seal_frames)
from snapguard.codec import Codec
from snapguard.daemon.protect import PIECE
from snapguard.errors import DaemonUnavailable, RestoreError, SnapGuardError
from snapguard.faults import ENV_FAULTS
from snapguard.guard import Guard
from snapguard.procs import TrainerLock, spawn_daemon

from conftest import Node, flip_bits, wait_until
from test_daemon import seal_raw, spawn_failing_daemon

SECRET = secrets.token_hex(16)


class _Pair(tuple):
    """(endpoint, b's PeerNet, a client of a, a's log) from `_pair`; `restart()` SIGKILLs daemon a and starts it
    again with the same flags and slots."""
    restart: Callable[..., None]


@contextlib.contextmanager
def _pair(tmp_path, extra: tuple[str, ...] = (), failing: tuple[str, list[str]] | None = None):
    """Daemon a, and node b played by this test; `failing`: (trigger, methods) as for `spawn_failing_daemon`."""
    ep = Endpoint(f"auth{os.getpid()}", "a", str(tmp_path / "run"))
    pa, pb = free_port(), free_port()
    shm = f"/dev/shm/snapguard-peers-{secrets.token_hex(4)}"
    os.makedirs(shm, mode=0o700)
    os.environ["SNAPGUARD_SECRET"] = SECRET
    args = ["--peer-bind", f"tcp://127.0.0.1:{pa}", "--peer", f"b=tcp://127.0.0.1:{pb}", "--ec-group", "a,b",
            "--ec-m", "1", *extra]
    if failing is None:
        procs = [spawn_daemon(ep, shm, args, log_path=str(tmp_path / "daemon.log"))]
    else:
        procs = [spawn_failing_daemon(ep, shm, args, *failing, log_path=str(tmp_path / "daemon.log"))]
    net = PeerNet(ep.job, "b", SECRET.encode(), f"tcp://127.0.0.1:{pb}", {"a": f"tcp://127.0.0.1:{pa}"})
    # b's first heartbeat, as a peer's daemon sends when it starts: b started after a, and refuses what a sends it
    # before a has heard from b
    net.send("a", P.PeerHeld(**net.header("a"), held=[], parity=[]))
    client = DaemonClient(ep.address, timeout_s=10)

    def restart(wipe: bool = False) -> None:
        """SIGKILL daemon a and start it again; `wipe`: with empty shared memory, as on a replacement machine."""
        procs[-1].kill()
        procs[-1].wait(10)
        if wipe:
            for name in os.listdir(shm):
                shutil.rmtree(os.path.join(shm, name))
        procs.append(spawn_daemon(ep, shm, args, log_path=str(tmp_path / "daemon.log")))

    pair = _Pair((ep, net, client, tmp_path / "daemon.log"))
    pair.restart = restart
    try:
        yield pair
    finally:
        client.close()
        net.close()
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def pair(tmp_path):
    with _pair(tmp_path) as p:
        yield p


def _guard(ep: Endpoint, state: dict, timeout_s: float = 10, gate_timeout_s: float = 3.0) -> Guard:
    """The one rank of node a, in this process, protecting `state`."""
    return Guard(states={"s": state}, rng=False, job=ep.job, node="a", run_dir=ep.run_dir, rank=0, world_size=1,
                 timeout_s=timeout_s, gate_timeout_s=gate_timeout_s)


def chunk(net: PeerNet, step: int, data: bytes, checksum: int | None = None, to: str | None = None) -> P.PeerChunk:
    blob = {"nbytes": len(data), "ranks": []}
    return P.PeerChunk(**net.header(to), step=step, codeword=0, position=0, chunk_len=len(data),
                       checksum=xxhash.xxh3_64_intdigest(data) if checksum is None else checksum, blob=blob)


def piece(net: PeerNet, step: int, data: bytes, off: int, size: int | None = None, epoch: int = 0) -> list:
    """The frames of the piece of b's chunk `data` (codeword 0) at `off`, PIECE bytes long unless `size` says."""
    body = data[off:off + (size or PIECE)]
    msg = P.PeerChunk(**net.header(), step=step, codeword=0, position=0, chunk_len=len(data), offset=off, epoch=epoch,
                      checksum=xxhash.xxh3_64_intdigest(body), blob={"nbytes": len(data), "ranks": []} if off == 0 else {})
    return seal_frames(net.secret, bytes(8), msg, [body])


def inventory_request(net: PeerNet, timeout_s: float) -> tuple[bytes, bytes] | None:
    """Wait for a's PeerInventory, as b: (identity, request id) to reply to, None if none came in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not net.router.poll(50):
            continue
        try:
            ident, rid, msg, _ = net.receive(recv_frames(net.router))
        except PeerAuthError:
            continue
        if isinstance(msg, P.PeerInventory):
            return ident, rid
    return None


def fetch(net: PeerNet, step: int, offset: int = 0, length: int = PIECE) -> tuple[P.PeerData, bytes]:
    """b fetches bytes [offset, offset + length) of a's parity of codeword 0 at `step`."""
    reply, bulk = net.request("a", P.PeerFetch(**net.header(), step=step, codeword=0, position=1, offset=offset,
                                               length=length), P.PeerData, timeout_s=10)
    return reply, bytes(bulk[0])


def status_after(client: DaemonClient, rejected: int, timeout_s: float = 10.0) -> P.StatusReport:
    """Wait until the daemon has handled what was sent (its rejected count reaches `rejected`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.request(P.Status())
        if st.rejected >= rejected or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def wait_parity(client: DaemonClient, want: list, timeout_s: float = 10.0) -> P.StatusReport:
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.request(P.Status())
        if st.parity == want or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def test_forged_replayed_stale_and_corrupt_chunks_are_refused(pair):
    ep, net, client, log = pair
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    dealer = net._dealer("a")

    # a good chunk of step 3 completes the parity of codeword 0 (k = 1)
    good = seal_frames(net.secret, bytes(8), chunk(net, 3, data), [data])
    dealer.send_multipart(good)
    st = wait_parity(client, [[0, 1, 3]])
    assert st.parity == [[0, 1, 3]] and st.rejected == 0

    attacks = []
    forged = list(seal_frames(net.secret, bytes(8), chunk(net, 4, data), [data]))
    forged[-1] = bytes(32)
    attacks.append(("wrong tag", forged))
    attacks.append(("missing tag", seal_frames(net.secret, bytes(8), chunk(net, 4, data), [data])[:-1]))
    attacks.append(("other secret", seal_frames(b"not the job secret!", bytes(8), chunk(net, 4, data), [data])))
    attacks.append(("replay of an old message", good))
    attacks.append(("old step", seal_frames(net.secret, bytes(8), chunk(net, 2, data), [data])))
    attacks.append(("bad checksum", seal_frames(net.secret, bytes(8), chunk(net, 5, data, checksum=12345), [data])))
    flipped = bytearray(data)
    flipped[100] ^= 1
    attacks.append(("flipped bytes", seal_frames(net.secret, bytes(8), chunk(net, 6, data), [bytes(flipped)])))

    for i, (what, frames) in enumerate(attacks, start=1):
        dealer.send_multipart(frames)
        st = status_after(client, i)
        assert st.rejected == i, f"{what}: not rejected"
        assert st.parity == [[0, 1, 3]], f"{what}: parity changed to {st.parity}"

    text = log.read_text()
    assert "authentication tag is missing or wrong" in text
    assert "replayed message from b" in text
    assert "older than step 3, whose parity is complete here" in text
    assert "fails its checksum" in text

    # a genuine newer chunk is still accepted; the older parity stays until the whole group has
    # protected the newer step (b reports its own parity of codeword 1), then it is dropped
    dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 7, data), [data]))
    assert wait_parity(client, [[0, 1, 3], [0, 1, 7]]).parity == [[0, 1, 3], [0, 1, 7]]
    dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[], parity=[[1, 1, 7]])))
    st = wait_parity(client, [[0, 1, 7]])
    assert st.parity == [[0, 1, 7]] and st.protected == 7


def test_parity_equals_the_codec_of_the_data(pair):
    """The parity a holder builds from chunks equals what the codec computes (m=1, k=1: a copy)."""
    ep, net, client, _ = pair
    data = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    net._dealer("a").send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 1, data), [data]))
    wait_parity(client, [[0, 1, 1]])
    reply, got = fetch(net, 1)
    assert got == data and reply.checksum == xxhash.xxh3_64_intdigest(data)


def test_a_chunk_in_pieces_completes_parity_once_every_piece_is_in(pair):
    """Chunks travel in pieces of PIECE bytes, in any order; a duplicate or misshapen piece is refused."""
    ep, net, client, log = pair
    n = PIECE + 1000
    data = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8).tobytes()
    dealer = net._dealer("a")
    dealer.send_multipart(piece(net, 1, data, PIECE))  # the tail first
    dealer.send_multipart(piece(net, 1, data, 0, PIECE - 8))  # a piece that is not the last one must be PIECE long
    assert status_after(client, 1).rejected == 1
    assert client.request(P.Status()).parity == [], "parity complete with a piece missing"
    dealer.send_multipart(piece(net, 1, data, 0))
    assert wait_parity(client, [[0, 1, 1]]).parity == [[0, 1, 1]]
    dealer.send_multipart(piece(net, 1, data, PIECE))  # the same piece again
    assert status_after(client, 2).rejected == 2
    # a serves it back a piece at a time: fewer bytes where the chunk ends, none past its end
    pieces = [fetch(net, 1, off) for off in (0, PIECE, 2 * PIECE)]
    assert [len(got) for _, got in pieces] == [PIECE, 1000, 0]
    assert b"".join(got for _, got in pieces) == data, "parity of k=1 is the chunk itself"
    assert [(r.offset, r.checksum) for r, got in pieces] == [(off, xxhash.xxh3_64_intdigest(got))
                                                           for off, (_, got) in zip((0, PIECE, 2 * PIECE), pieces)]
    assert fetch(net, 1, 500, 600)[1] == data[500:1100]
    with pytest.raises(SnapGuardError, match=f"a fetch asks for at most {PIECE} bytes at once, not {PIECE + 1}"):
        fetch(net, 1, 0, PIECE + 1)
    text = log.read_text()
    assert "does not fit a chunk" in text and "duplicate chunk of step 1" in text


def test_a_step_still_arriving_is_dropped_once_a_newer_one_completes(pair):
    """b sends the first piece of its step 2, then moves on to step 3 (as a node that fell behind joins the step its
    peers send). Once a holds step 3 whole it refuses pieces of step 2, whose parity can then never complete: a drops
    that parity at once, not when the group protects a newer step, and keeps steps 1 and 3 intact."""
    ep, net, client, log = pair
    n = PIECE + 1000
    rng = np.random.default_rng(5)
    data = {step: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for step in (1, 2, 3)}
    dealer = net._dealer("a")
    for off in (0, PIECE):
        dealer.send_multipart(piece(net, 1, data[1], off))
    wait_parity(client, [[0, 1, 1]])
    dealer.send_multipart(piece(net, 2, data[2], 0))
    wait_until(lambda: client.request(P.Status()).parity_bytes == 2 * n, 10, "a to hold part of b's step 2")
    for off in (0, PIECE):
        dealer.send_multipart(piece(net, 3, data[3], off))
    st = wait_parity(client, [[0, 1, 1], [0, 1, 3]])
    assert st.parity == [[0, 1, 1], [0, 1, 3]]
    assert st.parity_bytes == 2 * n, f"a holds {st.parity_bytes} bytes of parity, {n} more than steps 1 and 3"
    dealer.send_multipart(piece(net, 2, data[2], PIECE))  # step 2's last piece, too late
    assert status_after(client, 1).rejected == 1
    assert "older than step 3, whose parity is complete here" in log.read_text()
    for step in (1, 3):
        assert b"".join(fetch(net, step, off)[1] for off in (0, PIECE)) == data[step]


def test_a_holder_keeps_the_newest_complete_steps_while_protection_is_stuck(tmp_path):
    """b never completes the parity it holds (of a's chunks), so the group's protected step stays at -1 while a
    completes step after step of b's. a keeps the newest 4 complete steps, more while they fit in --ec-keep-mib,
    not every step: only the newest steps are still in the ranks' slots. Once b reports a complete step, a keeps
    that step and the newer ones, and what it kept is b's data, byte for byte."""
    rng = np.random.default_rng(9)
    big = {step: rng.integers(0, 256, 512 << 10, dtype=np.uint8).tobytes() for step in range(1, 7)}
    small = {step: rng.integers(0, 256, 64 << 10, dtype=np.uint8).tobytes() for step in range(7, 17)}
    with _pair(tmp_path, ("--ec-keep-mib", "1")) as (ep, net, client, log):
        dealer = net._dealer("a")
        for step, data in big.items():  # 2 MiB for the newest 4: more than 1 MiB, but never fewer than 4 steps
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, step, data), [data]))
        st = wait_parity(client, [[0, 1, s] for s in range(3, 7)])
        assert st.parity == [[0, 1, s] for s in range(3, 7)] and st.protected == -1
        assert st.parity_bytes == 4 * (512 << 10)
        assert "protection has not passed step -1 while this node completed parity of many newer" in log.read_text()
        for step, data in small.items():  # 10 steps of 64 KiB fit in 1 MiB; with step 6 they would not
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, step, data), [data]))
        st = wait_parity(client, [[0, 1, s] for s in range(7, 17)])
        assert st.parity == [[0, 1, s] for s in range(7, 17)] and st.parity_bytes == 10 * (64 << 10)
        dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[],
                                                                           parity=[[1, 1, 14]])))
        st = wait_parity(client, [[0, 1, s] for s in range(14, 17)])
        assert st.parity == [[0, 1, 14], [0, 1, 15], [0, 1, 16]] and st.protected == 14
        for step in (14, 15, 16):
            assert fetch(net, step, 0, 64 << 10)[1] == small[step]
        # b is replaced and reports no parity: the protected step falls to -1, and step 14, which a lost node would
        # be rebuilt to, must stay while a keeps newer steps within bounds
        dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[], parity=[])))
        later = {step: rng.integers(0, 256, 128 << 10, dtype=np.uint8).tobytes() for step in range(17, 31)}
        for step, data in later.items():  # the newest 8 fill 1 MiB
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, step, data), [data]))
        st = wait_parity(client, [[0, 1, s] for s in [14, *range(23, 31)]])
        assert st.parity == [[0, 1, s] for s in [14, *range(23, 31)]] and st.protected == -1
        assert fetch(net, 14, 0, 64 << 10)[1] == small[14]


def held_frames(net: PeerNet, to: str | None = None, **fields) -> list:
    """The frames of a PeerHeld from b (to `to`: naming its run as b heard it), authenticated, whatever its fields
    hold."""
    return seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(to), **{"held": [], "parity": [], **fields}))


def chunk_frames(net: PeerNet, data: bytes, **fields) -> list:
    """The frames of a PeerChunk of b's step 4 for codeword 0 carrying `data`, authenticated, with `fields` changed."""
    fields = {"step": 4, "codeword": 0, "position": 0, "chunk_len": len(data), "checksum": xxhash.xxh3_64_intdigest(data),
              "blob": {"nbytes": len(data), "ranks": []}, **fields}
    return seal_frames(net.secret, bytes(8), P.PeerChunk(**net.header(), **fields), [data])


def test_malformed_peer_messages_are_refused_counted_and_never_kept(pair):
    """Authenticated messages that do not fit this node's plan: rows of the wrong shape, codewords and positions out
    of range, parity that only a peer started with another --ec-group or --ec-m would report, a chunk longer than
    any memory. Each is refused and counted, nothing of it is kept (not even its good rows), and the daemon serves
    on with its snapshots. (Any one of them used to stop the daemon, which then deleted every slot of the node.)"""
    ep, net, client, log = pair
    a = Node(ep.job, "a", ep.run_dir, "")
    try:
        seal_raw(a, 0, 1, 0)
        dealer = net._dealer("a")
        data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 3, data), [data]))
        assert wait_parity(client, [[0, 1, 3]]).parity == [[0, 1, 3]]

        attacks = [
            ("a held row without a rank", held_frames(net, held=[[]])),
            ("a negative rank", held_frames(net, held=[[-1, 0]])),
            ("a parity row of two values", held_frames(net, parity=[[1, 1]])),
            ("codeword 99", held_frames(net, parity=[[99, 1, 3]])),
            ("a negative codeword", held_frames(net, parity=[[-1, 1, 3]])),
            ("a position past the group", held_frames(net, parity=[[1, 5, 3]])),
            ("a data position", held_frames(net, parity=[[1, 0, 3]])),
            ("parity a holds, as from a peer with another group", held_frames(net, parity=[[0, 1, 3]])),
            ("a bad row behind a good one", held_frames(net, parity=[[1, 1, 3], [99, 1, 3]])),
            ("sending below -1", held_frames(net, sending=-5)),
            ("a chunk of codeword 99", chunk_frames(net, data, codeword=99)),
            ("a chunk longer than memory", chunk_frames(net, bytes(PIECE), chunk_len=1 << 50,
                                                        blob={"nbytes": 1 << 50, "ranks": []})),
            ("a malformed blob layout", chunk_frames(net, data, blob={"nbytes": len(data), "ranks": [[0]]})),
        ]
        for i, (what, frames) in enumerate(attacks, start=1):
            dealer.send_multipart(frames)
            st = status_after(client, i)
            assert st.rejected == i, f"{what}: not rejected"
            assert st.parity == [[0, 1, 3]] and st.protected == -1, f"{what}: parity {st.parity}, protected {st.protected}"
        assert a.held() == {0: [0]}
        text = log.read_text()
        assert "is not [rank, step, ...]" in text and "is not [codeword, position, step]" in text
        assert "are the daemons of the group started alike?" in text
        assert "more than this machine's memory" in text and "blob layout is malformed" in text
        # b's parity of step 3, reported alone, counts: the refused message's good row was not kept before
        dealer.send_multipart(held_frames(net, parity=[[1, 1, 3]]))
        wait_until(lambda: client.request(P.Status()).protected == 3, 10, "step 3 to be protected")
    finally:
        a.close()


def test_a_bug_handling_a_peer_message_or_a_heartbeat_is_logged_and_the_daemon_serves_on(tmp_path):
    """Defence in depth: an unexpected exception while a handles b's PeerHeld, or sends its own heartbeat, is logged
    with the message type; a keeps serving and keeps its snapshots."""
    trigger = tmp_path / "fail"
    methods = ["snapguard.daemon.protect:Protector.note_peer", "snapguard.daemon.peers:PeerNet.send"]
    with _pair(tmp_path, failing=(str(trigger), methods)) as (ep, net, client, log):
        a = Node(ep.job, "a", ep.run_dir, "")
        try:
            seal_raw(a, 0, 1, 0)
            # b's first heartbeat must be handled before handling fails: else it is refused too
            wait_until(lambda: _heard_from_b(net), 10, "a to hear b's first heartbeat")
            trigger.touch()
            dealer = net._dealer("a")
            dealer.send_multipart(held_frames(net, parity=[[1, 1, 0]]))
            assert status_after(client, 1).rejected == 1
            wait_until(lambda: "internal error sending PeerHeld (heartbeat)" in log.read_text(), 10, "a heartbeat")
            text = log.read_text()
            assert "internal error handling PeerHeld from b" in text and "RuntimeError: injected failure" in text
            trigger.unlink()
            data = np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8).tobytes()
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 3, data), [data]))
            assert wait_parity(client, [[0, 1, 3]]).parity == [[0, 1, 3]]
            assert a.held() == {0: [0]}
        finally:
            a.close()


def _heard_from_b(net: PeerNet) -> bool:
    """Whether what a sent b (this test) in the next 0.1 s names b's run: a has taken a message of b's."""
    heard = False
    while net.router.poll(100):
        try:
            heard = net.receive(recv_frames(net.router))[2].to_boot == net.boot or heard
        except PeerAuthError:
            pass
    return heard


def _boot_of_a(net: PeerNet) -> int:
    """a's boot as b (this test) has heard it, after reading what a sent b for up to 0.1 s; 0 if not yet."""
    while net.router.poll(100):
        try:
            net.receive(recv_frames(net.router))
        except PeerAuthError:
            pass
    return net.boots.get("a", 0)


def test_a_chunk_sent_to_an_earlier_run_of_a_daemon_is_refused_after_it_restarts(pair):
    """A restarted daemon's replay check starts empty. A chunk captured (or held up) while a ran before must not
    complete a's parity once a runs again: it names the run it was sent to."""
    ep, net, client, log = pair
    first = wait_until(lambda: _boot_of_a(net), 10, "a's first heartbeat to b")
    rng = np.random.default_rng(9)
    data = {s: rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for s in (3, 4, 5)}
    dealer = net._dealer("a")
    dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 3, data[3], to="a"), [data[3]]))
    assert wait_parity(client, [[0, 1, 3]]).parity == [[0, 1, 3]]
    m4 = chunk(net, 4, data[4], to="a")
    captured = seal_frames(net.secret, bytes(8), m4, [data[4]])

    pair.restart()
    dealer.send_multipart(captured)
    st = status_after(client, 1)
    assert st.rejected == 1 and [0, 1, 4] not in st.parity, st
    assert (f"PeerChunk from b (boot {m4.boot}, seq {m4.seq}) was sent to an earlier run of this daemon (boot {first},"
            " this run's is") in log.read_text()
    # once b hears from a's new run, its chunks are taken again
    wait_until(lambda: _boot_of_a(net) > first, 10, "a heartbeat of a's new run")
    dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 5, data[5], to="a"), [data[5]]))
    wait_until(lambda: [0, 1, 5] in client.request(P.Status()).parity, 10, "parity of step 5")


def test_a_chunk_sent_before_its_sender_heard_from_a_daemon_is_refused_after_the_daemon_restarts(pair):
    """A chunk that names no run of a (b had not heard from a when it sent it) is taken while b is the newer of the
    two. Captured (or held up) and sent once a runs again, it must be refused: a's new run started after b, so b
    could only have sent it to an earlier run."""
    ep, net, client, log = pair
    rng = np.random.default_rng(11)
    data = {s: rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for s in (3, 4, 5)}
    dealer = net._dealer("a")
    dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 3, data[3]), [data[3]]))
    assert wait_parity(client, [[0, 1, 3]]).parity == [[0, 1, 3]], "b started after a: what it sends before it hears"
    m4 = chunk(net, 4, data[4])
    captured = seal_frames(net.secret, bytes(8), m4, [data[4]])

    pair.restart()
    dealer.send_multipart(captured)
    st = status_after(client, 1)
    assert st.rejected == 1 and [0, 1, 4] not in st.parity, st
    assert (f"PeerChunk from b (boot {m4.boot}, seq {m4.seq}) may predate this run of this daemon: its sender started"
            " before this run") in log.read_text()
    # once b hears from a's new run, its chunks are taken again
    wait_until(lambda: _boot_of_a(net), 10, "a heartbeat of a's new run")
    dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 5, data[5], to="a"), [data[5]]))
    wait_until(lambda: [0, 1, 5] in client.request(P.Status()).parity, 10, "parity of step 5")


def test_a_daemon_restarted_on_a_clock_that_runs_behind_is_taken_by_its_peers(pair, monkeypatch, caplog):
    """b restarts on a machine whose clock is a minute behind the one it ran on: its new run's boot (its start
    time) is earlier than its last run's, which a keeps as b's newest. a would refuse every message of the new run
    as a replay, and b every one of a's, which names that later boot as b's: b was cut off for good. b moves its
    boot past the one a names; a then takes b's chunks, and still refuses what b's earlier run sent."""
    ep, net, client, log = pair
    wait_until(lambda: _boot_of_a(net), 10, "a's first heartbeat to b")
    rng = np.random.default_rng(13)
    data = {s: rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for s in (3, 4, 5)}
    net._dealer("a").send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 3, data[3], to="a"), [data[3]]))
    assert wait_parity(client, [[0, 1, 3]]).parity == [[0, 1, 3]]
    m4 = chunk(net, 4, data[4], to="a")
    captured = seal_frames(net.secret, bytes(8), m4, [data[4]])

    first = net.boot
    bind = net.router.getsockopt(zmq.LAST_ENDPOINT).decode()
    net.close()
    with monkeypatch.context() as m:
        m.setattr(time, "time_ns", lambda: first - 60 * 10**9)
        b = PeerNet(net.job, "b", net.secret, bind, net.peers)
    try:
        assert b.boot < first

        def heard() -> bool:  # b's heartbeat, as its daemon sends every second; whether a's replies name b's run
            b.send("a", P.PeerHeld(**b.header("a"), held=[], parity=[]))
            return _heard_from_b(b)

        with caplog.at_level(logging.WARNING, logger="snapguard.daemon.peers"):
            wait_until(heard, 10, "a to take a message of b's new run")
        assert b.boot == first + 1, "b moves its boot just past the one a names"
        assert "knew an earlier run of this daemon with a later start" in caplog.text
        b._dealer("a").send_multipart(seal_frames(b.secret, bytes(8), chunk(b, 5, data[5], to="a"), [data[5]]))
        wait_until(lambda: [0, 1, 5] in client.request(P.Status()).parity, 10, "parity of b's step 5")
        rejected = client.request(P.Status()).rejected
        b._dealer("a").send_multipart(captured)  # held up since b's earlier run
        st = status_after(client, rejected + 1)
        assert st.rejected == rejected + 1 and [0, 1, 4] not in st.parity, st
        assert f"replayed message from b (boot {first}, seq {m4.seq}" in log.read_text()
    finally:
        b.close()


def test_a_daemon_restarted_on_a_clock_between_its_last_start_and_its_peers_start_and_that_peer_take_each_other(
        monkeypatch):
    """b restarts on a clock a little behind: its new run's start lies between its last run's and a's (a started
    since). a's heartbeats name b's last run, which b refuses as sent to an earlier run (and that run is older than
    this one: nothing to move past); b's name no run of a's and come from a run that started before a's, which a
    refuses as possibly predating it. Each must still learn of the other's run from those authentic messages, so
    that the next ones are taken: else neither takes the other's heartbeats or chunks until a restore."""
    secret = secrets.token_hex(16).encode()
    ports = {"a": free_port(), "b": free_port()}
    now = time.time_ns()

    def start(node: str, boot: int) -> PeerNet:
        other = "b" if node == "a" else "a"
        with monkeypatch.context() as m:
            m.setattr(time, "time_ns", lambda: boot)
            return PeerNet("job", node, secret, f"tcp://127.0.0.1:{ports[node]}",
                           {other: f"tcp://127.0.0.1:{ports[other]}"})

    def heartbeats(x: PeerNet, y: PeerNet) -> dict[str, list[str]]:
        """One heartbeat each way; what each took (its type) or refused (the reason)."""
        x.send(y.node, P.PeerHeld(**x.header(y.node), held=[], parity=[]))
        y.send(x.node, P.PeerHeld(**y.header(x.node), held=[], parity=[]))
        got: dict[str, list[str]] = {x.node: [], y.node: []}
        for n in (x, y):
            assert n.router.poll(5000), f"{n.node} got no heartbeat within 5 s"
            try:
                got[n.node].append(n.receive(recv_frames(n.router))[2].TYPE)
            except PeerAuthError as e:
                got[n.node].append(str(e))
        return got

    b = start("b", now - 3600 * 10**9)
    a = start("a", now - 10 * 10**9)
    try:
        heartbeats(a, b)
        assert heartbeats(a, b) == {"a": ["PeerHeld"], "b": ["PeerHeld"]}
        assert a.boots["b"] == b.boot
        b.close()
        b = start("b", now - 20 * 10**9)  # after its last run's start, before a's
        first = heartbeats(a, b)
        assert "was sent to an earlier run of this daemon" in first["b"][0], first
        assert "may predate this run of this daemon" in first["a"][0], first
        assert a.boots["b"] == b.boot and b.boots["a"] == a.boot, "each learns the other's run from what it refused"
        assert heartbeats(a, b) == {"a": ["PeerHeld"], "b": ["PeerHeld"]}
    finally:
        a.close()
        b.close()


def test_chunk_pieces_that_arrive_while_the_daemon_waits_for_a_reply_keep_their_turn(pair):
    """b sends a burst of pieces of one chunk; a reads some of them ahead (queued, not handled yet) and then,
    asked for an Inventory, asks b what it holds. b sends the last pieces before it answers. Handled as they
    arrive, those would overtake the queued ones, and the replay check would refuse the queued ones: the
    parity would stay incomplete until b sent the chunk again."""
    ep, net, client, log = pair
    n = 24  # 384 MiB: a reads and folds them a few at a time for a few tenths of a second
    data = np.random.default_rng(10).integers(0, 1 << 63, n * PIECE // 8, dtype=np.uint64).tobytes()
    burst, asked = threading.Event(), threading.Event()

    def play_b() -> None:
        dealer = net._dealer("a")
        for off in range(0, (n - 2) * PIECE, PIECE):
            dealer.send_multipart(piece(net, 1, data, off))
        burst.set()
        asking = inventory_request(net, 20)
        if asking is not None:
            for off in range((n - 2) * PIECE, n * PIECE, PIECE):  # the last pieces, before the reply
                dealer.send_multipart(piece(net, 1, data, off))
            net.reply(*asking, P.PeerStock("b", [], [], {}))
            asked.set()

    t = threading.Thread(target=play_b)
    t.start()
    try:
        assert burst.wait(20)
        time.sleep(0.1)  # a is reading the burst now
        client.request(P.Inventory(ep.job, 0, recheck=False))  # a asks b what it holds, pieces still queued
        assert asked.wait(20), "a never asked b for its inventory"
    finally:
        t.join(30)
    st = wait_parity(client, [[0, 1, 1]])
    assert st.parity == [[0, 1, 1]] and st.rejected == 0, (st, [l for l in log.read_text().splitlines()
                                                               if "refused" in l or "replayed" in l][:5])


def test_chunk_pieces_that_arrive_while_the_daemon_waits_for_a_reply_are_not_piled_up_in_memory(pair):
    """While a waits for b's reply it reads on (b's small messages must get through), but holds no more pieces of
    chunks unhandled than its loop reads ahead: a peer whose reply is slow, while pieces keep coming, must not make
    it hold every one of them. (b's pieces here carry a MAC that fails: a refuses them when it handles them.)"""
    ep, net, client, log = pair
    with open(ep.lock_path) as f:
        daemon = psutil.Process(int(f.read()))
    n = 32  # 512 MiB
    data = np.random.default_rng(11).integers(0, 1 << 63, n * PIECE // 8, dtype=np.uint64).tobytes()
    grew: list[int] = []

    def play_b() -> None:
        dealer = net._dealer("a")
        asking = inventory_request(net, 30)
        if asking is not None:
            rss0 = daemon.memory_info().rss
            for off in range(0, n * PIECE, PIECE):
                frames = piece(net, 1, data, off)
                frames[-1] = bytes(len(frames[-1]))
                dealer.send_multipart(frames)
            time.sleep(1.0)  # a has read what it reads
            grew.append(daemon.memory_info().rss - rss0)
            net.reply(*asking, P.PeerStock("b", [], [], {}))

    t = threading.Thread(target=play_b)
    t.start()
    try:
        client.request(P.Inventory(ep.job, 0, recheck=False))
    finally:
        t.join(40)
    # read ahead (4 pieces), the one being handled, ZeroMQ's queues: 80-144 MiB seen; all 32 held: over 512 MiB
    assert grew and grew[0] < 12 * PIECE, f"a held {grew[0] >> 20} MiB of pieces while it waited for b's reply"
    assert status_after(client, n).rejected == n


def test_a_sender_without_the_jobs_credentials_is_closed_at_its_handshake_and_never_buffered(pair):
    """ZeroMQ reads a whole message before its MAC can be checked, and limits only each frame's size: a sender
    that reached the peer port could make the daemon hold any amount of memory in one message of many frames."""
    ep, net, client, log = pair
    with open(ep.lock_path) as f:
        daemon = psutil.Process(int(f.read()))
    rss0 = daemon.memory_info().rss
    ctx = zmq.Context()
    piece_of_zeros = bytes(PIECE)  # one buffer, sent 48 times without a copy: 768 MiB per message
    senders = [ctx.socket(zmq.DEALER) for _ in range(2)]
    present_credentials(senders[1], ep.job, b"not the job secret!")
    try:
        for sock in senders:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(net.peers["a"])
        for sock in senders:
            # Without a connection whose handshake succeeded, a DEALER has nowhere to queue the message now and
            # then (it refuses it, or would block); before the gate, each of these went out at once.
            for _ in range(40):
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart([bytes(8), *[zmq.Frame(piece_of_zeros) for _ in range(48)]], copy=False,
                                        flags=zmq.NOBLOCK)
                    break
                time.sleep(0.05)
        peak, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 4.0:  # loopback carries 768 MiB in well under a second
            peak = max(peak, daemon.memory_info().rss - rss0)
            time.sleep(0.05)
    finally:
        for sock in senders:
            sock.close(0)
        ctx.term()
    assert peak < 64 << 20, f"the daemon's memory grew by {peak >> 20} MiB"
    assert client.request(P.Status()).rejected == 0, "no message of theirs was read"
    wait_until(lambda: "refused a peer connection from 127.0.0.1: it did not present job" in log.read_text(), 10,
               "the daemon to log the connection it refused")
    data = np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes()  # b, with them, still gets in
    net._dealer("a").send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 1, data), [data]))
    assert wait_parity(client, [[0, 1, 1]]).parity == [[0, 1, 1]]


def test_a_reply_captured_from_an_earlier_run_never_answers_a_later_request():
    """Node a is played by a bare socket. It answers b's first run, then replays that authentic reply to the
    first request of b's next run (a restarted daemon): b must not take it."""
    job, secret = f"rid{os.getpid()}", SECRET.encode()
    ctx = zmq.Context()
    gate = ConnectionGate(ctx, job, secret, "[test: node a]")
    a = ctx.socket(zmq.ROUTER)
    a.setsockopt(zmq.LINGER, 0)
    require_credentials(a)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    rids, captured = [], []

    def play_a() -> None:
        if not a.poll(10_000):
            return
        ident, *frames = a.recv_multipart()
        rid, msg, _ = open_frames(secret, frames)
        rids.append(rid)
        if not captured:
            captured.extend(seal_frames(secret, rid, P.PeerStock("a", [3], [], {})))
        a.send_multipart([ident, *captured])

    try:
        for run in range(2):
            b = PeerNet(job, "b", secret, f"tcp://127.0.0.1:{free_port()}", {"a": f"tcp://127.0.0.1:{port}"})
            t = threading.Thread(target=play_a)
            t.start()
            try:
                if run == 0:
                    reply, _ = b.request("a", P.PeerInventory(**b.header(), asker="b"), P.PeerStock, 10.0)
                    assert reply.sealed == [3]
                else:
                    with pytest.raises(DaemonUnavailable, match="did not answer PeerInventory"):
                        b.request("a", P.PeerInventory(**b.header(), asker="b"), P.PeerStock, 2.0)
            finally:
                t.join(15)
                b.close()
        assert len(rids) == 2 and rids[0] != rids[1] and bytes(8) not in rids
    finally:
        a.close(0)
        gate.close()
        ctx.term()


def test_a_frame_over_the_peer_limit_closes_that_connection_unread(pair):
    """A frame larger than any a peer sends (a piece of a chunk, or a header) closes the connection before it is
    read whole, even one that presented the job's credentials."""
    ep, net, client, _ = pair
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    present_credentials(sock, ep.job, SECRET.encode())
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(net.peers["a"])
        sock.send_multipart([bytes(8), bytes(PIECE + P.MAX_HEADER_BYTES + (1 << 16) + 1)])
        assert monitor.poll(20_000), "a should close the connection that sent an over-limit frame"
        assert zmq.utils.monitor.recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
    # b's messages, a piece of PIECE bytes among them, are still taken
    n = PIECE + 1000
    data = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()
    dealer = net._dealer("a")
    for off in (0, PIECE):
        dealer.send_multipart(piece(net, 1, data, off))
    st = wait_parity(client, [[0, 1, 1]])
    assert st.parity == [[0, 1, 1]] and st.rejected == 0


def _chunks_received(net: PeerNet, until_step: int, timeout_s: float = 10.0) -> dict[int, tuple[int, bytes]]:
    """Authenticated PeerChunks that reached this (test-played) node, until one of `until_step`: step -> (epoch,
    bytes) of the last one."""
    got: dict[int, tuple[int, bytes]] = {}
    deadline = time.monotonic() + timeout_s
    while until_step not in got and net.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        try:
            _, _, msg, bulk = net.receive(recv_frames(net.router))
        except PeerAuthError:  # a stale message: sent on a connection a replaced after counting b as lost
            continue
        if isinstance(msg, P.PeerChunk):
            assert xxhash.xxh3_64_intdigest(bulk[0]) == msg.checksum
            got[msg.step] = (msg.epoch, bytes(bulk[0]))
    return got


def _held_reported(net: PeerNet, until: Callable[[list], bool], timeout_s: float = 10.0) -> list:
    """The `held` rows of the first authenticated PeerHeld that reaches this (test-played) node and satisfies `until`."""
    deadline = time.monotonic() + timeout_s
    while net.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        try:
            _, _, msg, _ = net.receive(recv_frames(net.router))
        except PeerAuthError:
            continue
        if isinstance(msg, P.PeerHeld) and until(msg.held):
            return msg.held
    raise AssertionError(f"no PeerHeld as awaited within {timeout_s} s")


@pytest.mark.parametrize("slots", [None, 2])
def test_training_never_waits_for_a_parity_holder_that_falls_behind(tmp_path, slots):
    """Node b, the holder of a's parity, stops confirming it after step 0. With the default slots under erasure
    coding (3), a's rank snapshots ten more steps without waiting, its daemon keeps step 0 (the newest protected,
    which a lost node would be rebuilt to) the whole time, and once b confirms the newest step, that step is
    protected. With 2 slots the rank has to wait for protection and gives up: the third slot is what keeps
    training from waiting."""
    extra = () if slots is None else ("--slots-per-rank", str(slots))
    with _pair(tmp_path, extra) as (ep, net, client, _):
        state = {"w": torch.arange(4096, dtype=torch.float32)}
        guard = _guard(ep, state)
        try:
            dealer = net._dealer("a")
            data = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
            guard.snapshot(0)
            guard.wait()
            # b completes step 0 on both holders: a's parity of b's chunk, and its own parity of a's chunk
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 0, data), [data]))
            dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[], parity=[[1, 1, 0]])))
            deadline = time.monotonic() + 10
            while client.request(P.Status()).protected != 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.request(P.Status()).protected == 0

            def train(steps):
                for step in steps:
                    state["w"] += 1
                    guard.snapshot(step)
                    guard.wait()
                    st = client.request(P.Status())
                    held = sorted(s["step"] for s in st.ranks[0]["slots"] if s["state"] == "sealed")
                    assert st.protected == 0 and 0 in held and step in held, (step, held)

            if slots == 2:
                with pytest.raises(SnapGuardError, match="waited 3 s for every rank to seal step"):
                    train(range(1, 11))
                return
            train(range(1, 11))
            assert guard.last_sealed == 10

            sent = _chunks_received(net, until_step=10)
            assert 10 in sent, f"a sent chunks of steps {sorted(sent)}, not of its newest step"
            assert np.array_equal(np.frombuffer(sent[10][1][:4096 * 4], np.float32), state["w"].numpy())
            # b catches up with the newest step only: protection skips what it fell behind on
            dealer.send_multipart(seal_frames(net.secret, bytes(8), chunk(net, 10, data), [data]))
            dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[], parity=[[1, 1, 10]])))
            deadline = time.monotonic() + 10
            while client.request(P.Status()).protected != 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            st = client.request(P.Status())
            assert st.protected == 10 and st.parity == [[0, 1, 10]]
        finally:
            guard.close()


def test_after_a_restore_no_parity_mixes_the_timeline_left_with_the_new_one(tmp_path):
    """a's trainer dies after sealing step 1, while a holds the first piece of b's step 2. The restarted trainer
    restores step 1 and trains step 2 again, not necessarily to the same bytes (here b's differ). A holder that
    folded the new step 2's pieces into the old one's would hold parity of neither, and rebuild a lost node from
    it wrongly. So the restore starts a new timeline (an epoch, on every chunk): a drops its parity of step 2,
    refuses pieces of the old timeline that arrive late, and builds step 2's parity from the new one alone."""
    with _pair(tmp_path, ("--peer-timeout", "1")) as (ep, net, client, log):
        dealer = net._dealer("a")
        n = PIECE + 1000
        rng = np.random.default_rng(4)
        sent_by_b = {1: rng.integers(0, 256, n, dtype=np.uint8).tobytes()}  # b's chunk of each step, this timeline
        state = {"w": torch.arange(4096, dtype=torch.float32)}
        guard = _guard(ep, state)
        memory = client.request(P.Status()).memory_bytes
        guard.snapshot(1)
        guard.wait()
        for off in (0, PIECE):
            dealer.send_multipart(piece(net, 1, sent_by_b[1], off))
        wait_parity(client, [[0, 1, 1]])
        left = rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # b's step 2 on the timeline about to be left
        dealer.send_multipart(piece(net, 2, left, 0))
        wait_until(lambda: client.request(P.Status()).parity_bytes == 2 * n, 10, "a to hold part of b's step 2")
        # `snapguard status` shows the daemon's own memory, which parity fills: step 1's whole, step 2's first piece
        grown = client.request(P.Status()).memory_bytes - memory
        assert grown >= 0.9 * (n + PIECE), f"a holds {n + PIECE} bytes of parity, its memory grew by {grown}"
        guard.close()  # the trainer is gone; its state lives on in the daemon

        state = {"w": torch.zeros(4096, dtype=torch.float32)}
        guard = _guard(ep, state)
        try:
            assert guard.restore() == 1
            assert torch.equal(state["w"], torch.arange(4096, dtype=torch.float32))
            assert guard.epoch > 0
            assert client.request(P.Status()).parity == [[0, 1, 1]]
            rejected = client.request(P.Status()).rejected
            dealer.send_multipart(piece(net, 2, left, PIECE))  # the old step 2's last piece, late
            assert status_after(client, rejected + 1).rejected == rejected + 1

            mine = {}  # a's state at each step, this timeline
            for step in (2, 3):
                state["w"] += 1
                mine[step] = state["w"].numpy().tobytes()
                guard.snapshot(step)
                guard.wait()
                sent_by_b[step] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                for off in (0, PIECE):
                    dealer.send_multipart(piece(net, step, sent_by_b[step], off, epoch=guard.epoch))
            st = wait_parity(client, [[0, 1, 1], [0, 1, 2], [0, 1, 3]])
            for _, _, step in st.parity:
                got = b"".join(fetch(net, step, off)[1] for off in (0, PIECE))
                assert got == sent_by_b[step], f"a's parity of step {step} is not b's chunk of that step"
            assert st.parity == [[0, 1, 1], [0, 1, 2], [0, 1, 3]]
            assert "is of timeline 0, and this node's is" in log.read_text()

            got = _chunks_received(net, until_step=3)
            for step, (epoch, data) in got.items():
                if step > 1:  # a's own chunks of the new timeline carry its epoch and its new bytes
                    assert epoch == guard.epoch and data[:4096 * 4] == mine[step], step
            dealer.send_multipart(seal_frames(net.secret, bytes(8), P.PeerHeld(**net.header(), held=[],
                                                                                parity=[[1, 1, 3]])))
            st = wait_until(lambda: (lambda s: s.protected == 3 and s)(client.request(P.Status())), 10,
                            "step 3 to be protected")
            assert st.parity == [[0, 1, 3]]
        finally:
            guard.close()


class _Holder:
    """Node b as the holder of a's parity, answering a's requests from a thread: it keeps a's chunks as they
    arrive and serves them back when a rebuilds, with the bytes of the steps in `rot` changed after they arrived
    (bit rot in b's memory), under a transport checksum of the changed bytes. In a's group of two (k=1, m=1) the
    parity of a's chunk is a copy of it; `m` > 1: the holder of parity `position` - 1 of a's codeword in a group
    of 1 + m nodes (k=1), which computes it with the codec."""

    def __init__(self, net: PeerNet, codeword: int = 1, position: int = 1, m: int = 1):
        self.net, self.chunks, self.blobs, self.rot, self.fetched = net, {}, {}, set(), []
        self.codeword, self.position, self.m = codeword, position, m
        self.answer_with: dict[int, int] = {}  # asked step -> the step whose chunk b sends (a buggy peer)
        # or "hold": keep them until it is "answer" again; "first": answer the first piece of a chunk and hold the
        # others; "paced": answer one every `pace_s`; or "ignore": never answer (b hangs)
        self.fetches = "answer"
        self.pace_s, self._answered_at = 0.0, 0.0
        self.pieces: list[tuple[int, int, int]] = []  # (step, offset, length) of each fetch
        self._held: list[tuple[bytes, bytes, P.PeerFetch]] = []
        self._arriving: dict[int, tuple[bytearray, int]] = {}  # step -> (a's chunk, pieces still to come)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            while self.fetches == "answer" and self._held:
                self._answer(*self._held.pop(0))
            if self.fetches == "paced" and self._held and time.monotonic() - self._answered_at >= self.pace_s:
                self._answered_at = time.monotonic()
                self._answer(*self._held.pop(0))
            if not self.net.router.poll(20):
                continue
            try:
                ident, rid, msg, bulk = self.net.receive(recv_frames(self.net.router))
            except PeerAuthError:
                continue
            # b never reports a's step protected, so a sends its chunks again now and then: b keeps the first
            # copy, as a real holder refuses pieces it has folded in already
            if isinstance(msg, P.PeerChunk) and msg.codeword == self.codeword and msg.step not in self.chunks:
                buf, left = self._arriving.get(msg.step) or (bytearray(msg.chunk_len), -(-msg.chunk_len // PIECE))
                buf[msg.offset:msg.offset + len(bulk[0])] = bulk[0]
                self._arriving[msg.step] = (buf, left - 1)
                if msg.offset == 0:
                    self.blobs[msg.step] = msg.blob
                if left == 1:  # its last piece
                    self.chunks[msg.step] = self._parity(bytes(self._arriving.pop(msg.step)[0]))
            elif isinstance(msg, P.PeerInventory):
                parity = [[self.codeword, self.position, s] for s in sorted(self.chunks)]
                self.net.reply(ident, rid, P.PeerStock(self.net.node, [], parity,
                                                       {str(s): b for s, b in self.blobs.items()}))
            elif isinstance(msg, P.PeerFetch):
                if msg.offset == 0:
                    self.fetched.append(msg.step)
                self.pieces.append((msg.step, msg.offset, msg.length))
                if self.fetches != "answer" and not (self.fetches == "first" and msg.offset == 0):
                    self._held.append((ident, rid, msg))
                    continue
                self._answer(ident, rid, msg)

    def _parity(self, chunk: bytes) -> bytes:
        if self.m == 1:
            return chunk
        parity = [np.empty(len(chunk), np.uint8) for _ in range(self.m)]
        Codec(1, self.m).encode([np.frombuffer(chunk, np.uint8)], parity)
        return parity[self.position - 1].tobytes()

    def _answer(self, ident: bytes, rid: bytes, msg: P.PeerFetch) -> None:
        step = self.answer_with.get(msg.step, msg.step)
        data = bytearray(self.chunks[step])
        if msg.step in self.rot:
            data[len(data) // 2] ^= 0xFF
        data = bytes(data[msg.offset:msg.offset + msg.length])
        reply = P.PeerData(step, msg.codeword, msg.position, msg.offset, xxhash.xxh3_64_intdigest(data))
        self.net.reply(ident, rid, reply, [data])

    def rot_a(self, client: DaemonClient, rank: int, step: int) -> None:
        """Flip a byte of `rank`'s sealed slot of `step` on a."""
        st = client.request(P.Status())
        slot = next(s["slot"] for r in st.ranks if r["rank"] == rank
                    for s in r["slots"] if s["state"] == "sealed" and s["step"] == step)
        flip_bits(os.path.join(st.shm_dir, f"r{rank:05d}.s{slot}.data"), 100, 0xFF)

    def rot_both(self, client: DaemonClient, rank: int, step: int) -> None:
        """Flip a byte of `rank`'s sealed slot of `step` on a, and of b's parity of that step."""
        self.rot_a(client, rank, step)
        self.rot.add(step)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("peer", ["rots", "answers with another chunk", "holds a changed manifest"])
def test_a_rebuild_whose_bytes_fail_their_checksums_makes_restore_use_an_older_step(tmp_path, peer):
    """a's rank sealed steps 1 and 2, and b holds the parity of both. a's slot of step 2 rots, and so does b's
    parity of it, or b answers the fetch of it with its parity of step 1, or the manifest of step 2 that b keeps
    for a's rebuild changed. The restore finds the slot corrupt; a rebuilds step 2 from b; the rebuilt bytes fail
    the checksums the trainer recorded (or b's answer is not the chunk asked for, or the manifest its digest), so
    they are never loaded: a stops offering step 2, and the ranks restore step 1, which a still holds, instead of
    failing the same way on every restart."""
    with _pair(tmp_path) as (ep, net, client, log):
        holder = _Holder(net)
        try:
            saved = _seal_two_steps(ep, [holder], 4096)
            if peer == "rots":
                holder.rot_both(client, rank=0, step=2)
            elif peer == "answers with another chunk":
                holder.rot_a(client, rank=0, step=2)
                holder.answer_with[2] = 1
            else:
                holder.rot_a(client, rank=0, step=2)
                holder.blobs[2]["ranks"][0][2]["created"] += 1

            state = {"w": torch.zeros(4096, dtype=torch.float32)}
            guard = _guard(ep, state)
            try:
                assert guard.restore() == 1
                assert torch.equal(state["w"], saved[1])
            finally:
                guard.close()
            changed = peer == "holds a changed manifest"
            assert holder.fetched == ([] if changed else [2]), "a rebuilt step 2 once, and never offered it again"
            text = log.read_text()
            assert "dropping it, restore will use an older step" in text
            assert "step 2 cannot be rebuilt" in text and "it is not offered again" in text
            if changed:
                assert "the manifest of rank 0 step 2 does not match its digest" in text
            elif peer != "rots":
                assert "peer b answered the fetch of chunk 1 of codeword 1 of step 2 at offset 0 with chunk 1 of" \
                       " codeword 1 of step 1 at offset 0, in 1 frame(s) of 16384 bytes (16384 asked)" in text, text
        finally:
            holder.close()


def _seal_two_steps(ep: Endpoint, holders: list[_Holder], n: int) -> dict[int, torch.Tensor]:
    """a's rank seals steps 1 and 2 of a state of `n` floats, and `holders` receive a's chunks of both. Returns
    the state saved at each step."""
    state = {"w": torch.arange(n, dtype=torch.float32)}
    guard = _guard(ep, state)
    saved = {}
    for step in (1, 2):
        state["w"] += 1
        saved[step] = state["w"].clone()
        guard.snapshot(step)
        guard.wait()
        for h in holders:  # before the next step is sealed: protection would skip this one if it fell behind
            wait_until(lambda: step in h.chunks, 10, f"a's chunks of step {step} to reach {h.net.node}")
    guard.close()
    return saved


def _lose_a_after_two_steps(pair: _Pair, *holders: _Holder, n: int = 1 << 16) -> dict[int, torch.Tensor]:
    """`_seal_two_steps` of `n` floats; then node a is lost: its daemon is SIGKILLed and a replacement starts with
    empty shared memory."""
    saved = _seal_two_steps(pair[0], list(holders), n)
    pair.restart(wipe=True)
    return saved


@contextlib.contextmanager
def _restoring(guard: Guard, holder: _Holder):
    """Run `guard.restore()` in a thread; yield a dict that gets its "step", or the "error" it raised. On leaving,
    b answers every fetch, and the restore is waited for."""
    got: dict = {}

    def restore() -> None:
        try:
            got["step"] = guard.restore()
        except BaseException as e:
            got["error"] = e

    t = threading.Thread(target=restore, daemon=True)
    t.start()
    try:
        yield got
    finally:
        holder.fetches = "answer"
        t.join(30)


def test_a_replacement_daemon_serves_on_while_it_rebuilds_from_its_peers_and_restores_bit_exact(tmp_path):
    """While the replacement of lost node a rebuilds its shard from b, and b holds back the chunk, the daemon
    answers every request at once: Open says how far the rebuild is (Loading, from the peers), and so do Status
    and `snapguard status`. Once b answers, restore() returns step 2, bit-exact."""
    with _pair(tmp_path) as pair:
        ep, net, client, log = pair
        holder = _Holder(net)
        quick = DaemonClient(ep.address, timeout_s=2)
        try:
            saved = _lose_a_after_two_steps(pair, holder)
            holder.fetches = "hold"
            state = {"w": torch.zeros(1 << 16, dtype=torch.float32)}
            guard = _guard(ep, state, gate_timeout_s=60)
            with _restoring(guard, holder) as got:
                wait_until(lambda: holder._held, 10, "a to fetch its chunk of step 2 from b")
                assert isinstance(quick.request(P.Ping()), P.Ok)
                reading = quick.request(P.Status()).ranks[0]["reading"]
                assert reading["step"] == 2 and reading["source"] == "peers" and reading["done"] == 0, reading
                assert reading["total"] >= saved[2].numel() * 4, reading
                assert quick.request(P.Open(ep.job, 0, 2)) == P.Loading(2, 0, reading["total"], source="peers")
                out = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--job", ep.job, "--run-dir",
                                      ep.run_dir], capture_output=True, text=True, timeout=60)
                assert "rank 0: step 2 is rebuilt from the peers: 0 B of " in out.stdout, out
                assert not got, got
            assert got == {"step": 2}, got
            assert torch.equal(state["w"], saved[2])
            assert holder.fetched == [2]
            assert "rebuilt step 2 of ranks [0] from peers ['b']" in log.read_text()
            assert quick.request(P.Status()).ranks[0]["reading"] == {}
            guard.close()
        finally:
            quick.close()
            holder.close()


def test_slots_too_small_for_a_shard_to_rebuild_grow_in_the_background_first(tmp_path, monkeypatch):
    """The rank of lost node a reserved slots for less than its shard before restoring (an optimizer's state appears
    at its first step): a's replacement grows the one it rebuilds the shard into in its grower threads first,
    answering Open with Loading (nothing loaded yet) and every other request at once meanwhile. Reserving the
    memory in its loop would leave the trainers and the peers unanswered for as long. Then the rebuild restores
    step 2 bit-exact."""
    stall = tmp_path / "stall"  # rank 0's slots stop growing before their first byte while this file exists
    stall.touch()
    with _pair(tmp_path) as pair:
        ep, net, client, log = pair
        holder = _Holder(net)
        try:
            monkeypatch.setenv(ENV_FAULTS, f"daemon.reserve.piece@0%{stall}")  # the replacement's only
            saved = _lose_a_after_two_steps(pair, holder)
            monkeypatch.delenv(ENV_FAULTS)
            assert isinstance(client.request(P.Reserve(ep.job, 0, 1, 0)), P.Ok)
            total = holder.blobs[2]["nbytes"]
            for _ in range(3):
                loading = client.request(P.Open(ep.job, 0, 2))
                assert (loading.step, loading.done, loading.total, loading.source) == (2, 0, total, "peers"), loading
                assert loading.reserved == 0 and loading.slot >= saved[2].numel() * 4, loading
            st = client.request(P.Status()).ranks[0]
            states = [s["state"] for s in st["slots"]]  # the slot the shard will be rebuilt into grows
            assert states == ["allocating"] + ["free"] * (len(states) - 1) and not st["reading"], st
            assert isinstance(client.request(P.Ping()), P.Ok)
            assert holder.fetched == [], "nothing is fetched before there is a slot to write it into"
            assert "grows a slot of ranks [0] to hold their shards of step 2" in log.read_text()
            stall.unlink()
            state = {"w": torch.zeros(1 << 16, dtype=torch.float32)}
            guard = _guard(ep, state, gate_timeout_s=30)
            assert guard.restore() == 2
            assert torch.equal(state["w"], saved[2])
            assert "rebuilt step 2 of ranks [0] from peers ['b']" in log.read_text()
            guard.close()
        finally:
            stall.unlink(missing_ok=True)
            holder.close()


def test_a_rebuild_fetches_a_chunk_in_pieces_all_at_once_and_decodes_each_as_it_comes(tmp_path):
    """a's chunk of a 40 MiB shard is three pieces. The replacement of a asks b for all three at once, none longer
    than PIECE; b answers the first and holds the others: a decodes that one into its slot at once (the rebuild
    shows PIECE bytes done), and the shard is whole, bit-exact, once b answers the rest."""
    n = 10 << 20  # floats
    with _pair(tmp_path) as pair:
        ep, net, client, log = pair
        holder = _Holder(net)
        try:
            saved = _lose_a_after_two_steps(pair, holder, n=n)
            holder.fetches = "first"
            state = {"w": torch.zeros(n, dtype=torch.float32)}
            guard = _guard(ep, state, gate_timeout_s=60)
            with _restoring(guard, holder) as got:
                wait_until(lambda: len(holder.pieces) == 3, 10, "a to ask b for the three pieces of its chunk")
                chunk_len = len(holder.chunks[2])
                assert holder.pieces == [(2, 0, PIECE), (2, PIECE, PIECE), (2, 2 * PIECE, chunk_len - 2 * PIECE)]
                reading = wait_until(lambda: client.request(P.Status()).ranks[0]["reading"].get("done") and
                                     client.request(P.Status()).ranks[0]["reading"], 10, "a to decode the piece b answered")
                assert (reading["done"], reading["total"], reading["source"]) == (PIECE, holder.blobs[2]["nbytes"],
                                                                                  "peers"), reading
                assert not got, got
            assert got == {"step": 2}, got
            assert torch.equal(state["w"], saved[2])
            assert len(holder.pieces) == 3, "every piece was fetched once"
            guard.close()
        finally:
            holder.close()


def test_a_rebuild_from_a_peer_that_stops_answering_ends_in_a_clear_error_and_the_daemon_serves_on(tmp_path):
    """b answers what it holds, but not the fetch of a's chunk: after --peer-timeout, a counts b as lost, and with
    no other peer to fetch from, the rebuild fails with an error that says so. The ranks plan again, fail the
    same way, and restore() raises a RestoreError instead of waiting for b; the daemon serves on."""
    with _pair(tmp_path, extra=("--peer-timeout", "1")) as pair:
        ep, net, client, log = pair
        holder = _Holder(net)
        try:
            _lose_a_after_two_steps(pair, holder)
            holder.fetches = "ignore"
            state = {"w": torch.zeros(1 << 16, dtype=torch.float32)}
            guard = _guard(ep, state, gate_timeout_s=60)
            try:
                with pytest.raises(RestoreError, match=r"steps \[2\] failed verification or could not be rebuilt"):
                    guard.restore()
            finally:
                guard.close()
            assert holder.fetched == [2, 2], "a tried step 2 once more after the daemons checked their slots"
            text = log.read_text()
            assert "peer b did not answer the fetch of chunk 1 of codeword 1 (bytes 0..262144) within 1.0 s;" \
                   " counting peer b as lost" in text, text
            assert ("step 2 cannot be rebuilt: fewer than k=1 chunks of some codeword survive (peers counted as lost:"
                    " b: peer b did not answer the fetch of chunk 1 of codeword 1") in text, text
            assert isinstance(client.request(P.Ping()), P.Ok)
        finally:
            holder.close()


def test_a_rebuild_fetches_from_another_peer_when_the_first_stops_answering(tmp_path):
    """A group of three with m=2 (k=1): b and c each hold a parity chunk of a's codeword, and either one rebuilds
    a. The replacement of a asks b first; b does not answer, so after --peer-timeout a counts b as lost, fetches
    from c, and restore() returns step 2, bit-exact."""
    pc = free_port()
    extra = ("--peer", f"c=tcp://127.0.0.1:{pc}", "--ec-group", "a,b,c", "--ec-m", "2", "--peer-timeout", "1")
    with _pair(tmp_path, extra=extra) as pair:
        ep, net_b, client, log = pair
        net_c = PeerNet(ep.job, "c", SECRET.encode(), f"tcp://127.0.0.1:{pc}", {"a": net_b.peers["a"]})
        net_c.send("a", P.PeerHeld(**net_c.header("a"), held=[], parity=[]))
        # a's one data chunk is in codeword 2, whose parity chunks b (position 1) and c (position 2) hold
        b, c = _Holder(net_b, codeword=2, position=1, m=2), _Holder(net_c, codeword=2, position=2, m=2)
        try:
            saved = _lose_a_after_two_steps(pair, b, c)
            b.fetches = "ignore"
            state = {"w": torch.zeros(1 << 16, dtype=torch.float32)}
            guard = _guard(ep, state, gate_timeout_s=60)
            try:
                assert guard.restore() == 2
            finally:
                guard.close()
            assert torch.equal(state["w"], saved[2])
            assert (b.fetched, c.fetched) == ([2], [2])
            text = log.read_text()
            assert "peer b did not answer the fetch of chunk 1 of codeword 2 (bytes 0..262144) within 1.0 s;" \
                   " counting peer b as lost" in text, text
            assert "rebuilt step 2 of ranks [0] from peers ['c']" in text, text
        finally:
            b.close()
            c.close()
            net_c.close()


def test_peers_that_do_not_answer_cost_an_inventory_one_peer_timeout_not_one_each(tmp_path):
    """In a group of five, c, d and e are down (nothing listens at their addresses). A restore's Inventory asks
    every peer what it holds, all at once: with --peer-timeout 1, it answers after about one second, within
    the rank's 2.5 s request timeout, not after three (one for each silent peer, one after another)."""
    silent = {n: free_port() for n in "cde"}
    extra = (*(a for n, port in silent.items() for a in ("--peer", f"{n}=tcp://127.0.0.1:{port}")),
             "--ec-group", "a,b,c,d,e", "--ec-m", "2", "--peer-timeout", "1")
    with _pair(tmp_path, extra=extra) as (ep, net, client, log):
        holder = _Holder(net)  # b answers
        try:
            state = {"w": torch.zeros(1024)}
            guard = _guard(ep, state, timeout_s=2.5, gate_timeout_s=10)
            try:
                assert guard.restore() is None
            finally:
                guard.close()
            text = log.read_text()
            for n in "cde":
                assert f"counting peer {n} as lost: peer {n} (tcp://127.0.0.1:{silent[n]}) did not answer" \
                       " PeerInventory within 1.0 s" in text, text
            assert "counting peer b as lost" not in text
        finally:
            holder.close()


_RANK = """
import json, sys, torch, torch.distributed as dist
from snapguard.guard import Guard
from snapguard.procs import leave_process_group
rank, world, port, job, run_dir, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:8]
n, timeout_s, gate_timeout_s = int(sys.argv[8]), float(sys.argv[9]), float(sys.argv[10])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
state = {"w": torch.full((n,), float(100 * rank))}
guard = Guard(states={"s": state}, rng=False, job=job, node="a", run_dir=run_dir, rank=rank, world_size=world,
              timeout_s=timeout_s, gate_timeout_s=gate_timeout_s)
if mode == "train":
    for step in (1, 2):
        state["w"] += 1
        guard.snapshot(step)
        guard.wait()
else:
    state["w"].zero_()
    step = guard.restore()
    with open(out, "w") as f:
        json.dump({"step": step, "w": state["w"].unique().tolist()}, f)  # the values it holds
guard.close()
leave_process_group()
"""


def _ranks(ep: Endpoint, mode: str, out_dir, world: int = 2, n: int = 4096, timeout_s: float = 20,
           gate_timeout_s: float = 5.0) -> list[str]:
    """Run `world` ranks of _RANK on node a, each a process of its own joined by gloo, with a state of `n` floats;
    return their logs."""
    port, procs, logs = free_port(), [], []
    for rank in range(world):
        log = out_dir / f"{mode}.r{rank}.log"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(rank), str(world), str(port), ep.job,
                                           ep.run_dir, mode, str(out_dir / f"{mode}.r{rank}.json"), str(n),
                                           str(timeout_s), str(gate_timeout_s)],
                                          stdout=f, stderr=subprocess.STDOUT))
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank of {mode} did not finish in 120 s:\n{log.read_text()[-3000:]}")
        assert rc == 0, f"{mode} rank exited with {rc}:\n{log.read_text()[-3000:]}"
    return [log.read_text() for log in logs]


def test_ranks_that_disagree_on_a_failed_rebuild_all_restore_the_same_older_step(tmp_path):
    """Two ranks on node a sealed steps 1 and 2. Rank 1's slot of step 2 rots, and so does b's parity of it;
    rank 0's slot is intact. Rank 0 can open step 2, rank 1 cannot (its rebuild fails the checksums), so
    both plan again and restore step 1, each its own bytes: never two different steps."""
    with _pair(tmp_path) as (ep, net, client, log):
        holder = _Holder(net)
        try:
            _ranks(ep, "train", tmp_path)
            wait_until(lambda: {1, 2} <= set(holder.chunks), 10, "a's chunks of steps 1 and 2 to reach b")
            holder.rot_both(client, rank=1, step=2)

            logs = _ranks(ep, "restore", tmp_path)
            for rank in range(2):
                got = json.loads((tmp_path / f"restore.r{rank}.json").read_text())
                assert got["step"] == 1, logs[rank][-3000:]
                assert got["w"] == [100.0 * rank + 1], f"rank {rank} holds other bytes than its step 1"
            assert holder.fetched == [2]
            assert "restoring step 2" in logs[1] and "the ranks plan again" in logs[1]
            assert "step 2 cannot be rebuilt" in log.read_text()
        finally:
            holder.close()


def test_ranks_whose_shards_are_ready_wait_for_a_rebuild_that_moves_for_longer_than_a_collective_waits(tmp_path):
    """Two ranks on node a sealed steps 1 and 2, 28 MiB each: a's chunk of step 2 is four pieces. Rank 1's slot of
    step 2 rots, so a rebuilds step 2 from b, which answers one piece every 2.5 s: the rebuild takes 7.5 s, longer
    than the 6 s (timeout_s + gate_timeout_s) that one of restore's collectives waits, and moves every 2.5 s,
    within gate_timeout_s (4 s). Rank 0's shard is ready at once, and it waits for rank 1 in gathers a second
    apart: both restore step 2, each its own bytes."""
    n = 7 << 20
    with _pair(tmp_path) as (ep, net, client, log):
        holder = _Holder(net)
        try:
            _ranks(ep, "train", tmp_path, n=n)
            wait_until(lambda: {1, 2} <= set(holder.chunks), 30, "a's chunks of steps 1 and 2 to reach b")
            holder.rot_a(client, rank=1, step=2)
            holder.fetches, holder.pace_s = "paced", 2.5

            t0 = time.monotonic()
            logs = _ranks(ep, "restore", tmp_path, n=n, timeout_s=2, gate_timeout_s=4)
            took = time.monotonic() - t0
            for rank in range(2):
                got = json.loads((tmp_path / f"restore.r{rank}.json").read_text())
                assert got["step"] == 2, logs[rank][-3000:]
                assert got["w"] == [100.0 * rank + 2], f"rank {rank} holds other bytes than its step 2"
            assert [p[1] for p in holder.pieces] == [0, PIECE, 2 * PIECE, 3 * PIECE]
            assert took > 7.5, f"the rebuild, paced by b, took {took:.1f} s"
            assert "rebuilt step 2 of ranks [0, 1] from peers ['b']" in log.read_text()
        finally:
            holder.close()


def test_a_secret_file_that_is_missing_short_or_readable_by_others_stops_the_daemon_with_a_clear_error(tmp_path):
    def daemon_with(secret_file: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snapguard.daemon", "--job", "sec", "--node", "n0",
                               "--run-dir", str(tmp_path / "run"), "--shm-dir", str(tmp_path / "shm"),
                               "--peer-bind", f"tcp://127.0.0.1:{free_port()}", "--secret-file", secret_file],
                              capture_output=True, text=True, timeout=60)

    path = tmp_path / "secret"
    proc = daemon_with(str(path))
    assert proc.returncode == 2 and "cannot read the secret file" in proc.stderr, proc.stderr[-2000:]
    path.write_bytes(secrets.token_hex(16).encode())
    path.chmod(0o644)
    proc = daemon_with(str(path))
    assert proc.returncode == 2 and "chmod 600" in proc.stderr, proc.stderr[-2000:]
    path.chmod(0o600)
    path.write_bytes(b"short")
    proc = daemon_with(str(path))
    assert proc.returncode == 2 and "at least 16 bytes" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "shm") or not os.listdir(tmp_path / "shm")


def test_a_job_that_restarts_with_fewer_ranks_under_its_job_id_is_served_and_protected(tmp_path):
    """An elastic job of 4 ranks (a holds 0 and 1, b 2 and 3) restarts with 2 after losing a node: a now serves
    rank 0, b rank 1. a's slots of the 4-rank job cannot be restored into 2 ranks. They must neither count as what
    the new job's ranks hold (a's rank 1 would keep the common step at -1, so rank 0 could reuse no slot) nor
    block a new job that restarts from a checkpoint at an earlier step, nor stop a's chunks from going out (a's
    blob would need a step rank 1 never seals here). They are kept until every rank of the new job has sealed a
    step, and then freed."""
    with _pair(tmp_path, ("--peer-timeout", "1")) as pair:
        ep, net, client, _ = pair
        restart = pair.restart
        a = Node(ep.job, "a", ep.run_dir, "")
        dealer = net._dealer("a")
        for step in (5, 6):  # the 4-rank job, whose trainers are gone
            for rank in (0, 1):
                seal_raw(a, rank, 4, step)
        dealer.send_multipart(held_frames(net, held=[[2, 5, 6], [3, 5, 6]]))
        wait_until(lambda: a.status().common == 6, 10, "a to count b's ranks 2 and 3")
        life = TrainerLock(ep, 0, 2)
        try:
            assert isinstance(a.request(P.Hello(ep.job, 0, 2, os.getpid(), life.token)), P.Welcome)
            steps = a.request(P.Inventory(ep.job, 0))
            assert steps.steps == [] and steps.old_world == [4, 6], "the 4-rank job's steps are not offered to 2 ranks"
            a.request(P.Drop(ep.job, 0, -1, epoch=7))  # what a Guard does on a fresh start
            assert a.held() == {0: [5, 6], 1: [5, 6]}, "a fresh start of the new job forgets none of the old one"
            for step in (0, 1, 2):  # from a checkpoint on disk, at lower steps than the old job's
                seal_raw(a, 0, 2, step)
            assert a.status().common == -1, "b has not said that rank 1 holds anything yet"
            got = _chunks_received(net, until_step=2)
            assert 2 in got, f"a sent chunks of steps {sorted(got)}, not of its newest step 2"
            assert _held_reported(net, lambda held: [0, 0, 1, 2] in held) == [[0, 0, 1, 2]], \
                "a tells its peers of the ranks it serves now, not of rank 1's slots of the old job"
            before = _boot_of_a(net)
            restart()  # a daemon that re-adopts both jobs' slots takes the world size of the newest
            assert a.status().sealed == 2 and a.request(P.Inventory(ep.job, 0)).steps == [0, 1, 2]
            assert isinstance(a.request(P.Hello(ep.job, 0, 2, os.getpid(), life.token)), P.Welcome)
            wait_until(lambda: _boot_of_a(net) > before, 10, "a heartbeat of a's new run")  # b started before it
            dealer.send_multipart(held_frames(net, "a", held=[[1, 1, 2]]))
            wait_until(lambda: a.status().common == 2, 10, "the common step of the new job")
            wait_until(lambda: a.held() == {0: [0, 1, 2]}, 10, "the old job's slots to go")
            assert [r["rank"] for r in a.status().ranks] == [0], "a's rank 1 lives on b now: its slots are removed"
            seal_raw(a, 0, 2, 3)  # reuses the slot of step 0: every rank holds step 2
            assert a.held() == {0: [1, 2, 3]}
        finally:
            life.release()
