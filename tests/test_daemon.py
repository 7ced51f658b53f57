"""The daemon as a real process: its wire, its files, its crashes.

Each test starts `snapguard-daemon` in a subprocess with its own shm and run directories and talks
to it over its real IPC socket, either with raw ZeroMQ frames (to send what no well-behaved client
would) or with a Guard in this process acting as rank 0 of a one-rank job. Crashes are SIGKILL.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import msgpack
import numpy as np
import psutil
import pytest
import torch
import zmq
import zmq.utils.monitor

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint, default_timeout, job_id_caveat
from snapguard.demo import state_digest
from snapguard.errors import (ConfigError, DaemonError, DaemonUnavailable, LayoutError, RestoreError, SnapGuardError,
                              WorldSizeChanged)
from snapguard.guard import Guard
from snapguard.layout import MANIFEST_VERSION, Manifest, TensorEntry, align, chunk_checksums, manifest_digest
from snapguard.procs import TrainerLock, daemon_command

from conftest import Node, flip_bits, make_dirs, unique_id, wait_until

# ---- helpers -------------------------------------------------------------------------------------


class RawWire:
    """A DEALER socket that sends arbitrary frames to the daemon and returns whatever comes back."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: list[bytes], timeout_s: float = 10.0) -> list[bytes] | None:
        self.sock.send_multipart(frames)
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv_multipart()

    def error(self, header: bytes | None = None, frames: list[bytes] | None = None) -> P.Error:
        """Send one request (header after an 8-byte id, or the given frames); the reply must be an Error."""
        rid = os.urandom(8)
        reply = self.send(frames if frames is not None else [rid, header])
        assert reply is not None, "the daemon did not answer a bad message"
        assert len(reply) == 2, reply
        if frames is None:
            assert reply[0] == rid, "the error must answer this request's id"
        msg = P.decode(reply[1])
        assert isinstance(msg, P.Error), f"a bad message was answered with {msg}"
        return msg

    def close(self) -> None:
        self.sock.close(0)


def seal_raw(node: Node, rank: int, world: int, step: int, nbytes: int = 8192, seal: bool = True) -> int:
    """Act as a trainer without torch: get a slot, write a recognisable payload, seal it. Returns the slot."""
    g = node.request(P.Begin(node.job, rank, world, step, nbytes))
    assert isinstance(g, P.Granted), g
    fd = os.open(g.path, os.O_RDWR)
    try:
        os.pwrite(fd, payload(rank, step, nbytes), 0)
    finally:
        os.close(fd)
    if seal:
        reply = node.request(P.Seal(node.job, rank, step, g.slot,
                                    good_manifest(node, rank, step, nbytes, over={"world_size": world})))
        assert isinstance(reply, P.Sealed) and reply.step == step
    return g.slot


_FAILING = """
import importlib, os, sys
from snapguard.daemon.__main__ import main
trigger, targets = sys.argv[1], sys.argv[2]
def failing(orig):
    def method(*args, **kwargs):
        if os.path.exists(trigger):
            raise RuntimeError("injected failure")
        return orig(*args, **kwargs)
    return method
for target in targets.split(","):
    module, _, name = target.partition(":")
    cls_name, meth = name.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    setattr(cls, meth, failing(getattr(cls, meth)))
sys.exit(main(sys.argv[3:]))
"""


def spawn_failing_daemon(ep: Endpoint, shm_dir: str, extra: list[str], trigger: str, methods: list[str],
                         log_path: str) -> subprocess.Popen:
    """A real daemon whose `methods` ("module:Class.method") raise RuntimeError while the file `trigger` exists: a
    bug, which no validation rules out, at a chosen place. Waits until it answers."""
    cmd = [sys.executable, "-c", _FAILING, trigger, ",".join(methods), *daemon_command(ep, shm_dir, extra)[3:]]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    c = DaemonClient(ep.address, who="waiting for a failing daemon")
    try:
        c.wait_ready(30)
    except DaemonUnavailable:
        proc.kill()
        proc.wait(10)
        raise
    finally:
        c.close()
    return proc


def files_of(node: Node) -> dict[str, bytes]:
    """Every byte of every file the daemon keeps in shared memory, by name."""
    out = {}
    for name in sorted(os.listdir(node.table_dir)):
        with open(os.path.join(node.table_dir, name), "rb") as f:
            out[name] = f.read()
    return out


