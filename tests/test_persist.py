"""Background persistence to disk (`snapguard-daemon --persist-dir`) and the fallback restore from it: a real
daemon writes sealed shards to a real directory, and a later daemon, whose shared memory is gone, restores
from there. The multi-rank case (a torchrun job that loses its node's memory) is in test_training.py."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from snapguard import protocol as P
from snapguard.daemon.persist import Persister
from snapguard.daemon.slots import SEALED, plan_begin
from snapguard.demo import state_digest
from snapguard.errors import (ChecksumError, DaemonError, RestoreError, SnapGuardError, UnrecoverableError,
                              WorldSizeChanged)
from snapguard.shm import fmt_bytes

from conftest import flip_bits, wait_until
from test_daemon import make_model, mode, train_and_snapshot, train_step


def persisted(root: str, job: str) -> dict[str, list[int]]:
    """{"manifest": steps, "data": steps, "other": file names} of rank 0 in the job's persist directory."""
    d = os.path.join(root, f"snapguard-{job}")
    names = sorted(os.listdir(d))
    out = {"manifest": [], "data": [], "other": []}
    for n in names:
        parts = n.split(".")
        if len(parts) == 3 and parts[0] == "r0" and parts[2] in ("manifest", "data"):
            out[parts[2]].append(int(parts[1][1:]))
        else:
            out["other"].append(n)
    return {k: sorted(v) for k, v in out.items()}


def on_disk(root: str, job: str, step: int) -> bool:
    return os.path.exists(os.path.join(root, f"snapguard-{job}", f"r0.s{step}.manifest"))


@pytest.fixture
def disk(tmp_path):
    return str(tmp_path / "persist")


def start(node, disk: str, every: int = 3, keep: int = 2, faults: str | None = None):
    node.start(["--persist-dir", disk, "--persist-every", str(every), "--persist-keep", str(keep)], faults=faults)


def train(node, disk: str, steps, on_disk_at: int | None, **kw) -> dict[int, dict]:
    """Train and snapshot `steps` in a Guard of rank 0, wait until step `on_disk_at` is persisted, close the Guard;
    return each step's state digest."""
    model, opt = make_model()
    loop = {"step": -1}
    g = node.guard(model, opt, loop, rng=False, **{"chunk_size": 4096, **kw})
    try:
        digests = train_and_snapshot(g, model, opt, loop, steps)
        if on_disk_at is not None:
            wait_until(lambda: on_disk(disk, node.job, on_disk_at), 30, f"step {on_disk_at} on disk")
    finally:
        g.close()
    return digests


def fresh(node, seed: int = 99, **kw):
    """A new model, optimizer and loop state (other values than the trained ones), and a Guard over them."""
    model, opt = make_model(seed=seed)
    loop: dict = {"step": -1}
    return model, opt, loop, node.guard(model, opt, loop, rng=False, **kw)


@pytest.mark.parametrize("chunk", [4096, 4160])
def test_the_first_step_of_every_interval_goes_to_disk_privately_and_the_newest_k_stay(node, disk, chunk):
    # chunks of whole 4 KiB blocks are written with O_DIRECT, around the page cache; others through it
    start(node, disk, every=3, keep=2)
    train(node, disk, range(7), 6, chunk_size=chunk)  # steps 0..6: 0, 3 and 6 open an interval of 3
    slot6 = open(node.slot_file(0, 6), "rb").read()
    nbytes = [s["nbytes"] for s in node.status().ranks[0]["slots"] if s["step"] == 6][0]
    want = {"manifest": [3, 6], "data": [3, 6], "other": []}
    wait_until(lambda: persisted(disk, node.job) == want, 30, f"step 0 to be pruned, leaving {want}")
    d = os.path.join(disk, f"snapguard-{node.job}")
    assert mode(d) == 0o700 and all(mode(p) == 0o600 for p in glob.glob(os.path.join(d, "*")))
    data = open(os.path.join(d, "r0.s6.data"), "rb").read()
    assert len(data) == nbytes and data == slot6[:nbytes], "the bytes on disk are the sealed slot's"
    assert nbytes % 4096 and nbytes > 4 * 4096, "several chunks, the last one not whole blocks (O_DIRECT pads it)"
    assert [r["persisted"] for r in node.status().ranks] == [[3, 6]]
    out = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--job", node.job,
                          "--run-dir", node.run_dir],
                         capture_output=True, text=True, timeout=60)
    assert f"persisted to {d}: rank 0: 3, 6" in out.stdout, out.stdout + out.stderr
    assert "persisted rank 0 step 6" in node.log()
    assert ("O_DIRECT" if chunk == 4096 else "through the page cache") in node.log()


def test_restore_takes_memory_first_and_disk_once_memory_is_gone(node, disk, caplog):
    start(node, disk, every=3)
    digests = train(node, disk, range(8), 6)

    model2, opt2, _, g2 = fresh(node)
    assert g2.restore() == 7 and g2.restored_from == "memory"  # memory holds 6 and 7, the disk 3 and 6
    assert state_digest(model2, opt2) == digests[7]
    g2.close(shutdown_daemon=True)  # a clean shutdown removes the shared memory: as if the node had rebooted
    node.proc.wait(30)
    assert not os.path.exists(node.table_dir) or not os.listdir(node.table_dir)

    start(node, disk, every=3)
    model3, opt3, loop3, g3 = fresh(node, seed=98)
    with caplog.at_level("INFO", logger="snapguard.guard"):
        assert g3.restore() == 6
    assert g3.restored_from == "disk" and loop3 == {"step": 6}
    assert state_digest(model3, opt3) == digests[6], "bit-exact from disk"
    assert "restored step 6 from disk" in caplog.text
    assert "rank 0 restores step 6 from disk" in node.log()
    # training goes on from there exactly as before the loss, and the next snapshots go to memory
    train_step(model3, opt3, 7)
    loop3["step"] = 7
    assert state_digest(model3, opt3) == digests[7]
    g3.snapshot(7)
    g3.wait()
    assert node.held() == {0: [6, 7]}
    g3.close()


