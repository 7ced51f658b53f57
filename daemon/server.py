"""The snapshot daemon's serving loop: one ROUTER socket on an IPC path in a 0700 directory.

Every request is decoded and validated before it is acted on; a bad one gets an Error reply and
changes nothing, and the daemon keeps serving. The daemon holds a lock file for its lifetime, so a
second daemon for the same job and node refuses to start instead of stealing the socket.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import psutil
import zmq

from snapguard import protocol as P
from snapguard.config import Endpoint, daemon_who, ensure_private_dir
from snapguard.errors import ChecksumError, ProtocolError, RestoreError, SnapGuardError, UnrecoverableError
from snapguard.faults import fault_point
from snapguard.layout import Manifest, default_hash_threads
from snapguard.procs import trainer_of, trainer_runs
from snapguard.shm import IN_MEMORY, filesystem_type, free_bytes

from snapguard.daemon.peers import AuthError as PeerAuthError
from snapguard.daemon.peers import PeerNet, recv_frames
from snapguard.daemon.persist import Persister, Reading
from snapguard.daemon.protect import KEEP_COMPLETE_BYTES, OutgoingPiece, OutgoingStep, Protector, Rebuild
from snapguard.daemon.slots import ALLOCATING, SEALED, WRITING, SlotTable

log = logging.getLogger(__name__)

CHUNKS_READ_AHEAD = 4  # pieces of chunks read out of ZeroMQ ahead of handling them, to reach the small messages behind
PIECES_PER_TURN = 4  # pieces of chunks handed to ZeroMQ per holder per turn of the loop
ZMQ_MAX_MSG = 4 * P.MAX_HEADER_BYTES  # beyond this zmq drops the connection; below it we answer with an error
_READ_STOP_S = 30.0  # how long a read of a persisted step may take to stop at its next piece (`persist.Reading`)


@dataclass(frozen=True)
class DaemonConfig:
    job: str
    node: str
    run_dir: str
    shm_dir: str = "/dev/shm"
    shm_limit: int | None = None  # bytes this daemon may allocate in shm_dir, on top of the free-space check
    slots_per_rank: int | None = None  # default: 2, or 3 with erasure coding (see `slots_for`)
    remove_on_exit: bool = True
    hash_threads: int | None = None  # threads that verify a sealed shard (default: `default_hash_threads()`)
    # erasure coding across nodes (all empty: this node stands alone)
    peer_bind: str | None = None  # e.g. tcp://10.0.0.5:7100
    peers: tuple[tuple[str, str], ...] = ()  # (node, address) of every other daemon of the job
    ec_group: tuple[str, ...] = ()  # the EC group this node belongs to, in the same order on every member
    ec_m: int = 1
    ec_keep_bytes: int = KEEP_COMPLETE_BYTES  # complete parity kept above the protected step (`Protector.prune`)
    secret: bytes = b""
    peer_timeout_s: float = 10.0
    heartbeat_s: float = 1.0
    # background persistence to disk (`daemon.persist`): off without a directory
    persist_dir: str | None = None
    persist_every: int = 100  # steps: the first step each rank seals in every interval of this many is written
    persist_keep: int = 2  # persisted steps kept per rank

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.job, self.node, self.run_dir)


def slots_for(cfg: DaemonConfig) -> int:
    """Slots per rank. Alone, two: the newest step all ranks hold, and one to write. With erasure coding a
    rank must also keep the group's newest protected step, which a lost node is rebuilt to, until a newer
    one is protected: with two slots, a rank whose protection falls behind would wait for it. A third
    slot lets the rank overwrite the step still being protected instead (protection then skips to the
    newest), so training never waits for parity."""
    if cfg.slots_per_rank is not None:
        return cfg.slots_per_rank
    return 3 if cfg.peer_bind else 2


def own_memory() -> int:
    """This process's resident memory that is its own: neither the slots it maps (shared memory) nor files it maps
    (its code), so what erasure coding holds (parity, chunks on their way) and the interpreter's heap."""
    m = psutil.Process().memory_info()
    return m.rss - m.shared


class _SendJob:
    """The pieces of one step's chunks on their way to the parity holders, handed to ZeroMQ in the order
    `OutgoingStep` gives them to each holder."""

    def __init__(self, out: OutgoingStep, now: float):
        self.out, self.step, self.started, self.progress = out, out.step, now, now
        self.todo = [h for h in out.cursor if out.wants(h)]
        self.trackers: list[tuple[str, OutgoingPiece, zmq.MessageTracker]] = []  # copies ZeroMQ may still send
        self.total = out.total
        self.bytes = 0

    def pump(self, net: PeerNet, budget: int, now: float) -> bool:
        """Read up to `budget` pieces ahead and hand up to `budget` pieces per holder to ZeroMQ; True once every
        piece has left."""
        self.out.read_some(budget)
        for dest in list(self.todo):
            for _ in range(budget):
                piece = self.out.next_for(dest)
                if piece is None:
                    if not self.out.wants(dest):
                        self.todo.remove(dest)
                    break
                tracker = net.send_tracked(dest, P.PeerChunk(**net.header(dest, bulk=True), **piece.fields), piece.data)
                if tracker is None:  # the holder's queue is full: it is slow, or gone
                    break
                self.out.handed(dest)
                self.trackers.append((dest, piece, tracker))
                self.bytes += piece.length
                self.progress = now
        waiting = []
        for dest, piece, tracker in self.trackers:
            if tracker.done:
                self.out.left(piece, dest)
                self.progress = now
            else:
                waiting.append((dest, piece, tracker))
        self.trackers = waiting
        return self.out.done

    def slow(self) -> list[str]:
        """The holders the step waits for: the others wait for them only because the window waits."""
        return self.out.holding_back()