def observable(node: Node) -> tuple:
    """What the daemon reports, minus what changes by itself (ages)."""
    st = node.status()
    ranks = [{**r, "slots": [{k: v for k, v in s.items() if k != "age_s"} for s in r["slots"]]} for r in st.ranks]
    return ranks, st.common, st.shm_used, st.job, st.pid


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_model(seed: int = 0, width: int = 64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model, opt, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = model(torch.randn(16, 32, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def train_and_snapshot(guard, model, opt, loop: dict, steps) -> dict[int, dict]:
    """Train `steps`, snapshot each; return each step's state digest (taken when its snapshot is sealed)."""
    digests = {}
    for step in steps:
        train_step(model, opt, step)
        loop["step"] = step
        guard.snapshot(step)
        guard.wait()
        digests[step] = state_digest(model, opt)
    return digests


# ---- bad messages on the wire --------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy():
    """One daemon holding state for a two-rank job: rank 0 sealed steps 0 and 1, rank 1 sealed 0 and is writing 1.
    Rank 0's trainer (this process) said Hello."""
    run_dir, shm_dir = make_dirs("wire")
    n = Node(unique_id("wire"), "n0", run_dir, shm_dir)
    n.start()
    life = TrainerLock(n.ep, 0, 2)
    try:
        assert isinstance(n.request(P.Hello(n.job, 0, 2, os.getpid(), life.token)), P.Welcome)
        for step in (0, 1):
            seal_raw(n, 0, 2, step)
        seal_raw(n, 1, 2, 0)
        seal_raw(n, 1, 2, 1, seal=False)
        yield n
    finally:
        life.release()
        n.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture
def wire(busy):
    w = RawWire(busy.ep.address)
    before = (observable(busy), files_of(busy))
    assert before[0][0][0]["slots"][0]["state"] == "sealed"
    yield w
    w.close()
    # the daemon keeps serving, and nothing it holds has changed: not its state, not one byte of a slot
    assert isinstance(busy.request(P.Ping()), P.Ok)
    assert (observable(busy), files_of(busy)) == before
    assert busy.held() == {0: [0, 1], 1: [0]}


def taken(directory: str, prefix: str = "") -> int:
    """The memory that the files in `directory` (those whose names start with `prefix`) take."""
    return sum(os.stat(os.path.join(directory, n)).st_blocks * 512 for n in os.listdir(directory) if n.startswith(prefix))


def enc(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def payload(rank: int, step: int, nbytes: int) -> bytes:
    """The recognisable bytes of `rank`'s shard of `step` (`seal_raw` writes them)."""
    return bytes((step * 13 + rank * 101 + i) % 256 for i in range(nbytes))


def good_manifest(node: Node, rank: int, step: int, nbytes: int = 8192, over: dict | None = None) -> dict:
    """The wire manifest of `payload(rank, step, nbytes)` in a job of 2 ranks (`over` replaces fields)."""
    data = payload(rank, step, nbytes)
    man = Manifest(MANIFEST_VERSION, node.job, rank, 2, step, nbytes, 4096,
                   [TensorEntry("payload", "uint8", [nbytes], 0, nbytes)],
                   chunk_checksums(memoryview(data), nbytes, 4096), msgpack.packb(None), time.time())
    wire = {**man.to_wire(), **(over or {})}
    return {**wire, "digest": manifest_digest(wire)}  # numbers a buggy trainer might send, under a digest that fits


def bad_requests(node: Node) -> dict[str, tuple[bytes, str, str]]:
    """name -> (header frame, expected error code, text the error must contain)."""
    job = node.job
    seal = P.encode(P.Seal(job, 1, 1, 1, good_manifest(node, 1, 1)))
    begin = {"v": 4, "type": "Begin", "job": job, "rank": 0, "world_size": 2, "step": 9, "nbytes": 8192}
    sealf = {"v": 4, "type": "Seal", "job": job, "rank": 1, "step": 1, "slot": 1}
    return {
        "malformed-byte": (b"\xc1", "ProtocolError", "not valid msgpack"),
        "malformed-text": (b"GET / HTTP/1.1\r\n\r\n", "ProtocolError", "not valid msgpack"),
        "empty": (b"", "ProtocolError", "not valid msgpack"),
        "truncated-seal": (seal[: len(seal) // 2], "ProtocolError", "not valid msgpack"),
        "truncated-by-one": (seal[:-1], "ProtocolError", "not valid msgpack"),
        "oversized": (enc({**begin, "pad": b"\0" * (P.MAX_HEADER_BYTES + 1)}), "ProtocolError", "over the"),
        "wrong-version": (enc({**begin, "v": 2}), "ProtocolError", "version 2 is not supported"),
        "no-version": (enc({k: v for k, v in begin.items() if k != "v"}), "ProtocolError", "version None"),
        "float-version": (enc({**begin, "v": 4.0}), "ProtocolError", "version 4.0 is not supported"),
        "unknown-type": (enc({"v": 4, "type": "FormatDisk", "job": job}), "ProtocolError", "unknown message type"),
        "not-a-map": (enc(["Begin", job, 0]), "ProtocolError", "must be a map"),
        "str-for-int": (enc({**begin, "step": "9"}), "ProtocolError", "Begin.step has type str"),
        "bool-for-int": (enc({**begin, "rank": True}), "ProtocolError", "Begin.rank has type bool"),
        "float-for-int": (enc({**begin, "nbytes": 8192.0}), "ProtocolError", "Begin.nbytes has type float"),
        "missing-field": (enc({k: v for k, v in begin.items() if k != "nbytes"}), "ProtocolError", "lacks field"),
        "unknown-field": (enc({**begin, "force": True}), "ProtocolError", "unknown fields ['force']"),
        "negative-step": (enc({**begin, "step": -1}), "ProtocolError", "must be >= 0"),
        "rank-outside-world": (enc({**begin, "rank": 2}), "ProtocolError", "outside world_size 2"),
        "other-job": (P.encode(P.Drop("someone-else", 0, -1)), "ProtocolError", "not 'someone-else'"),
        "reply-as-request": (P.encode(P.Granted(0, "/etc/passwd", 1)), "ProtocolError", "not a request"),
        "step-not-newer": (P.encode(P.Begin(job, 0, 2, 1, 8192)), "BadStep", "not newer than step 1"),
        "open-unheld-step": (P.encode(P.Open(job, 0, 7)), "LayoutError", "holds no sealed step 7"),
        "seal-manifest-not-map": (enc({**sealf, "manifest": [1, 2]}), "ProtocolError", "manifest has type list"),
        "seal-manifest-garbage": (enc({**sealf, "manifest": {"x": 1}}), "LayoutError", "differ from"),
        "seal-manifest-bool": (enc({**sealf, "manifest": good_manifest(node, 1, 1, over={"rank": True})}), "LayoutError",
                               "must be int, got bool"),
        "seal-sealed-slot": (P.encode(P.Seal(job, 0, 1, 0, good_manifest(node, 0, 1))), "LayoutError",
                             "not being written"),
        "seal-wrong-step": (P.encode(P.Seal(job, 1, 2, 1, good_manifest(node, 1, 2))), "LayoutError",
                            "not being written for step 2"),
        "seal-other-rank": (P.encode(P.Seal(job, 1, 1, 1, good_manifest(node, 0, 1))), "LayoutError",
                            "manifest names job"),
        "seal-too-big": (P.encode(P.Seal(job, 1, 1, 1, good_manifest(
            node, 1, 1, over={"nbytes": 1 << 20, "checksums": [0] * 256}))),
            "LayoutError", "does not fit a slot of 8192 bytes"),
        # a shape whose full product would take the daemon minutes to compute, while it answers no one
        "seal-shape-of-200k-dims": (P.encode(P.Seal(job, 1, 1, 1, good_manifest(
            node, 1, 1, over={"entries": [["payload", "uint8", [(1 << 64) - 1] * 200_000, 0, 8192]]}))),
            "LayoutError", "tensor 'payload' uint8 of 200000 dimensions claims 8192 bytes"),
        # an error that quotes 1.2 MB of what was sent must still be a reply the sender can decode
        "unknown-fields-of-1mb": (enc({**begin, "x" * 600_000: 1, "y" * 600_000: 1}), "ProtocolError",
                                  "characters left out"),
        "seal-no-such-slot": (P.encode(P.Seal(job, 1, 1, 9, good_manifest(node, 1, 1))), "LayoutError", "no slot 9"),
        "seal-offset-past-end": (P.encode(P.Seal(job, 1, 1, 1, good_manifest(
            node, 1, 1, over={"entries": [["payload", "uint8", [8192], 64, 8192]]}))), "LayoutError", "runs past the shard end"),
        # a world size other than the one rank 0's running trainer said: ranks would drop out of the common step
        "reserve-rank-outside-world": (P.encode(P.Reserve(job, 1, 1, 8192)), "ProtocolError",
                                       "Reserve.rank 1 is outside world_size 1"),
        "reserve-smaller-world": (P.encode(P.Reserve(job, 0, 1, 8192)), "ProtocolError",
                                  "rank 0 says world_size 1, but rank 0 of this job"),
        "begin-larger-world": (P.encode(P.Begin(job, 1, 3, 2, 8192)), "ProtocolError",
                               "rank 1 says world_size 3, but rank 0 of this job"),
        "hello-other-world": (P.encode(P.Hello(job, 1, 4, os.getpid(), "0123456789abcdef")), "ProtocolError",
                              "still running) said 2"),
        "world-of-4e7": (enc({**begin, "world_size": 40_000_000}), "ProtocolError", "Begin.world_size must be in 1.."),
        "seal-manifest-other-world": (P.encode(P.Seal(job, 1, 1, 1, good_manifest(node, 1, 1, over={"world_size": 3}))),
                                      "ProtocolError", "says world_size 3, the job's is 2"),
    }


BAD = sorted(bad_requests(Node("j", "n", "/r", "/s")))


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_an_error_reply_and_changes_nothing(busy, wire, case):
    header, code, text = bad_requests(busy)[case]
    err = wire.error(header)
    assert err.code == code, err
    assert text in err.message, err


@pytest.mark.parametrize(("name", "frames"), [
    ("no-request-id", lambda h: [h]),
    ("short-request-id", lambda h: [b"abc", h]),
    ("extra-frame", lambda h: [b"\1" * 8, h, b"bulk"]),
])
def test_wrong_frame_layouts_get_an_error_reply(busy, wire, name, frames):
    err = wire.error(frames=frames(P.encode(P.Drop(busy.job, 0, -1))))
    assert err.code == "ProtocolError" and "expected [request id (8 bytes), header]" in err.message


def test_a_flood_of_random_bytes_and_truncations_is_answered_one_error_each(busy, wire):
    rnd = random.Random(2)
    frames = [rnd.randbytes(rnd.randrange(1, 300)) for _ in range(300)]
    valid = P.encode(P.Seal(busy.job, 1, 1, 1, good_manifest(busy, 1, 1)))
    frames += [valid[:cut] for cut in sorted(rnd.sample(range(len(valid)), 100))]
    for f in frames:
        wire.error(f)


def test_a_message_over_the_transport_limit_drops_only_that_connection(busy, wire):
    """Past 64 MiB ZeroMQ refuses the frame and closes that peer's connection; the daemon serves everyone else."""
    from snapguard.daemon.server import ZMQ_MAX_MSG

    huge = RawWire(busy.ep.address)
    monitor = huge.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert huge.send([os.urandom(8), b"\0" * (ZMQ_MAX_MSG + 1)], timeout_s=0.0) is None
        assert monitor.poll(30_000), "the daemon should close the connection that sent an over-limit frame"
        assert zmq.utils.monitor.recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        huge.sock.disable_monitor()
        monitor.close(0)
        huge.close()
    assert isinstance(busy.request(P.Ping()), P.Ok)


# ---- /dev/shm too small --------------------------------------------------------------------------

def slot_mib(model) -> float:
    """The size of one slot for a model's parameters alone (the optimizer has no state before its first step)."""
    return sum(align(p.numel() * p.element_size()) for p in model.parameters()) / (1 << 20)


def test_a_shm_dir_that_is_not_in_memory_is_warned_about_at_start(node, tmp_path, small_tmpfs):
    """Slots on a disk file system (SNAPGUARD_SHM_DIR=/tmp, say, to get around a small /dev/shm) work, but every
    snapshot is then written back to the disk: the daemon says so when it starts. On a tmpfs it says nothing."""
    disk = str(tmp_path / "slots")
    os.makedirs(disk, mode=0o700)
    kind = subprocess.run(["stat", "-f", "-c", "%T", disk], capture_output=True, text=True, check=True).stdout.strip()
    warned = []
    for shm_dir in (disk, small_tmpfs):
        node.start(shm_dir=shm_dir)
        node.kill()
        warned.append(f"{shm_dir} is on a file system of type" in node.log() and "not in memory (tmpfs)" in node.log())
        os.unlink(node.log_path)
    assert warned == [kind != "tmpfs", False], (kind, warned)


def test_shm_limit_is_a_clear_error_before_training_starts(node):
    node.start(["--shm-limit", "1M"])
    model, opt = make_model(width=4096)
    per = slot_mib(model)
    assert 0.5 < per < 1.0, "one slot fits the limit, two do not"
    with pytest.raises(DaemonError) as e:
        node.guard(model, opt, rng=False)
    msg = str(e.value)
    assert (f"refused Reserve: [ShmSpaceError] rank 0: 2 snapshot slot(s) of {per:.1f} MiB need {2 * per:.1f} MiB"
            " more shared memory") in msg
    assert "the daemon's limit of 1.0 MiB leaves 1.0 MiB" in msg and "--shm-size" in msg
    assert taken(node.table_dir, "r") == 0, "nothing may be allocated for a promise that cannot be kept"
    assert node.status().shm_used == 0


@pytest.fixture
def small_tmpfs():
    """A real 8 MiB tmpfs, like Docker's too-small /dev/shm (we run as root; see the report if not)."""
    where = tempfile.mkdtemp(prefix="sg-tmpfs-", dir="/tmp")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", where], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the configured-limit test covers the check")
    yield where
    subprocess.run(["umount", "-l", where], check=True)
    os.rmdir(where)


def test_a_real_small_tmpfs_is_a_clear_error_before_training_starts(node, small_tmpfs):
    node.start(shm_dir=small_tmpfs)
    model, opt = make_model(width=16384)
    assert 2 * slot_mib(model) < 6, "two slots of this model fit in 8 MiB"
    g = node.guard(model, opt, rng=False)
    g.close()
    model, opt = make_model(width=65536)
    per = slot_mib(model)
    assert 2 * per > 8
    other = Node(unique_id("tmpfs"), node.node, node.run_dir, small_tmpfs)
    other.start()
    try:
        with pytest.raises(DaemonError) as e:
            other.guard(model, opt, rng=False)
        msg = str(e.value)
        assert f"[ShmSpaceError] rank 0: 2 snapshot slot(s) of {per:.1f} MiB need {2 * per:.1f} MiB more shared memory" in msg
        assert f"but {small_tmpfs} has" in msg and "MiB free" in msg and "--shm-size" in msg
        assert taken(other.table_dir, "r") == 0
    finally:
        other.close()


def test_slots_grow_in_place_so_a_tmpfs_that_holds_the_final_state_twice_is_enough(node, small_tmpfs):
    """A Guard reserves its slots for the parameters; Adam's moments come with the first step, and the slots grow to
    three times that. A slot's file grows in place, taking only what it adds: the 8 MiB tmpfs holds two slots of the
    final state, though not those beside the parameters' slots."""
    node.start(shm_dir=small_tmpfs)
    model, opt = make_model(width=7168)
    per = slot_mib(model)
    assert 2 * (per + 3 * per) > 8 > 2 * 3 * per + 0.25
    g = node.guard(model, opt, rng=False)
    try:
        for step in range(3):
            train_step(model, opt, step)
            g.snapshot(step)
        g.wait()
        assert node.held() == {0: [1, 2]}
    finally:
        g.close()


def test_a_slot_keeps_room_for_its_manifest_and_a_seal_without_it_is_a_clear_error(node, small_tmpfs):
    """Slots that would fill the tmpfs to the last byte are refused: each seal writes its manifest beside its slot.
    When the room goes to something else anyway, the seal fails saying so, leaves nothing behind, and the next one
    succeeds once there is room again."""
    node.start(shm_dir=small_tmpfs)
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    with pytest.raises(DaemonError, match=r"need .* MiB more shared memory \(and 128.0 KiB beside them for their"
                                          r" manifests\)"):
        node.request(P.Reserve(node.job, 0, 1, free // 2))
    wait_until(lambda: isinstance(node.request(P.Reserve(node.job, 0, 1, 1 << 20)), P.Ok), 10, "rank 0's slots")
    seal_raw(node, 0, 1, 0)
    filler = os.path.join(small_tmpfs, "filler")
    slot = seal_raw(node, 0, 1, 1, seal=False)
    with open(filler, "wb") as f:  # every byte left, in pages: the manifest of step 1 finds none
        f.write(bytes(os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize))
    with pytest.raises(DaemonError, match=r"\[ShmSpaceError\] rank 0 step 1: no room for its manifest \(.*\) beside its"
                                          r" slot: .* free. Give the node more /dev/shm"):
        node.request(P.Seal(node.job, 0, 1, slot, good_manifest(node, 0, 1, over={"world_size": 1})))
    assert node.held() == {0: [0]}
    assert not [n for n in os.listdir(os.path.join(small_tmpfs, os.path.basename(node.table_dir))) if n.endswith(".new")]
    os.unlink(filler)
    seal_raw(node, 0, 1, 1)
    assert node.held() == {0: [0, 1]}


def test_a_state_of_no_tensors_is_snapshotted_and_restored_after_the_daemon_restarts(node):
    """A Guard over a model without parameters and a loop-state dict: a shard of no bytes, sealed in an empty file,
    which a restarted daemon re-adopts like any other."""
    node.start()
    loop = {"step": 0, "epoch": 3}
    g = node.guard(torch.nn.ReLU(), None, loop, rng=False)
    for step in range(2):
        loop["step"] = step
        g.snapshot(step)
    g.wait()
    g.close()
    node.kill()
    node.start()
    assert node.held() == {0: [0, 1]}
    loop = {"step": -1, "epoch": 0}
    g = node.guard(torch.nn.ReLU(), None, loop, rng=False)
    try:
        assert g.restore() == 1
        assert loop == {"step": 1, "epoch": 3}
    finally:
        g.close()


def test_slots_grow_in_the_background_while_the_daemon_serves_and_a_failed_growth_is_a_clear_error(node, tmp_path,
                                                                                                      small_tmpfs):
    """Reserving memory takes a while (0.3 s per GiB on the dev VM: minutes for a node's slots of a large model), so
    the daemon grows a rank's slots in threads and answers its Reserve with how far it got until they are ready.
    Meanwhile it serves everyone else; a Guard waits while the reservation moves and gives up after timeout_s without
    progress, saying what it waited for. A growth that fails (the memory went elsewhere since the check) is the
    rank's next answer, and nothing of it is left."""
    stall = tmp_path / "stall"  # rank 0's slots stop growing before their first byte while this file exists
    stall.touch()
    node.start(shm_dir=small_tmpfs, faults=f"daemon.reserve.piece@0%{stall}")
    model = torch.nn.Linear(1024, 512, bias=False)  # 2 MiB of parameters: two slots take 4 of the 8 MiB
    failed: list[BaseException] = []

    def rank0() -> None:
        try:
            node.guard(model, None, rng=False, world_size=2, timeout_s=3.0)
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=rank0)
    t.start()
    try:
        _grow_and_fail(node, small_tmpfs, stall, model, t, failed)
    finally:  # the Guard's thread ends, and the daemon goes before its tmpfs does
        stall.unlink(missing_ok=True)
        t.join(30)
        node.kill()


def _grow_and_fail(node: Node, small_tmpfs: str, stall, model, t: threading.Thread, failed: list) -> None:
    table = os.path.join(small_tmpfs, os.path.basename(node.table_dir))
    wait_until(lambda: [[s["state"] for s in r["slots"]] for r in node.status().ranks] == [["allocating"] * 2], 10,
               "rank 0's slots to be growing")
    # served meanwhile: a ping, and rank 1, whose slots grow beside rank 0's
    assert isinstance(node.request(P.Ping()), P.Ok)

    def rank1_slots() -> P.Ok | None:
        reply = node.request(P.Reserve(node.job, 1, 2, 1 << 20))  # Allocating until they are ready
        return reply if isinstance(reply, P.Ok) else None

    reply = wait_until(rank1_slots, 10, "rank 1's slots")
    assert [capacity for _, capacity in reply.info["slots"]] == [1 << 20] * 2
    # what rank 0's growth is about to take counts as taken
    with pytest.raises(DaemonError, match=r"\[ShmSpaceError\] rank 1: 2 snapshot slot\(s\) of 3.0 MiB need 4.0 MiB more"
                                          r" shared memory \(and 128.0 KiB beside them for their manifests\), but .* MiB"
                                          r" free once the 4.0 MiB being allocated for other"):
        node.request(P.Reserve(node.job, 1, 2, 3 << 20))
    t.join(30)
    assert not t.is_alive() and len(failed) == 1, failed
    assert isinstance(failed[0], DaemonError)
    assert re.search(r"waited 3 s for the daemon to reserve this rank's snapshot slots \(0 B of 4.0 MiB so far, after \d+ s\)"
                     r" without progress", str(failed[0])), failed[0]

    # the memory goes elsewhere; then the growth goes on, and fails
    with open(os.path.join(small_tmpfs, "filler"), "wb") as f:
        f.write(bytes(os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize))
    stall.unlink()
    with pytest.raises(DaemonError, match=r"refused Reserve: \[ShmSpaceError\] could not allocate 2.0 MiB more for .*No"
                                          r" space"):
        node.guard(model, None, rng=False, world_size=2, timeout_s=10.0)
    st = node.status().ranks[0]["slots"]
    assert [(s["state"], s["capacity"]) for s in st] == [("free", 0)] * 2
    assert taken(table, "r00000.") == 0, "a failed growth gives back what it had reserved"

    os.unlink(os.path.join(small_tmpfs, "filler"))
    g = node.guard(model, None, rng=False, world_size=2, timeout_s=10.0)
    try:
        g.snapshot(0)
        g.wait()
        assert node.held()[0] == [0]
    finally:
        g.close()


def test_a_daemon_killed_while_it_grows_slots_leaves_free_slots_that_a_restarted_daemon_grows_on(node):
    """SIGKILL while a grower thread reserves a rank's slot: the trainer's Guard() fails saying the daemon closed the
    connection (or, when it died between two of Guard's Reserve polls, that no daemon took its place within the
    timeout); the slot's file holds what had been reserved (it grows in place), and the restarted daemon takes it as
    a free slot of that size and grows it on."""
    node.start(faults="daemon.reserve.piece@0")
    model = torch.nn.Linear(256, 256, bias=False)
    gone = r"closed the connection while Reserve waited|did not answer Reserve within 5.0 s \(no daemon was connected\)"
    with pytest.raises(DaemonError, match=gone):
        node.guard(model, None, rng=False, timeout_s=5.0)
    assert node.proc.wait(10) == -9
    node.start()
    # the growth was killed before it reserved anything: the restarted daemon holds free slots of no memory
    assert [[(s["state"], s["capacity"]) for s in r["slots"]] for r in node.status().ranks] == [[("free", 0)] * 2]
    assert taken(node.table_dir, "r") == 0
    g = node.guard(model, None, rng=False)
    try:
        g.snapshot(0)
        g.wait()
        assert node.held() == {0: [0]}
    finally:
        g.close()


# ---- crashes ---------------------------------------------------------------------------------------

def test_daemon_sigkill_mid_seal_then_restore_gives_the_newest_complete_step(node):
    node.start(faults="daemon.seal.verified@2")
    model, opt = make_model()
    loop = {"step": -1}
    g = node.guard(model, opt, loop, timeout_s=3.0, rng=False)
    digests = train_and_snapshot(g, model, opt, loop, range(2))
    train_step(model, opt, 2)
    g.snapshot(2)  # the daemon verifies step 2 and dies before its manifest exists
    with pytest.raises(SnapGuardError, match="snapshot of step 2 failed: .*closed the connection while Seal waited"):
        g.wait()
    assert node.proc.wait(10) == -9
    g.close()
    names = sorted(os.listdir(node.table_dir))
    assert names == ["r00000.s0.data", "r00000.s1.data", "r00000.s1.manifest"], "step 2 must have no commit marker"

    node.start()
    assert node.held() == {0: [1]}
    model2, opt2 = make_model(seed=99)
    loop2 = {}
    g2 = node.guard(model2, opt2, loop2, rng=False)
    assert g2.restore() == 1
    assert state_digest(model2, opt2) == digests[1]
    assert loop2 == {"step": 1}
    g2.close()


@pytest.mark.parametrize("hash_threads", [1, 3])
def test_flipped_bytes_in_a_sealed_slot_fall_back_to_the_previous_step_and_say_so(node, caplog, hash_threads):
    daemon = node
    daemon.start(["--hash-threads", str(hash_threads)])
    model, opt = make_model()
    loop = {"step": -1}
    g = daemon.guard(model, opt, loop, rng=False, chunk_size=4096)  # many chunks, for the daemon's threads
    digests = train_and_snapshot(g, model, opt, loop, range(2))
    g.close()
    flip_bits(daemon.slot_file(0, 1), 0, 0x10)  # one bit of the first tensor of step 1

    model2, opt2 = make_model(seed=99)
    loop2 = {}
    g2 = daemon.guard(model2, opt2, loop2, rng=False)
    with caplog.at_level("INFO", logger="snapguard.guard"):
        assert g2.restore() == 0
    assert state_digest(model2, opt2) == digests[0] and loop2 == {"step": 0}
    assert "a sealed snapshot failed verification and is not used: rank 0: shard for step 1 has checksum" in caplog.text
    assert "restored step 0" in caplog.text and "newer snapshots were corrupt and skipped" in caplog.text
    assert "shard for step 1 has checksum" in daemon.log() and "restore will use an older step" in daemon.log()
    assert daemon.held() == {0: [0]}
    g2.close()


def test_when_every_snapshot_is_corrupt_restore_stops_and_says_the_state_was_touched(daemon):
    model, opt = make_model()
    loop = {"step": -1}
    g = daemon.guard(model, opt, loop, rng=False)
    train_and_snapshot(g, model, opt, loop, range(2))
    g.close()
    for step in (0, 1):
        flip_bits(daemon.slot_file(0, step), 0, 0x10)

    model2, opt2 = make_model(seed=99)
    g2 = daemon.guard(model2, opt2, {}, rng=False)
    with pytest.raises(RestoreError, match=r"cannot restore: every snapshot failed verification\. This rank: rank 0:"
                                           r" shard for step 0 has checksum .*; rank 0: shard for step 1 has checksum"
                                           r" .*state holds verified chunks of step 1 now, so it must not train on"):
        g2.restore()
    assert daemon.held() == {0: []}
    g2.close()


def test_a_request_in_flight_when_the_daemon_dies_fails_at_once_not_at_its_timeout(node):
    node.start()
    c = node.client(timeout_s=60)
    assert isinstance(c.request(P.Ping()), P.Ok)
    pid = node.proc.pid
    os.kill(pid, signal.SIGSTOP)  # the request reaches the daemon's socket, but no answer comes
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="closed the connection while Ping waited for its reply"):
        c.request(P.Ping())
    assert time.monotonic() - t0 < 30, "the request must fail when the daemon dies, not wait out its 60 s"
    killer.join()
    node.proc.wait(30)
    node.start()  # the same client goes on with the restarted daemon
    assert isinstance(c.request(P.Ping()), P.Ok)


def test_a_request_sent_after_the_daemon_died_waits_the_clients_timeout_not_a_longer_one(node):
    # Open may wait up to gate_timeout_s for a daemon rebuilding shards; a daemon that is not there at all is
    # waited for (it may be restarting) only as long as any request.
    node.start()
    c = node.client(timeout_s=2.0)
    assert isinstance(c.request(P.Ping()), P.Ok)
    node.kill()
    time.sleep(0.5)  # the connection closes while no request waits
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match=r"did not answer Ping within 2.0 s \(no daemon was connected\)"):
        c.request(P.Ping(), timeout_s=300)
    assert time.monotonic() - t0 < 20
    node.start()  # a daemon that comes back gets the whole timeout
    assert isinstance(c.request(P.Ping(), timeout_s=300), P.Ok)


def test_abort_ends_a_request_that_waits_and_refuses_every_later_one(node):
    """`abort()` from another thread ends a request that waits for its reply at once, and no request is sent
    after it: the client is closed for good (a plain `close()` lets the next request connect again)."""
    node.start()
    c = node.client(timeout_s=60)
    assert isinstance(c.request(P.Ping()), P.Ok)
    os.kill(node.proc.pid, signal.SIGSTOP)  # no answer comes
    try:
        aborter = threading.Timer(0.5, c.abort)
        aborter.start()
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="Ping was given up while it waited for its reply"):
            c.request(P.Ping())
        assert time.monotonic() - t0 < 10, "abort() must end the waiting request, not its 60 s timeout"
        aborter.join()
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    with pytest.raises(DaemonUnavailable, match="Ping not sent: the connection to the daemon at .* was given up"):
        c.request(P.Ping())


def test_a_snapshot_that_close_gave_up_on_is_never_sealed_after_close(daemon, monkeypatch, tmp_path):
    """close() while the last snapshot is still not sealed (here: its copy thread stalls before the seal, as on
    a slow hash): close() says so and returns. Once it has returned the training loop may change the state under
    a copy that is still running, so the thread, going on later, must not seal that step."""
    from snapguard import faults

    stall = tmp_path / "stall"
    stall.touch()
    monkeypatch.setattr(faults, "_FAULTS", faults._parse(f"trainer.copy.done@1%{stall}"))
    model, opt = make_model()
    g = daemon.guard(model, opt, rng=False, timeout_s=1.0, gate_timeout_s=1.0)
    try:
        train_and_snapshot(g, model, opt, {"step": -1}, range(1))
        train_step(model, opt, 1)
        g.snapshot(1)  # its copy thread stops before sending the seal
        with pytest.raises(SnapGuardError, match="waited 2 s for step 1 to be sealed"):
            g.close()
    finally:
        stall.unlink()  # the copy thread goes on to its seal
    wait_until(lambda: not any(t.name == "snapguard-copy-r0" for t in threading.enumerate()), 10,
               "the copy thread to end")
    assert daemon.held() == {0: [0]}, "a step was sealed after close() had given up on it"


def sealed_steps_0_to_2(node: Node) -> dict[int, dict]:
    """Start the daemon, train and snapshot steps 0-2 with a loop state, close; each step's state digest."""
    node.start()
    model, opt = make_model()
    loop = {"step": -1}
    g = node.guard(model, opt, loop, rng=False)
    digests = train_and_snapshot(g, model, opt, loop, range(3))
    g.close()
    return digests


def test_a_restarted_daemon_readopts_sealed_slots_after_verifying_them(node, caplog):
    digests = sealed_steps_0_to_2(node)
    before = observable(node)[:3], files_of(node)
    assert node.held() == {0: [1, 2]}
    assert node.kill() == -9

    node.start()
    assert (observable(node)[:3], files_of(node)) == before
    assert "re-adopted rank 0 step 1" in node.log() and "re-adopted rank 0 step 2" in node.log()
    model2, opt2 = make_model(seed=99)
    g2 = node.guard(model2, opt2, {}, rng=False)
    assert g2.restore() == 2
    assert state_digest(model2, opt2) == digests[2]
    g2.close()

    # while the daemon is dead, step 2's bytes rot: the next daemon verifies, refuses it and says so
    path = node.slot_file(0, 2)
    man = path.removesuffix(".data") + ".manifest"
    slot = int(path.split(".s")[-1].split(".")[0])
    node.kill()
    assert os.path.exists(man)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad")
    node.start()
    assert node.held() == {0: [1]}
    assert f"not re-adopting rank 0 slot {slot}" in node.log() and not os.path.exists(man)
    model3, opt3 = make_model(seed=98)
    g3 = node.guard(model3, opt3, {}, rng=False)
    assert g3.restore() == 1
    assert state_digest(model3, opt3) == digests[1]
    g3.close()


def test_a_manifest_changed_in_shared_memory_is_refused_at_readoption_not_restored(node):
    """The chunk checksums cover a shard's bytes; its manifest says where its tensors are, and carries the
    non-tensor state. While the daemon is dead, one byte of step 2's manifest changes: the loop state's step
    reads 3. The next daemon must refuse the slot, as it refuses rotten bytes, and restore gives step 1 whole."""
    digests = sealed_steps_0_to_2(node)
    path = node.slot_file(0, 2).removesuffix(".data") + ".manifest"
    node.kill()
    with open(path, "rb") as f:
        raw = f.read()
    tree = msgpack.unpackb(raw, raw=False)["tree"]
    at = raw.index(tree) + tree.index(b"\xa4step\x02") + 5  # the loop state's step, a msgpack fixint
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x03")
    node.start()
    assert node.held() == {0: [1]}
    assert "does not match its digest" in node.log()
    model2, opt2 = make_model(seed=97)
    loop2: dict = {}
    g2 = node.guard(model2, opt2, loop2, rng=False)
    assert g2.restore() == 1
    assert loop2 == {"step": 1} and state_digest(model2, opt2) == digests[1]
    g2.close()


@pytest.mark.parametrize("how", ["Shutdown", "SIGTERM"])
def test_a_clean_shutdown_removes_its_files(daemon, how):
    """Its own files, and the lock files of trainers that died holding them; a running trainer keeps its own."""
    (dead, dead_token, _), (live, live_token, _) = hold_trainer_lock(daemon, 0), hold_trainer_lock(daemon, 1)
    try:
        for rank, (p, token) in enumerate(((dead, dead_token), (live, live_token))):
            assert isinstance(daemon.request(P.Hello(daemon.job, rank, 2, p.pid, token)), P.Welcome)
        seal_raw(daemon, 0, 2, 0)
        assert os.listdir(daemon.table_dir)
        dead.kill()
        dead.wait(10)
        if how == "Shutdown":
            assert isinstance(daemon.request(P.Shutdown(remove=True)), P.Ok)
        else:
            daemon.proc.terminate()
        assert daemon.proc.wait(15) == 0
        assert not os.path.exists(daemon.table_dir)
        assert not os.path.exists(daemon.ep.socket_path)
        assert not os.path.exists(daemon.ep.lock_path)
        assert os.listdir(daemon.shm_dir) == []
        assert sorted(os.listdir(daemon.run_dir)) == sorted([os.path.basename(daemon.ep.trainer_lock_path(live_token)),
                                                             os.path.basename(daemon.log_path)])
    finally:
        live.kill()
        live.wait(10)


def test_the_reply_to_shutdown_is_never_lost(node):
    """The daemon exits right after answering Shutdown; the client must still get the answer, every time.
    (With ZMQ_IMMEDIATE on the client's socket, about half of these replies were dropped with the connection.)"""
    for i in range(6):
        node.start()
        assert isinstance(node.request(P.Shutdown(remove=True), timeout_s=10.0), P.Ok), f"round {i}"
        assert node.proc.wait(15) == 0
        node.close()


def test_a_trainer_without_a_daemon_gets_an_error_naming_the_socket(node, caplog):
    """It waits its timeout (a launcher may start the daemon beside the trainers), says so while it waits, and
    then fails naming the socket, the time waited and what to do."""
    model, opt = make_model()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="snapguard.guard"), pytest.raises(DaemonError) as e:
        node.guard(model, opt, rng=False, timeout_s=2.0)
    assert 2.0 <= time.monotonic() - t0 < 10
    assert f"no snapguard daemon answers on {node.ep.socket_path} (waited 2 s)" in str(e.value)
    assert f"snapguard-daemon --job {node.job}" in str(e.value)
    waiting = [r.getMessage() for r in caplog.records if "yet: waiting up to 1 s more" in r.getMessage()]
    assert len(waiting) == 1 and node.ep.socket_path in waiting[0], caplog.text


def test_a_job_id_torchrun_draws_or_shares_is_warned_of_and_a_fresh_start_names_other_jobs_daemons(monkeypatch, caplog):
    """Under `torchrun --standalone` the job id is a new random one per launch: a relaunch would start afresh beside
    the daemon holding its snapshots. Rank 0 says so when it builds its Guard, and a fresh start names the daemons of
    other jobs that listen on its node (not a dead daemon's socket, not another node's daemon)."""
    run_dir, shm_dir = make_dirs("jobid")
    run_id = str(uuid.uuid4())
    this, other, dead, elsewhere = (Node(job, node, run_dir, shm_dir) for job, node in
                                    ((run_id, "n1"), (unique_id("other"), "n1"), (unique_id("dead"), "n1"),
                                     (unique_id("far"), "n2")))
    try:
        for n in (this, other, dead, elsewhere):
            n.start()
        dead.kill()
        assert os.path.exists(dead.ep.socket_path)  # left behind, refusing connections
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        model, opt = make_model()
        with caplog.at_level(logging.WARNING, logger="snapguard.guard"):
            g = Guard(model, opt, node="n1", run_dir=run_dir, rank=0, world_size=1, rng=False, timeout_s=10.0)
            assert g.endpoint.job == run_id
            assert g.restore() is None
            g.close()
        warned = [r.getMessage() for r in caplog.records]
        assert any(f"the job id is {run_id!r}, the random id torchrun --standalone draws" in w
                   and "SNAPGUARD_JOB" in w for w in warned), warned
        fresh = [w for w in warned if "starts afresh, while daemons of other jobs run on node n1" in w]
        assert len(fresh) == 1 and fresh[0].split(": ", 1)[1].startswith(f"{other.job}. "), fresh
        assert dead.job not in fresh[0] and elsewhere.job not in fresh[0]
    finally:
        for n in (this, other, dead, elsewhere):
            n.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)


def test_job_ids_torchrun_shares_or_draws_per_launch_have_a_caveat_and_given_ones_none(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert "'none', torchrun's default --rdzv-id" in job_id_caveat()
    assert job_id_caveat("pretrain-7b") is None  # given as an argument
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "f3b0c1de-5a1e-4c2b-9d7e-0123456789ab")
    assert "torchrun --standalone draws" in job_id_caveat()
    monkeypatch.setenv("SNAPGUARD_JOB", "pretrain-7b")
    assert job_id_caveat() is None
    monkeypatch.delenv("SNAPGUARD_JOB")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "slurm-81234")  # an --rdzv-id of the user's
    assert job_id_caveat() is None


