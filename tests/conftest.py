"""Fixtures for tests that run the real thing: daemon subprocesses, shared memory, ZeroMQ, torchrun.

Every test gets its own job id, its own 0700 run directory (short, under /tmp: an IPC socket path
must fit in 107 bytes) and its own directory under /dev/shm, all removed at teardown, so tests can
run beside other people's tests and benchmarks on the same machine. Every process a test starts is
killed at teardown by its own pid (or process group), never by name.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint, slot_dir_name
from snapguard.faults import ENV_FAULTS, fault_point
from snapguard.procs import spawn_daemon

# The test process itself must never take a fault: fault points read SNAPGUARD_FAULTS once per
# process, so read it now, empty. Faults are handed to child processes through their environment.
os.environ.pop(ENV_FAULTS, None)
fault_point("tests.never")

SHM_ROOT = "/dev/shm"
_ids = itertools.count()


def unique_id(tag: str) -> str:
    """A job id no other test, run or person on this machine uses."""
    return f"t{os.getpid()}-{tag}-{next(_ids)}"[:64]


def wait_until(cond: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02) -> object:
    """Poll `cond` until it returns something true; fail the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def stop_with_sigterm(proc: subprocess.Popen, kids: list, timeout_s: float = 90, repeat: int = 1) -> str:
    """SIGTERM a `snapguard` command started in a session of its own, with its output piped (`repeat` times, 20 ms
    apart): it must exit as stopped by SIGTERM, and every process of `kids` (psutil processes it had started) must
    be gone. Its output."""
    import psutil

    try:
        for i in range(repeat):
            proc.send_signal(signal.SIGTERM)
            if i + 1 < repeat:
                time.sleep(0.02)
        out = proc.communicate(timeout=timeout_s)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "snapguard: stopped by SIGTERM; the processes it had started are stopped" in out, out[-3000:]
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, f"left running: {alive}"
    return out


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SNAPGUARD_* setting from the outside world leaks into a test or the processes it starts."""
    for k in list(os.environ):
        if k.startswith("SNAPGUARD_"):
            monkeypatch.delenv(k)


@dataclass
class Node:
    """One node's daemon for one job: its directories, its process, and ways to talk to it."""

    job: str
    node: str
    run_dir: str
    shm_dir: str
    proc: subprocess.Popen | None = None
    _clients: list = field(default_factory=list)

    @property
    def ep(self) -> Endpoint:
        return Endpoint(self.job, self.node, self.run_dir)

    @property
    def table_dir(self) -> str:
        """Where the daemon keeps this job's slot files."""
        return os.path.join(self.shm_dir, slot_dir_name(self.job, self.node))

    @property
    def log_path(self) -> str:
        return os.path.join(self.run_dir, f"{self.ep.stem}.log")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    @property
    def env(self) -> dict[str, str]:
        """Environment that points trainers (Guard) at this daemon."""
        return {"SNAPGUARD_JOB": self.job, "SNAPGUARD_NODE": self.node, "SNAPGUARD_RUN_DIR": self.run_dir}

    def start(self, extra: list[str] | tuple[str, ...] = (), faults: str | None = None,
              shm_dir: str | None = None, wait_s: float = 30.0) -> subprocess.Popen:
        """Spawn `snapguard-daemon` and wait until it answers; `faults` goes into its SNAPGUARD_FAULTS only."""
        assert self.proc is None or self.proc.poll() is not None, "a daemon of this node is still running"
        saved = os.environ.get(ENV_FAULTS)
        if faults:
            os.environ[ENV_FAULTS] = faults
        try:
            self.proc = spawn_daemon(self.ep, shm_dir or self.shm_dir, list(extra), wait_s=wait_s)
        finally:
            if saved is None:
                os.environ.pop(ENV_FAULTS, None)
            else:
                os.environ[ENV_FAULTS] = saved
        return self.proc

    def kill(self) -> int:
        """SIGKILL the daemon (as an OOM kill or a crash would) and reap it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def client(self, timeout_s: float = 10.0) -> DaemonClient:
        c = DaemonClient(self.ep.address, timeout_s=timeout_s, who=f"test {self.job}")
        self._clients.append(c)
        return c

    def request(self, msg: P.Message, timeout_s: float = 10.0) -> P.Message:
        if not self._clients:
            self.client()
        return self._clients[0].request(msg, timeout_s=timeout_s)

    def status(self) -> P.StatusReport:
        st = self.request(P.Status())
        assert isinstance(st, P.StatusReport)
        return st

    def held(self) -> dict[int, list[int]]:
        """Sealed steps per rank, as the daemon reports them."""
        return {r["rank"]: sorted(s["step"] for s in r["slots"] if s["state"] == "sealed")
                for r in self.status().ranks}

    def slot_file(self, rank: int, step: int) -> str:
        """The data file of `rank`'s sealed slot holding `step`."""
        for r in self.status().ranks:
            if r["rank"] == rank:
                for s in r["slots"]:
                    if s["state"] == "sealed" and s["step"] == step:
                        return os.path.join(self.table_dir, f"r{rank:05d}.s{s['slot']}.data")
        raise AssertionError(f"rank {rank} holds no sealed step {step}: {self.held()}")

    def guard(self, model, optimizer, extra=None, **kw):
        """A Guard in this (test) process, as rank 0 of a one-rank job, talking to this daemon."""
        import snapguard

        kw.setdefault("timeout_s", 10.0)
        kw.setdefault("rank", 0)
        kw.setdefault("world_size", 1)
        return snapguard.Guard(model, optimizer, extra, job=self.job, node=self.node, run_dir=self.run_dir, **kw)

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def flip_bits(path: str, offset: int, mask: int) -> None:
    """Corrupt a file in place, as a bad DIMM or a stray write would: XOR the byte at `offset` with `mask`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def make_dirs(tag: str) -> tuple[str, str]:
    run_dir = tempfile.mkdtemp(prefix=f"sg-{tag}-", dir="/tmp")
    shm_dir = tempfile.mkdtemp(prefix=f"sgtest-{os.getpid()}-", dir=SHM_ROOT)
    return run_dir, shm_dir


@pytest.fixture
def node(request: pytest.FixtureRequest):
    """A node whose daemon is not started yet (call `node.start(...)`); everything is removed at teardown."""
    run_dir, shm_dir = make_dirs("n")
    n = Node(unique_id(request.node.name.split("[")[0][-20:].strip("_")), "n0", run_dir, shm_dir)
    yield n
    n.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture
def daemon(node: Node) -> Node:
    """A running daemon with its own job, run dir and shm dir."""
    node.start()
    return node


# ---- torchrun jobs -----------------------------------------------------------------------------

def worker_pids(out: str, nproc: int) -> dict[int, tuple[int, int]]:
    """rank -> (pid, attempt) from the pid files the demo worker writes."""
    got = {}
    for r in range(nproc):
        try:
            with open(os.path.join(out, f"pid.r{r}")) as f:
                pid, attempt = f.read().split()
            got[r] = (int(pid), int(attempt))
        except (OSError, ValueError):
            pass
    return got


def is_worker_of(pid: int, out: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return out.encode() in f.read()
    except OSError:
        return False


class Jobs:
    """The torchrun jobs a test launched; at teardown every one still running is stopped, workers included."""

    def __init__(self):
        self.running: list[tuple[subprocess.Popen, str, int]] = []

    def launch(self, spec) -> subprocess.Popen:
        from snapguard.demo import launch

        proc = launch(spec)
        self.running.append((proc, spec.out, spec.nproc))
        return proc

    def finish(self, proc: subprocess.Popen, out: str, timeout_s: float = 240.0) -> int:
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(proc, out, 4)
            pytest.fail(f"torchrun job {out} did not finish within {timeout_s:.0f} s; see {out}/launcher.log")

    def stop(self, proc: subprocess.Popen, out: str, nproc: int) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)
        # workers run in sessions of their own: kill any left behind, by the pids they wrote
        for pid, _ in worker_pids(out, nproc).values():
            if is_worker_of(pid, out):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

    def close(self) -> None:
        for proc, out, nproc in self.running:
            self.stop(proc, out, nproc)


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.close()
