"""Restore's edges: values go back into the objects they came from, states that cannot come back exactly are
refused, and ranks that disagree or do not come stop every rank with an error that says why, within the Guard's
timeouts. Real daemons; the multi-rank cases run two processes over torch.distributed (gloo)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from snapguard import guard as guard_module
from snapguard.config import Endpoint
from snapguard.errors import ConfigError, DaemonError, LayoutError, WorldSizeChanged
from snapguard.procs import free_port

from conftest import flip_bits


def bits(t: torch.Tensor) -> bytes:
    return t.detach().resolve_conj().resolve_neg().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_tensors_of_a_plain_dict_go_back_into_the_same_objects(daemon):
    g0 = torch.Generator().manual_seed(0)
    saved = {"w": torch.randn(3, generator=g0), "t": torch.randn(4, 3, generator=g0), "n": torch.randn(5, generator=g0)}
    extra = {"w": torch.nn.Parameter(saved["w"].clone()), "t": saved["t"].clone(), "n": saved["n"].clone(), "lst": [1]}
    g = daemon.guard(None, None, extra, rng=False)
    g.snapshot(0)
    g.close()

    w = torch.nn.Parameter(torch.zeros(3))
    t = torch.zeros(4, 6)[:, ::2]  # live tensors that cannot take the bytes by address: copied into, in place
    n = torch.zeros(5)._neg_view()
    live = {"w": w, "t": t, "n": n, "lst": []}
    g2 = daemon.guard(None, None, live, rng=False)
    assert g2.restore() == 0
    g2.close()
    assert live["w"] is w and type(w) is torch.nn.Parameter and w.requires_grad
    assert live["t"] is t and live["n"] is n and live["lst"] == [1]
    for k in ("w", "t", "n"):
        assert bits(live[k]) == bits(saved[k]), k


def test_numpy_values_come_back_with_their_shape_dtype_order_and_type(daemon):
    grid = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    extra = {"a0": np.array(7.25), "f64": np.float64(0.1), "s": np.str_("x"), "c": grid, "f": np.asfortranarray(grid),
             "strided": grid[:, ::2]}
    g = daemon.guard(None, None, extra, rng=False)
    g.snapshot(0)
    g.close()
    live = {"a0": np.array(0.0), "f64": np.float64(0), "s": np.str_(""), "c": np.zeros_like(grid),
            "f": np.zeros_like(extra["f"]), "strided": np.zeros_like(grid[:, ::2])}
    g2 = daemon.guard(None, None, live, rng=False)
    assert g2.restore() == 0
    g2.close()
    assert live["a0"].shape == () and live["a0"].dtype == np.float64 and live["a0"].tobytes() == extra["a0"].tobytes()
    for k in ("c", "f", "strided"):
        assert live[k].shape == extra[k].shape and live[k].dtype == np.int32 and np.array_equal(live[k], extra[k]), k
        # the bytes in memory order: a Fortran-ordered array comes back Fortran-ordered, column after column
        assert live[k].tobytes(order="A") == extra[k].tobytes(order="A"), k
    assert live["f"].flags.f_contiguous and not live["f"].flags.c_contiguous
    assert live["c"].flags.c_contiguous and live["strided"].flags.c_contiguous  # a strided view comes back compact
    assert type(live["f64"]) is np.float64 and live["f64"] == extra["f64"]
    assert type(live["s"]) is np.str_ and live["s"] == "x"


def test_a_state_whose_tensor_names_collide_is_refused_when_the_guard_is_built(daemon):
    with pytest.raises(LayoutError, match=r"\['extra'\]\['ints'\]\[1\] and \['extra'\]\['ints'\]\['1'\] would both"):
        daemon.guard(None, None, {"ints": {1: torch.ones(1), "1": torch.zeros(1)}}, rng=False)


def test_a_guard_of_several_ranks_built_without_torch_distributed_cannot_restore_and_says_why(daemon):
    # Its snapshots go on (a daemon serves it as any rank), but a restore would plan with this rank's steps alone
    g = daemon.guard(None, None, {"w": torch.ones(4)}, rng=False, world_size=2)
    try:
        g.snapshot(1)
        g.wait()
        with pytest.raises(ConfigError, match=r"restore\(\) in a job of 2 ranks needs torch.distributed, over which the"
                                              r" ranks agree on the step, .* call init_process_group\(\) first"):
            g.restore()
    finally:
        g.close()


def test_a_snapshot_of_another_world_size_is_refused_and_nothing_is_written(daemon):
    g = daemon.guard(None, None, {"w": torch.ones(4), "pos": 123}, rng=False, world_size=2)
    g.snapshot(5)
    g.close()
    live = {"w": torch.zeros(4), "pos": 0}
    g2 = daemon.guard(None, None, live, rng=False, world_size=1)
    with pytest.raises(WorldSizeChanged, match=r"snapshots of a job of 2 ranks \(up to step 5, rank 0's node\), this"
                                               r" job has 1, and snapguard restores only into the world size"):
        g2.restore()
    g2.close()
    assert live["pos"] == 0 and torch.equal(live["w"], torch.zeros(4))
    assert daemon.held() == {0: [5]}, "the refused snapshot stays for a restart with the right world size"


def test_close_releases_the_socket_even_when_the_daemon_refuses_to_shut_down(daemon, monkeypatch):
    g = daemon.guard(None, None, {"w": torch.ones(2)}, rng=False)
    closed = []
    monkeypatch.setattr(g.client, "close", lambda: closed.append(True))

    def refuse(msg, timeout_s=None):
        raise DaemonError(f"daemon refused {msg.TYPE}: [Busy] not now", "Busy")

    monkeypatch.setattr(g.client, "request", refuse)
    with pytest.raises(DaemonError, match="refused Shutdown"):
        g.close(shutdown_daemon=True)
    assert closed == [True]


# ---- two ranks over gloo -------------------------------------------------------------------------

WORKER = r'''
import datetime, json, os, sys, time
import torch, torch.distributed as dist
from snapguard.errors import DaemonUnavailable, SnapGuardError
from snapguard.guard import Guard

rank, port, job, run_dir, out, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
shm_dir = sys.argv[7]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))

def guard(state, node="n0", run_dir=run_dir, **kw):
    return Guard(states={"s": state}, rng=False, job=job, node=node, run_dir=run_dir, timeout_s=2.0, gate_timeout_s=2.0,
                 **kw)

# A daemon of rank 1's own, to fail while rank 0's serves on: a second daemon of node n0, in directories of its own
# (daemons of two nodes would have to be peers).
own = {"run_dir": os.path.join(run_dir, "r1"), "shm_dir": os.path.join(shm_dir, "r1"), "start_daemon": True}

result = {}
if phase == "cycle":  # a process that builds and closes Guards over and over
    state = {"w": torch.full((4,), float(rank))}
    result["fds"] = []
    for i in range(4):
        g = guard(state)
        g.restore()
        g.close()
        result["fds"].append(len(os.listdir("/proc/self/fd")))
elif phase in ("not-peers", "same-name"):
    if phase == "not-peers":  # rank 1 on node n1, whose daemon is no peer of n0's
        kw = {"node": "n1", "start_daemon": True, "shm_dir": shm_dir} if rank else {}
    else:  # rank 1 on another machine whose host name gives the same node name, n0
        import snapguard.guard as guard_module
        if rank:  # one machine has one kernel: rank 1 stands for another machine by the boot id it reads
            guard_module._machine_hash = lambda: 12345
        kw = own if rank else {}
    result["fds"] = []
    for attempt in range(2):  # the second: what a refused Guard left open (its gloo group above all) stays so
        t0 = time.monotonic()
        try:
            guard({"w": torch.zeros(4)}, **kw)
            result["built"] = True
        except SnapGuardError as e:
            result.setdefault("error", f"{type(e).__name__}: {e}")
        result.setdefault("elapsed", time.monotonic() - t0)
        result["fds"].append(len(os.listdir("/proc/self/fd")))
elif phase == "leave-alone":  # the end of a job, to which rank 1 never comes
    from snapguard.procs import leave_process_group
    if rank == 1:
        time.sleep(6)
    else:
        t0 = time.monotonic()
        try:
            leave_process_group(timeout_s=3.0)
            result["left"] = True
        except SnapGuardError as e:
            result["error"] = f"{type(e).__name__}: {e}"
        result["elapsed"] = time.monotonic() - t0
elif phase == "save":
    state = {"w": torch.full((4,), float(rank))}
    g = guard(state)
    for step in range(2):
        state["w"] += 1
        g.snapshot(step)
    g.close()
else:
    state = {"w": torch.zeros(5 if phase == "mismatch" and rank == 1 else 4)}
    if phase == "unwritable" and rank == 1:  # four elements that are one: no copy can write them in place
        state["w"] = torch.zeros(1).expand(4)
    if phase == "refused" and rank == 1:  # an object of rank 1's that cannot take the state it is given
        class Refuses:
            w = torch.zeros(4)

            def state_dict(self):
                return {"w": self.w}

            def load_state_dict(self, sd):
                from snapguard.errors import LayoutError
                raise LayoutError("the layout changed since the snapshot")

        state = Refuses()
    if phase == "inventory-fails" and rank == 1:  # its own node's daemon, which dies before the restore asks it
        import signal
        from snapguard.config import Endpoint
        g = guard(state, **own)
        with open(Endpoint(job, "n0", own["run_dir"]).lock_path) as f:
            os.kill(int(f.read()), signal.SIGKILL)
    elif phase == "unfinished" and rank == 1:  # its last snapshot failed in the background, unseen until restore
        g = guard(state, **own, daemon_args=("--shm-limit", "1M"))
        g.snapshot(1)
        g.wait()
        state["w"] = torch.zeros(1 << 20)  # 4 MiB: its slots cannot grow under the daemon's limit
        g.snapshot(2)
        g._job.sealed.wait(30)
    else:
        g = guard(state)
    if phase == "late" and rank == 1:  # comes to restore only once rank 0 has given up on it
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(out, "r0.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
    if phase == "open-fails" and rank == 1:
        g._ask_open = lambda step, epoch: None  # as when its daemon cannot rebuild the step from its peers
    if phase == "open-raises" and rank == 1:
        def died(step, epoch):
            raise DaemonUnavailable("the daemon closed the connection while Open waited for its reply")
        g._ask_open = died
    t0 = time.monotonic()
    try:
        result["restored"] = g.restore()
    except SnapGuardError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        result["other"] = f"{type(e).__name__}: {e}"
    result["elapsed"] = time.monotonic() - t0
    if "error" in result and phase in ("open-fails", "open-raises", "unwritable"):  # a caller that catches it, trains on
        try:
            g.snapshot(7)
            result["snapshot"] = "taken"
        except SnapGuardError as e:
            result["snapshot"] = f"{type(e).__name__}: {e}"
    try:
        g.close(shutdown_daemon=phase == "unfinished" and rank == 1)  # the daemon it started
    except SnapGuardError:
        pass
with open(os.path.join(out, f"r{rank}.tmp"), "w") as f:
    json.dump(result, f)
os.rename(os.path.join(out, f"r{rank}.tmp"), os.path.join(out, f"r{rank}.json"))
sys.stdout.flush()
os._exit(0)  # no teardown of gloo groups whose peer may be gone
'''


@pytest.fixture
def pair(daemon, tmp_path):
    """run(phase) -> each rank's result: two worker processes, ranks 0 and 1 of a gloo job, on `daemon`'s node."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs: list[subprocess.Popen] = []

    def run(phase: str, timeout_s: float = 90.0) -> dict[int, dict]:
        port = free_port()  # outside the ephemeral range: no outgoing connection takes it before rank 0 binds it
        out = tmp_path / phase
        out.mkdir()
        ps = []
        for r in range(2):
            with open(out / f"log.r{r}", "w") as log:
                ps.append(subprocess.Popen([sys.executable, str(script), str(r), str(port), daemon.job, daemon.run_dir,
                                            str(out), phase, daemon.shm_dir], stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        procs.extend(ps)
        for p in ps:
            p.wait(timeout_s)
        got = {}
        for r in range(2):
            path = out / f"r{r}.json"
            assert path.exists(), f"rank {r} wrote no result: {(out / f'log.r{r}').read_text()[-3000:]}"
            got[r] = json.loads(path.read_text())
        return got

    yield run
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    for ep in (Endpoint(daemon.job, "n1", daemon.run_dir), Endpoint(daemon.job, "n0", os.path.join(daemon.run_dir, "r1"))):
        try:  # a daemon that rank 1 started and that is still running
            with open(ep.lock_path) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if daemon.job.encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_guards_built_and_closed_over_and_over_leave_no_connections_behind(pair):
    # Each Guard of a job of several ranks opens a gloo group of its own, with a connection to every other rank;
    # closing it must close them.
    got = pair("cycle")
    for r in (0, 1):
        fds = got[r]["fds"]
        assert fds[1:] == fds[:1] * 3, f"rank {r}: open files after each Guard closed: {fds}"


def test_a_rank_that_does_not_come_stops_the_others_within_the_guards_timeouts(pair):
    # timeout_s=2 and gate_timeout_s=2: rank 0 waits 4 s for rank 1's inventory, not the default group's 30 min.
    got = pair("late")
    assert "error" in got[0], got
    assert got[0]["error"].startswith("RestoreError: "), got
    assert "for every rank's inventory of sealed steps (restore round 1)" in got[0]["error"], got
    assert got[0]["elapsed"] < 20, got
    assert "error" in got[1] and got[1]["error"].startswith("RestoreError: "), got


def test_a_rank_whose_restore_fails_stops_every_rank_at_once(pair):
    pair("save")
    got = pair("mismatch")  # rank 1's model has a tensor of another shape
    assert got[1]["error"].startswith("LayoutError: tensor '/s/w': the snapshot has float32[4]"), got
    assert "cannot restore step 1: it failed on ranks [1] (their errors say why)" in got[0]["error"], got
    assert got[0]["elapsed"] < 20, got


def test_a_rank_whose_open_fails_stops_every_rank_before_any_copies_its_shard(pair):
    pair("save")
    got = pair("open-raises")  # rank 1's daemon dies while it asks for its shard
    assert got[1]["error"].startswith("DaemonUnavailable: "), got
    assert "cannot restore step 1: it failed on ranks [1] (their errors say why)" in got[0]["error"], got
    assert "holds verified chunks" not in got[0]["error"], "rank 0 copied its shard, which the job cannot use"
    assert got[0]["snapshot"] == "taken", "a failed restore that copied nothing leaves the state as it was"
    assert got[0]["elapsed"] < 20, got


def test_a_rank_whose_state_cannot_take_the_shard_stops_every_rank_at_once_and_none_trains_on(pair):
    # Not a SnapGuardError (torch's RuntimeError): rank 0 must hear of it at the next gather all the same, not wait
    # there for the collective's timeout; and both ranks' states hold chunks of the step now.
    pair("save")
    got = pair("unwritable")
    assert got[1]["error"].startswith("RestoreError: "), got
    assert "cannot restore step 1: RuntimeError: " in got[1]["error"], got
    assert "cannot restore step 1: it failed on ranks [1] (their errors say why)" in got[0]["error"], got
    for r in (0, 1):
        assert got[r]["elapsed"] < 20, got
        assert got[r]["snapshot"].startswith("RestoreError: "), got  # refused: the state is mixed


def test_a_state_one_rank_refuses_to_load_stops_every_rank(pair):
    # Rank 1's own object refuses the state: rank 0, whose objects took theirs, must not train on alone (it would
    # wait in the job's next collective), and both states are mixed.
    pair("save")
    got = pair("refused")
    assert got[1]["error"].startswith("RestoreError: "), got
    assert "cannot restore step 1: 's' refused it: LayoutError: the layout changed since the snapshot" \
        in got[1]["error"], got
    assert "cannot restore step 1: ranks [1] could not load it into their objects" in got[0]["error"], got
    assert "restored" not in got[0], got
    for r in (0, 1):
        assert "must not train on" in got[r]["error"] and got[r]["elapsed"] < 20, got


def test_ranks_on_nodes_whose_daemons_are_not_peers_are_refused_when_they_build_their_guards(pair):
    # Without it the job would train until the third snapshot, then wait gate_timeout_s for a slot (five minutes
    # by default) before it failed.
    got = pair("not-peers")
    for r in (0, 1):
        assert "built" not in got[r], got
        assert got[r]["error"].startswith("ConfigError: "), got
        assert "this job's ranks run on 2 nodes (n0: rank 0; n1: rank 1), and the daemons of n0, n1 are not peers" \
               " of every other node's daemon" in got[r]["error"], got
        assert "--peer-bind and the others as --peer NODE=ADDRESS, or with --rendezvous" in got[r]["error"], got
        assert got[r]["elapsed"] < 20, got
        assert got[r]["fds"][1] <= got[r]["fds"][0], f"a refused Guard left connections open: {got}"
    assert "This rank's daemon, of node n0, has no peers, so not n1." in got[0]["error"], got
    assert "This rank's daemon, of node n1, has no peers, so not n0." in got[1]["error"], got


def test_ranks_on_two_machines_that_name_the_same_node_are_refused_when_they_build_their_guards(pair):
    # Each machine's daemon would hear only of its own ranks, and the check above would see one node: without this
    # the job would train until the third snapshot, then wait gate_timeout_s for a slot.
    got = pair("same-name")
    for r in (0, 1):
        assert "built" not in got[r], got
        assert got[r]["error"].startswith("ConfigError: "), got
        assert ("this job's ranks on different machines name the same node (node n0: rank 0 and rank 1, each group"
                " on a machine of its own, by its kernel's boot id)") in got[r]["error"], got
        assert "give each machine's daemon and trainers a node name of their own" in got[r]["error"], got
        assert got[r]["elapsed"] < 20, got
        assert got[r]["fds"][1] <= got[r]["fds"][0], f"a refused Guard left connections open: {got}"
    # Ranks of one node name on one machine are not refused, though they use two daemons here: the "inventory-fails"
    # and "unfinished" phases below build their Guards that way.


def test_ranks_in_messages_are_runs():
    assert guard_module._spans([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert guard_module._spans([3]) == "3"


def test_a_rank_whose_daemon_cannot_list_its_snapshots_stops_every_rank_at_once(pair):
    pair("save")
    got = pair("inventory-fails")  # rank 1's daemon was SIGKILLed: its Inventory request fails
    # The connection closes when the daemon dies; on a loaded machine the request may go out before that is seen.
    assert got[1]["error"].startswith("DaemonUnavailable: ") and ("while Inventory waited" in got[1]["error"]
                                                                  or "did not answer Inventory" in got[1]["error"]), got
    assert "cannot restore: ranks [1] could not list their snapshots (their errors say why)" in got[0]["error"], got
    assert got[0]["elapsed"] < 20, got


def test_a_rank_whose_last_snapshot_failed_stops_every_rank_at_once(pair):
    pair("save")
    got = pair("unfinished")  # rank 1's restore re-raises the failure of its last snapshot
    assert got[1]["error"].startswith("SnapGuardError: ") and "snapshot of step 2 failed" in got[1]["error"], got
    assert ("cannot restore: ranks [1] stopped on a failure of their last snapshot (their errors say why)"
            in got[0]["error"]), got
    assert got[0]["elapsed"] < 20, got


def test_ranks_whose_restores_went_differently_take_the_same_branch(pair, daemon):
    # Round 1: rank 0 copies (corrupt) chunks of step 1, rank 1's daemon cannot give it step 1. Round 2: the daemons
    # drop every corrupt slot, so no rank holds anything; rank 1 must not start afresh while rank 0 stops.
    pair("save")
    for path in glob.glob(os.path.join(daemon.table_dir, "r*.data")):
        flip_bits(path, 0, 0x10)
    got = pair("open-fails")
    assert "error" in got[0] and "error" in got[1], got
    assert "every snapshot failed verification" in got[0]["error"], got
    assert "This rank's state holds verified chunks of step 1 now, so it must not train on" in got[0]["error"], got
    assert got[1]["error"].startswith("RestoreError: "), got
    assert "Ranks [0] hold chunks of the snapshot in their state now, so the job must not train on" in got[1]["error"]
    # a caller that catches the RestoreError and trains on cannot snapshot the mixed state as step 7
    for r in (0, 1):
        assert got[r]["snapshot"].startswith("RestoreError: "), got
        assert "refused: a failed restore left the state mixed" in got[r]["snapshot"], got
    assert 7 not in sum(daemon.held().values(), []), daemon.held()


def test_leaving_the_job_waits_for_every_rank_and_says_so_when_one_never_comes(pair):
    """(Every rank of every demo and example run leaves this way: the case where all come is tested there.)"""
    alone = pair("leave-alone")
    assert "left" not in alone[0] and alone[0]["elapsed"] < 30, alone
    assert alone[0]["error"].startswith("SnapGuardError: rank 0 waited 3 s for every rank to reach the end of the job:")
    assert "Ranks 1 failed to pass monitoredBarrier" in alone[0]["error"], alone  # gloo's: the rank that did not come