class _Trainer(NamedTuple):
    """A trainer as its Hello described it: `lock` names the file it holds while it runs (`procs.TrainerLock`)."""
    pid: int
    world_size: int
    lock: str


class AlreadyRunning(SnapGuardError):
    pass


class NodeLock:
    """The lock file that allows one daemon per job and node, held until the daemon exits. snapguard-daemon takes
    it before it meets the job's other daemons, so a second daemon of the node never joins the rendezvous."""

    def __init__(self, ep: Endpoint):
        who = daemon_who(ep.job, ep.node)
        ensure_private_dir(ep.run_dir)
        self.path = ep.lock_path
        for _ in range(10):  # bounded: each retry means a daemon of this job and node exited just then
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise AlreadyRunning(f"{who} another daemon (pid {other or '?'}) already serves {ep.socket_path}")
                os.close(fd)
                raise
            # A daemon unlinks its lock file as it exits, still holding the lock: if we opened that file just
            # before, our lock is on a file the next starter never sees. Keep it only if it is still at the path.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise SnapGuardError(f"{who} could not lock {self.path}: it was replaced 10 times in a row")
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # still holding the lock: no other daemon owns this file
        os.close(self.fd)
        self.fd = None


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.who = daemon_who(cfg.job, cfg.node)
        self.table = SlotTable(cfg.job, cfg.node, cfg.shm_dir, cfg.shm_limit, slots_for(cfg),
                               cfg.hash_threads or default_hash_threads())
        self._stop = False
        self._remove = cfg.remove_on_exit
        self._lock: NodeLock | None = None
        self._slots_fd: int | None = None  # the slot directory, locked (`_lock_slots`)
        self._sock = None
        self.started = time.time()
        self.net: PeerNet | None = None
        self.protector: Protector | None = None
        self._stocks_cache: tuple[float, dict] = (0.0, {})
        self._last_beat = 0.0
        self._held_due = False
        self._job: _SendJob | None = None  # the chunks on their way to parity holders
        self._protect_after = 0.0  # after a failure, protection pauses until then
        self._sent_at = 0.0  # when the chunks of protector.sent_step last left, all of them
        self._chunks: collections.deque = collections.deque()  # peer messages with bulk frames, read, not handled
        self.rejected: list[str] = []
        self._rejected_count = 0
        self._warned_alone = False
        self._trainers: dict[int, _Trainer] = {}  # rank -> its trainer, from its Hello
        self.persister: Persister | None = None
        self._reads: dict[int, Reading] = {}  # rank -> its persisted step being read from disk into a slot
        self._rebuilding: Rebuild | None = None  # this node's shards of a step being rebuilt from the peers
        self._load_failed: dict[tuple[int, int], BaseException] = {}  # (rank, step) -> why its read or rebuild failed

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, lock: NodeLock | None = None) -> None:
        """Take the node's lock (or the one given: taken before a rendezvous), re-adopt the sealed slots, bind."""
        ep = self.cfg.endpoint
        self._lock = lock or NodeLock(ep)
        self._lock_slots()
        self.table.adopt()  # creates the directory: a --shm-dir it cannot use fails here, with no word of its type
        kind = filesystem_type(self.table.dir)
        if kind and kind not in IN_MEMORY:
            log.warning("%s %s is on a file system of type %s, not in memory (tmpfs): its slots are files the kernel"
                        " writes back to disk, so every snapshot also costs disk bandwidth. Use /dev/shm (in Docker, with"
                        " a larger --shm-size) or another tmpfs", self.who, self.cfg.shm_dir, kind)
        self._recall_trainers()
        if self.cfg.persist_dir:
            self.persister = Persister(self.cfg.persist_dir, self.cfg.job, self.cfg.persist_every,
                                       self.cfg.persist_keep, self.who)
            self.table.pinned = self.persister.pending  # a slot being written to disk is not reused meanwhile
            log.info("%s persists one step in every %d of each rank to %s (keeping %d)", self.who,
                     self.cfg.persist_every, self.persister.dir, self.cfg.persist_keep)
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
        if self.cfg.peer_bind:
            peers = dict(self.cfg.peers)
            group = list(self.cfg.ec_group) or sorted([self.cfg.node, *peers])
            missing = [n for n in group if n != self.cfg.node and n not in peers]
            if missing:
                raise SnapGuardError(f"{self.who} EC group members {missing} have no peer address")
            self.net = PeerNet(self.cfg.job, self.cfg.node, self.cfg.secret, self.cfg.peer_bind, peers)
            self.protector = Protector(self.table, group, self.cfg.node, self.cfg.ec_m,
                                       keep_bytes=self.cfg.ec_keep_bytes)
            log.info("%s erasure coding in group %s with m=%d, listening for peers on %s; %d slots per rank",
                     self.who, group, self.cfg.ec_m, self.cfg.peer_bind, self.table.slots_per_rank)
            if self.table.slots_per_rank < 3:
                log.warning("%s with %d slots per rank, a rank waits whenever protection falls a step behind;"
                            " 3 slots (the default with erasure coding) never make training wait for it", self.who,
                            self.table.slots_per_rank)
        log.info("%s serving on %s (shm %s, pid %d)", self.who, ep.socket_path, self.table.dir, os.getpid())

    def _sweep_trainer_locks(self) -> None:
        """Remove the lock files of this job's trainers on this node that died holding them (`procs.TrainerLock`)."""
        for path in self.cfg.endpoint.trainer_locks().values():
            trainer_runs(path)

    def _recall_trainers(self) -> None:
        """Take the trainers of this job on this node that run as this daemon starts (an earlier one served them) as
        if they had said Hello, from their lock files, so that the job's world size stays guarded; remove the files
        of those that died."""
        found = []
        for token, path in self.cfg.endpoint.trainer_locks().items():
            t = trainer_of(path) if P.LOCK_TOKEN.fullmatch(token) else None
            if t is not None:
                with contextlib.suppress(FileNotFoundError):  # gone if the trainer exited since
                    found.append((os.stat(path).st_mtime_ns, token, t))
        for _, token, (pid, rank, world) in sorted(found):
            self._trainers[rank] = _Trainer(pid, world, token)
            self.table.note_world(world, rank)
            log.info("%s rank %d's trainer (pid %d, world size %d) runs: it holds its lock file", self.who, rank, pid,
                     world)

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            if self.net is not None:
                poller.register(self.net.router, zmq.POLLIN)
            while not self._stop:
                awaited = self.net.awaited() if self._rebuilding is not None else []  # replies to the rebuild's fetches
                for s in awaited:
                    poller.register(s, zmq.POLLIN)
                busy = self._job or self._persisting() or self._rebuilding or self._reads
                events = dict(poller.poll(0 if self._chunks else 10 if busy else 200))
                for s in awaited:
                    poller.unregister(s)
                self.table.settle_growth()  # slots grown in the background are free to use
                if self.persister is not None:
                    self.persister.drain()  # unpins the slots written to disk
                if self._reads:
                    self._settle_reads()  # a finished read's slot is sealed now, not at its rank's next Open
                if self._sock in events:
                    self._handle(self._sock.recv_multipart())
                if self.net is not None:
                    if self._held_due:  # a rank sealed: the other nodes' ranks may reuse a slot once they know
                        self._held_due = False
                        self._broadcast_held()
                    if self._rebuilding is not None:
                        self._pump_rebuild()
                    try:
                        if time.monotonic() >= self._protect_after:
                            self._protect()
                    except Exception:  # tried again a second later; the daemon keeps serving
                        log.exception("%s could not send chunks to their parity holders", self.who)
                        self._job, self._protect_after = None, time.monotonic() + 1.0
                    if self.net.router in events or self._chunks:
                        self._read_peers()
                    if time.monotonic() - self._last_beat > self.cfg.heartbeat_s:
                        self._broadcast_held()
        except BaseException:
            # Only a clean shutdown may delete the slots: after a crash they are what a restarted daemon re-adopts.
            self._remove = False
            log.critical("%s stops on an unexpected error; its sealed slots stay in %s for the next daemon to"
                         " re-adopt", self.who, self.table.dir)
            raise
        finally:
            self.close()

    def stop(self, remove: bool | None = None) -> None:
        if remove is not None:
            self._remove = remove
        self._stop = True

    def close(self) -> None:
        for r in self._reads.values():
            r.stop(5.0)  # its slot is not sealed: a daemon that re-adopts the slots ignores it
        self._reads.clear()
        if self._rebuilding is not None:
            self._rebuilding.cancel(self.net)  # its decoding thread writes into slots that are about to go
            self._rebuilding = None
        self.table.stop_growing()  # before the files go
        if self.persister is not None:
            self.persister.close()
            self.persister = None
        if self.net is not None:
            self.net.close()
            self.net = None
        if self._sock is not None:
            self._sock.close(linger=500)  # let the reply to Shutdown leave
            self._sock = None
            ep = self.cfg.endpoint
            if os.path.exists(ep.socket_path):
                os.unlink(ep.socket_path)
            self._sweep_trainer_locks()
        if self._remove:
            self.table.remove_all()
            log.info("%s removed its shared memory", self.who)
        if self._slots_fd is not None:
            os.close(self._slots_fd)
            self._slots_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _lock_slots(self) -> None:
        """Lock the slot directory itself (a flock on the directory, no file in it), so that a daemon of this job and
        node started with another --run-dir, whose lock file is elsewhere, does not adopt, hand out and remove the
        slots this one serves."""
        ensure_private_dir(self.table.dir)
        fd = os.open(self.table.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(f"{self.who} another daemon already serves this job's slots in {self.table.dir}"
                                     f" (with a --run-dir other than {self.cfg.run_dir})") from None
            raise
        self._slots_fd = fd

    def abandon(self) -> None:
        """Undo a start() that failed after taking the lock: close the sockets, remove the socket and lock files.
        The slots stay (sealed ones are an earlier daemon's, for the next one to re-adopt); an empty slot
        directory goes."""
        self._remove = False
        held = self._slots_fd is not None  # not when another daemon holds the directory, however empty
        self.close()
        if held:
            with contextlib.suppress(OSError):
                os.rmdir(self.table.dir)  # only if empty

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
            reply = P.Error(type(e).__name__, str(e))  # cut short if the request made it long
            log.warning("%s refused a request: %s", self.who, reply.message)
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
        if not isinstance(getattr(msg, "job", None), str):  # a reply type (Ok, Granted, ...) sent as a request
            raise ProtocolError(f"{msg.TYPE} is not a request this daemon serves")
        self._check_job(msg.job)
        if isinstance(msg, P.Hello):
            self._note_world(msg)
            return P.Welcome(self.cfg.node, os.getpid(), t.dir, sorted(n for n, _ in self.cfg.peers))
        if isinstance(msg, P.Reserve):
            self._note_world(msg)
            # a free slot that grows gets a new file: read out first, once as a growth starts, not on each poll
            done, total = t.reserve(msg.rank, msg.nbytes, before_growing=self._read_out)
            if total:
                return P.Allocating(done, total)
            return P.Ok({"slots": [[s.path, s.capacity] for s in t.ranks[msg.rank]]})
        if isinstance(msg, P.Begin):
            self._note_world(msg)
            d, _ = t.plan(msg.rank, msg.step)
            if d.action == "error":  # refused before it stops anything: stopping a read or a rebuild cannot undo it
                return P.Error("BadStep", f"rank {msg.rank}: {d.reason}")
            self._stop_reads(msg.rank)  # a trainer that snapshots no longer waits for a restore
            self._stop_rebuild(msg.rank)
            if self._job is not None:
                _, slot = t.plan(msg.rank, msg.step)
                if any(slot is s for s in self._job.out.slots):
                    self._read_out()  # the trainer overwrites this slot next
            d = t.begin(msg.rank, msg.step, msg.nbytes)
            if d.action == "grant":
                s = t.ranks[msg.rank][d.slot]
                return P.Granted(d.slot, s.path, s.capacity)
            if d.action == "wait":
                if self.net is None and not self._warned_alone:
                    held = t.held()  # the first ranks it never heard of, found without a set of the whole world
                    unknown = list(itertools.islice((r for r in range(msg.world_size) if r not in held), 9))
                    if unknown:
                        self._warned_alone = True
                        log.warning("%s rank %d waits for ranks %s%s to seal step %d, which this daemon does not serve"
                                    " and, without peers, never hears of: a job spanning several nodes needs its daemons"
                                    " to be peers (--peer-bind with --peer or --rendezvous)", self.who, msg.rank,
                                    unknown[:8], "..." if len(unknown) > 8 else "", d.need)
                log.debug("%s rank %d waits to write step %d: slots %s, all ranks hold %d, protected %d", self.who,
                          msg.rank, msg.step, [(x.state, x.step) for x in t.ranks[msg.rank]], t.common(), t.protected)
                return P.Wait(d.need, t.common(), d.disk)
            return P.Error("BadStep", f"rank {msg.rank}: {d.reason}")
        if isinstance(msg, P.Seal):
            man = Manifest.from_wire(msg.manifest)
            if man.world_size != t.world_size:  # the table would take it as the job's
                raise ProtocolError(f"rank {msg.rank}: the manifest of step {msg.step} says world_size {man.world_size},"
                                    f" the job's is {t.world_size}")
            slot = t.seal(msg.rank, msg.step, msg.slot, man)
            if self.persister is not None and self.persister.due(msg.rank, msg.step, man.world_size):
                self.persister.submit(msg.rank, msg.step, slot.path, man)
            self._retire_old_world()
            self._held_due = True  # told to the peers after the reply: a seal never waits for that
            return P.Sealed(msg.step, t.common())
        if isinstance(msg, P.Inventory):
            if msg.recheck:
                steps, dropped = t.verified_steps(msg.rank)
            else:
                steps, dropped = t.sealed_steps(msg.rank), []
            on_disk = self.persister.steps(msg.rank, t.world_size) if self.persister is not None else []
            if self.protector is not None:
                stocks = self._stocks()
                rebuild = self.protector.rebuildable(stocks)
                steps = sorted(set(steps) | {s for s, blob in rebuild.items()
                                             if [msg.rank, t.world_size] in [[r[0], r[2].get("world_size")] for r in blob["ranks"]]})
                if not steps and not on_disk:
                    why = self.protector.explain_loss(stocks)
                    if why:
                        dropped = [*dropped, why]
            persisted = sorted(set(on_disk) - set(steps))
            old = t.old_world() or (self.persister.other_world(msg.rank, t.world_size) if self.persister else None)
            return P.Steps(sorted({*steps, *persisted}), dropped, list(old or ()), persisted)
        if isinstance(msg, P.Open):
            self._settle_reads()
            if msg.step not in t.sealed_steps(msg.rank):
                failed = self._load_failed.pop((msg.rank, msg.step), None)
                if failed is not None:
                    raise failed
                loading = self._loading(msg.rank)
                if loading is not None and loading.step == msg.step:
                    return loading
                self._stop_reads(msg.rank)  # of a step the ranks no longer restore
                self._stop_rebuild(msg.rank)
                on_disk = self.persister is not None and msg.step in self.persister.steps(msg.rank, t.world_size)
                if self.protector is not None and (not on_disk or msg.step in self.protector.rebuildable(self._stocks())):
                    self._stop_reads()  # a rebuild writes the slots of every rank here
                    return self._start_rebuild(msg.step)
                if on_disk:
                    return self._start_read(msg.rank, msg.step)
            man = t.sealed_manifest(msg.rank, msg.step)
            if man is not None and man.world_size != t.world_size:
                # Refused before anything changes: opening forgets the rank's newer steps and rewinds the parity.
                raise RestoreError(f"rank {msg.rank}: step {msg.step} was taken by a job of {man.world_size} ranks,"
                                    f" this job has {t.world_size}; snapguard restores only into the world size"
                                    " that took the snapshot")
            # Opening frees the rank's other slots: a read or a rebuild of another step must not write into one after
            self._stop_reads(msg.rank)
            if self._rebuilding is not None and self._rebuilding.step != msg.step:
                self._stop_rebuild(msg.rank)
            s = t.open(msg.rank, msg.step)
            if self.persister is not None:
                self.persister.rewind(msg.rank, msg.step, t.world_size)
            self._rewind(msg.step, msg.epoch)
            self._broadcast_held()
            return P.Shard(s.path, s.manifest.to_wire())
        if isinstance(msg, P.Drop):
            self._stop_reads(msg.rank)
            self._stop_rebuild(msg.rank)
            t.drop(msg.rank, msg.keep_upto)
            if self.persister is not None:
                self.persister.rewind(msg.rank, msg.keep_upto, t.world_size)
            self._rewind(msg.keep_upto, msg.epoch)
            self._broadcast_held()
            return P.Ok()
        raise ProtocolError(f"{msg.TYPE} is not a request this daemon serves")

    # ---- erasure coding -------------------------------------------------------------------------

    def _protect(self) -> None:
        """Called on every turn of the loop: send the chunks of the step to protect next to their parity holders.

        One step's chunks are on their way at a time, in pieces (`protect.PIECE`), a few per turn of the loop, as
        fast as the holders take them, so that neither this loop nor a holder's is ever busy with one for long. A
        window of pieces is out of the slots at once, each read once into a reused buffer that ZeroMQ sends in
        place to every holder (`protect.OutgoingStep`): the slowest holder paces the others. The next
        step goes out once ZeroMQ is done with them. If protection falls behind the seals, steps in between are
        skipped (`Protector.choose_step`), and a trainer that needs the slot of a step still being sent
        overwrites it (a third slot per rank): training never waits for parity. The chunks of a step that stays
        unprotected are sent again now and then: one lost on the way (a restarted holder, a dropped connection)
        would otherwise leave the step unprotected for good."""
        p, now = self.protector, time.monotonic()
        job = self._job
        if job is not None:
            if job.pump(self.net, PIECES_PER_TURN, now):
                self._job = None
                self._sent_at = now
                log.debug("%s sent %d bytes of step %d to parity holders in %.3f s", self.who, job.bytes, job.step,
                          now - job.started)
            elif now - job.progress > self.cfg.peer_timeout_s:
                slow = job.slow()
                log.warning("%s parity holders %s took no chunk of step %d for %.0f s: dropping what is queued for"
                            " them", self.who, ", ".join(slow), job.step, self.cfg.peer_timeout_s)
                for n in slow:
                    self.net.forget(n)  # discards the queue; ZeroMQ lets go of their pieces in its own time
                self._job = None
                self._sent_at = now
            else:
                return
        if self._rebuilding is not None:
            return  # it writes slots: no step is read out of them until it is done
        step = p.choose_step(now, fresh_s=self.cfg.peer_timeout_s)
        resend = False
        if step is None:
            # nothing newer to send: send the last step again if it stays unprotected while still held
            if (p.sent_step < 0 or self.table.protected >= p.sent_step or p.sent_step not in p.full_steps()
                    or now - self._sent_at < max(2 * self.cfg.heartbeat_s, 2.0)):
                return
            step, resend = p.sent_step, True
        out = p.chunks_to_send(step)
        if out is None:  # a slot of the step failed its check and is dropped: the other nodes hear of it
            self._held_due = True
            return
        self._job = _SendJob(out, now)
        if resend:
            log.info("%s step %d is not protected yet: sending its chunks again", self.who, step)
        else:
            p.sent_step = step
            p.sent_bytes += self._job.total
            self._broadcast_held()  # tells the others which step to join
        self._job.pump(self.net, PIECES_PER_TURN, now)

    def _broadcast_held(self) -> None:
        if self.net is None:
            return
        self._last_beat = time.monotonic()
        try:
            self.protector.prune()
            held = [[r, *steps] for r, steps in self.table.local_held().items()]
            msg_fields = {"held": held, "parity": self.protector.complete_parity(), "sending": self.protector.sent_step}
            for node in self.net.peers:
                self.net.send(node, P.PeerHeld(**self.net.header(node), **msg_fields))
            self.table.protected = self.protector.protected_step()
        except Exception:  # a bug must not take the daemon, and this node's snapshots, down: the next beat tries again
            log.exception("%s internal error sending PeerHeld (heartbeat) to the peers", self.who)

    def _read_peers(self) -> None:
        """Handle what the peers sent: every small message at once, and one chunk. A chunk (hundreds of MiB to
        authenticate and fold into parity) would otherwise hold up the small messages queued behind it, among
        them which steps the other ranks have sealed, which this node's ranks wait for before reusing a slot."""
        while len(self._chunks) < CHUNKS_READ_AHEAD and self.net.router.poll(0):
            self._take_peer_frames(recv_frames(self.net.router))
        if self._chunks:
            self._handle_peer(self._chunks.popleft())

    def _take_peer_frames(self, frames: list[bytes]) -> None:
        """A small message is handled now; a chunk waits its turn behind the chunks read before it, also while
        this daemon waits for a peer's reply: handled out of turn, it would make the replay check refuse them."""
        if len(frames) > 4:  # [identity, request id, header, bulk..., tag]: a chunk (authenticated later)
            if len(self._chunks) >= CHUNKS_READ_AHEAD:  # while a reply is awaited: in turn, never piling up in memory
                self._handle_peer(self._chunks.popleft())
            self._chunks.append(frames)
        else:
            self._handle_peer(frames)

    def _handle_peer(self, frames: list[bytes]) -> None:
        try:
            ident, rid, msg, bulk = self.net.receive(frames)
        except (PeerAuthError, ProtocolError) as e:
            self._reject(f"unauthenticated or malformed peer message: {e}")
            return
        except Exception as e:  # a bug must not take the daemon down: the message is dropped
            log.exception("%s internal error reading a peer message", self.who)
            self._reject(f"peer message dropped on an internal error: {type(e).__name__}: {e}")
            return
        try:
            if isinstance(msg, P.PeerHeld):
                self.protector.note_peer(msg, time.monotonic())
                self.protector.prune()
                self.table.protected = self.protector.protected_step()
                self._retire_old_world()
            elif isinstance(msg, P.PeerChunk):
                if len(bulk) != 1:
                    raise ProtocolError(f"PeerChunk carries {len(bulk)} data frames, expected 1")
                before = self.protector.complete_parity()
                self.protector.accept_chunk(msg, bulk[0])
                if self.protector.complete_parity() != before:
                    self._broadcast_held()
            elif isinstance(msg, P.PeerInventory):
                self.net.reply(ident, rid, self.protector.stock(msg.asker))
            elif isinstance(msg, P.PeerFetch):
                fault_point("daemon.serve.fetch", msg.step)
                reply, data = self.protector.serve_fetch(msg)
                self.net.reply(ident, rid, reply, [data])
            else:
                raise ProtocolError(f"{msg.TYPE} is not a peer request")
        except SnapGuardError as e:
            self._reject(f"refused {msg.TYPE} from {msg.node}: {e}")
            if rid != bytes(8):
                self.net.reply(ident, rid, P.Error(type(e).__name__, str(e)))
        except Exception as e:  # a bug must not take the daemon, and this node's snapshots, down
            log.exception("%s internal error handling %s from %s", self.who, msg.TYPE, msg.node)
            self._reject(f"refused {msg.TYPE} from {msg.node} on an internal error: {type(e).__name__}: {e}")
            if rid != bytes(8):
                self.net.reply(ident, rid, P.Error("InternalError", f"{type(e).__name__}: {e}"))

    def _reject(self, why: str) -> None:
        self._rejected_count += 1
        self.rejected.append(why)
        del self.rejected[:-100]
        log.warning("%s %s", self.who, why)

    def _stocks(self, max_age_s: float = 1.0) -> dict[str, P.PeerStock]:
        """What every reachable member of the EC group holds, asked of all at once; a peer that does not answer
        within --peer-timeout counts as lost."""
        at, cached = self._stocks_cache
        if time.monotonic() - at < max_age_s:
            return cached
        stocks = {}
        asks = {node: P.PeerInventory(**self.net.header(node), asker=self.cfg.node)
                for node in self.protector.group if node != self.cfg.node}
        for node, got in self.net.request_all(asks, P.PeerStock, self.cfg.peer_timeout_s,
                                              serve=self._take_peer_frames).items():
            if isinstance(got, SnapGuardError):
                log.warning("%s counting peer %s as lost: %s", self.who, node, got)
            else:
                stocks[node] = got[0]
        self._stocks_cache = (time.monotonic(), stocks)
        return stocks

    def _read_out(self) -> None:
        """Read what the chunks on their way still need out of the slots, before one of them may change."""
        if self._job is not None:
            self._job.out.read_all()

    def _persisting(self) -> bool:
        return self.persister is not None and any(self.persister.pending.values())

    def _start_read(self, rank: int, step: int) -> P.Loading:
        """Start reading `rank`'s persisted `step` from disk into one of its slots, in a thread (`Reading`): the
        ranks restore `step`, and no memory here or at the peers holds it. The rank asks again (Open) until the
        step is sealed there, which `_settle_reads` does once its bytes match their checksums."""
        man, fill = self.persister.load(rank, step)  # `step` is kept on disk until released
        try:
            t = self.table
            t.drop(rank, step)  # the rank rewinds to `step`: what it holds newer goes, as on every restore
            # on disk too: a write of a newer step still under way is of the timeline left, and prunes nothing
            self.persister.rewind(rank, step, t.world_size)
            if t.plan(rank, step)[0].action != "grant" and all(s.state != ALLOCATING for s in t.ranks[rank]):
                t.drop(rank, -1)  # every slot holds an older step: none is restored once this one is
            growing = self._grow_for(step, {rank: man.nbytes}, man.nbytes, "disk")
            if growing is not None:
                self.persister.release(rank, step)
                return growing
            self._read_out()  # the slot may be one whose chunks are on their way to parity holders
            index = t.install_begin(rank, man)
            self._load_failed.pop((rank, step), None)
            self._reads[rank] = Reading(rank, step, index, man, fill, t.ranks[rank][index].buffer()[:man.nbytes],
                                        t.hash_threads, self.who)
        except BaseException:  # no Reading started: none will release the step
            self.persister.release(rank, step)
            raise
        log.info("%s rank %d reads step %d from disk (%s, %.1f MiB)", self.who, rank, step, self.persister.dir,
                 man.nbytes / (1 << 20))
        return P.Loading(step, 0, man.nbytes)

    def _settle_reads(self) -> None:
        """Seal the slots of the finished reads of persisted steps; free those of the failed ones, whose error the
        next Open of that step gets."""
        for rank, r in list(self._reads.items()):
            if r.finished:
                del self._reads[rank]
                self._settle(r)

    def _settle(self, r: Reading) -> None:
        self.persister.release(r.rank, r.step)
        t = self.table
        slot = t.ranks[r.rank][r.index]
        ours = slot.state == WRITING and slot.step == r.step
        if r.error is None and not r.stopped:
            try:
                if not ours:
                    raise RestoreError(f"{self.who} rank {r.rank}: the slot step {r.step} was read into from disk was"
                                       " freed meanwhile")
                t.seal(r.rank, r.step, r.index, r.manifest, verified=True)
            except SnapGuardError as e:  # e.g. no room left for its manifest: the next Open of the step says so
                r.error = e
            else:
                log.warning("%s rank %d restores step %d from disk (%s, %.1f MiB in %.2f s): shared memory holds no"
                            " good copy of it", self.who, r.rank, r.step, self.persister.dir,
                            r.manifest.nbytes / (1 << 20), time.monotonic() - r.t0)
                return
        if ours:
            t.abort(r.rank, r.index)
        if r.stopped:
            return
        if isinstance(r.error, ChecksumError):
            self.persister.condemn(r.rank, r.step, str(r.error))
        else:
            log.error("%s rank %d could not read step %d from disk: %s", self.who, r.rank, r.step, r.error)
        self._load_failed[r.rank, r.step] = r.error

    def _stop_reads(self, rank: int | None = None) -> None:
        """Stop the read of a persisted step into a slot of `rank` (of every rank: None) before anything else
        writes its slots."""
        for k in [rank] if rank is not None else list(self._reads):
            r = self._reads.get(k)
            if r is None:
                continue
            if not r.stop(_READ_STOP_S):
                raise SnapGuardError(f"{self.who} rank {k}: the read of its persisted step {r.step} from disk did not"
                                     f" stop within {_READ_STOP_S:.0f} s (a disk that hangs?); its slot stays busy")
            del self._reads[k]
            self._settle(r)

    def _rewind(self, step: int, epoch: int) -> None:
        """A rank restored `step` (or started afresh: -1) as the start of timeline `epoch`; every rank of the job
        does so with the same step and epoch (`Protector.rewind`)."""
        p = self.protector
        if p is None:
            return
        new = epoch != self.table.epoch  # else this node's other ranks restored the same already
        if self._job is not None and (new or self._job.step > step):
            self._job = None  # chunks of the old timeline, or of its slots just forgotten: holders refuse them now
        dropped = p.rewind(step, epoch)
        if new or dropped:
            log.info("%s restored step %d as timeline %d: dropped parity of newer steps %s", self.who, step, epoch,
                     dropped)

    def _start_rebuild(self, step: int) -> P.Loading:
        """Start rebuilding this node's shards of `step` from the peers (`Rebuild`, driven by `_pump_rebuild` on every
        turn of the loop): the ranks restore `step`, and this node holds no good copy of a rank's shard. Its ranks
        ask again (Open) until their slots are sealed; the daemon serves on meanwhile."""
        blob = self.protector.rebuildable(self._stocks()).get(step)  # asked of the peers at most once a second
        if blob is not None:
            sizes = {rank: Manifest.from_wire(wire).nbytes for rank, _, wire in blob["ranks"]
                     if step not in self.table.sealed_steps(rank)}
            growing = self._grow_for(step, sizes, blob["nbytes"], "peers")
            if growing is not None:
                return growing
        stocks = self._stocks(max_age_s=0.0)
        blob = self.protector.rebuildable(stocks).get(step)
        if blob is None:
            raise UnrecoverableError(f"{self.who} step {step} is neither held here nor rebuildable from the peers"
                                     f" that answered ({sorted(stocks)})")
        self._read_out()  # rebuilt shards are written into free slots: one may be a slot whose chunks are on their way
        if self._rebuilding is not None:
            self._rebuilding.cancel(self.net)
            self._rebuilding = None
        rb = Rebuild(self.protector, step, blob, stocks)
        rb.begin()
        self._rebuilding = rb
        for r in rb.ranks:
            self._load_failed.pop((r, step), None)
        log.info("%s rebuilds step %d of ranks %s (%.1f MiB) from its peers", self.who, step, rb.ranks,
                 rb.total / (1 << 20))
        self._pump_rebuild()  # the first fetches go out now
        return P.Loading(step, rb.done, rb.total, source="peers")

    def _grow_for(self, step: int, sizes: dict[int, int], total: int, source: str) -> P.Loading | None:
        """Before a read from disk or a rebuild writes `step` into the slots of the ranks in `sizes` (rank -> bytes of
        its shard): grow the free slot each will write into, if it is too small, in the grower threads
        (`SlotTable.reserve`) as a Reserve does; the rank's other slots grow at its Reserve after the restore. Done
        in this loop, reserving the memory would leave the trainers and the peers unanswered for as long (0.3 s per
        GiB on the dev VM). None once each is big enough; until then Loading with how far the reservation is and
        nothing loaded yet, so that the ranks ask again."""
        started = []

        def before_growing() -> None:
            self._read_out()  # a free slot that grows gets a new file
            started.append(True)

        progress = [self.table.reserve(rank, nbytes, before_growing, for_step=step) for rank, nbytes in sizes.items()]
        reserved, growing = sum(done for done, _ in progress), sum(n for _, n in progress)
        if not growing:
            return None
        if started:
            log.info("%s grows a slot of ranks %s to hold their shards of step %d (%.1f MiB to reserve) before it"
                     " %s", self.who, sorted(sizes), step, growing / (1 << 20),
                     "reads them from disk" if source == "disk" else "rebuilds them from its peers")
        return P.Loading(step, 0, total, source=source, reserved=reserved, slot=growing)

    def _pump_rebuild(self) -> None:
        """Move the rebuild on; once it is done, seal its slots, or keep why it failed for the ranks' next Open."""
        rb = self._rebuilding
        try:
            self.net.take_answers()
            if not rb.pump(self.net, time.monotonic(), self.cfg.peer_timeout_s):
                return
            rb.finish()
            self.protector.sent_step = max(self.protector.sent_step, rb.step)  # its parity is in place already
            self._stocks_cache = (0.0, {})
        except Exception as e:
            rb.cancel(self.net)
            if isinstance(e, ChecksumError):
                self.protector.rebuild_failed(rb.step, e)
            elif isinstance(e, SnapGuardError):
                log.error("%s could not rebuild step %d: %s", self.who, rb.step, e)
            else:  # a bug must not take the daemon down: the ranks get the error and plan again
                log.exception("%s internal error rebuilding step %d", self.who, rb.step)
                e = UnrecoverableError(f"{self.who} internal error rebuilding step {rb.step}: {type(e).__name__}: {e}")
            for r in rb.ranks:
                if rb.step not in self.table.sealed_steps(r):
                    self._load_failed[r, rb.step] = e
        self._rebuilding = None

    def _stop_rebuild(self, rank: int) -> None:
        """Give up the rebuild if `rank` is one of its ranks: it no longer restores that step."""
        rb = self._rebuilding
        if rb is not None and rank in rb.ranks:
            rb.cancel(self.net)
            self._rebuilding = None
            log.info("%s stopped rebuilding step %d: rank %d no longer restores it", self.who, rb.step, rank)

    def _note_world(self, msg: P.Hello | P.Reserve | P.Begin) -> None:
        """Take the job's world size from a trainer's request. A job changes it only by restarting every rank, so a
        world size other than the one a running trainer of the job said Hello with is refused: ranks beyond a smaller
        world would drop out of `common()`, and a rank could reuse a slot of a step they still need. A Hello replaces
        its rank's earlier trainer once that one no longer runs (or is the same process), and is refused while it
        does; once no trainer of the old size runs, the job may restart with another. Whether a
        trainer runs is whether it holds its lock file (`procs.TrainerLock`)."""
        hello = isinstance(msg, P.Hello)
        ep = self.cfg.endpoint
        for rank, (pid, world, lock) in sorted(self._trainers.items()):
            if world != msg.world_size and not (hello and rank == msg.rank) and trainer_runs(ep.trainer_lock_path(lock)):
                raise ProtocolError(f"rank {msg.rank} says world_size {msg.world_size}, but rank {rank} of this job (pid"
                                    f" {pid}, still running) said {world}: a job changes its world size only by"
                                    " restarting every rank")
        replaced = self._trainers.get(msg.rank) if hello else None
        if replaced is not None and replaced.lock != msg.lock:
            # trainer_runs removes the file of a trainer that died holding it. Two processes writing one rank's slots
            # would overwrite each other's steps; a Guard built again in the same process replaces its earlier one.
            if trainer_runs(ep.trainer_lock_path(replaced.lock)) and replaced.pid != msg.pid:
                raise ProtocolError(f"rank {msg.rank} of job {ep.job} is taken by a trainer that still runs (pid"
                                    f" {replaced.pid}); a job that shares this job id must use its own (SNAPGUARD_JOB)")
        self._trainers = {r: t for r, t in self._trainers.items() if t.world_size == msg.world_size}  # others are gone
        if hello:
            self._trainers[msg.rank] = _Trainer(msg.pid, msg.world_size, msg.lock)
        self.table.note_world(msg.world_size, msg.rank)

    def _retire_old_world(self) -> None:
        """Free the slots of a job of another world size once every rank of this one holds a step (`SlotTable`)."""
        if self.table.retirable():
            self._read_out()  # chunks on their way may still need bytes of a slot about to go
            self.table.retire_old_world()

    def _check_job(self, job: str) -> None:
        if job != self.cfg.job:
            raise ProtocolError(f"this daemon serves job {self.cfg.job!r}, not {job!r}")

    def _loading(self, rank: int) -> P.Loading | None:
        """The step being brought into a slot of `rank` (read from disk, or rebuilt from the peers), and how far."""
        r, rb = self._reads.get(rank), self._rebuilding
        if r is not None:
            return P.Loading(r.step, r.done, r.manifest.nbytes, source="disk")
        if rb is not None and rank in rb.ranks and rb.step not in self.table.sealed_steps(rank):
            return P.Loading(rb.step, rb.done, rb.total, source="peers")
        return None

    def status(self) -> P.StatusReport:
        now = time.time()
        ranks = []
        for r, slots in sorted(self.table.ranks.items()):
            ranks.append({
                "rank": r,
                "slots": [{"slot": s.index, "state": s.state, "step": s.step, "capacity": s.capacity,
                           "nbytes": s.manifest.nbytes if s.manifest else 0,
                           "world_size": s.manifest.world_size if s.manifest else 0,
                           "age_s": round(now - s.sealed_at, 3) if s.state == SEALED else -1.0}
                          for s in slots],
                "persisted": self.persister.steps(r, self.table.world_size) if self.persister else [],
                "reading": asdict(loading) if (loading := self._loading(r)) else {},
            })
        p = self.protector
        return P.StatusReport(self.cfg.node, self.cfg.job, os.getpid(), self.table.dir, self.table.used_bytes(),
                              free_bytes(self.cfg.shm_dir), ranks, self.table.common(),
                              sealed=(p.full_steps() or [-1])[-1] if p else -1,
                              protected=p.protected_step() if p else -1,
                              peers=sorted(self.net.peers) if self.net else [],
                              parity=p.complete_parity() if p else [], rejected=self._rejected_count,
                              parity_bytes=p.parity_bytes() if p else 0, sent_bytes=p.sent_bytes if p else 0,
                              persist_dir=self.persister.dir if self.persister else "",
                              memory_bytes=own_memory())