def test_a_shutdown_that_keeps_memory_leaves_it_for_the_next_daemon(daemon):
    seal_raw(daemon, 0, 1, 0)
    before = files_of(daemon)
    assert isinstance(daemon.request(P.Shutdown(remove=False)), P.Ok)
    assert daemon.proc.wait(15) == 0
    assert files_of(daemon) == before
    daemon.start()
    assert daemon.held() == {0: [0]}


def test_a_daemon_that_dies_of_an_unexpected_error_leaves_its_sealed_slots_to_the_next(node):
    """Only a clean shutdown deletes the slots: a daemon that stops on a bug keeps them, and the next one re-adopts
    them. (Deleting them on the way out turned any crash into the loss of every snapshot of the node.)"""
    trigger = os.path.join(node.run_dir, "fail")
    node.proc = spawn_failing_daemon(node.ep, node.shm_dir, [], trigger, ["snapguard.daemon.server:Daemon._handle"],
                                     node.log_path)
    for step in (0, 1):
        seal_raw(node, 0, 1, step)
    before = files_of(node)
    open(trigger, "w").close()
    with pytest.raises(DaemonUnavailable):
        node.request(P.Ping(), timeout_s=5.0)
    assert node.proc.wait(30) != 0
    assert files_of(node) == before
    assert "stops on an unexpected error; its sealed slots stay" in node.log()
    node.close()
    os.unlink(trigger)
    node.start()
    assert node.held() == {0: [0, 1]}


