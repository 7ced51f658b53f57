"""Starting daemons as real processes: shared by Guard's auto-start, the demo, the tests and the chaos harness;
choosing the TCP ports they and the demo's workers listen on; telling a daemon whether a trainer still runs;
and leaving a torch.distributed job so that its process exits cleanly."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

from snapguard.client import DaemonClient
from snapguard.config import Endpoint, ensure_private_dir
from snapguard.errors import DaemonUnavailable, SnapGuardError
from snapguard.protocol import MAX_WORLD_SIZE

_HANDED_OUT: set[int] = set()
_PORT_PICKS = random.Random()  # its own generator: a job's seeded `random` is left alone


def free_port() -> int:
    """A TCP port that is free now, that this process has not handed out before, and that lies outside the
    kernel's ephemeral range where it can. Each probe socket closes before the port is used, seconds later
    (a daemon, a worker's store after it has imported torch). Without the record, ports picked one after
    another could repeat (two daemons of one cluster given one port); in the ephemeral range, any outgoing
    connection on the machine (gloo's, ZeroMQ's) could take the port in between. Outside it, only an
    explicit bind can."""
    low, high = _ephemeral_range()
    spans = [r for r in (range(max(1024, low - 16384), low), range(high + 1, 65536)) if len(r)]
    for _ in range(100_000):
        if spans:
            port = _PORT_PICKS.choice(_PORT_PICKS.choices(spans, weights=[len(r) for r in spans])[0])
        else:
            port = 0  # no room outside the ephemeral range: the kernel picks
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise SnapGuardError(f"no free TCP port in 100000 tries (ephemeral range {low}-{high})")


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


class TrainerLock:
    """A file that a trainer holds locked for as long as it runs, named by a token it sends in its Hello: how its
    node's daemon tells whether it still runs. Not by its pid: a daemon in a container of its own (a sidecar)
    sees another PID namespace, where the trainer's pid is missing or belongs to another process. Both see the
    run dir (the socket is there), the lock works across namespaces, and the kernel drops it however the
    trainer dies. The file says the trainer's pid, rank and world size, for a daemon that starts while it runs
    (`trainer_of`)."""

    def __init__(self, ep: Endpoint, rank: int, world_size: int):
        ensure_private_dir(ep.run_dir)
        self.token = secrets.token_hex(8)
        self.path = ep.trainer_lock_path(self.token)
        # Locked before it is at its path: a daemon that finds it there unlocked removes it as a dead trainer's.
        fresh = f"{self.path}.new"
        self.fd: int | None = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        self.pid = os.getpid()
        os.pwrite(self.fd, f"{self.pid} {rank} {world_size}".encode(), 0)
        os.rename(fresh, self.path)
        _TRAINER_LOCK_FDS.add(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        if os.getpid() != self.pid:  # a forked child's copy: its fd was closed at the fork, the lock is the parent's
            self.fd = None
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        _TRAINER_LOCK_FDS.discard(self.fd)
        os.close(self.fd)
        self.fd = None


_TRAINER_LOCK_FDS: set[int] = set()


def _drop_trainer_locks_in_child() -> None:
    """A forked child (a DataLoader worker, say) shares its parent's locked file: closing its copy leaves the lock
    with the parent alone, so the lock goes when the trainer dies, not when its last child does."""
    for fd in _TRAINER_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _TRAINER_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_trainer_locks_in_child)


def trainer_runs(path: str) -> bool:
    """Whether the trainer whose `TrainerLock` is at `path` still runs. The file of one that died without
    releasing it is removed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return False
    finally:
        os.close(fd)


_TRAINER_TEXT = re.compile(rb"(\d{1,10}) (\d{1,8}) (\d{1,8})")


def trainer_of(path: str) -> tuple[int, int, int] | None:
    """(pid, rank, world size) of the running trainer whose `TrainerLock` is at `path`; None if it does not run (its
    file is then removed) or its file does not say them."""
    if not trainer_runs(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        m = _TRAINER_TEXT.fullmatch(os.read(fd, 64))
    finally:
        os.close(fd)
    if m is None:
        return None
    pid, rank, world = map(int, m.groups())
    return (pid, rank, world) if 0 <= rank < world <= MAX_WORLD_SIZE else None


def listens(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at `path`: a daemon that was SIGKILLed leaves its
    socket file behind, and a connection to it is refused at once (ZeroMQ would retry until the timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a full backlog, a timeout: something is there; the request says more
    return True


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what `snapguard` stops on, cleaning up first


@contextlib.contextmanager
def stop_signals_ignored():
    """Ignore STOP_SIGNALS while cleaning up (in the main thread, where handlers are set): a second Ctrl-C must not
    leave daemons and ranks behind."""
    main = threading.current_thread() is threading.main_thread()
    old = [signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS] if main else []
    try:
        yield
    finally:
        for s, handler in zip(STOP_SIGNALS, old):
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def other_jobs_on_node(ep: Endpoint) -> list[str]:
    """The job ids of the daemons other than `ep`'s that listen in its run dir for its node."""
    tail = f"@{ep.node}.sock"
    try:
        names = os.listdir(ep.run_dir)
    except OSError:
        return []
    return sorted(n[:-len(tail)] for n in names
                  if n.endswith(tail) and n[:-len(tail)] != ep.job and listens(os.path.join(ep.run_dir, n)))


def daemon_command(ep: Endpoint, shm_dir: str | None = None, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "snapguard.daemon", "--job", ep.job, "--node", ep.node, "--run-dir", ep.run_dir]
    if shm_dir:
        cmd += ["--shm-dir", shm_dir]
    return cmd + list(extra)


# snapguard-daemon's exit code when another daemon of its job and node already runs
ALREADY_RUNNING_EXIT = 3


def spawn_daemon(ep: Endpoint, shm_dir: str | None = None, extra: tuple[str, ...] | list[str] = (),
                 log_path: str | None = None, wait_s: float | None = 30.0, owned: bool = True) -> subprocess.Popen:
    """Start a daemon in a session of its own (it outlives its parent's process group); wait until it answers.

    With ``wait_s``: a daemon that exits first (bad flags, a rendezvous refused) is a SnapGuardError with its
    exit code and the last lines of its log, raised as soon as it exits; one that neither answers nor exits
    within ``wait_s`` is killed (its whole session) and reported as DaemonUnavailable. Without ``wait_s`` the
    process is returned at once and the caller owns it.

    ``owned=False``: a daemon started for a trainer, which must outlive it. One that exits because another
    daemon of its job and node runs (a rank beside this one started it first) is not an error: that daemon is
    waited for instead. One that does not answer in time is left running (re-adopting large slots takes a
    while), and so is one whose wait is interrupted.
    """
    ensure_private_dir(ep.run_dir)
    log_path = log_path or os.path.join(ep.run_dir, f"{ep.stem}.log")
    with open(log_path, "ab") as logf:
        log_start = logf.tell()  # the log is appended to: what this daemon writes starts here
        proc = subprocess.Popen(daemon_command(ep, shm_dir, extra), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True)
    if wait_s:
        try:
            _wait_answering(ep, proc, wait_s, log_path, log_start, owned)
        except BaseException:  # Ctrl-C, SIGTERM's exception: the caller never gets the process, so it goes here
            if owned:
                _kill_session(proc)
            raise
    return proc


def _wait_answering(ep: Endpoint, proc: subprocess.Popen, wait_s: float, log_path: str, log_start: int,
                    owned: bool = True) -> None:
    who = f"daemon {ep.job}/{ep.node} (pid {proc.pid})"
    deadline = time.monotonic() + wait_s
    c = DaemonClient(ep.address, who=f"waiting for daemon {ep.job}/{ep.node}")
    other = False  # it found another daemon of its job and node running, and left: wait for that one
    try:
        while True:
            if not other and proc.poll() is not None:
                if owned or proc.returncode != ALREADY_RUNNING_EXIT:
                    raise SnapGuardError(f"{who} exited with code {proc.returncode} before it answered on {ep.address};"
                                         f" its log {log_path} ends:\n{_log_tail(log_path, log_start)}")
                other = True
            try:
                c.wait_ready(max(0.05, min(0.5, deadline - time.monotonic())))
                return
            except DaemonUnavailable:
                if time.monotonic() < deadline or (not other and proc.poll() is not None):
                    continue
                if other:
                    raise DaemonUnavailable(f"{who} left because another daemon of job {ep.job} on node {ep.node}"
                                            f" runs, and that one did not answer on {ep.address} within {wait_s:g} s;"
                                            f" see {log_path}") from None
                if not owned:
                    raise DaemonUnavailable(f"{who} did not answer on {ep.address} within {wait_s:g} s; it is left"
                                            f" running (see {log_path})") from None
                _kill_session(proc)
                raise DaemonUnavailable(f"{who} did not answer on {ep.address} within {wait_s:g} s and was killed"
                                        f" (its process group, SIGKILL); see {log_path}") from None
    finally:
        c.close()


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and everything in its session's group; reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its pid is its process group's id
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # in uninterruptible sleep: nothing more to do from here
        pass


def _log_tail(path: str, start: int, lines: int = 5, max_bytes: int = 8192) -> str:
    """The last ``lines`` lines a process wrote to ``path`` since offset ``start``."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, os.path.getsize(path) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"  (cannot read it: {e})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  {line}" for line in tail) if tail else "  (nothing)"


def leave_process_group(timeout_s: float = 300.0) -> None:
    """Wait for every rank (gloo: at most `timeout_s`), destroy the default process group, and give gloo's worker
    threads the GIL.

    A gloo worker thread frees each collective's work once it is done, and freeing one can need the GIL (the
    work holds tensors and thread-local state that point at Python objects). When the main thread goes straight
    on to exit, the worker may still be waiting for the GIL as the interpreter finalizes; CPython then ends
    that thread with a forced unwind, which C++ turns into std::terminate ("terminate called without an active
    exception", SIGABRT) after all the work was done. Sleeping a moment releases the GIL to it."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.get_backend() == "gloo":  # else the backend's own timeout, which an error of its own names
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as e:
            raise SnapGuardError(f"rank {dist.get_rank()} waited {timeout_s:g} s for every rank to reach the end of the"
                                 f" job: {e}") from e
    else:
        dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.05)