def test_a_corrupt_persisted_step_is_set_aside_and_restore_takes_the_one_before(node, disk, caplog):
    start(node, disk, every=3)
    digests = train(node, disk, range(7), 6)
    node.request(P.Shutdown(remove=True))  # the node's memory is gone
    node.proc.wait(30)
    d = os.path.join(disk, f"snapguard-{node.job}")
    flip_bits(os.path.join(d, "r0.s6.data"), 100, 0x01)

    start(node, disk, every=3)
    model2, opt2, _, g2 = fresh(node)
    with caplog.at_level("INFO", logger="snapguard.guard"):
        assert g2.restore() == 3
    assert g2.restored_from == "disk" and state_digest(model2, opt2) == digests[3]
    assert "persisted step 6 of rank 0 is corrupt" in node.log() and "shard for step 6 has checksum" in node.log()
    assert persisted(disk, node.job) == {"manifest": [3], "data": [3],
                                         "other": ["r0.s6.data.corrupt", "r0.s6.manifest.corrupt"]}
    g2.close()


def open_from_disk(node, step: int, limit_s: float = 30.0) -> tuple[list[P.Loading], P.Shard]:
    """Ask for rank 0's `step` until the daemon hands out the shard; the Loading answers before it, and the shard."""
    answers, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        reply = node.request(P.Open(node.job, 0, step))
        if isinstance(reply, P.Shard):
            return answers, reply
        assert isinstance(reply, P.Loading) and reply.step == step, reply
        answers.append(reply)
        time.sleep(0.005)
    raise AssertionError(f"step {step} was not read from disk within {limit_s} s: {answers[-3:]}")


def test_a_step_on_disk_is_read_in_the_background_while_the_daemon_serves_on(node, disk, tmp_path):
    # A node's ranks restoring from disk may read for longer than a request may take: Open starts the read and
    # answers Loading at once, the daemon serves other requests meanwhile, and the rank asks again until the
    # shard is in a slot. A Drop stops a read, and frees its slot.
    start(node, disk, every=3)
    train(node, disk, range(7), 6)
    node.request(P.Shutdown(remove=True))  # the node's memory is gone
    node.proc.wait(30)
    data = open(os.path.join(disk, f"snapguard-{node.job}", "r0.s6.data"), "rb").read()

    stall = tmp_path / "stall"  # the read of step 6 stops after its first piece while this file exists
    stall.touch()
    start(node, disk, every=3, faults=f"daemon.persist.read@6%{stall}")
    node.request(P.Reserve(node.job, 0, 1, 0))
    assert node.request(P.Inventory(node.job, 0)).persisted == [3, 6]
    first = node.request(P.Open(node.job, 0, 6))  # and again, until the slot is grown and the read starts
    assert isinstance(first, P.Loading) and (first.step, first.total) == (6, len(data)), first
    wait_until(lambda: node.request(P.Open(node.job, 0, 6)) and node.status().ranks[0]["reading"], 10,
               "the read of step 6 to start")
    assert isinstance(node.request(P.Ping()), P.Ok)
    reading = node.status().ranks[0]["reading"]
    assert reading["step"] == 6 and reading["total"] == len(data) and 0 <= reading["done"] <= len(data), reading
    out = subprocess.run([sys.executable, "-m", "snapguard.cli", "status", "--job", node.job, "--run-dir", node.run_dir],
                         capture_output=True, text=True, timeout=60)
    assert "rank 0 reads step 6 from disk: " in out.stdout and f"of {fmt_bytes(len(data))}\n" in out.stdout, out
    stall.unlink()
    # the rank restarts from step 5 instead: the read stops (or, if it is done, its step goes), and so does step 6
    # on disk, which lies on the timeline the rank left
    assert node.request(P.Drop(node.job, 0, 5)) == P.Ok()
    st = node.status().ranks[0]
    assert node.held() == {0: []} and [s["state"] for s in st["slots"]] == ["free", "free"] and not st["reading"]
    assert node.request(P.Inventory(node.job, 0)).persisted == [3]

    data = open(os.path.join(disk, f"snapguard-{node.job}", "r0.s3.data"), "rb").read()
    answers, shard = open_from_disk(node, 3)
    assert answers and answers[0].done == 0 and all(a.total == len(data) for a in answers), "a new read, from byte 0"
    assert [a.done for a in answers] == sorted(a.done for a in answers)
    assert open(shard.path, "rb").read()[:len(data)] == data, "the slot holds the bytes on disk"
    assert shard.manifest["step"] == 3 and node.held() == {0: [3]}
    assert "rank 0 reads step 3 from disk" in node.log() and "rank 0 restores step 3 from disk" in node.log()