def test_files_are_private(node):
    os.chmod(node.run_dir, 0o755)  # the daemon tightens a run dir that others could read
    node.start()
    model, opt = make_model()
    g = node.guard(model, opt, {"step": 0}, rng=False)
    train_and_snapshot(g, model, opt, {}, range(2))
    g.close()
    assert mode(node.run_dir) == 0o700
    assert stat.S_ISSOCK(os.stat(node.ep.socket_path).st_mode) and mode(node.ep.socket_path) == 0o600
    assert mode(node.table_dir) == 0o700
    names = os.listdir(node.table_dir)
    assert sorted(names) == ["r00000.s0.data", "r00000.s0.manifest", "r00000.s1.data", "r00000.s1.manifest"]
    for name in names:
        assert mode(os.path.join(node.table_dir, name)) == 0o600, name
    assert node.job in node.table_dir, "slot files carry the job's name"


def test_a_daemon_of_another_run_dir_leaves_the_slots_a_running_one_serves_alone(daemon):
    """Two daemons of one job and node with different --run-dir (their lock files and sockets apart) but one
    --shm-dir: the second must not adopt, hand out or remove the first one's slots."""
    seal_raw(daemon, 0, 1, 0)
    run_dir, shm_dir = make_dirs("o")
    try:
        proc = subprocess.run(daemon_command(Endpoint(daemon.job, daemon.node, run_dir), daemon.shm_dir),
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)
    assert proc.returncode == 3, proc.stderr
    assert f"another daemon already serves this job's slots in {daemon.table_dir}" in proc.stderr
    assert os.path.isdir(daemon.table_dir) and daemon.held() == {0: [0]}
    daemon.kill()
    daemon.start()
    assert daemon.held() == {0: [0]}, "the first daemon's slots are all there for the next one"


