"""The snapshot daemon's serving loop: one ROUTER socket on an IPC path in a 0700 directory.

Every request is decoded and validated before it is acted on; a bad one gets an Error reply and
changes nothing, and the daemon keeps serving. The daemon holds a lock file for its lifetime, so a
second daemon for the same job and node refuses to start instead of stealing the socket.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time
from dataclasses import dataclass

import zmq

from snapguard import protocol as P
from snapguard.config import Endpoint, ensure_private_dir
from snapguard.errors import ProtocolError, SnapGuardError
from snapguard.layout import Manifest
from snapguard.shm import free_bytes

from snapguard.daemon.slots import SEALED, SlotTable

log = logging.getLogger(__name__)

ZMQ_MAX_MSG = 4 * P.MAX_HEADER_BYTES  # beyond this zmq drops the connection; below it we answer with an error


@dataclass(frozen=True)
class DaemonConfig:
    job: str
    node: str
    run_dir: str
    shm_dir: str = "/dev/shm"
    shm_limit: int | None = None  # bytes this daemon may allocate in shm_dir, on top of the free-space check
    slots_per_rank: int = 2
    remove_on_exit: bool = True

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.job, self.node, self.run_dir)


class AlreadyRunning(SnapGuardError):
    pass


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.who = f"[{cfg.job}/{cfg.node} daemon]"
        self.table = SlotTable(cfg.job, cfg.node, cfg.shm_dir, cfg.shm_limit, cfg.slots_per_rank)
        self._stop = False
        self._remove = cfg.remove_on_exit
        self._lock_fd = None
        self._sock = None
        self.started = time.time()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        ensure_private_dir(self.cfg.run_dir)
        ep = self.cfg.endpoint
        self._lock_fd = os.open(ep.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
                os.close(self._lock_fd)
                raise AlreadyRunning(f"{self.who} another daemon (pid {other or '?'}) already serves {ep.socket_path}")
            raise
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self.table.adopt()
        ctx = zmq.Context.instance()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MSG)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if os.path.exists(ep.socket_path):
            os.unlink(ep.socket_path)  # we hold the lock: whatever is there is a dead daemon's
        old = os.umask(0o077)
        try:
            self._sock.bind(ep.address)
        finally:
            os.umask(old)
        os.chmod(ep.socket_path, 0o600)
        log.info("%s serving on %s (shm %s, pid %d)", self.who, ep.socket_path, self.table.dir, os.getpid())

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            while not self._stop:
                if self._sock.poll(200):
                    self._handle(self._sock.recv_multipart())
        finally:
            self.close()

    def stop(self, remove: bool | None = None) -> None:
        if remove is not None:
            self._remove = remove
        self._stop = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=500)  # let the reply to Shutdown leave
            self._sock = None
            ep = self.cfg.endpoint
            if os.path.exists(ep.socket_path):
                os.unlink(ep.socket_path)
        if self._remove:
            self.table.remove_all()
            log.info("%s removed its shared memory", self.who)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- requests --------------------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        rid = frames[1] if len(frames) > 1 and len(frames[1]) == 8 else b"\0" * 8
        try:
            if len(frames) != 3 or len(frames[1]) != 8:
                raise ProtocolError(f"expected [request id (8 bytes), header], got {len(frames) - 1} frame(s)")
            msg = P.decode(frames[2])
            reply = self.dispatch(msg)
        except SnapGuardError as e:
            log.warning("%s refused a request: %s", self.who, e)
            reply = P.Error(type(e).__name__, str(e))
        except Exception as e:  # a bug must not take the daemon, and every trainer's snapshots, down
            log.exception("%s internal error", self.who)
            reply = P.Error("InternalError", f"{type(e).__name__}: {e}")
        self._sock.send_multipart([ident, rid, P.encode(reply)])

    def dispatch(self, msg: P.Message) -> P.Message:
        t = self.table
        if isinstance(msg, P.Ping):
            return P.Ok({"pid": os.getpid()})
        if isinstance(msg, P.Status):
            return self.status()
        if isinstance(msg, P.Shutdown):
            self.stop(remove=msg.remove)
            return P.Ok()
        self._check_job(msg.job)
        if isinstance(msg, P.Hello):
            t.note_world(msg.world_size)
            return P.Welcome(self.cfg.node, os.getpid(), t.dir)
        if isinstance(msg, P.Reserve):
            t.note_world(msg.world_size)
            slots = t.reserve(msg.rank, msg.nbytes)
            return P.Ok({"slots": [[s.path, s.capacity] for s in slots]})
        if isinstance(msg, P.Begin):
            t.note_world(msg.world_size)
            d = t.begin(msg.rank, msg.step, msg.nbytes)
            if d.action == "grant":
                s = t.ranks[msg.rank][d.slot]
                return P.Granted(d.slot, s.path, s.capacity)
            if d.action == "wait":
                return P.Wait(d.need, t.common())
            return P.Error("BadStep", f"rank {msg.rank}: {d.reason}")
        if isinstance(msg, P.Seal):
            man = Manifest.from_wire(msg.manifest)
            t.seal(msg.rank, msg.step, msg.slot, man)
            return P.Sealed(msg.step, t.common())
        if isinstance(msg, P.Inventory):
            steps, dropped = t.verified_steps(msg.rank)
            return P.Steps(steps, dropped)
        if isinstance(msg, P.Open):
            s = t.open(msg.rank, msg.step)
            return P.Shard(s.path, s.manifest.to_wire())
        if isinstance(msg, P.Drop):
            t.drop(msg.rank, msg.keep_upto)
            return P.Ok()
        raise ProtocolError(f"{msg.TYPE} is not a request this daemon serves")

    def _check_job(self, job: str) -> None:
        if job != self.cfg.job:
            raise ProtocolError(f"this daemon serves job {self.cfg.job!r}, not {job!r}")

    def status(self) -> P.StatusReport:
        now = time.time()
        ranks = []
        for r, slots in sorted(self.table.ranks.items()):
            ranks.append({
                "rank": r,
                "slots": [{"slot": s.index, "state": s.state, "step": s.step, "capacity": s.capacity,
                           "nbytes": s.manifest.nbytes if s.manifest else 0,
                           "age_s": round(now - s.sealed_at, 3) if s.state == SEALED else -1.0}
                          for s in slots],
            })
        return P.StatusReport(self.cfg.node, self.cfg.job, os.getpid(), self.table.dir, self.table.used_bytes(),
                              free_bytes(self.cfg.shm_dir), ranks, self.table.common())