def test_slots_too_small_for_a_step_on_disk_grow_in_the_background_before_it_is_read(node, disk, tmp_path):
    """A rank restoring from disk on a new node reserved slots for less than its shard (an optimizer's state appears
    at its first step): the daemon grows the slot it will read into in its grower threads first, answering Open with
    Loading (nothing read yet) and every other request at once meanwhile, as it does for a Reserve; then it reads
    the step."""
    start(node, disk, every=3)
    train(node, disk, range(7), 6)
    node.request(P.Shutdown(remove=True))  # the node's memory is gone
    node.proc.wait(30)
    data = open(os.path.join(disk, f"snapguard-{node.job}", "r0.s6.data"), "rb").read()

    stall = tmp_path / "stall"  # rank 0's slots stop growing before their first byte while this file exists
    stall.touch()
    start(node, disk, every=3, faults=f"daemon.reserve.piece@0%{stall}")
    assert isinstance(node.request(P.Reserve(node.job, 0, 1, 0)), P.Ok)
    for _ in range(3):
        assert node.request(P.Open(node.job, 0, 6)) == P.Loading(6, 0, len(data), source="disk", reserved=0,
                                                                 slot=len(data))
    st = node.status().ranks[0]
    assert [s["state"] for s in st["slots"]] == ["allocating", "free"] and not st["reading"], st  # the one to read into
    assert isinstance(node.request(P.Ping()), P.Ok)
    assert "grows a slot of ranks [0] to hold their shards of step 6 (" in node.log()
    stall.unlink()
    answers, shard = open_from_disk(node, 6)
    assert open(shard.path, "rb").read()[:len(data)] == data
    # the other slot grows at the rank's next Reserve, as it would after a restore
    assert [s["capacity"] >= len(data) for s in node.status().ranks[0]["slots"]] == [True, False]
    assert "rank 0 restores step 6 from disk" in node.log()


def test_a_slot_for_a_restore_that_stops_growing_ends_restore_with_an_error_that_says_so(node, disk, tmp_path):
    """The wait for the slot's memory has the read's timeout (`gate_timeout_s` without progress), and its error says
    what was awaited: the memory, not the disk."""
    start(node, disk, every=3)
    train(node, disk, range(4), 3)
    node.request(P.Shutdown(remove=True))
    node.proc.wait(30)
    stall = tmp_path / "stall"  # rank 0's slots stop growing before their first byte while this file exists
    start(node, disk, every=3, faults=f"daemon.reserve.piece@0%{stall}")
    model, opt = make_model()  # its Adam moments come at its first step: the slots Guard() reserved are too small
    g = node.guard(model, opt, {"step": -1}, rng=False, gate_timeout_s=1.0)
    stall.touch()
    try:
        with pytest.raises(RestoreError, match=r"restoring step 3: the daemon has reserved 0 B of [\d.]+ [KM]iB of"
                                               r" shared memory for the slots it reads the [\d.]+ [KM]iB into, and moved"
                                               r" no further for 1 s; is the node short of memory\?"):
            g.restore()
    finally:
        stall.unlink()
        g.close()
    assert isinstance(node.request(P.Ping()), P.Ok)


def reading_six_stalled(node, disk: str, tmp_path) -> tuple[dict[int, dict], object]:
    """Train steps 0-6 (the disk gets 3 and 6), then leave memory only step 5 and start reading step 6 from disk, the
    read stalled while the file it returns (a path) exists; return each step's state digest and that file."""
    start(node, disk, every=3)
    digests = train(node, disk, range(7), 6)
    six = node.slot_file(0, 6).removesuffix(".data") + ".manifest"
    node.kill()
    os.unlink(six)  # memory holds step 5, the disk steps 3 and 6
    stall = tmp_path / "stall"
    stall.touch()
    start(node, disk, every=3, faults=f"daemon.persist.read@6%{stall}")
    assert node.held() == {0: [5]}
    assert isinstance(node.request(P.Open(node.job, 0, 6)), P.Loading)
    return digests, stall


def test_a_begin_refused_as_stale_leaves_a_read_from_disk_going(node, disk, tmp_path):
    # A request the daemon refuses changes nothing: a Begin of a step the rank already holds sealed is refused
    # before the read of a step from disk (the restore under way) is stopped.
    _, stall = reading_six_stalled(node, disk, tmp_path)
    size = node.status().ranks[0]["slots"][0]["capacity"]
    with pytest.raises(DaemonError, match=r"\[BadStep\] rank 0: step 5 is not newer than step 5"):
        node.request(P.Begin(node.job, 0, 1, 5, size))
    assert node.status().ranks[0]["reading"]["step"] == 6, "the read goes on"
    stall.unlink()
    answers, shard = open_from_disk(node, 6)
    assert shard.manifest["step"] == 6 and node.log().count("rank 0 reads step 6 from disk") == 1