def test_a_script_that_ends_without_close_still_seals_its_last_snapshot(daemon):
    """The documented loop calls snapshot() and never close(): the copy thread is a daemon thread, so without a wait at
    exit the last step would be left half-written, and a restart would restore the one before."""
    script = textwrap.dedent(f"""
        import torch, snapguard
        m = torch.nn.Linear(1024, 1024)
        o = torch.optim.Adam(m.parameters())
        g = snapguard.Guard(m, o, job={daemon.job!r}, node={daemon.node!r}, run_dir={daemon.run_dir!r}, rank=0,
                            world_size=1, timeout_s=30)
        for step in range(3):
            m(torch.randn(8, 1024)).sum().backward()
            o.step()
            o.zero_grad()
            g.snapshot(step)
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGUARD_")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert daemon.held() == {0: [1, 2]}, daemon.request(P.Status())


def test_a_snapshot_of_a_step_not_newer_than_the_last_is_refused_at_once(daemon):
    """Not on the copy thread after the whole copy, to surface in the next optimizer.step() with advice about restarts."""
    model, opt = make_model()
    g = daemon.guard(model, opt, rng=False)
    g.snapshot(0)
    g.wait()
    with pytest.raises(ConfigError, match=r"snapshot\(0\) after snapshot or restore of step 0: each snapshot's step"
                                          " must be newer than the last"):
        g.snapshot(0)
    g.snapshot(1)
    g.close()
    g = daemon.guard(model, opt, rng=False)
    assert g.restore() == 1
    with pytest.raises(ConfigError, match=r"snapshot\(1\) after snapshot or restore of step 1"):
        g.snapshot(1)
    g.snapshot(2)
    g.wait()
    # A shard of another step than the one the ranks agreed on (a daemon's fault) is refused, not restored as it
    shard = daemon.request(P.Open(daemon.job, 0, 2))
    with pytest.raises(RestoreError, match="asked the daemon for step 3 of this rank, it handed out step 2 of rank 0"):
        g._manifest(shard, 3)
    assert g._manifest(shard, 2).step == 2
    g.close()


def test_numpy_arrays_restore_whatever_the_memory_order_of_the_live_ones(daemon):
    """A Fortran-ordered array is stored transposed. The restarted process's array of the same shape may have the
    other order: the restore compares logical shapes, and gives back each array as it was saved."""
    saved = {"f": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "c": np.arange(24, dtype=np.int32).reshape(2, 3, 4)}
    g = daemon.guard(None, None, extra=dict(saved), rng=False)
    g.snapshot(0)
    g.close()
    live = {"f": np.zeros((2, 3)), "c": np.asfortranarray(np.zeros((2, 3, 4), dtype=np.int32))}
    g = daemon.guard(None, None, extra=live, rng=False)
    assert g.restore() == 0
    for k, want in saved.items():
        assert np.array_equal(live[k], want) and live[k].dtype == want.dtype, k
        assert (live[k].flags.f_contiguous, live[k].flags.c_contiguous) == (want.flags.f_contiguous,
                                                                          want.flags.c_contiguous), k
    g.close()
    g = daemon.guard(None, None, extra={"f": np.zeros((3, 2)), "c": saved["c"]}, rng=False)
    with pytest.raises(LayoutError, match=r"'/extra/f': the snapshot has float64\[2, 3\], the model expects"
                                          r" float64\[3, 2\]"):
        g.restore()
    g.snapshot(1)  # refused before anything was written: the state is not mixed, and snapshots go on
    g.wait()
    g.close()


def test_a_restore_into_a_model_on_the_meta_device_says_to_materialize_it(daemon):
    model = torch.nn.Linear(4, 4)
    g = daemon.guard(model, None, rng=False)
    g.snapshot(0)
    g.close()
    with torch.device("meta"):
        empty = torch.nn.Linear(4, 4)
    g = daemon.guard(empty, None, rng=False)
    with pytest.raises(LayoutError, match="tensor '/model/weight' is on the meta device, which holds no memory to"
                                          r" restore into: materialize the model \(e.g. to_empty\(\)\) before"):
        g.restore()
    empty.to_empty(device="cpu")
    assert g.restore() == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), empty.state_dict().values()))
    g.close()


def test_a_rank_that_cannot_grow_its_slots_after_the_ranks_agreed_on_a_restore_still_restores(daemon, caplog):
    """The shard is larger than the slots a fresh optimizer's state needed when the Guard was built, so a restore
    grows them once every rank has agreed and loaded the step. A failure there (no room in /dev/shm on one node) must
    not make that rank raise while the others train on: it restores, warns, and the next snapshot tries again."""
    from snapguard.errors import ShmSpaceError

    model, opt = make_model()
    train_step(model, opt, 0)
    g = daemon.guard(model, opt, rng=False)
    g.snapshot(0)
    g.close()
    fresh_model, fresh_opt = make_model(seed=1)
    g = daemon.guard(fresh_model, fresh_opt, rng=False)
    tried = []

    def reserve_fails_once(nbytes=None):
        if not tried:
            tried.append(nbytes)
            raise ShmSpaceError("no room (as on a full /dev/shm)")
        return Guard._reserve(g, nbytes)

    g._reserve = reserve_fails_once
    with caplog.at_level(logging.WARNING, logger="snapguard"):
        assert g.restore() == 0
    assert tried, "the restore did not grow the slots: the test tests nothing"
    assert "restored step 0, but could not reserve snapshot slots" in caplog.text and "no room" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
    g.snapshot(1)
    g.wait()
    assert daemon.held() == {0: [0, 1]}
    g.close()


def test_a_slot_granted_smaller_than_the_shard_fails_the_snapshot_instead_of_writing_past_it(daemon, tmp_path):
    """The copy writes by address: a grant too small for the shard (a daemon's fault) must never be written past."""
    model, opt = make_model(width=4096)
    g = daemon.guard(model, opt, rng=False)
    small = tmp_path / "small.data"
    small.write_bytes(bytes(4096))
    g._begin = lambda step, nbytes: P.Granted(0, str(small), 4096)
    g.snapshot(0)
    with pytest.raises(SnapGuardError, match=r"snapshot of step 0 failed: .*the daemon granted a slot of 4096 bytes"
                                             r" \(4096 mapped\) for a shard of \d+"):
        g.wait()
    assert small.read_bytes() == bytes(4096)
    g.close()


def test_restore_after_close_is_refused(daemon):
    model, opt = make_model()
    g = daemon.guard(model, opt, rng=False)
    g.snapshot(0)
    g.close()
    with pytest.raises(SnapGuardError, match=r"restore\(\) after close\(\): build a new Guard"):
        g.restore()


def test_a_second_daemon_for_the_same_job_refuses_to_start(daemon):
    r = subprocess.run(daemon_command(daemon.ep, daemon.shm_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert f"another daemon (pid {daemon.proc.pid}) already serves {daemon.ep.socket_path}" in r.stderr
    assert isinstance(daemon.request(P.Ping()), P.Ok)


def test_status_cli_shows_ranks_steps_sizes_and_ages(daemon):
    for step in (0, 1):
        seal_raw(daemon, 0, 2, step)
    seal_raw(daemon, 1, 2, 0)
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", daemon.run_dir, "--job", daemon.job],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"daemon {daemon.job}/{daemon.node}" in out and "newest step held by all ranks: 0" in out
    own = re.search(r"daemon memory outside shm ([\d.]+) MiB", out)  # the interpreter's heap, at least
    assert own and float(own.group(1)) > 1, out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[:4] for row in rows] == [["0", "0", "sealed", "0"], ["0", "1", "sealed", "1"],
                                         ["1", "0", "sealed", "0"], ["1", "1", "free", "-"]]
    assert all(row[4:6] == ["8.0", "KiB"] and row[7:] == ["s", "2"] for row in rows[:3]) and rows[3][-1] == "-"

    # the same for monitoring, as JSON
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", daemon.run_dir, "--job", daemon.job,
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    [report] = json.loads(r.stdout)
    assert (report["job"], report["node"], report["common"]) == (daemon.job, daemon.node, 0)
    assert report["pid"] == daemon.proc.pid and report["memory_bytes"] > 1 << 20
    slots = [(x["rank"], s["slot"], s["state"], s["step"], s["nbytes"], s["world_size"])
             for x in report["ranks"] for s in x["slots"]]
    assert slots == [(0, 0, "sealed", 0, 8192, 2), (0, 1, "sealed", 1, 8192, 2), (1, 0, "sealed", 0, 8192, 2),
                     (1, 1, "free", -1, 0, 0)]
    ages = [s["age_s"] for x in report["ranks"] for s in x["slots"]]
    assert all(0 <= a < 60 for a in ages[:3]) and ages[3] == -1


def test_status_cli_says_at_once_that_a_killed_daemon_left_its_socket_and_how_to_get_its_snapshots_back(node):
    node.start()
    seal_raw(node, 0, 1, 0)
    node.kill()  # SIGKILL: the socket file and the slots stay
    assert os.path.exists(node.ep.socket_path)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", node.run_dir, "--job", node.job,
                        "--timeout", "60"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30, "status waited out its timeout for a daemon that is gone"
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert (f"{node.ep.socket_path}: no daemon listens on it: the daemon of job {node.job} on node {node.node} that"
            " left it was killed or crashed") in r.stderr, r.stderr
    assert f"`snapguard-daemon --job {node.job} --node {node.node}`" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", node.run_dir, "--job", node.job,
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout) == [], r.stdout  # a monitor still gets a list to parse
    empty = os.path.join(node.run_dir, "empty")
    os.mkdir(empty, 0o700)
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", empty, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout) == [], r.stdout
    assert f"no snapguard daemon sockets in {empty}" in r.stderr, r.stderr
    node.start()  # as the message says: the next daemon re-adopts the sealed step
    assert node.held() == {0: [0]}
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", node.run_dir, "--job", node.job],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"daemon {node.job}/{node.node}" in r.stdout, r.stderr


def test_jobs_and_nodes_whose_ids_run_together_get_daemons_of_their_own(node):
    """Job 'J.x' on node 'c' and job 'J' on node 'x.c' name different daemons: both run, each with its own
    socket, lock and slots, and `snapguard status --job J` shows only job J's."""
    a = Node(f"{node.job}.x", "c", node.run_dir, node.shm_dir)
    b = Node(node.job, "x.c", node.run_dir, node.shm_dir)
    try:
        a.start()
        b.start()
        assert a.ep.socket_path != b.ep.socket_path and a.table_dir != b.table_dir
        seal_raw(b, 0, 1, 0)
        assert a.request(P.Status()).job == a.job and b.request(P.Status()).job == b.job
        assert a.held() == {} and b.held() == {0: [0]}
        r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--run-dir", node.run_dir, "--job", b.job],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"daemon {b.job}/{b.node}" in r.stdout and f"daemon {a.job}/" not in r.stdout
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(("extra", "message"), [
    pytest.param(["--peer", "n1=tcp://127.0.0.1:7311", "--ec-group", "n0,n1"],
                 "--peer, --ec-group make(s) this daemon a member of an EC group, which needs --peer-bind",
                 id="peers-without-peer-bind"),
    pytest.param(["--ec-m", "2"], "--ec-m make(s) this daemon a member of an EC group", id="ec-m-alone"),
    pytest.param(["--peer-bind", "tcp://127.0.0.1:7312", "--peer", "n1=notanaddress"],
                 "peer address 'notanaddress' is not tcp://HOST:PORT", id="bad-peer-address"),
    pytest.param(["--peer-bind", "tcp://127.0.0.1:7312", "--peer", "n1=tcp://127.0.0.1:7313", "--ec-group", "n5,n1"],
                 "--ec-group n5,n1 does not include this node (n0)", id="group-without-this-node"),
    pytest.param(["--peer-bind", "tcp://127.0.0.1:7312", "--peer", "n1=tcp://127.0.0.1:7313", "--ec-group", "n0,n2"],
                 "--ec-group members ['n2'] have no --peer", id="group-member-without-address"),
    pytest.param(["--peer-bind", "tcp://127.0.0.1:7312", "--peer", "n1=tcp://127.0.0.1:7313", "--ec-m", "5"],
                 "parity chunks m must be an int in 1..g-1", id="m-too-large"),
    pytest.param(["--shm-limit", "infG"], "'infG' is not a size", id="shm-limit-inf"),
    pytest.param(["--shm-limit", "-3"], "'-3' is not a size", id="shm-limit-negative"),
    pytest.param(["--persist-dir", "/proc/snapguard"], "cannot use the --persist-dir directory /proc/snapguard: [Errno 2]",
                 id="persist-dir-unusable"),
    pytest.param(["--persist-dir", "/proc/snapguard/deeper"], "cannot use the --persist-dir directory"
                 " /proc/snapguard/deeper: [Errno 2] No such file or directory: '/proc/snapguard'", id="persist-dir-parent"),
    pytest.param(["--shm-dir", "/proc/snapguard"], "cannot use the --shm-dir directory /proc/snapguard: [Errno 2]",
                 id="shm-dir-unusable"),
])
def test_a_daemon_given_flags_it_cannot_honour_stops_before_creating_anything(node, extra, message):
    """Peer flags without --peer-bind used to start a daemon that ran alone, no erasure coding, without a word."""
    r = subprocess.run(daemon_command(node.ep, node.shm_dir, extra), capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SNAPGUARD_SECRET=secrets.token_hex(16)))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "not in memory" not in r.stderr  # of a directory it could not create, the file system is not known
    assert os.listdir(node.run_dir) == [] and os.listdir(node.shm_dir) == []


def test_a_daemon_whose_start_fails_leaves_no_socket_lock_or_slot_directory(node):
    with socket.socket() as busy:  # --peer-bind on a port something else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(daemon_command(node.ep, node.shm_dir, ["--peer-bind", f"tcp://127.0.0.1:{port}", "--peer",
                                                                 "n1=tcp://127.0.0.1:1"]),
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, SNAPGUARD_SECRET=secrets.token_hex(16)))
    assert r.returncode == 2 and "Address already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert os.listdir(node.run_dir) == [] and os.listdir(node.shm_dir) == []
    node.start()  # nothing left behind stands in the way of the next daemon
    assert isinstance(node.request(P.Ping()), P.Ok)


