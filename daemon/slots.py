"""The daemon's slots: which shared-memory file holds which rank's step, in which state.

Decisions are pure functions over plain tuples (`plan_begin`, `common_step`); `SlotTable` carries
them out on files. A slot is FREE, WRITING (granted to a trainer, manifest removed) or SEALED
(verified, manifest written beside it), or ALLOCATING while its file grows in the background. The
manifest file is the commit marker: it is deleted before a slot is handed out for writing and written
last when a shard is sealed, so a crash at any moment leaves either the old sealed shard or no claim at
all, never a torn one.

A job that restarts with another number of ranks under the same job id cannot restore what the job before
it sealed (snapguard restores only into the world size that took a snapshot). Such slots are of an old
world: kept, but neither offered nor counted as what the job's ranks hold, until every rank of the new
world holds a sealed step; then they are freed (`SlotTable.retire_old_world`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import glob
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import msgpack

from snapguard.config import daemon_who, ensure_private_dir, slot_dir_name
from snapguard.errors import (ChecksumError, ConfigError, LayoutError, ManifestVersionError, ShmSpaceError,
                              SnapGuardError)
from snapguard.faults import fault_point
from snapguard.layout import Manifest, verify_checksums
from snapguard.shm import MiB, create_slot, fmt_bytes, free_bytes, map_file, write_private

log = logging.getLogger(__name__)

FREE, WRITING, SEALED = "free", "writing", "sealed"
ALLOCATING = "allocating"  # a free slot whose file grows in the background (`SlotTable.reserve`)
GROWERS = 4  # threads that reserve slot files at once (posix_fallocate on files of their own runs in parallel)
OLD_WORLD = "old-world"  # as `plan_begin` sees a sealed slot of a job of another world size: taken when none is free
_DATA = re.compile(r"^r(\d+)\.s(\d+)\.data$")
_EPOCH = "epoch"
_OURS = re.compile(r"^(r\d+\.s\d+\.(data|manifest)|epoch)(\.new)?$")  # every name a table writes in its directory


@dataclass(frozen=True)
class Decision:
    action: str  # "grant", "wait" or "error"
    slot: int = -1
    need: int = -1
    reason: str = ""
    disk: int = -1  # with "wait": the step whose slot it would take, were that step not being written to disk


def plan_begin(slots: tuple[tuple[str, int], ...], step: int, common: int, protected: int = -1,
               pinned: frozenset[int] = frozenset()) -> Decision:
    """Pick the slot a rank writes `step` into, given its slots as (state, step), the job's common step and,
    with erasure coding, the newest protected step. A slot of an OLD_WORLD is taken when none is free.

    A sealed slot is reused only when it is older than `common` (the newest step every rank holds sealed),
    so the rank keeps that step; and never when it holds `protected`, the step a lost node would be rebuilt
    to. Otherwise a crash could leave ranks without a shared, restorable step: the rank waits. It waits too
    while the slot it would take holds a `pinned` step (one being written to disk).
    """
    sealed = sorted(s for state, s in slots if state == SEALED)
    if sealed and step <= sealed[-1]:
        return Decision("error", reason=f"step {step} is not newer than step {sealed[-1]}, which is already sealed;"
                                        " call restore() after a restart, or use a new job id")
    for state in (WRITING, FREE, OLD_WORLD):
        for i, (st, _) in enumerate(slots):
            if st == state:
                return Decision("grant", slot=i)
    if not slots:
        return Decision("error", reason="no slots are reserved")
    if not sealed:  # every slot is ALLOCATING
        return Decision("error", reason="its slots are still being allocated: wait for the reply to Reserve")
    disk = -1
    if common in sealed:
        for candidate in sealed:
            if candidate < common and candidate != protected:
                if candidate not in pinned:
                    return Decision("grant", slot=[s for _, s in slots].index(candidate))
                disk = candidate if disk < 0 else disk
    return Decision("wait", need=sealed[1] if len(sealed) > 1 else sealed[0], disk=disk)


def manifest_room(nbytes: int) -> int:
    """What a slot of `nbytes` keeps free beside it for its manifest, whose size the daemon learns only at Seal
    (a few dozen bytes per tensor and per 4 MiB chunk)."""
    return max(64 << 10, nbytes >> 10)


def common_step(held: dict[int, Iterable[int]], world_size: int) -> int:
    """The newest step that every rank 0..world_size-1 holds sealed, or -1."""
    common: set[int] | None = None
    for r in range(world_size):
        steps = set(held.get(r, ()))
        common = steps if common is None else common & steps
        if not common:
            return -1
    return max(common) if common else -1


@dataclass
class _Growth:
    """A slot's file, being grown in place by a grower thread (`SlotTable.reserve`)."""
    slot: "Slot"
    nbytes: int
    extra: int  # what it adds to the slots' memory: the file grows in place
    done: int = 0  # bytes of `extra` reserved so far (the grower thread counts them)
    future: concurrent.futures.Future | None = None


