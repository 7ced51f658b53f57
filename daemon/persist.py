"""Background persistence of sealed shards to disk, and the fallback restore from it.

Memory holds a job's newest steps; it does not survive the loss of more nodes than erasure coding covers, or
of the whole job's machines. With `--persist-dir`, the daemon also writes one sealed step in every
`--persist-every` of each of its ranks to disk, in a thread, off the training path. When memory cannot give
every rank a common step, the daemons offer the persisted steps too, and the ranks restore the newest step
that every one of them can restore from memory or disk (DESIGN.md, Fallback).

On disk, `<dir>/snapguard-<job>/r<rank>.s<step>.data` holds a shard's bytes and `.manifest` beside it its
manifest, as in shared memory; one directory serves a job's daemons on a shared file system. The manifest is
written last, after the data is on disk (fsync), and is the commit marker: a crash mid-write leaves no claim.
The newest `keep` persisted steps of each rank stay.

Which steps: the first step a rank seals in each interval `[k * every, (k + 1) * every)`. Ranks snapshot the
same steps, so they persist the same ones. While a write runs, its slot is pinned (`SlotTable.pinned`): a disk
slower than training makes the trainer wait at its next snapshot rather than lose the step. Each chunk is
checked against the manifest's checksum in a bounce buffer, and those very bytes are written: what reaches
the disk is what was sealed. A shard is read back into a slot, and verified there, in a thread per rank (`Reading`),
while the daemon serves on; the daemon seals the slot once its bytes match.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import logging
import mmap
import os
import re
import threading
import time

import msgpack
import xxhash

from snapguard.config import ensure_private_dir
from snapguard.errors import (ChecksumError, ConfigError, LayoutError, ManifestVersionError, RestoreError,
                              SnapGuardError, UnrecoverableError)
from snapguard.faults import fault_point
from snapguard.layout import Manifest, checksum_mismatch, verify_checksums

log = logging.getLogger(__name__)

_FILE = re.compile(r"^r(\d+)\.s(\d+)\.((?:data|manifest)(?:\.new)?)$")  # every name a Persister writes
_BLOCK = 4096  # O_DIRECT's alignment of buffers, offsets and lengths: a page, a multiple of every block size
_READ = 64 << 20  # bytes per read of a persisted shard


class Persister:
    """Writes sealed shards of one job to `<root>/snapguard-<job>/` in a thread, and reads them back.

    The daemon's loop calls every method but `_run`: it `submit`s a write (after pinning the slot), `drain`s the
    finished ones (to unpin their slots), lists `steps` and `load`s a shard for a restore."""

    def __init__(self, root: str, job: str, every: int, keep: int = 2, who: str = "snapguard"):
        if every < 1:
            raise ConfigError(f"--persist-every must be at least 1 step, got {every}")
        if keep < 1:
            raise ConfigError(f"--persist-keep must be at least 1 step, got {keep}")
        self.job, self.every, self.keep, self.who = job, every, keep, who
        self.dir = ensure_private_dir(os.path.join(os.path.abspath(root), f"snapguard-{job}"))
        self._last: dict[tuple[int, int], int] = {}  # (rank, world size) -> newest step persisted or being written
        self.pending: dict[int, set[int]] = collections.defaultdict(set)  # rank -> steps being written
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._done: collections.deque = collections.deque()  # (rank, step, error or "") from the thread
        self._timeline: dict[int, int] = collections.defaultdict(int)  # rank -> bumped when a restore rewinds it
        self._claim = threading.Lock()  # held to write a manifest, and to rewind
        # (rank, step) -> (the files' identity, the manifest or why it is unusable): read once per file, not per Status
        self._read: dict[tuple[int, int], tuple[tuple, Manifest | Exception]] = {}
        self._reading = threading.Lock()  # the loop and the thread (pruning) both list
        self._unreadable: dict[tuple[int, int], str] = {}  # (rank, step) -> why its manifest could not be read
        self._held: collections.Counter = collections.Counter()  # (rank, step) being read back: never pruned
        self.direct: bool | None = None  # whether the last write went around the page cache (O_DIRECT)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="snapguard-persist", daemon=True)
        self._thread.start()

    # ---- the daemon's loop ----------------------------------------------------------------------

    def due(self, rank: int, step: int, world_size: int) -> bool:
        """Whether `rank`'s newly sealed `step` (of a job of `world_size` ranks) is the first of its interval, so to
        be persisted. A job restarted with another number of ranks counts its own steps only."""
        if (rank, world_size) not in self._last:
            self._last[rank, world_size] = max(self.steps(rank, world_size), default=-1)
        last = self._last[rank, world_size]
        return step > last and step // self.every > last // self.every

    def submit(self, rank: int, step: int, path: str, manifest: Manifest) -> None:
        """Write `manifest`'s shard from the slot file at `path`; the caller keeps the slot from being reused until
        `drain` reports the write finished."""
        self._last[rank, manifest.world_size] = step
        self.pending[rank].add(step)
        with self._wake:
            self._queue.append((rank, step, path, manifest, self._timeline[rank]))
            self._wake.notify()

    def drain(self) -> list[tuple[int, int, str]]:
        """The writes finished since the last call, as (rank, step, error or "")."""
        out = []
        while self._done:
            rank, step, world_size, error = self._done.popleft()
            self.pending[rank].discard(step)
            if error:  # the next seal of the interval tries again
                self._last[rank, world_size] = max(self.steps(rank, world_size), default=-1)
            out.append((rank, step, error))
        return out

    def steps(self, rank: int, world_size: int) -> list[int]:
        """The steps persisted whole for `rank` by a job of `world_size` ranks, oldest first."""
        return [step for step, man in self._listing(rank)
                if not isinstance(man, Exception) and man.world_size == world_size]

    def other_world(self, rank: int, world_size: int) -> tuple[int, int] | None:
        """(world size, step) of the newest step persisted for `rank` by a job of another size, None if none."""
        others = [(man.world_size, step) for step, man in self._listing(rank)
                  if not isinstance(man, Exception) and man.world_size != world_size]
        return others[-1] if others else None

    def load(self, rank: int, step: int) -> tuple[Manifest, object]:
        """The manifest of `rank`'s persisted `step`, and a function `fill(buf, progress=None)` that reads its bytes
        into a page-aligned buffer of their size (the slot it is restored into), calling `progress(bytes read)`
        after each read (which may raise to stop it). The caller verifies the checksums (`condemn` it if they
        fail). `step` is kept from pruning until `release`; a step gone meanwhile is an UnrecoverableError, after
        which the ranks plan again."""
        with self._claim:  # held before its manifest is read: a write's pruning cannot take it from under the read
            self._held[rank, step] += 1
        try:
            man = self._manifest(rank, step)
        except BaseException as e:
            self.release(rank, step)
            if isinstance(e, FileNotFoundError):
                raise UnrecoverableError(f"{self.who} rank {rank}'s persisted step {step} is no longer in {self.dir}")\
                    from None
            raise
        path = self._base(rank, step) + ".data"

        def fill(buf: memoryview, progress=None) -> None:
            n = man.nbytes
            fd, direct = _open(path, os.O_RDONLY, direct=True)
            try:
                # With O_DIRECT, whole blocks go straight into the slot, and the last part of one through a bounce
                # buffer: neither fresh page cache (slow to touch the first time on a VM) nor a copy out of it.
                body = n - n % _BLOCK if direct else n
                got = 0
                while got < body:
                    k = os.readv(fd, [buf[got:min(body, got + _READ)]])
                    if not k:
                        break
                    got += k
                    if progress is not None:
                        progress(got)
                if direct and got == body < n:
                    bounce = mmap.mmap(-1, _BLOCK)
                    with memoryview(bounce) as tail:
                        got += os.preadv(fd, [tail], got)
                        buf[body:min(got, n)] = tail[:min(got, n) - body]
                if got < n:
                    raise ChecksumError(f"{self.who} persisted shard {path} ends at byte {got}, its manifest says {n}")
            finally:
                os.close(fd)

        return man, fill

    def release(self, rank: int, step: int) -> None:
        """The read of `rank`'s `step` that `load` started is over: the step may be pruned again."""
        with self._claim:
            self._held[rank, step] -= 1
            if self._held[rank, step] <= 0:
                del self._held[rank, step]

    def rewind(self, rank: int, step: int, world_size: int) -> None:
        """`rank` restored `step` (or started afresh: -1): its persisted steps of this world size newer than that
        belong to a timeline left behind, and go; so does any write of them still running."""
        with self._claim:
            self._timeline[rank] += 1
            # newer steps of this job, and unusable ones; another job's are not this timeline's to drop, nor those
            # another snapguard version wrote (a job that found none it could read starts afresh: -1)
            listing = self._listing(rank)
            gone = [s for s, man in listing
                    if s > step and not isinstance(man, (ManifestVersionError, OSError))
                    and (isinstance(man, Exception) or man.world_size == world_size)]
            for s in gone:
                self._remove(rank, s)
            # a manifest that could not be read may hold a step of this timeline or of another job: not offered
            # again (it may be of the timeline left behind), not deleted either
            for s, man in listing:
                if s > step and isinstance(man, OSError):
                    self._set_aside(rank, s, man)
        if gone:
            log.info("%s rank %d restored step %d: removed its persisted steps %s of the timeline left behind",
                     self.who, rank, step, gone)
        self._last[rank, world_size] = max(self.steps(rank, world_size), default=-1)  # writes under way fail

    def condemn(self, rank: int, step: int, why: str) -> None:
        """Stop offering a persisted step whose bytes failed their checksums; its files stay, renamed, to look at."""
        base = self._base(rank, step)
        log.error("%s persisted step %d of rank %d is corrupt (%s): it is no longer offered; its files are kept as"
                  " %s.*.corrupt", self.who, step, rank, why, base)
        for ext in (".manifest", ".data"):  # the manifest first: it is the claim
            try:
                os.replace(base + ext, base + ext + ".corrupt")
            except FileNotFoundError:
                pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; a write in progress stops at its next chunk and leaves nothing behind but `.new`
        files, which the next write of that rank removes."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s the disk write still runs %.0f s after the daemon asked it to stop", self.who, timeout_s)

    # ---- files ----------------------------------------------------------------------------------

    def _base(self, rank: int, step: int) -> str:
        return os.path.join(self.dir, f"r{rank}.s{step}")

    def _files(self, rank: int) -> list[tuple[int, str, str]]:
        """`rank`'s files here as (step, kind: "data", "manifest", "data.new" or "manifest.new", path)."""
        out = []
        for path in glob.glob(os.path.join(self.dir, f"r{rank}.s*")):
            m = _FILE.match(os.path.basename(path))
            if m and int(m.group(1)) == rank:
                out.append((int(m.group(2)), m.group(3), path))
        return out

    def _complete(self, rank: int) -> list[int]:
        """The steps of `rank` with a manifest on disk, oldest first."""
        return sorted(step for step, kind, _ in self._files(rank) if kind == "manifest")

    def _listing(self, rank: int) -> list[tuple[int, Manifest | Exception]]:
        """Each step of `rank` with a manifest on disk, oldest first, with its manifest or why it is unusable. A
        manifest is read again only when its file or its data's size changed (a Status lists every rank's steps;
        a large shard's manifest takes milliseconds to read); an unusable one is logged when it is read."""
        with self._reading:
            out: list[tuple[int, Manifest | Exception]] = []
            steps = self._complete(rank)
            for step in steps:
                base = self._base(rank, step)
                try:
                    st, data = os.stat(base + ".manifest"), os.stat(base + ".data")
                    key: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, data.st_size)
                except OSError:  # read below, which says what is missing
                    key = None
                cached = self._read.get((rank, step))
                if key is not None and cached is not None and cached[0] == key:
                    out.append((step, cached[1]))
                    continue
                try:
                    man: Manifest | Exception = self._manifest(rank, step)
                except Exception as e:  # anything a damaged or foreign file makes the reader raise: not offered
                    if self._unreadable.get((rank, step)) != str(e):
                        log.warning("%s persisted step %d of rank %d is unusable: %s: %s", self.who, step, rank,
                                    type(e).__name__, e)
                    man = e
                if isinstance(man, OSError):  # the file may be readable later (an I/O error): read it again then
                    self._unreadable[rank, step] = str(man)
                elif key is not None:
                    self._unreadable.pop((rank, step), None)
                    self._read[rank, step] = key, man
                out.append((step, man))
            for gone in [k for k in (*self._read, *self._unreadable) if k[0] == rank and k[1] not in steps]:
                self._read.pop(gone, None)
                self._unreadable.pop(gone, None)
        return out

    def _remove(self, rank: int, step: int) -> None:
        base = self._base(rank, step)
        for ext in (".manifest", ".data"):  # the claim first
            try:
                os.unlink(base + ext)
            except FileNotFoundError:
                pass

    def _set_aside(self, rank: int, step: int, why: Exception) -> None:
        """Rename a step whose manifest could not be read out of the listing, to `.unreadable`, keeping its bytes."""
        base = self._base(rank, step)
        log.warning("%s rank %d's persisted step %d could not be read (%s): it is no longer offered; its files are kept"
                    " as %s.*.unreadable", self.who, rank, step, why, base)
        for ext in (".manifest", ".data"):  # the manifest first: it is the claim
            with contextlib.suppress(FileNotFoundError):
                os.replace(base + ext, base + ext + ".unreadable")

    def _manifest(self, rank: int, step: int) -> Manifest:
        base = self._base(rank, step)
        with open(base + ".manifest", "rb") as f:
            raw = f.read(1 << 26)
        man = Manifest.from_wire(msgpack.unpackb(raw, raw=False, strict_map_key=False))
        if (man.job, man.rank, man.step) != (self.job, rank, step):
            raise LayoutError(f"its manifest names job {man.job!r} rank {man.rank} step {man.step}")
        man.validate(os.path.getsize(base + ".data"))
        return man

    # ---- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                rank, step, path, man, timeline = self._queue.popleft()
            error = ""
            try:
                t0 = time.monotonic()
                try:
                    self._write(rank, step, path, man, timeline)
                except BaseException:
                    with contextlib.suppress(OSError):
                        self._remove_strays(rank)  # a full disk gets back what the write took
                    raise
                log.info("%s persisted rank %d step %d to %s (%.1f MiB in %.2f s, %s)", self.who, rank, step, self.dir,
                         man.nbytes / (1 << 20), time.monotonic() - t0,
                         "O_DIRECT" if self.direct else "through the page cache")
                self._prune(rank, man.world_size)
            except Exception as e:  # reported, never fatal: memory still holds the step
                error = f"{type(e).__name__}: {e}"
                log.warning("%s could not persist rank %d step %d to %s: %s", self.who, rank, step, self.dir, error)
            self._done.append((rank, step, man.world_size, error))

    def _write(self, rank: int, step: int, path: str, man: Manifest, timeline: int) -> None:
        base = self._base(rank, step)
        self._remove_strays(rank)
        data, cs = base + ".data.new", man.chunk_size
        bounce = mmap.mmap(-1, -(-cs // _BLOCK) * _BLOCK)  # page-aligned, as O_DIRECT needs
        dst, self.direct = _open(data, _CREATE, direct=cs % _BLOCK == 0)
        try:
            with open(path, "rb", buffering=0) as src, memoryview(bounce) as whole:
                for c, want in enumerate(man.checksums):
                    if self._stop:
                        raise SnapGuardError("the daemon stops")
                    n = min(cs, man.nbytes - c * cs)
                    piece = whole[:n]
                    if os.preadv(src.fileno(), [piece], c * cs) != n:
                        raise ChecksumError(f"slot file {path} was cut short while it was written to disk")
                    have = xxhash.xxh3_64_intdigest(piece)
                    if have != want:  # the slot changed under the write: it was forgotten and handed out again
                        raise checksum_mismatch(man, c, have, f"{self.who} rank {rank} slot being written to disk")
                    if self.direct and n % _BLOCK:  # the last chunk: whole blocks, cut back to size below
                        m = -(-n // _BLOCK) * _BLOCK
                        whole[n:m] = bytes(m - n)
                        piece = whole[:m]
                    _write_all(dst, piece)
                    if c == len(man.checksums) // 2:
                        fault_point("daemon.persist.mid", step)
            os.ftruncate(dst, man.nbytes)
            os.fsync(dst)
        finally:
            os.close(dst)  # the bounce buffer goes with the last view of it, when this returns
        manifest = base + ".manifest.new"
        with os.fdopen(_open(manifest, _CREATE, direct=False)[0], "wb") as f:
            f.write(msgpack.packb(man.to_wire(), use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        with self._claim:
            if timeline != self._timeline[rank]:
                raise SnapGuardError("the rank restored an older step meanwhile: this step is of the timeline it left")
            os.replace(data, base + ".data")
            os.replace(manifest, base + ".manifest")
        _fsync_dir(self.dir)

    def _prune(self, rank: int, world_size: int) -> None:
        """Keep the newest `keep` persisted steps of `rank` of a job of `world_size` ranks, and the newest step that
        every rank with steps here has too (a rank whose writes lag or fail may hold nothing newer); remove older
        ones, those of a job of another size once this one has `keep` (a job restarted with another number of ranks
        cannot restore them), and data left without a manifest. A step being read back stays."""
        with self._claim:  # decided and done at once: a rewind or a rename aside meanwhile would make it stale
            listing = self._listing(rank)
            ours = [s for s, man in listing if not isinstance(man, Exception) and man.world_size == world_size]
            common = self._common_step(world_size)
            gone = [s for s in ours[:-self.keep] if s != common]
            if len(ours) >= self.keep:
                # not one whose manifest could not be read: it may be this job's (`rewind` sets such steps aside)
                others = [s for s, man in listing if s not in ours and not isinstance(man, OSError)]
                if others:
                    log.info("%s removing rank %d's persisted steps %s, of a job of another world size or unreadable:"
                             " this job of %d ranks has persisted %d of its own", self.who, rank, others, world_size,
                             len(ours))
                gone += others
            for step in gone:
                if (rank, step) not in self._held:
                    self._remove(rank, step)
            claimed = set(self._complete(rank))
            for step, kind, path in self._files(rank):
                if kind == "data" and step not in claimed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # a write that died between its data and its manifest

    def _common_step(self, world_size: int) -> int | None:
        """The newest step that every rank below `world_size` with usable steps of that world size here can restore."""
        ranks = {int(m.group(1)) for m in map(_FILE.match, os.listdir(self.dir))
                 if m and m.group(3) == "manifest" and int(m.group(1)) < world_size}
        usable = [s for s in (set(self.steps(r, world_size)) for r in sorted(ranks)) if s]
        return max(set.intersection(*usable), default=None) if usable else None

    def _remove_strays(self, rank: int) -> None:
        """Remove `rank`'s `.new` files: only this daemon writes this rank's, and it writes one at a time."""
        for _, kind, path in self._files(rank):
            if kind.endswith(".new"):
                os.unlink(path)


_CREATE = os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW  # a new file, mode 0600 (`_open`)


def _open(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """`path` opened with `flags`, and with O_DIRECT where asked for and the file system takes it (EINVAL where it
    does not); and whether it is. A file created is 0600, whatever the umask. Direct I/O goes between our buffer
    and the device: the kernel neither copies a shard through fresh page cache (which, on a VM, costs more CPU
    than the transfer) nor keeps gigabytes of it cached, evicting what training reads."""
    flags |= os.O_CLOEXEC
    fd = None
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    opened = fd is not None
    if fd is None:
        fd = os.open(path, flags, 0o600)
    if flags & os.O_CREAT:
        os.fchmod(fd, 0o600)
    return fd, opened


def _write_all(fd: int, piece: memoryview) -> None:
    done = 0
    while done < len(piece):
        done += os.write(fd, piece[done:])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Stopped(Exception):
    """A Reading asked to stop."""


class Reading:
    """One rank's persisted step being read into a slot (`Persister.load`'s fill) and verified, in a thread of its
    own: the restores from disk of a node's ranks run side by side, and the daemon's loop serves on meanwhile.
    The loop owns the slot: it seals it once `finished` without `error`, or frees it."""

    def __init__(self, rank: int, step: int, index: int, manifest: Manifest, fill, buf: memoryview,
                 hash_threads: int, who: str):
        self.rank, self.step, self.index, self.manifest, self.who = rank, step, index, manifest, who
        self.done = 0  # bytes read so far
        self.error: BaseException | None = None
        self.stopped = False
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fill, buf, hash_threads), daemon=True,
                                        name=f"snapguard-read-r{rank}")
        self._thread.start()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to stop at its next read; whether it has finished within `timeout_s`."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.finished

    def _progress(self, got: int) -> None:
        self.done = got
        fault_point("daemon.persist.read", self.step)
        if self._stop.is_set():
            raise _Stopped

    def _run(self, fill, buf: memoryview, hash_threads: int) -> None:
        try:
            with buf:
                fill(buf, self._progress)
                self.done = self.manifest.nbytes
                verify_checksums(buf, self.manifest, f"{self.who} persisted rank {self.rank}", hash_threads)
        except _Stopped:
            self.stopped = True
        except ChecksumError as e:
            self.error = e
        except OSError as e:
            self.error = RestoreError(f"{self.who} cannot read rank {self.rank}'s persisted step {self.step}: {e}")
        except BaseException as e:  # reported by the loop, which goes on serving
            self.error = e