def test_socket_paths_too_long_for_unix_sockets_bad_timeouts_and_chunk_sizes_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"Unix sockets allow 107: use a shorter run dir"):
        Endpoint("j" * 60, "n" * 60, "/tmp/x").socket_path
    for bad in ("abc", "inf", "nan", "-1", "0"):
        monkeypatch.setenv("SNAPGUARD_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match=r"\$SNAPGUARD_TIMEOUT_S must be a number of seconds"):
            default_timeout()
    monkeypatch.setenv("SNAPGUARD_TIMEOUT_S", "2.5")
    assert default_timeout() == 2.5 and default_timeout(7) == 7.0
    for bad in (-1, 0, float("nan")):  # before it looks for a daemon (there is none)
        with pytest.raises(ConfigError, match=r"gate_timeout_s must be a number of seconds, more than 0 and finite"):
            Guard(states={"s": {"x": torch.zeros(2)}}, rng=False, run_dir="/tmp/no-such-dir", gate_timeout_s=bad)
    for bad in (1000, 0, True, 64.0):  # every seal would be refused, or every copy fail, after the whole copy
        with pytest.raises(ConfigError, match=r"chunk_size must be a positive multiple of 64 bytes"):
            Guard(states={"s": {"x": torch.zeros(2)}}, rng=False, run_dir="/tmp/no-such-dir", chunk_size=bad)
    r = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--timeout", "nan"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--timeout must be a number of seconds, more than 0 and finite, got nan" in r.stderr, \
        r.stderr


# ---- memory: pre-faulted slots, in-place restore -------------------------------------------------

def _slot_mappings(table_dir: str) -> dict[str, tuple[int, int]]:
    """This process's mappings of the slot files in `table_dir`: path -> (size, resident bytes), from
    /proc/self/smaps. (Other tests' slots may still be mapped here until the garbage collector frees the
    tracebacks that hold their buffers.)"""
    out, path = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: address range, perms, offset, dev, inode[, path]
                name = fields[5] if len(fields) >= 6 else ""
                path = name if name.endswith(".data") and os.path.dirname(name) == table_dir else None
            elif path is not None and fields[0] in ("Size:", "Rss:"):
                size, rss = out.get(path, (0, 0))
                kib = int(fields[1]) * 1024
                out[path] = (kib, rss) if fields[0] == "Size:" else (size, kib)
    return out


def test_a_guard_faults_in_both_slots_before_training_and_regrows_them_together(daemon):
    # Fresh shared memory costs a page fault per page on first touch: a Guard pays that when it is built,
    # and when the state grows (Adam creates its moments on the first step) both slots regrow at once,
    # so no later snapshot touches a page for the first time.
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = daemon.guard(model, opt, rng=False)
    params_only = sum(p.numel() * 4 for p in model.parameters())
    maps = _slot_mappings(daemon.table_dir)
    assert len(maps) == 2, maps
    assert all(size >= params_only and rss == size for size, rss in maps.values()), maps

    train_step_big = lambda: (opt.zero_grad(), model(torch.randn(8, 512)).sum().backward(), opt.step())
    train_step_big()
    g.snapshot(0)  # three times the bytes now: the slots grow
    g.wait()
    grown = _slot_mappings(daemon.table_dir)
    assert len(grown) == 2 and all(size >= 3 * params_only and rss == size for size, rss in grown.values()), grown

    train_step_big()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g.snapshot(1)  # into the other, already faulted-in slot
    g.wait()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < params_only * 3 // 4096 // 10, f"{faults} page faults copying into a pre-faulted slot"
    g.close()


def test_restore_loads_in_place_and_leaves_nothing_pointing_into_shared_memory(daemon):
    model, opt = make_model()
    loop = {"step": -1}
    g = daemon.guard(model, opt, loop, rng=False)
    digests = train_and_snapshot(g, model, opt, loop, range(3))
    g.close()

    model2, opt2 = make_model(seed=7)
    weight = model2[0].weight
    ptr = weight.data_ptr()
    g2 = daemon.guard(model2, opt2, {}, rng=False)
    assert g2.restore() == 2
    assert state_digest(model2, opt2) == digests[2]
    assert model2[0].weight is weight and weight.data_ptr() == ptr  # parameters were overwritten in place
    # The optimizer's moments did not exist before the restore: they must be its own memory, not views of
    # the slot, which the daemon reuses for later snapshots.
    g2.close()
    for path in glob.glob(os.path.join(daemon.table_dir, "r*.data")):
        with open(path, "r+b") as f:
            f.write(b"\xff" * os.path.getsize(path))
    assert state_digest(model2, opt2) == digests[2]


def test_a_rank_of_a_multi_node_job_whose_daemon_has_no_peers_gets_an_error_that_says_why(daemon, caplog):
    """Rank 0 of a two-rank job whose rank 1 lives on another node: a daemon without peers never hears of
    rank 1's seals, so after two snapshots rank 0 cannot reuse a slot. The rank says so once it has waited a
    while (half the gate timeout, here), and the wait ends in an error naming the cause, within the gate
    timeout, not a silent hang."""
    model, opt = make_model()
    g = daemon.guard(model, opt, rng=False, world_size=2, gate_timeout_s=2.0)
    try:
        with caplog.at_level(logging.WARNING, logger="snapguard.guard"), \
                pytest.raises(SnapGuardError, match="waited 2 s for every rank to seal step 1 .*hears of other nodes'"
                                                    " ranks only from its peers"):
            train_and_snapshot(g, model, opt, {"step": -1}, range(4))
        waiting = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
        assert len(waiting) == 1, caplog.text
        assert "step 2: has waited 1 s for every rank to seal step 1" in waiting[0]
        assert "gives up after 2 s" in waiting[0] and "only from its peers" in waiting[0]
        assert "never hears of: a job spanning several nodes needs its daemons to be peers" in daemon.log()
    finally:
        with contextlib.suppress(SnapGuardError):
            g.close()


# ---- the job's world size ------------------------------------------------------------------------

def test_a_job_restarts_with_another_world_size_once_its_old_trainers_are_gone(daemon):
    """While a trainer of the two-rank job runs, a request that says the job has one rank is refused (rank 1 would
    drop out of the common step, and rank 0 could overwrite a step rank 1 still needs). An elastic restart with one
    rank, after the old trainers have exited, is served (Hello, train on), but the two-rank job's snapshot is not
    offered to it, and Open refuses it before forgetting anything. Once the one-rank job holds a step, the old
    job's slots are freed, and rank 1's files removed."""
    old = [hold_trainer_lock(daemon, rank)[:2] for rank in range(2)]
    try:
        for rank, (p, token) in enumerate(old):
            assert isinstance(daemon.request(P.Hello(daemon.job, rank, 2, p.pid, token)), P.Welcome)
        for step in (0, 1):
            for rank in (0, 1):
                seal_raw(daemon, rank, 2, step)
        life = TrainerLock(daemon.ep, 0, 1)
        with pytest.raises(DaemonError, match=r"rank 0 says world_size 1, but rank 1 of this job \(pid \d+, still"
                                              r" running\) said 2"):
            daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token))
        with pytest.raises(DaemonError, match="rank 0 says world_size 1, but rank 0 of this job"):
            daemon.request(P.Begin(daemon.job, 0, 1, 2, 8192))
        assert daemon.status().common == 1 and daemon.held() == {0: [0, 1], 1: [0, 1]}
    finally:
        for p, _ in old:
            p.kill()
            p.wait(10)
    assert isinstance(daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token)), P.Welcome)
    assert [daemon.ep.trainer_lock_path(t) for _, t in old if os.path.exists(daemon.ep.trainer_lock_path(t))] == [], \
        "the daemon removes the lock files of trainers that died holding them"
    inv = daemon.request(P.Inventory(daemon.job, 0))
    assert inv.steps == [] and inv.old_world == [2, 1]
    with pytest.raises(DaemonError, match="step 1 was taken by a job of 2 ranks, this job has 1"):
        daemon.request(P.Open(daemon.job, 0, 1, epoch=5))
    with pytest.raises(DaemonError, match="step 0 was taken by a job of 2 ranks"):
        daemon.request(P.Open(daemon.job, 0, 0, epoch=5))
    assert daemon.held() == {0: [0, 1], 1: [0, 1]}, "a refused Open forgets no step"
    seal_raw(daemon, 0, 1, 2)
    assert daemon.status().common == 2
    assert daemon.held() == {0: [2]}, "the two-rank job's slots are freed once the one-rank job holds a step"
    assert sorted(os.listdir(daemon.table_dir)) == ["r00000.s0.data", "r00000.s0.manifest", "r00000.s1.data"]
    life.release()