@dataclass
class Slot:
    rank: int
    index: int
    path: str
    capacity: int
    state: str = FREE
    step: int = -1
    manifest: Manifest | None = None
    sealed_at: float = 0.0
    _map: object = None

    @property
    def manifest_path(self) -> str:
        return self.path[: -len(".data")] + ".manifest"

    def buffer(self) -> memoryview:
        if self._map is None or len(self._map) != self.capacity:
            self._map = map_file(self.path, writable=True, populate=False) if self.capacity else b""
        return memoryview(self._map)

    def unmap(self) -> None:
        if self._map is not None and not isinstance(self._map, bytes):
            try:
                self._map.close()
            except BufferError:
                pass  # a view (a chunk being sent to a peer) is still alive: the mapping goes with the last one
        self._map = None


class SlotTable:
    """All slots of one job's ranks on this node, under shm_dir/snapguard-<job>@<node>/."""

    def __init__(self, job: str, node: str, shm_dir: str, shm_limit: int | None = None, slots_per_rank: int = 2,
                 hash_threads: int = 1):
        if slots_per_rank < 2:
            raise SnapGuardError(f"slots_per_rank must be at least 2, got {slots_per_rank}")
        self.job, self.node, self.shm_dir = job, node, shm_dir
        self.shm_limit = shm_limit
        self.slots_per_rank = slots_per_rank
        self.hash_threads = hash_threads  # threads that verify a shard's checksums
        self.dir = os.path.join(shm_dir, slot_dir_name(job, node))
        self.ranks: dict[int, list[Slot]] = {}
        self.world_size = 0
        self.world_told = False  # said by a trainer, not taken from adopted shards
        self.members: set[int] = set()  # ranks whose trainers spoke to this daemon with the current world size
        self.remote: dict[int, set[int]] = {}  # sealed steps of ranks served by other daemons
        self.protected = -1  # with erasure coding: the newest step protected across the EC group
        self.pinned: dict[int, set[int]] = {}  # rank -> sealed steps not to reuse yet (being written to disk)
        self.epoch = 0  # the job's timeline since its last restore (`Open.epoch`), kept across daemon restarts
        self.who = daemon_who(job, node)
        self._growing: dict[tuple[int, int], _Growth] = {}  # (rank, slot index) -> its file being reserved
        self._grow_failed: dict[int, SnapGuardError] = {}  # rank -> why its last growth failed, for its next reserve
        self._grower: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_growing = False

    # ---- adoption after a restart --------------------------------------------------------------

    def adopt(self) -> None:
        """Re-adopt slot files left by an earlier daemon of this job; keep only verified sealed shards."""
        ensure_private_dir(self.dir)
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".new") and _OURS.match(name):
                os.unlink(os.path.join(self.dir, name))
        try:
            with open(os.path.join(self.dir, _EPOCH)) as f:
                self.epoch = int(f.read())
        except FileNotFoundError:
            pass
        except (ValueError, OSError) as e:
            log.warning("%s cannot read the job's epoch (%s): taking 0 until the next restore sets it", self.who, e)
        newest = -1.0  # the world size is that of the shard sealed last: a job may have restarted with another
        for path in sorted(glob.glob(os.path.join(self.dir, "r*.s*.data"))):
            m = _DATA.match(os.path.basename(path))
            if not m:
                continue
            rank, index = int(m.group(1)), int(m.group(2))
            slot = Slot(rank, index, path, os.path.getsize(path))
            self._ensure_rank(rank)
            while len(self.ranks[rank]) <= index:
                self.ranks[rank].append(None)  # type: ignore[arg-type]
            self.ranks[rank][index] = slot
            if os.path.exists(slot.manifest_path):
                try:
                    with open(slot.manifest_path, "rb") as f:
                        man = Manifest.from_wire(msgpack.unpackb(f.read(), raw=False, strict_map_key=False))
                    if man.job != self.job or man.rank != rank:  # a file copied or renamed: not this slot's shard
                        raise LayoutError(f"its manifest names job {man.job!r} rank {man.rank}, the file is job"
                                          f" {self.job!r} rank {rank}'s")
                    man.validate(slot.capacity)
                    verify_checksums(slot.buffer(), man, f"{self.who} rank {rank} slot {index}", self.hash_threads)
                except ManifestVersionError as e:
                    # Written by another snapguard: the shard is not this daemon's to read, nor to throw away.
                    raise ConfigError(f"{self.who} {slot.manifest_path}: {e}. A daemon of another snapguard version"
                                      f" left this job's snapshots in {self.dir}: restart that version's daemon to"
                                      " restore them, or remove the directory to start the job afresh; nothing was"
                                      " removed") from None
                except (SnapGuardError, ValueError, OSError, msgpack.UnpackException) as e:
                    log.warning("%s not re-adopting rank %d slot %d: %s", self.who, rank, index, e)
                    os.unlink(slot.manifest_path)
                    continue
                slot.state, slot.step, slot.manifest = SEALED, man.step, man
                slot.sealed_at = os.path.getmtime(slot.manifest_path)
                if slot.sealed_at > newest:
                    newest, self.world_size = slot.sealed_at, man.world_size
                log.info("%s re-adopted rank %d step %d (slot %d, %d bytes)", self.who, rank, man.step, index, man.nbytes)
        for rank, slots in self.ranks.items():
            for i, s in enumerate(slots):
                if s is None:
                    slots[i] = self._new_slot(rank, i)

    def set_epoch(self, epoch: int) -> None:
        """Remember the job's timeline, in a file beside the slots, so that a restarted daemon keeps it."""
        if epoch == self.epoch:
            return
        ensure_private_dir(self.dir)
        write_private(os.path.join(self.dir, _EPOCH), str(epoch).encode())
        self.epoch = epoch

    # ---- queries -------------------------------------------------------------------------------

    def current(self, slot: Slot) -> bool:
        """Whether `slot` holds a sealed step of the job as it is now, not of an old world."""
        return slot.state == SEALED and slot.manifest.world_size == self.world_size

    def local_ranks(self) -> list[int]:
        """The ranks of the job as it is now that this node serves: those whose trainers spoke to it with the
        current world size, and those it holds a sealed step of that world for."""
        return sorted(self.members | {r for r, slots in self.ranks.items() if any(self.current(s) for s in slots)})

    def local_held(self) -> dict[int, list[int]]:
        return {r: self.sealed_steps(r) for r in self.local_ranks()}

    def held(self) -> dict[int, list[int]]:
        out = self.local_held()
        for r, steps in self.remote.items():
            out.setdefault(r, sorted(steps))
        return out

    def sealed_steps(self, rank: int) -> list[int]:
        """The steps this node holds sealed for `rank`, as verified when they were sealed or adopted."""
        return sorted(s.step for s in self.ranks.get(rank, []) if self.current(s))

    def sealed_manifest(self, rank: int, step: int) -> Manifest | None:
        """The manifest of `rank`'s sealed `step` (of the current world if one is), None if this node does not hold it."""
        found = sorted((s for s in self.ranks.get(rank, []) if s.state == SEALED and s.step == step),
                       key=lambda s: not self.current(s))
        return found[0].manifest if found else None

    def old_world(self) -> tuple[int, int] | None:
        """(world size, step) of the step of an old world that this node sealed last, None if it holds none."""
        old = [s for slots in self.ranks.values() for s in slots if s.state == SEALED and not self.current(s)]
        if not old:
            return None
        last = max(old, key=lambda s: s.sealed_at)
        return last.manifest.world_size, last.step

    def common(self) -> int:
        return common_step(self.held(), self.world_size)

    def used_bytes(self) -> int:
        return sum(s.capacity for slots in self.ranks.values() for s in slots)

    def growing(self) -> int:
        """Bytes of slot files being reserved in the background, not reserved yet."""
        return sum(g.extra - g.done for g in self._growing.values())

    # ---- actions -------------------------------------------------------------------------------

    def note_world(self, world_size: int, rank: int) -> None:
        """A trainer of `rank` says the job has `world_size` ranks."""
        if world_size != self.world_size or not self.world_told:
            self.members = set()
        self.world_size, self.world_told = world_size, True
        self.members.add(rank)

    def retirable(self) -> bool:
        """Whether `retire_old_world` would free anything: every rank of the job as a trainer last said it is holds a
        sealed step, and this node holds steps of an old world."""
        return self.world_told and self.old_world() is not None and self.common() >= 0

    def retire_old_world(self) -> None:
        """Free the slots of an old world once `retirable`: the job trained on in its new world, and restoring them
        would undo that. A rank this node no longer serves loses its files; the others' slots are reused."""
        if not self.retirable():
            return
        local = self.local_ranks()
        for rank in list(self.ranks):
            slots = self.ranks[rank]
            old = [s for s in slots if s.state == SEALED and not self.current(s)]
            if not old:
                continue
            log.info("%s every rank of the job of %d ranks holds step %d: freeing rank %d's steps %s of a job of %s"
                     " ranks", self.who, self.world_size, self.common(), rank, sorted(s.step for s in old),
                     sorted({s.manifest.world_size for s in old}))
            if rank in local:
                for s in old:
                    self._forget(s)
            else:
                self._remove_rank(rank)

    def _reclaim_old_world(self, rank: int) -> bool:
        """Remove the slots of an old world's ranks that this node no longer serves, for `rank` of the job as it is
        now, which needs their room before every rank of the job holds a step (`retire_old_world`). Whether any went."""
        if not self.world_told:
            return False
        keep = set(self.local_ranks()) | {rank}
        gone = [r for r, slots in self.ranks.items()
                if r not in keep and any(s.state == SEALED and not self.current(s) for s in slots)]
        for r in gone:
            log.warning("%s rank %d of the job of %d ranks needs room: removing the slots of rank %d, which hold steps"
                        " %s of a job of another size", self.who, rank, self.world_size, r,
                        sorted(s.step for s in self.ranks[r] if s.state == SEALED))
            self._remove_rank(r)
        return bool(gone)

    def _remove_rank(self, rank: int) -> None:
        for s in self.ranks.pop(rank):
            s.unmap()
            for path in (s.manifest_path, s.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def reserve(self, rank: int, nbytes: int, before_growing: Callable[[], None] | None = None,
                for_step: int | None = None) -> tuple[int, int]:
        """Make `rank`'s slots able to hold `nbytes` each: free slots that are too small grow, in grower threads, since
        reserving memory takes a while (0.3 s per GiB on the dev VM: minutes for a node's slots of a large model) and
        the daemon serves on meanwhile. Return (bytes reserved, bytes to reserve) of `rank`'s growth under way: (0, 0)
        once none is, and then every free slot holds `nbytes`; call again until then. A growth that failed (no memory
        after all) raises its error here, once, when none of the rank's slots grows any more (so that the next call
        starts afresh). `before_growing` runs only when a growth is about to start.
        `for_step`: grow only the slot that a `begin` of that step would take, if it is free (a restore writes one)."""
        self._ensure_rank(rank)
        self.settle_growth()
        mine = [g for g in self._growing.values() if g.slot.rank == rank]
        if rank in self._grow_failed and not mine:
            raise self._grow_failed.pop(rank)
        if not mine:
            if for_step is None:
                grow = [s for s in self.ranks[rank] if s.state == FREE and s.capacity < nbytes]
            else:
                slot = self.plan(rank, for_step)[1]
                grow = [slot] if slot is not None and slot.state == FREE and slot.capacity < nbytes else []
            self._check_space(rank, sum(nbytes - s.capacity for s in grow), len(grow), nbytes)
            if grow and before_growing is not None:
                before_growing()
            mine = [self._grow(s, nbytes) for s in grow]
        return sum(g.done for g in mine), sum(g.extra for g in mine)

    def settle_growth(self) -> None:
        """Take the slots the grower threads are done with: grown, or (if it failed) as they were, the error kept for
        their rank's next `reserve`."""
        for key, g in list(self._growing.items()):
            if not g.future.done():
                continue
            del self._growing[key]
            slot, error = g.slot, g.future.exception()
            now = self.ranks.get(slot.rank, [])
            if slot.index >= len(now) or now[slot.index] is not slot:  # the rank was removed (and maybe made anew)
                if not any(s.path == slot.path for s in now):  # else the file at the path is a new slot's
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(slot.path)
                continue
            slot.state = FREE
            if error is None:
                slot.capacity = g.nbytes
            else:
                log.warning("%s could not grow rank %d slot %d to %.1f MiB: %s", self.who, slot.rank, slot.index,
                            g.nbytes / MiB, error)
                if not isinstance(error, SnapGuardError):
                    error = SnapGuardError(f"growing slot {slot.index}: {type(error).__name__}: {error}")
                self._grow_failed[slot.rank] = error

    def stop_growing(self) -> None:
        """Stop the grower threads (each at its next GiB) and wait for them: what they had added is given back."""
        self._stop_growing = True
        if self._grower is not None:
            self._grower.shutdown(wait=True)
        self.settle_growth()

    def plan(self, rank: int, step: int) -> tuple[Decision, Slot | None]:
        """What `begin` would decide, and the slot it would hand out, without changing anything."""
        self._ensure_rank(rank)
        slots = self.ranks[rank]
        view = tuple((OLD_WORLD if s.state == SEALED and not self.current(s) else s.state, s.step) for s in slots)
        d = plan_begin(view, step, self.common(), self.protected, frozenset(self.pinned.get(rank, ())))
        return d, slots[d.slot] if d.action == "grant" else None

    def begin(self, rank: int, step: int, nbytes: int) -> Decision:
        d, _ = self.plan(rank, step)
        slots = self.ranks[rank]
        if d.action != "grant":
            return d
        slot = slots[d.slot]
        if slot.capacity < nbytes:
            # The space is checked and the file grown before the commit marker goes: a Begin refused
            # for lack of memory keeps the sealed step this slot holds.
            self._check_space(rank, nbytes - slot.capacity, 1, nbytes)
            self._allocate(slot, nbytes, once_reserved=lambda: self._forget(slot))
        else:
            self._forget(slot)  # the commit marker goes first
        slot.state, slot.step = WRITING, step
        return d

    def seal(self, rank: int, step: int, index: int, manifest: Manifest, verified: bool = False) -> Slot:
        """Mark a slot being written for `step` as holding it, once its bytes match `manifest`'s checksums (checked
        here, unless the caller has just `verified` them itself)."""
        slots = self.ranks.get(rank) or []
        if not 0 <= index < len(slots):
            raise LayoutError(f"rank {rank} has no slot {index}")
        slot = slots[index]
        if slot.state != WRITING or slot.step != step:
            raise LayoutError(f"rank {rank} slot {index} is {slot.state} for step {slot.step}, not being written"
                              f" for step {step}")
        if manifest.job != self.job or manifest.rank != rank or manifest.step != step:
            raise LayoutError(f"manifest names job {manifest.job!r} rank {manifest.rank} step {manifest.step},"
                              f" the seal is for job {self.job!r} rank {rank} step {step}")
        manifest.validate(slot.capacity)
        t0 = time.monotonic()
        if not verified:
            try:
                verify_checksums(slot.buffer(), manifest, f"rank {rank}", self.hash_threads)
            except ChecksumError:
                slot.state, slot.step = FREE, -1
                raise
        fault_point("daemon.seal.verified", step)
        data = msgpack.packb(manifest.to_wire(), use_bin_type=True)
        try:
            write_private(slot.manifest_path, data)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            slot.state, slot.step = FREE, -1
            raise ShmSpaceError(f"rank {rank} step {step}: no room for its manifest ({fmt_bytes(len(data))}) beside its"
                                f" slot: {self.shm_dir} has {fmt_bytes(free_bytes(self.shm_dir))} free. Give the node"
                                " more /dev/shm, or keep other files out of it") from None
        slot.state, slot.manifest, slot.sealed_at = SEALED, manifest, time.time()
        self.world_size = max(self.world_size, manifest.world_size)
        log.debug("%s rank %d sealed step %d (%d bytes verified in %.3f s)", self.who, rank, step,
                  manifest.nbytes, time.monotonic() - t0)
        return slot

    def install_begin(self, rank: int, manifest: Manifest) -> int:
        """Take a free slot of `rank` for `manifest`'s shard (rebuilt from peers, or read from disk), which the caller
        writes into and then `seal`s (or `abort`s); return its index."""
        self._ensure_rank(rank)
        if not self.world_told:
            self.world_size = max(self.world_size, manifest.world_size)
        d = self.begin(rank, manifest.step, manifest.nbytes)
        if d.action != "grant":
            raise LayoutError(f"rank {rank}: no slot for step {manifest.step}: {d.reason or 'slots busy'}")
        manifest.validate(self.ranks[rank][d.slot].capacity)
        return d.slot

    def abort(self, rank: int, index: int) -> None:
        """Free a slot that was being written (`install_begin`): its bytes are no step."""
        slot = self.ranks[rank][index]
        slot.state, slot.step = FREE, -1

    def verified_steps(self, rank: int) -> tuple[list[int], list[str]]:
        """Check every sealed slot of `rank` again; drop (and report) those whose bytes changed."""
        steps, dropped = [], []
        for slot in self.ranks.get(rank, []):
            if not self.current(slot):
                continue
            why = self.check_sealed(slot)
            if why:
                dropped.append(why)
            else:
                steps.append(slot.step)
        return sorted(steps), dropped

    def check_sealed(self, slot: Slot) -> str | None:
        """Check a sealed slot's bytes against its manifest again: None if they match; else drop the slot and say why."""
        try:
            verify_checksums(slot.buffer(), slot.manifest, f"rank {slot.rank}", self.hash_threads)
        except ChecksumError as e:
            log.warning("%s %s; dropping it, restore will use an older step", self.who, e)
            self._forget(slot)
            return str(e)
        return None

    def open(self, rank: int, step: int) -> Slot:
        """The sealed slot of `step`; newer steps of this rank are forgotten (a restore rewinds the rank)."""
        found = None
        for slot in self.ranks.get(rank, []):
            if self.current(slot) and slot.step == step:
                found = slot
        if found is None:
            raise LayoutError(f"rank {rank} holds no sealed step {step} (it holds {self.held().get(rank, [])})")
        self.drop(rank, step)
        return found

    def drop(self, rank: int, keep_upto: int) -> None:
        """Forget `rank`'s steps newer than `keep_upto`, and what it was writing; an old world's stay until retired."""
        for slot in self.ranks.get(rank, []):
            if slot.state == WRITING or (self.current(slot) and slot.step > keep_upto):
                self._forget(slot)

    def remove_all(self) -> None:
        """Delete the files this table writes, and its directory once empty: never anything else in there."""
        for slots in self.ranks.values():
            for s in slots:
                s.unmap()
        self.ranks.clear()
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # not the directory we made: leave it alone
            log.warning("%s %s is not our directory (a symlink, or another user's): not removing anything in it",
                        self.who, self.dir)
            return
        for name in os.listdir(self.dir):
            if _OURS.match(name):
                os.unlink(os.path.join(self.dir, name))
        others = os.listdir(self.dir)
        if others:
            log.warning("%s left %s in place: it holds files snapguard did not write (%s)", self.who, self.dir,
                        ", ".join(sorted(others)[:5]))
        else:
            os.rmdir(self.dir)

    # ---- helpers -------------------------------------------------------------------------------

    def _path(self, rank: int, index: int) -> str:
        return os.path.join(self.dir, f"r{rank:05d}.s{index}.data")

    def _ensure_rank(self, rank: int) -> None:
        ensure_private_dir(self.dir)
        slots = self.ranks.setdefault(rank, [])
        while len(slots) < self.slots_per_rank:
            slots.append(self._new_slot(rank, len(slots)))

    def _new_slot(self, rank: int, index: int) -> Slot:
        """A slot that holds no step, with its file (empty, until a reserve grows it): a shard of no bytes at all (a
        state of no tensors) is sealed in a file too, which a restarted daemon finds and re-adopts."""
        path = self._path(rank, index)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        return Slot(rank, index, path, os.path.getsize(path))

    def _forget(self, slot: Slot) -> None:
        if os.path.exists(slot.manifest_path):
            os.unlink(slot.manifest_path)
        slot.state, slot.step, slot.manifest = FREE, -1, None

    def _grow(self, slot: Slot, nbytes: int) -> _Growth:
        slot.unmap()
        slot.state = ALLOCATING
        g = self._growing[slot.rank, slot.index] = _Growth(slot, nbytes, nbytes - slot.capacity)
        if self._grower is None:
            self._grower = concurrent.futures.ThreadPoolExecutor(GROWERS, thread_name_prefix="snapguard-grow")
        g.future = self._grower.submit(self._reserve_file, g)
        return g

    def _reserve_file(self, g: _Growth) -> None:
        """In a grower thread: grow `g`'s file, counting its progress."""

        def progress(n: int) -> None:
            if self._stop_growing:
                raise SnapGuardError("the daemon stops")
            g.done = n
            if n < g.extra:
                fault_point("daemon.reserve.piece", g.slot.rank)

        self._create(g.slot, g.nbytes, progress=progress)

    def _allocate(self, slot: Slot, nbytes: int, once_reserved: Callable[[], None] | None = None) -> None:
        slot.unmap()
        self._create(slot, nbytes, once_reserved)
        slot.capacity = nbytes

    def _create(self, slot: Slot, nbytes: int, once_reserved: Callable[[], None] | None = None,
                progress: Callable[[int], None] | None = None) -> None:
        """`create_slot` for `slot`, timed and logged; the caller sets its capacity (a grower thread leaves that to
        the daemon's loop, `settle_growth`)."""
        t0 = time.monotonic()
        create_slot(slot.path, nbytes, once_reserved, progress)
        log.info("%s allocated rank %d slot %d: %.1f MiB in %.2f s", self.who, slot.rank, slot.index,
                 nbytes / MiB, time.monotonic() - t0)

    def _check_space(self, rank: int, extra: int, count: int, each: int) -> None:
        """Refuse `extra` bytes more for `count` slots of `each` bytes unless the shm directory has them, with room
        for each slot's manifest beside it (written when a step is sealed), and the daemon's limit leaves them."""
        if extra <= 0:
            return
        room = count * manifest_room(each)
        ahead = self.growing()  # what the grower threads are about to take
        free = free_bytes(self.shm_dir) - ahead
        limit_free = None if self.shm_limit is None else (self.shm_limit - self.used_bytes()
                                                          - sum(g.extra for g in self._growing.values()))
        short = extra + room > free or (limit_free is not None and extra > limit_free)
        if short and self._reclaim_old_world(rank):
            self._check_space(rank, extra, count, each)
            return
        if short:
            need = f"{extra / MiB:.1f} MiB more shared memory"
            if extra + room > free:
                need += f" (and {fmt_bytes(room)} beside them for their manifests)"
            where = f"{self.shm_dir} has {free / MiB:.1f} MiB free"
            if ahead:
                where += f" once the {ahead / MiB:.1f} MiB being allocated for other slots are"
            if limit_free is not None:
                where += f", and the daemon's limit of {self.shm_limit / MiB:.1f} MiB leaves {max(limit_free, 0) / MiB:.1f} MiB"
            raise ShmSpaceError(
                f"rank {rank}: {count} snapshot slot(s) of {each / MiB:.1f} MiB need {need}, but {where}. Give the"
                f" node more /dev/shm (Docker's default is 64 MiB: run with --shm-size), or snapshot less state per rank"
            )