def test_a_finished_read_is_sealed_and_shown_so_before_the_rank_asks_again(node, disk):
    # `snapguard status` must not show a read as going on once its bytes are in the slot and verified
    start(node, disk, every=3)
    train(node, disk, range(4), 3)
    node.request(P.Shutdown(remove=True))
    node.proc.wait(30)
    start(node, disk, every=3)
    nbytes = os.path.getsize(os.path.join(disk, f"snapguard-{node.job}", "r0.s3.data"))
    # slots big enough for the shard, so that the first Open starts the read (else it grows them first)
    wait_until(lambda: isinstance(node.request(P.Reserve(node.job, 0, 1, nbytes)), P.Ok), 30, "rank 0's slots")
    assert isinstance(node.request(P.Open(node.job, 0, 3)), P.Loading)
    wait_until(lambda: node.held() == {0: [3]}, 30, "the daemon to seal step 3 read from disk, unasked")
    assert node.status().ranks[0]["reading"] == {}
    shard = node.request(P.Open(node.job, 0, 3))
    assert isinstance(shard, P.Shard) and shard.manifest["step"] == 3, shard


def test_a_read_from_disk_that_stops_moving_ends_restore_with_an_error_that_says_so(node, disk, tmp_path):
    start(node, disk, every=3)
    train(node, disk, range(4), 3)
    node.request(P.Shutdown(remove=True))
    node.proc.wait(30)
    stall = tmp_path / "stall"  # a disk that hangs after the first piece of the read
    stall.touch()
    start(node, disk, every=3, faults=f"daemon.persist.read%{stall}")
    model, opt = make_model()
    g = node.guard(model, opt, {"step": -1}, rng=False, gate_timeout_s=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(RestoreError, match=r"restoring step 3: the daemon has read [\d.]+ [KM]?i?B of [\d.]+ [KM]iB"
                                               r" of this rank's shard from disk, and moved no further for 1 s; is the"
                                               r" disk under --persist-dir stuck\?"):
            g.restore()
        assert time.monotonic() - t0 < 30
    finally:
        stall.unlink()
        g.close()
    assert isinstance(node.request(P.Ping()), P.Ok)


def test_a_daemon_killed_while_it_reads_a_step_from_disk_leaves_no_step_and_the_next_one_reads_it_again(node, disk):
    start(node, disk, every=3)
    digests = train(node, disk, range(7), 6)
    node.request(P.Shutdown(remove=True))
    node.proc.wait(30)

    start(node, disk, every=3, faults="daemon.persist.read@6")
    model2, opt2, _, g2 = fresh(node, timeout_s=3.0)
    t0 = time.monotonic()
    # The daemon dies under the rank's request (the connection closes while Open waits), or between two of its
    # Opens: then no daemon is connected when the next one is sent, and it waits timeout_s, not gate_timeout_s.
    with pytest.raises(DaemonError, match="closed the connection while Open waited|did not answer Open within 3.0 s"
                                          r" \(no daemon was connected\)"):
        g2.restore()
    assert time.monotonic() - t0 < 30
    g2.close()
    assert node.proc.wait(10) == -9
    assert not glob.glob(os.path.join(node.table_dir, "*.manifest")), "the half-read slot is not sealed"

    start(node, disk, every=3)
    model3, opt3, loop3, g3 = fresh(node, seed=98)
    assert g3.restore() == 6 and g3.restored_from == "disk" and loop3 == {"step": 6}
    assert state_digest(model3, opt3) == digests[6]
    g3.close()


def test_a_read_from_disk_stops_when_asked_and_reports_corrupt_bytes(tmp_path):
    import msgpack

    from snapguard.daemon.persist import Reading
    from test_slots import manifest_for

    p = Persister(str(tmp_path / "disk"), "job-a", every=1)
    n = 512 << 20  # read in 8 pieces
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    (tmp_path / "disk" / "snapguard-job-a" / "r0.s4.data").write_bytes(data)
    (tmp_path / "disk" / "snapguard-job-a" / "r0.s4.manifest").write_bytes(
        msgpack.packb(manifest_for(p, 0, 1, 4, data, chunk=4 << 20).to_wire(), use_bin_type=True))
    buf = mmap.mmap(-1, n)
    try:
        def read() -> Reading:
            man, fill = p.load(0, 4)
            return Reading(0, 4, 0, man, fill, memoryview(buf), 2, "test")

        r = read()
        assert r.stop(30) and r.stopped and r.error is None and 0 < r.done < n, (r.done, r.error)
        r = read()
        wait_until(lambda: r.finished, 30, "the read of 512 MiB")
        assert (r.error, r.stopped, r.done) == (None, False, n) and buf[:] == data
        flip_bits(os.path.join(p.dir, "r0.s4.data"), n - 10, 0x01)
        r = read()
        wait_until(lambda: r.finished, 30, "the read of 512 MiB")
        assert isinstance(r.error, ChecksumError) and "persisted rank 0: shard for step 4" in str(r.error)
    finally:
        buf.close()
        p.close()


def test_a_corrupt_step_read_from_disk_is_refused_at_the_next_open(node, disk):
    start(node, disk, every=3)
    train(node, disk, range(7), 6)
    node.request(P.Shutdown(remove=True))
    node.proc.wait(30)
    flip_bits(os.path.join(disk, f"snapguard-{node.job}", "r0.s6.data"), 5000, 0x10)

    start(node, disk, every=3)
    node.request(P.Reserve(node.job, 0, 1, 0))
    assert isinstance(node.request(P.Open(node.job, 0, 6)), P.Loading)
    with pytest.raises(DaemonError, match="shard for step 6 has checksum") as e:
        open_from_disk(node, 6)
    assert e.value.code == "ChecksumError"
    assert node.held() == {0: []} and "free" == node.status().ranks[0]["slots"][0]["state"]
    assert node.request(P.Inventory(node.job, 0)).persisted == [3], "no longer offered"
    _, shard = open_from_disk(node, 3)
    assert shard.manifest["step"] == 3


def test_a_daemon_killed_mid_write_leaves_no_claim_and_the_next_one_persists_on(node, disk):
    start(node, disk, every=3, faults="daemon.persist.mid@3")
    with pytest.raises(SnapGuardError):  # the daemon dies writing step 3 to disk, after sealing it in memory
        train(node, disk, range(20), None, timeout_s=3.0)
    assert node.proc.wait(10) == -9
    got = persisted(disk, node.job)
    assert got["manifest"] == [0] and got["data"] == [0], got
    assert got["other"] == ["r0.s3.data.new"], "half of step 3, which nothing claims"

    start(node, disk, every=3)
    model2, opt2, loop2, g2 = fresh(node, chunk_size=4096)
    step = g2.restore()
    assert step in (3, 4) and g2.restored_from == "memory", "the daemon re-adopted its sealed slots"
    train_and_snapshot(g2, model2, opt2, loop2, range(step + 1, 8))
    wait_until(lambda: on_disk(disk, node.job, 6), 30, "step 6 on disk")
    g2.close()
    # the interval [3, 6) is persisted by its next seal: 4 (after restoring 3), or 5 (the old daemon sealed 4,
    # but counted the interval as taken by 3); step 0 is pruned, and the stray half-write of step 3 removed
    wait_until(lambda: persisted(disk, node.job) in [{"manifest": s, "data": s, "other": []} for s in ([4, 6], [5, 6])],
               30, "steps 4 or 5, and 6, alone on disk")


def test_a_daemon_that_a_guard_starts_persists_with_the_flags_it_is_given(node, disk):
    try:
        train(node, disk, range(3), 2, start_daemon=True, shm_dir=node.shm_dir,
              daemon_args=("--persist-dir", disk, "--persist-every", "2"))
        assert persisted(disk, node.job)["manifest"] == [0, 2]
    finally:
        node.request(P.Shutdown(remove=True))


def test_a_job_restarted_with_another_world_size_is_told_of_its_steps_on_disk_and_persists_its_own(node, disk):
    start(node, disk, every=1)
    g = node.guard(None, None, {"w": torch.ones(4), "pos": 123}, rng=False, world_size=2)
    for step in (5, 6):
        g.snapshot(step)
        g.wait()
    wait_until(lambda: on_disk(disk, node.job, 6), 30, "step 6 on disk")
    g.close(shutdown_daemon=True)  # the node's memory goes: only the disk holds the job of 2 ranks
    node.proc.wait(30)

    start(node, disk, every=1)
    live = {"w": torch.zeros(4), "pos": 0}
    g2 = node.guard(None, None, live, rng=False, world_size=1)
    with pytest.raises(WorldSizeChanged, match=r"a job of 2 ranks \(up to step 6, rank 0's node\), this job has 1"):
        g2.restore()
    assert live["pos"] == 0 and torch.equal(live["w"], torch.zeros(4)), "nothing restored"
    assert persisted(disk, node.job)["manifest"] == [5, 6], "nothing removed either"
    for step in (0, 1):  # the new job's own steps are persisted from its first, and replace the old job's
        live["pos"] = step
        g2.snapshot(step)
        g2.wait()
    want = {"manifest": [0, 1], "data": [0, 1], "other": []}
    wait_until(lambda: persisted(disk, node.job) == want, 30, f"the new job's steps alone on disk: {want}")
    assert "persisted steps [5, 6], of a job of another world size" in node.log()
    g2.close()


def test_a_slot_being_written_to_disk_is_not_handed_out():
    S = lambda step: (SEALED, step)  # noqa: E731
    assert plan_begin((S(4), S(5)), 6, 5).slot == 0
    d = plan_begin((S(4), S(5)), 6, 5, pinned=frozenset({4}))
    assert (d.action, d.need, d.disk) == ("wait", 5, 4)
    d = plan_begin((S(3), S(4), S(5)), 6, 5, pinned=frozenset({3}))
    assert (d.action, d.slot) == ("grant", 1), "another sealed slot older than the shared step may go"


@pytest.mark.parametrize(("every", "keep", "message"), [
    (0, 2, "--persist-every must be at least 1 step, got 0"),
    (3, 0, "--persist-keep must be at least 1 step, got 0"),
])
def test_bad_persist_settings_stop_the_daemon_with_a_clear_error(node, disk, every, keep, message):
    with pytest.raises(SnapGuardError, match="exited with code 2"):
        start(node, disk, every=every, keep=keep)
    assert message in node.log()
    assert not os.path.exists(os.path.join(disk, f"snapguard-{node.job}"))


def test_persisted_steps_of_another_world_size_or_unreadable_are_not_offered(tmp_path, caplog):
    from test_slots import manifest_for, payload

    import msgpack

    def write(step: int, data: bytes, manifest: bytes) -> None:
        with open(os.path.join(p.dir, f"r0.s{step}.data"), "wb") as f:
            f.write(data)
        with open(os.path.join(p.dir, f"r0.s{step}.manifest"), "wb") as f:
            f.write(manifest)

    p = Persister(str(tmp_path), "job-a", every=1)
    try:
        assert mode(p.dir) == 0o700 and p.steps(0, 1) == []
        data = payload(5, 0)
        man = manifest_for(p, 0, 2, 5, data)  # a job of 2 ranks took it
        write(5, data, msgpack.packb(man.to_wire(), use_bin_type=True))
        assert p.steps(0, 2) == [5] and p.steps(0, 1) == [] and p.steps(1, 2) == []
        write(7, b"", b"\x93not a manifest")
        with caplog.at_level(logging.WARNING, logger=Persister.__module__):
            for _ in range(3):  # a Status lists the steps every time it is asked
                assert p.steps(0, 2) == [5], "an unreadable manifest is skipped"
        assert len([r for r in caplog.records if "step 7 of rank 0 is unusable" in r.message]) == 1, caplog.text
        data7 = payload(7, 0)
        write(7, data7, msgpack.packb(manifest_for(p, 0, 2, 7, data7).to_wire(), use_bin_type=True))
        assert p.steps(0, 2) == [5, 7], "a manifest written again is read again"
        data9 = payload(9, 0)
        wire9 = manifest_for(p, 0, 2, 9, data9).to_wire()
        write(9, data9, msgpack.packb({**wire9, "created": wire9["created"] + 1}, use_bin_type=True))
        with caplog.at_level(logging.WARNING, logger=Persister.__module__):
            assert p.steps(0, 2) == [5, 7], "a manifest that changed after it was written is skipped"
        assert "step 9 of rank 0 is unusable: ChecksumError: the manifest of rank 0 step 9 does not match its digest" \
            in caplog.text
        write(11, data, msgpack.packb({(1, 2): 3}))  # a map keyed by an array: the decoder raises TypeError
        with caplog.at_level(logging.WARNING, logger=Persister.__module__):
            assert p.steps(0, 2) == [5, 7], "a manifest the decoder cannot even build is skipped, nothing raises"
        assert "step 11 of rank 0 is unusable: TypeError" in caplog.text
        os.unlink(os.path.join(p.dir, "r0.s11.manifest"))
        os.truncate(os.path.join(p.dir, "r0.s5.data"), len(data) - 1)
        assert p.steps(0, 2) == [7], "a data file shorter than its manifest says is skipped"
        os.unlink(os.path.join(p.dir, "r0.s7.data"))
        assert p.steps(0, 2) == [], "a manifest without its data is skipped"
    finally:
        p.close()


def test_a_rewound_rank_drops_the_persisted_steps_of_the_timeline_it_left(tmp_path):
    from test_slots import manifest_for, payload

    p = Persister(str(tmp_path / "disk"), "job-a", every=1, keep=5)
    try:
        finished = []
        for step in (1, 2, 3):
            data = payload(step, 0)
            slot = tmp_path / f"slot{step}"
            slot.write_bytes(data)
            assert p.due(0, step, 1)
            p.submit(0, step, str(slot), manifest_for(p, 0, 1, step, data))
            wait_until(lambda: finished.extend(p.drain()) or len(finished) == step, 30, f"step {step} written")
        assert finished == [(0, 1, ""), (0, 2, ""), (0, 3, "")] and p.steps(0, 1) == [1, 2, 3]
        assert open(os.path.join(p.dir, "r0.s2.data"), "rb").read() == payload(2, 0)
        p.rewind(0, 1, world_size=1)  # the job restored step 1: steps 2 and 3 are a future that did not happen
        assert p.steps(0, 1) == [1] and sorted(os.listdir(p.dir)) == ["r0.s1.data", "r0.s1.manifest"]
        assert not p.due(0, 1, 1) and p.due(0, 2, 1), "the next seal of step 2 is persisted again"
        # A step another snapguard version wrote is not this one's to read, nor to drop: a job that found no step it
        # could read and starts afresh leaves it for that version.
        import msgpack

        wire = {**manifest_for(p, 0, 1, 9, payload(9, 0)).to_wire(), "version": 99}
        (tmp_path / "disk").joinpath(os.path.basename(p.dir), "r0.s9.manifest").write_bytes(
            msgpack.packb(wire, use_bin_type=True))
        (tmp_path / "disk").joinpath(os.path.basename(p.dir), "r0.s9.data").write_bytes(payload(9, 0))
        assert p.steps(0, 1) == [1]
        p.rewind(0, -1, world_size=1)
        assert sorted(os.listdir(p.dir)) == ["r0.s9.data", "r0.s9.manifest"]
    finally:
        p.close()


def test_a_manifest_that_cannot_be_read_is_read_again_later_and_set_aside_never_deleted(tmp_path, caplog):
    """An I/O error is not a verdict on the file: it is tried again at the next listing, logged once meanwhile, and a
    restore to an older step sets it aside (it may be of the timeline left behind) instead of deleting it."""
    from test_slots import manifest_for, payload

    import msgpack

    p = Persister(str(tmp_path / "disk"), "job-a", every=1, keep=5)
    try:
        wire = {}
        for step in (1, 3):
            data = payload(step, 0)
            (tmp_path / "disk" / os.path.basename(p.dir) / f"r0.s{step}.data").write_bytes(data)
            wire[step] = msgpack.packb(manifest_for(p, 0, 1, step, data).to_wire(), use_bin_type=True)
        manifest = os.path.join(p.dir, "r0.s1.manifest")
        with open(manifest, "wb") as f:
            f.write(wire[1])
        unreadable = os.path.join(p.dir, "r0.s3.manifest")
        os.mkdir(unreadable)  # open() fails with an OSError, as a disk's I/O error or a file of another user would
        with caplog.at_level(logging.WARNING, logger=Persister.__module__):
            for _ in range(3):
                assert p.steps(0, 1) == [1]
        assert len([r for r in caplog.records if "step 3 of rank 0 is unusable: IsADirectoryError" in r.message]) == 1
        os.rmdir(unreadable)
        with open(unreadable, "wb") as f:
            f.write(wire[3])
        assert p.steps(0, 1) == [1, 3], "readable again: offered again"
        os.replace(unreadable, unreadable + ".ok")
        os.mkdir(unreadable)
        assert p.steps(0, 1) == [1]
        p.rewind(0, 1, world_size=1)  # the job restored step 1
        assert sorted(os.listdir(p.dir)) == ["r0.s1.data", "r0.s1.manifest", "r0.s3.data.unreadable",
                                             "r0.s3.manifest.ok", "r0.s3.manifest.unreadable"]
        assert p.steps(0, 1) == [1]
    finally:
        p.close()


def test_pruning_keeps_the_newest_step_every_rank_has_and_the_step_being_read_back(tmp_path):
    """Rank 1's writes lag: rank 0 keeps the newest step both ranks have on disk beside its newest `keep`, so that the
    job still has a step to restore if the node goes; and a step being read back for a restore is never pruned."""
    from test_slots import manifest_for, payload

    p = Persister(str(tmp_path / "disk"), "job-a", every=10, keep=2)
    finished = []

    def persist(rank: int, step: int) -> None:
        data = payload(step, rank)
        slot = tmp_path / f"slot.r{rank}.s{step}"
        slot.write_bytes(data)
        assert p.due(rank, step, 2)
        p.submit(rank, step, str(slot), manifest_for(p, rank, 2, step, data))
        wait_until(lambda: finished.extend(p.drain()) or (rank, step, "") in finished, 30, f"rank {rank} step {step}")

    try:
        persist(1, 80)
        for step in (80, 90, 100):
            persist(0, step)
        assert p.steps(0, 2) == [80, 90, 100], "step 80, the only one rank 1 has, stays"
        persist(1, 90)
        persist(0, 110)
        assert p.steps(0, 2) == [90, 100, 110] and p.steps(1, 2) == [80, 90]
        man, fill = p.load(0, 90)  # a restore reads step 90 back
        persist(1, 110)
        persist(0, 120)
        assert p.steps(0, 2) == [90, 110, 120], "the step being read stays"
        buf = mmap.mmap(-1, man.nbytes)  # page-aligned, as a slot is
        fill(memoryview(buf))
        assert buf[:] == payload(90, 0)
        p.release(0, 90)
        persist(0, 130)
        assert p.steps(0, 2) == [110, 120, 130]
        # rank 1's manifest of a newer step that no one can read does not make that step the one both ranks have
        (tmp_path / "disk" / os.path.basename(p.dir) / "r1.s130.manifest").write_bytes(b"\x93not a manifest")
        (tmp_path / "disk" / os.path.basename(p.dir) / "r1.s130.data").write_bytes(payload(130, 1))
        persist(0, 140)
        assert p.steps(0, 2) == [110, 130, 140] and p.steps(1, 2) == [90, 110]
        with pytest.raises(UnrecoverableError, match="persisted step 999 is no longer in"):
            p.load(0, 999)  # listed by an Inventory, pruned before the Open: the ranks plan again
    finally:
        p.close()


def test_a_write_that_fails_leaves_no_partial_files_and_names_the_directory(tmp_path, caplog):
    from test_slots import manifest_for, payload

    p = Persister(str(tmp_path / "disk"), "job-a", every=1)
    try:
        data = payload(4, 0, n=64 << 10)
        slot = tmp_path / "slot"
        slot.write_bytes(data[:40 << 10])  # the slot file ends before the shard does
        with caplog.at_level(logging.WARNING, logger=Persister.__module__):
            p.submit(0, 4, str(slot), manifest_for(p, 0, 1, 4, data, chunk=8192))
            done: list = []
            wait_until(lambda: done.extend(p.drain()) or done, 30, "the write to end")
        assert done[0][:2] == (0, 4) and "cut short" in done[0][2]
        assert os.listdir(p.dir) == [], "the data written before the failure is removed"
        assert f"could not persist rank 0 step 4 to {p.dir}: ChecksumError" in caplog.text
    finally:
        p.close()


def test_opening_a_step_in_memory_stops_a_read_of_another_from_disk_before_its_slot_is_freed(node, disk, tmp_path):
    """The ranks plan again while a step is read from disk, and open one that memory holds: the read stops before
    opening frees its slot (it wrote on into a free slot, and sealing that killed the daemon), and the daemon serves on."""
    digests, stall = reading_six_stalled(node, disk, tmp_path)
    moves = threading.Timer(1.0, stall.unlink)  # the read moves again, and stops at its next piece
    moves.start()
    assert isinstance(node.request(P.Open(node.job, 0, 5), timeout_s=40), P.Shard)
    moves.join()
    time.sleep(1.0)  # for as long as the rest of a read that had not stopped would take
    assert node.proc.poll() is None and node.held() == {0: [5]}
    model, opt, loop, g = fresh(node)
    assert g.restore() == 5 and state_digest(model, opt) == digests[5]
    g.close()


def test_asking_again_for_a_step_on_disk_while_its_slot_grows_keeps_the_older_step_in_memory(node, disk, tmp_path):
    """The free slot is too small for the step on disk, so it grows first, and the rank asks again meanwhile: the step
    memory holds stays until the read has a slot (had the read failed, the restore would have fallen back past it)."""
    from test_daemon import seal_raw

    big, small = 1 << 20, 8192
    args = ["--persist-dir", disk, "--persist-every", "3", "--persist-keep", "2"]
    node.start(args)
    for step in range(7):
        seal_raw(node, 0, 1, step, nbytes=big)
    wait_until(lambda: on_disk(disk, node.job, 6), 30, "step 6 on disk")
    assert isinstance(node.request(P.Shutdown(remove=True)), P.Ok)
    node.proc.wait(30)
    stall = tmp_path / "stall"
    node.start(args, faults=f"daemon.reserve.piece@0%{stall}")
    wait_until(lambda: isinstance(node.request(P.Reserve(node.job, 0, 1, small)), P.Ok), 30, "small slots")
    seal_raw(node, 0, 1, 4, nbytes=small)  # memory: step 4; the other slot free and small; the disk: 3 and 6
    stall.touch()
    for _ in range(2):
        reply = node.request(P.Open(node.job, 0, 6))
        assert isinstance(reply, P.Loading) and reply.slot > 0, reply
        assert node.held() == {0: [4]}
    flip_bits(os.path.join(disk, f"snapguard-{node.job}", "r0.s6.data"), 100, 0xFF)  # the disk copy of 6 is bad
    stall.unlink()
    with pytest.raises(DaemonError, match="ChecksumError"):
        open_from_disk(node, 6)
    assert node.request(P.Inventory(node.job, 0)).steps == [3, 4], "memory's step 4 is still there to fall back to"


def test_a_corrupt_slot_in_memory_is_restored_from_the_disk_copy_of_the_same_step(node, disk, caplog):
    start(node, disk, every=1, keep=2)
    digests = train(node, disk, range(4), 3)
    flip_bits(node.slot_file(0, 3), 0, 0x10)

    model2, opt2, _, g2 = fresh(node)
    with caplog.at_level("INFO", logger="snapguard.guard"):
        assert g2.restore() == 3
    assert g2.restored_from == "disk" and state_digest(model2, opt2) == digests[3]
    assert "a sealed snapshot failed verification and is not used: rank 0: shard for step 3 has checksum" in caplog.text
    g2.close()



def test_a_file_system_that_refuses_o_direct_reads_and_writes_through_the_page_cache(tmp_path, monkeypatch):
    from test_slots import manifest_for, payload

    real_open = os.open

    def refuse_direct(path, flags, *a, **kw):  # as a file system without O_DIRECT answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **kw)

    p = Persister(str(tmp_path / "disk"), "job-a", every=1)
    try:
        for step, how in ((1, refuse_direct), (2, real_open)):
            monkeypatch.setattr(os, "open", how)
            data = payload(step, 0, n=3 * 4096 + 100)
            slot = tmp_path / f"slot{step}"
            slot.write_bytes(data)
            p.submit(0, step, str(slot), manifest_for(p, 0, 1, step, data, chunk=4096))
            assert wait_until(lambda: p.drain(), 30, f"step {step} written") == [(0, step, "")]
            assert p.direct is (how is real_open)
            assert open(os.path.join(p.dir, f"r0.s{step}.data"), "rb").read() == data
            assert mode(os.path.join(p.dir, f"r0.s{step}.data")) == 0o600
        assert p.steps(0, 1) == [1, 2]
        for step, how in ((1, real_open), (2, refuse_direct)):  # and read back, into a slot-like mapping
            monkeypatch.setattr(os, "open", how)
            man, fill = p.load(0, step)
            slot = mmap.mmap(-1, 4 * 4096)
            with memoryview(slot) as buf:
                fill(buf)
                assert bytes(buf[:man.nbytes]) == payload(step, 0, n=3 * 4096 + 100)
    finally:
        monkeypatch.setattr(os, "open", real_open)
        p.close()


def test_a_snapshot_that_waits_for_a_write_to_disk_says_so_and_fails_naming_the_disk(node, disk, tmp_path, caplog):
    """Step 0 goes to disk and its write hangs halfway (a stuck disk under --persist-dir). With two slots, step 2
    needs step 0's slot: the rank waits for the write, says so at half the gate timeout (here), and fails naming
    the disk, within the gate timeout."""
    stall = tmp_path / "stall"
    stall.touch()
    start(node, disk, every=3, faults=f"daemon.persist.mid%{stall}")
    model, opt = make_model()
    g = node.guard(model, opt, {"step": -1}, rng=False, gate_timeout_s=2.0)
    try:
        with caplog.at_level(logging.WARNING, logger="snapguard.guard"), \
                pytest.raises(SnapGuardError, match=r"step 2: waited 2 s for the daemon to finish writing step 0 to"
                                                    r" disk \(--persist-dir\).* too slow for --persist-every"):
            train_and_snapshot(g, model, opt, {"step": -1}, range(4))
        waiting = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
        assert len(waiting) == 1, caplog.text
        assert "step 2: has waited 1 s for the daemon to finish writing step 0 to disk" in waiting[0]
        assert "gives up after 2 s" in waiting[0]
    finally:
        stall.unlink()
        with contextlib.suppress(SnapGuardError):
            g.close()