def test_a_job_restarted_with_another_world_size_is_told_so_and_trains_on_from_its_own_checkpoint(daemon):
    """A one-rank job restarts where a two-rank job of the same id left snapshots. `restore()` raises
    `WorldSizeChanged`, naming the old job's size and step, and restores nothing. The job loads its own
    checkpoint (here: a model trained to step 2 beside the snapshots), snapshots from step 3 on, at steps the old
    job had sealed too, and its next restart restores its own newest step bit-exactly."""
    for step in (3, 4):  # the two-rank job's trainers are gone
        for rank in (0, 1):
            seal_raw(daemon, rank, 2, step)
    model, opt = make_model()
    loop = {"step": -1}
    for step in range(3):  # what the job's checkpoint on disk holds
        train_step(model, opt, step)
    loop["step"] = 2
    g = daemon.guard(model, opt, loop, rng=False)
    try:
        with pytest.raises(WorldSizeChanged, match=r"snapshots of a job of 2 ranks \(up to step 4, rank 0's node\),"
                                                   r" this job has 1.* restart with 2 ranks") as e:
            g.restore()
        assert (e.value.world_size, e.value.step) == (2, 4)
        assert daemon.held() == {0: [3, 4], 1: [3, 4]}, "nothing of the old job is forgotten by a refused restore"
        digests = train_and_snapshot(g, model, opt, loop, range(3, 6))
        assert daemon.held() == {0: [4, 5]}, "the old job's slots go once the new one holds a step"
    finally:
        g.close()
    model, opt = make_model(seed=1)
    loop = {"step": -1}
    g = daemon.guard(model, opt, loop, rng=False)
    try:
        assert g.restore() == 5 and loop["step"] == 5
        assert state_digest(model, opt) == digests[5]
    finally:
        g.close()



def test_a_rank_of_a_new_world_gets_the_room_of_old_ranks_its_node_no_longer_serves(node):
    """The daemon's memory holds one job's slots. The job restarts with 3 ranks, and this node now serves rank 2:
    ranks 0 and 1, which it served before, moved to other nodes. The old slots are freed once every rank of the new
    job holds a step, but rank 2 needs their room before that: it gets it, and the old ranks' files go, saying so."""
    node.start(["--shm-limit", "64K"])
    for step in (0, 1):
        for rank in (0, 1):
            seal_raw(node, rank, 2, step, nbytes=16 << 10)  # 4 slots of 16 KiB: the limit
    for step in (0, 1):
        seal_raw(node, 2, 3, step, nbytes=16 << 10)
    assert node.held() == {2: [0, 1]}
    assert sorted(os.listdir(node.table_dir)) == [f"r00002.s{i}.{ext}" for i in (0, 1) for ext in ("data", "manifest")]
    assert "rank 2 of the job of 3 ranks needs room: removing the slots of rank 0, which hold steps [0, 1]" in node.log()


HOLDER = """
import os, sys, time
from snapguard.config import Endpoint
from snapguard.procs import TrainerLock
life = TrainerLock(Endpoint(*sys.argv[1:4]), int(sys.argv[5]), int(sys.argv[6]))
forked, ready = os.pipe()
child = os.fork() if sys.argv[4] == "fork" else 0
if sys.argv[4] == "fork" and child == 0:
    os.write(ready, b"1")  # os.fork returns in the child after its at-fork hooks: its copy of the lock is closed
    time.sleep(120)
    os._exit(0)
if child:
    os.read(forked, 1)  # a parent killed before its child ran its hooks would leave the lock with the child a while
print(life.token, child, flush=True)
time.sleep(120)
"""


def hold_trainer_lock(node: Node, rank: int, world: int = 2, fork: bool = False) -> tuple[subprocess.Popen, str, int]:
    """A process that holds the lock file of a trainer of `rank` of `world`, as a running trainer does; its token;
    and with `fork`, the pid of a child it forked after taking the lock (as a DataLoader's workers are)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, node.job, node.node, node.run_dir, "fork" if fork else "-",
                          str(rank), str(world)], stdout=subprocess.PIPE, text=True)
    token, child = p.stdout.readline().split()
    return p, token, int(child)


def test_a_trainer_is_gone_once_it_dies_though_a_child_it_forked_lives_on(daemon):
    """A forked child shares the trainer's locked file; the lock must still go with the trainer."""
    p, token, child = hold_trainer_lock(daemon, 1, fork=True)
    life = TrainerLock(daemon.ep, 0, 1)
    try:
        assert isinstance(daemon.request(P.Hello(daemon.job, 1, 2, p.pid, token)), P.Welcome)
        with pytest.raises(DaemonError, match=r"rank 0 says world_size 1, but rank 1 of this job \(pid \d+, still"):
            daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token))
        p.kill()
        p.wait(10)
        assert psutil.pid_exists(child)
        assert isinstance(daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token)), P.Welcome)
    finally:
        p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        life.release()


def test_a_restarted_daemon_knows_the_trainers_that_run_and_removes_the_files_of_those_that_died(daemon):
    """The daemon that heard their Hellos is gone, and no trainer of their ranks has said Hello since. The one that
    still runs keeps the job's world size guarded: its lock file says its rank and world size."""
    (dead, dead_token, _), (live, live_token, _) = hold_trainer_lock(daemon, 0), hold_trainer_lock(daemon, 1)
    try:
        for rank, (p, token) in enumerate(((dead, dead_token), (live, live_token))):
            assert isinstance(daemon.request(P.Hello(daemon.job, rank, 2, p.pid, token)), P.Welcome)
        daemon.kill()
        dead.kill()
        dead.wait(10)
        assert sorted(daemon.ep.trainer_locks()) == sorted([dead_token, live_token])
        daemon.start()
        assert list(daemon.ep.trainer_locks().values()) == [daemon.ep.trainer_lock_path(live_token)]
        life = TrainerLock(daemon.ep, 0, 1)
        with pytest.raises(DaemonError, match=rf"rank 0 says world_size 1, but rank 1 of this job \(pid {live.pid}, still"):
            daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token))
    finally:
        live.kill()
        live.wait(10)
    assert isinstance(daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token)), P.Welcome)
    life.release()


def _pid_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _pid_namespaces(), reason="this machine gives an unprivileged user no PID namespace")
def test_the_daemon_tells_whether_trainers_in_another_pid_namespace_run(daemon):
    """Trainers in a container of their own, beside a daemon in another (a sidecar): their pids mean nothing to it.
    Each trainer here is a real Guard in a PID namespace of its own, where it is pid 1, and pid 1 also runs in the
    daemon's. While they run, a restart with another world size is refused; once they are SIGKILLed, it is served."""
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from snapguard.guard import Guard
        g = Guard(model=torch.nn.Linear(8, 8), job={daemon.job!r}, node={daemon.node!r}, run_dir={daemon.run_dir!r},
                  rank=int(sys.argv[1]), world_size=2)
        g.snapshot(0)
        g.wait()
        print(os.getpid(), flush=True)
        time.sleep(120)
        """)
    cmd = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script]
    err = tempfile.TemporaryFile("w+")
    trainers = [subprocess.Popen([*cmd, str(r)], stdout=subprocess.PIPE, stderr=err, text=True) for r in range(2)]
    try:
        pids = [p.stdout.readline().strip() for p in trainers]
        err.seek(0)
        assert pids == ["1", "1"], err.read()
        assert daemon.held() == {0: [0], 1: [0]}
        life = TrainerLock(daemon.ep, 0, 1)
        with pytest.raises(DaemonError, match=r"rank 0 says world_size 1, but rank 1 of this job \(pid 1, still running"):
            daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token))
    finally:
        for p in trainers:
            with contextlib.suppress(psutil.NoSuchProcess):  # the trainer, unshare's child, unless it exited
                children = psutil.Process(p.pid).children(recursive=True)
                for child in children:
                    child.kill()
                psutil.wait_procs(children, timeout=10)
            p.kill()
            p.wait(10)
        err.close()
    assert isinstance(daemon.request(P.Hello(daemon.job, 0, 1, os.getpid(), life.token)), P.Welcome)
    life.release()


def test_a_second_process_for_a_rank_whose_trainer_runs_is_refused_and_its_steps_stay(daemon):
    """Two processes writing one rank's slots (two jobs under one job id) would overwrite each other's snapshots: the
    second one's Hello (what a Guard says first) is refused, naming the trainer that runs; once that one is gone, a new
    process takes the rank."""
    script = textwrap.dedent(f"""
        import os
        from snapguard import protocol as P
        from snapguard.client import DaemonClient
        from snapguard.config import Endpoint
        from snapguard.procs import TrainerLock
        ep = Endpoint({daemon.job!r}, {daemon.node!r}, {daemon.run_dir!r})
        lock, c = TrainerLock(ep, 0, 1), DaemonClient(ep.address, timeout_s=10)
        try:
            print(type(c.request(P.Hello(ep.job, 0, 1, os.getpid(), lock.token))).__name__, flush=True)
        finally:
            c.close()
            lock.release()
        """)
    model, opt = make_model()
    g = daemon.guard(model, opt, rng=False)
    g.snapshot(0)
    g.wait()
    again = daemon.guard(model, opt, rng=False)  # a Guard built again in the same process replaces the first
    again.snapshot(1)
    again.wait()
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0
    assert f"rank 0 of job {daemon.job} is taken by a trainer that still runs (pid {os.getpid()})" in other.stderr, \
        other.stderr[-3000:]
    assert daemon.held() == {0: [0, 1]}
    g.close()
    again.close()
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0 and "Welcome" in other.stdout, other.stderr[-3000:]


def test_a_rank_of_the_largest_world_waits_without_the_daemon_listing_every_rank(daemon):
    """A Wait reply costs the same in a world of 2**24 ranks (the most a message may name) as in one of two."""
    world = 1 << 24
    for step in (0, 1):
        seal_raw(daemon, 0, world, step)
    t0 = time.monotonic()
    for _ in range(3):
        assert isinstance(daemon.request(P.Begin(daemon.job, 0, world, 2, 8192)), P.Wait)
    assert time.monotonic() - t0 < 2.0
    assert "waits for ranks [1, 2, 3, 4, 5, 6, 7, 8]... to seal step" in daemon.log()


# ---- the files around the daemon: planted symlinks, a lock file unlinked under a starter, refused memory ------

@pytest.mark.parametrize("where", ["shm", "run"])
def test_a_symlink_planted_at_a_daemon_directory_stops_it_and_touches_nothing(node, where):
    """/dev/shm and /tmp are everyone's: another user may plant the name of a daemon's directory as a symlink to
    a directory of ours. The daemon must refuse it, never chmod the target or delete files in it."""
    victim = tempfile.mkdtemp(prefix="sg-victim-", dir="/tmp")
    try:
        os.chmod(victim, 0o755)
        for name in ("precious.txt", "r00000.s0.data.new"):
            with open(os.path.join(victim, name), "w") as f:
                f.write("keep me")
        ep = node.ep
        if where == "shm":
            os.symlink(victim, node.table_dir)
        else:
            ep = Endpoint(node.job, node.node, os.path.join(node.run_dir, "planted"))
            os.symlink(victim, ep.run_dir)
        r = subprocess.run(daemon_command(ep, node.shm_dir), capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "is a symlink or not a directory" in r.stderr, r.stderr
        assert mode(victim) == 0o755 and sorted(os.listdir(victim)) == ["precious.txt", "r00000.s0.data.new"]
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_a_begin_refused_for_lack_of_memory_changes_nothing(node):
    """A rank's state can grow after its first snapshots (an optimizer creates its state lazily): a Begin that
    asks for more memory than there is gets an error, and every sealed step stays as it was."""
    node.start(["--shm-limit", "1M"])
    for step in (0, 1):
        seal_raw(node, 0, 1, step)
    before = (observable(node), files_of(node))
    with pytest.raises(DaemonError, match=r"refused Begin: \[ShmSpaceError\] rank 0: 1 snapshot slot\(s\) of 2.0 MiB"):
        node.request(P.Begin(node.job, 0, 1, 2, 2 << 20))
    assert node.request(P.Inventory(node.job, 0)) == P.Steps([0, 1], [])
    assert (observable(node), files_of(node)) == before


def test_a_starter_that_locked_an_unlinked_lock_file_locks_the_new_one(node, monkeypatch):
    """A daemon unlinks its lock file as it exits. A starter that opened the file just before gets the lock on
    it once it is free, while the next starter creates and locks a new file: unless the first one checks that
    its file is still the one at the path, two daemons serve one job and node."""
    import fcntl

    from snapguard.daemon.server import Daemon, DaemonConfig

    node.start()
    real_flock, raced = fcntl.flock, []

    def flock_once_the_old_daemon_is_gone(fd, op):
        if not raced:  # between this starter's open and its flock, the daemon holding the lock exits
            raced.append(fd)
            assert isinstance(node.request(P.Shutdown(remove=True)), P.Ok)
            assert node.proc.wait(15) == 0
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_once_the_old_daemon_is_gone)
    d = Daemon(DaemonConfig(node.job, node.node, node.run_dir, node.shm_dir))
    try:
        d.start()
        monkeypatch.undo()
        assert raced and os.path.exists(node.ep.lock_path)
        assert os.path.samestat(os.fstat(d._lock.fd), os.stat(node.ep.lock_path))
        r = subprocess.run(daemon_command(node.ep, node.shm_dir), capture_output=True, text=True, timeout=30)
        assert r.returncode == 3 and f"another daemon (pid {os.getpid()}) already serves" in r.stderr, r.stderr
    finally:
        d.close()
    assert not os.path.exists(node.ep.lock_path) and not os.path.exists(node.table_dir)


def test_spawn_daemon_reports_a_daemon_that_exits_at_once_with_its_exit_code_and_log(node):
    t0 = time.monotonic()
    with pytest.raises(SnapGuardError) as e:
        node.start(["--hash-threads", "0"], wait_s=60)
    assert time.monotonic() - t0 < 30, "spawn_daemon waited out wait_s although the daemon had exited"
    msg = str(e.value)
    assert f"daemon {node.job}/n0 (pid " in msg and "exited with code 2 before it answered" in msg, msg
    assert node.log_path in msg and "--hash-threads must be at least 1, got 0" in msg, msg


def test_a_guard_that_starts_its_daemon_reports_one_that_exits_at_once_and_waits_for_one_a_neighbour_started(node):
    """start_daemon=True: a daemon that exits (bad daemon_args) is an error at once, with its exit code and log, not
    a wait of the Guard's whole timeout. One that exits because a rank beside this one started the node's daemon
    first is no error: the Guard uses that daemon."""
    model, opt = make_model()
    t0 = time.monotonic()
    with pytest.raises(SnapGuardError) as e:
        node.guard(model, opt, rng=False, start_daemon=True, shm_dir=node.shm_dir, timeout_s=60,
                   daemon_args=("--hash-threads", "0"))
    assert time.monotonic() - t0 < 30, "the Guard waited out its timeout although its daemon had exited"
    assert "exited with code 2 before it answered" in str(e.value) and "--hash-threads must be at least 1, got 0" \
        in str(e.value), e.value
    from snapguard.daemon.server import NodeLock
    from snapguard.procs import spawn_daemon

    # The neighbour's daemon holds the node's lock but does not answer yet: the one started here leaves (exit 3).
    lock = NodeLock(node.ep)
    try:
        with pytest.raises(SnapGuardError, match="exited with code 3 before it answered"):  # a launcher's own daemon
            spawn_daemon(node.ep, node.shm_dir, wait_s=30)
        with pytest.raises(DaemonUnavailable, match=f"left because another daemon of job {node.job} on node"
                           f" {node.node} runs, and that one did not answer on .* within 2 s"):
            spawn_daemon(node.ep, node.shm_dir, wait_s=2, owned=False)
        started = []

        def neighbour_answers_once_ours_left():
            with open(node.log_path) as f:
                if f.read().count("already serves") < 3:
                    return None
            lock.release()
            started.append(node.start())
            return True

        neighbour = threading.Thread(target=lambda: wait_until(neighbour_answers_once_ours_left, 60,
                                                               "the third daemon to leave"))
        neighbour.start()
        late = spawn_daemon(node.ep, node.shm_dir, wait_s=90, owned=False)  # waits for the neighbour's daemon
        neighbour.join(60)
        assert started and late.wait(30) == 3 and node.proc.poll() is None
    finally:
        lock.release()
    g = node.guard(model, opt, rng=False, start_daemon=True, shm_dir=node.shm_dir)
    g.snapshot(0)
    g.wait()
    assert node.held() == {0: [0]}
    g.close()


@pytest.mark.parametrize(("flag", "value", "got"), [("--peer-timeout", "0", "0.0"), ("--peer-timeout", "-1", "-1.0"),
                                                    ("--rendezvous-timeout", "inf", "inf"),
                                                    ("--rendezvous-timeout", "nan", "nan")])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_stops_the_daemon_at_once(node, flag, value, got):
    r = subprocess.run(daemon_command(node.ep, node.shm_dir) + [flag, value], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and f"{flag} must be a number of seconds, more than 0 and finite, got {got}" in r.stderr, \
        r.stderr
    assert not os.path.exists(node.ep.socket_path) and not os.path.exists(node.table_dir)


def test_a_negative_parity_budget_stops_the_daemon_at_once(node):
    r = subprocess.run(daemon_command(node.ep, node.shm_dir) + ["--ec-keep-mib", "-1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--ec-keep-mib must be 0 or more, got -1" in r.stderr, r.stderr
    assert not os.path.exists(node.ep.socket_path) and not os.path.exists(node.table_dir)


def test_a_launcher_interrupted_while_its_daemon_starts_leaves_no_daemon_behind(node):
    """Ctrl-C in a launcher (the demo, the chaos harness) while spawn_daemon waits for its daemon to answer: the
    daemon runs in a session of its own and the launcher never got its handle, so spawn_daemon must kill it."""
    from snapguard.procs import free_port

    script = textwrap.dedent(f"""
        from snapguard.config import Endpoint
        from snapguard.procs import spawn_daemon
        spawn_daemon(Endpoint({node.job!r}, {node.node!r}, {node.run_dir!r}), {node.shm_dir!r},
                     ["--peer-bind", "tcp://127.0.0.1:{free_port()}", "--rendezvous", "127.0.0.1:{free_port()}",
                      "--rendezvous-host", "--nodes", "2", "--rendezvous-timeout", "120"], wait_s=120)
        """)

    def daemons() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "snapguard.daemon" in cmd and node.job in cmd:
                found.append(p)
        return found

    env = dict(os.environ, SNAPGUARD_SECRET="0123456789abcdef0123456789abcdef")
    launcher = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(daemons, 60, "the launcher's daemon to start")
        time.sleep(0.5)
        launcher.send_signal(signal.SIGINT)
        assert "KeyboardInterrupt" in launcher.communicate(timeout=60)[1]
        wait_until(lambda: not daemons(), 15, "the daemon to be gone")
    finally:
        launcher.kill()
        for p in daemons():
            p.kill()


def test_spawn_daemon_kills_a_daemon_that_does_not_answer_in_time(node, monkeypatch):
    """A daemon waiting in a rendezvous that never completes neither answers nor exits: spawn_daemon must not
    leave it running in its own session with no handle for the caller."""
    import re

    from snapguard.procs import free_port

    monkeypatch.setenv("SNAPGUARD_SECRET", "0123456789abcdef0123456789abcdef")
    with pytest.raises(DaemonUnavailable) as e:
        node.start(["--peer-bind", f"tcp://127.0.0.1:{free_port()}", "--rendezvous", f"127.0.0.1:{free_port()}",
                    "--rendezvous-host", "--nodes", "2", "--rendezvous-timeout", "120"], wait_s=3)
    msg = str(e.value)
    assert "did not answer on" in msg and "within 3 s and was killed" in msg and node.log_path in msg, msg
    pid = int(re.search(r"\(pid (\d+)\)", msg).group(1))
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
