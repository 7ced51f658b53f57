"""Guard: the training-side front door. Snapshot every step in the background, restore on restart.

    guard = snapguard.Guard(model=model, optimizer=optimizer, extra=loop_state)
    restored = guard.restore()            # newest step every rank holds, or None
    for step in range(0 if restored is None else restored + 1, steps):
        train_step()                       # forward, backward, optimizer.step()
        guard.snapshot(step)               # returns at once; the copy runs in the background

The copy into this rank's shared-memory slot overlaps the next forward and backward. Training waits
only in the optimizer's step pre-hook, which Guard installs: parameters and optimizer state must not
change until they are copied. Tensors that something other than the optimizer may change (module
buffers, RNG states, loop state) are cloned when `snapshot()` is called, so they need no such wait.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist
import xxhash

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import ENV_JOB, Endpoint, check_seconds, default_shm_dir, default_timeout, job_id_caveat
from snapguard.errors import (ChecksumError, ConfigError, DaemonError, DaemonUnavailable, LayoutError, RestoreError,
                              SnapGuardError, UnrecoverableError, WorldSizeChanged)
from snapguard.faults import fault_point
from snapguard.layout import (ALIGN, DEFAULT_CHUNK, MANIFEST_VERSION, ChunkHasher, Layout, Manifest, checksum_mismatch,
                              chunk_checksums, default_hash_threads, in_threads, plan_layout, verify_checksums)
from snapguard.memcopy import STREAM_KIND, address_view, native, stream_copy
from snapguard.procs import TrainerLock, other_jobs_on_node, spawn_daemon
from snapguard.plan import check_agreement, plan_restore
from snapguard.shm import fmt_bytes, map_file
from snapguard.state import (RNGState, TORCH_DTYPES, arrays_in, as_stateful, check_compatible, flatten, pack_tree,
                             tensor_spec, unflatten, unpack_tree)

log = logging.getLogger(__name__)

_DAEMON_NOTICE_S = 5.0  # a Guard waiting for its daemon says so after this long
_ALLOCATING_NOTICE_S = 10.0  # how often Guard() says how far the daemon got reserving its slots
_SLOT_NOTICE_S = 30.0  # a snapshot waiting for a slot says so after this long (protection may lag a few seconds)

_PIECE = 256 << 10  # bytes copied, then hashed while in the cache
_NODE_NAME_BYTES = 64  # a node id's longest (`config.check_name`), as ranks tell each other theirs
_MAX_INVENTORY = 16  # steps one rank reports at restore; more than slots_per_rank will ever hold
_RESTORE_THREADS = 4  # threads that verify and copy a shard on restore (memory bandwidth, not compute, bounds it)
_CORRUPT = -2  # what a rank that found a corrupt chunk reports instead of the step it restored
_FAILED = -3  # what a rank whose restore raised reports, so that the others stop too instead of waiting for it
# Why a rank stops before it lists its sealed steps; it still joins the first gather, and the others say so.
_UNLISTED, _UNFINISHED = 1, 2
_STOPPED_BEFORE_INVENTORY = {_UNLISTED: "could not list their snapshots",
                             _UNFINISHED: "stopped on a failure of their last snapshot"}
_MAX_RESTORE_ROUNDS = 8  # each round after the first two rules out a step, or ends the restore
# While a daemon reads a shard from disk or rebuilds it from its peers, the ranks gather this often whether every
# shard is in a slot: a rank whose shard is waits for the others in these gathers, each short, as long as the loads move
_OPEN_ROUND_S = 1.0
_OPENED, _LOADING, _OPEN_FAILED = 0, 1, 2  # what a rank reports in those gathers


class _Inventories(NamedTuple):
    """What every rank gathers at the start of a restore round."""
    steps: dict[int, list[int]]  # rank -> the steps it can restore
    epoch: int  # of the timeline this restore starts: rank 0's random draw, stamped on its chunks (`Protector.rewind`)
    touched: dict[int, int]  # rank -> the step of an earlier round some of whose chunks its state holds
    stopped: dict[int, list[int]]  # why (a key of _STOPPED_BEFORE_INVENTORY) -> the ranks that stop before listing
    old_world: dict[int, tuple[int, int]]  # rank -> (world size, step) its daemon holds of a job of another size


def _awaited(reply: P.Wait) -> str:
    """What a snapshot told to wait (`P.Wait`) waits for, and why it may never come."""
    if reply.disk >= 0:
        return (f"the daemon to finish writing step {reply.disk} to disk (--persist-dir), whose slot this step would"
                " take; the disk is too slow for --persist-every (the daemon's log says how long a write takes)")
    return (f"every rank to seal step {reply.need} before reusing the slot of an older step (newest step all ranks"
            f" hold: {reply.common}). A rank that stopped snapshotting holds the others up; in a job over several"
            " nodes, a daemon hears of other nodes' ranks only from its peers (snapguard-daemon --peer-bind with"
            " --peer or --rendezvous)")


@dataclass(frozen=True)
class GuardConfig:
    """How a Guard reaches its daemon; None means: from the environment, then the default (see snapguard.config)."""

    job: str | None = None
    node: str | None = None
    run_dir: str | None = None
    shm_dir: str | None = None
    start_daemon: bool = False  # start a daemon for this node when none answers
    daemon_args: tuple[str, ...] = ()  # extra arguments for a daemon started by Guard
    timeout_s: float | None = None  # every daemon request
    # Most time a copy waits for other ranks before reusing a slot; restore's collectives wait for the other ranks
    # this long on top of timeout_s.
    gate_timeout_s: float = 300.0
    chunk_size: int = DEFAULT_CHUNK
    hash_threads: int | None = None  # threads that hash a shard to or from the GPU (default: default_hash_threads())
    rank: int | None = None
    world_size: int | None = None


class _Job:
    def __init__(self, step: int, layout: Layout, tensors: list[torch.Tensor], tree: bytes,
                 cuda_ready: dict[torch.device, Any]):
        self.step, self.layout, self.tensors, self.tree = step, layout, tensors, tree
        self.cuda_ready = cuda_ready  # per CUDA device: an event recorded when snapshot() was called
        self.copy_done = threading.Event()
        self.sealed = threading.Event()
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.begin_s = self.copy_s = self.hash_s = self.seal_s = 0.0  # slot grant (with waits), copy, hashing left, seal


class Guard:
    """Protects a training loop's state. Constructed on every rank, after torch.distributed is initialised."""

    def __init__(self, model: Any = None, optimizer: Any = None, extra: Any = None, *,
                 states: dict[str, Any] | None = None, rng: bool = True, config: GuardConfig | None = None,
                 guarded: Callable[[], Iterable[torch.Tensor]] | None = None, **overrides: Any):
        """`guarded`: for frameworks whose optimizer is no torch.optim.Optimizer, a callable returning the
        tensors that change only after `before_update()` has returned (their copy then overlaps training
        instead of being cloned); the framework adapter calls `before_update()` right before it updates them.
        """
        try:
            cfg = dataclasses.replace(config or GuardConfig(), **overrides)
        except TypeError as e:
            raise ConfigError(f"unknown Guard option: {e}") from None
        self.config = cfg
        self.endpoint = Endpoint.resolve(cfg.job, cfg.node, cfg.run_dir)
        self.timeout_s = default_timeout(cfg.timeout_s)
        check_seconds("gate_timeout_s", cfg.gate_timeout_s)
        if not isinstance(cfg.chunk_size, int) or isinstance(cfg.chunk_size, bool) or cfg.chunk_size < ALIGN \
                or cfg.chunk_size % ALIGN:
            raise ConfigError(f"chunk_size must be a positive multiple of {ALIGN} bytes, got {cfg.chunk_size!r}")
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank = int(os.environ.get("RANK", 0)) if cfg.rank is None else cfg.rank
            self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if cfg.world_size is None else cfg.world_size
        self.who = f"[{self.endpoint.job}/rank {self.rank}]"
        caveat = job_id_caveat(cfg.job)
        if caveat and self.rank == 0:
            log.warning("%s %s", self.who, caveat)
        if not native():
            log.warning("%s snapshots and restores copy with %s, which reads every byte it writes first",
                        self.who, STREAM_KIND)

        named: dict[str, Any] = {}
        if isinstance(optimizer, (list, tuple)):
            optimizers = list(optimizer)
            optimizer = _ListState([as_stateful(o, f"optimizer[{i}]") for i, o in enumerate(optimizers)])
        else:
            optimizers = [optimizer]
        for name, obj in (("model", model), ("optimizer", optimizer), ("extra", extra)):
            if obj is not None:
                named[name] = obj
        for name, obj in (states or {}).items():
            if name in named or name == "rng":
                raise ConfigError(f"state name {name!r} is used twice")
            named[name] = obj
        if rng:
            named["rng"] = RNGState()
        if not named:
            raise ConfigError("Guard needs something to protect: model=, optimizer=, extra= or states=")
        self.states = {n: as_stateful(o, n) for n, o in named.items()}
        self.optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        self._guarded_fn = guarded

        # How long a restore's collectives wait for the other ranks. Longer than one daemon request: between two
        # collectives a rank makes requests (an Open that starts a read from disk or a rebuild from the peers, up
        # to gate_timeout_s; an Inventory that re-verifies every sealed slot) and copies its shard, which no request
        # timeout bounds; and ranks reach the first one after pre-faulting their slots at different speeds. While a
        # read or a rebuild runs, the ranks gather every second (`_open`), so it may take longer as long as it moves.
        # gate_timeout_s is the knob for "how long ranks wait for each other" on the save path too.
        self._agree_s = self.timeout_s + cfg.gate_timeout_s
        self.client = DaemonClient(self.endpoint.address, self.timeout_s, self.who)
        self._life: TrainerLock | None = None  # held while this Guard lives: the daemon's sign that the trainer runs
        self._pg = None
        try:
            welcome = self._connect()
            self._pg = self._agreement_group()
            self._check_daemons_are_peers(welcome)
        except BaseException:
            self.client.close()
            if self._life is not None:
                self._life.release()
            self._close_group()  # a refused Guard keeps no connections to the other ranks
            raise

        self._layout: Layout | None = None
        self._maps: dict[str, _Mapped] = {}
        self._pin = False  # the state has CUDA tensors: page-lock the slot mappings for device-to-host copies
        self._streams: dict[torch.device, Any] = {}  # per CUDA device, the side stream the copies run on
        self._reserved = 0  # shard size the slots were last reserved for
        self._job: _Job | None = None
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._mixed: str | None = None  # set when a failed restore left chunks of a snapshot in the state
        self._restoring: int | None = None  # during restore(): the step some of whose chunks it copied into the state
        self._last_step = -1  # the step of the last snapshot() or restore(): the next snapshot must be newer
        self._at_exit: Callable[[], None] | None = None  # registered with atexit once the Guard has started
        self.common_step = -1  # newest step every rank holds sealed, as the daemon last reported
        self.last_sealed = -1
        self.restored_from: str | None = None  # where restore() found this rank's shard: "memory" or "disk"
        self.epoch = 0  # the timeline the last restore() started (0: none); the daemons' chunks carry it
        self._worker = threading.Thread(target=self._run, name=f"snapguard-copy-r{self.rank}", daemon=True)
        self._worker.start()
        self._hooks = [opt.register_step_pre_hook(lambda *_: self.before_update()) for opt in self.optimizers]
        try:
            self._reserve()
        except BaseException:
            self.close()  # no copy thread, hook or socket outlives a Guard that could not start
            raise
        # A script that ends without close() would stop the copy thread (a daemon thread) mid-copy: its last step lost
        self._at_exit = functools.partial(_seal_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    # ---- connection ------------------------------------------------------------------------------

    def _connect(self) -> P.Welcome:
        if self.config.start_daemon:
            try:
                self.client.wait_ready(1.0)
            except DaemonUnavailable:
                self._spawn_daemon()
        else:
            self._wait_for_daemon()
        self._life = TrainerLock(self.endpoint, self.rank, self.world_size)
        return self.client.request(P.Hello(self.endpoint.job, self.rank, self.world_size, os.getpid(), self._life.token))

    def _wait_for_daemon(self) -> None:
        """Wait for the node's daemon (a launcher may start it beside the trainers) for the Guard's timeout, saying so
        after the first few seconds."""
        hint = f"start `snapguard-daemon --job {self.endpoint.job}` on this node, or pass start_daemon=True"
        first = min(_DAEMON_NOTICE_S, self.timeout_s / 2)
        try:
            self.client.wait_ready(first)
            return
        except DaemonUnavailable:
            log.warning("%s no snapguard daemon answers on %s yet: waiting up to %.0f s more (%s)", self.who,
                        self.endpoint.socket_path, self.timeout_s - first, hint)
        try:
            self.client.wait_ready(self.timeout_s - first)
        except DaemonUnavailable:
            raise DaemonUnavailable(f"{self.who} no snapguard daemon answers on {self.endpoint.socket_path}"
                                    f" (waited {self.timeout_s:.0f} s): {hint}") from None

    def _agreement_group(self) -> Any:
        """A gloo group of its own for restore's agreement, whose timeout is _agree_s: the default group's may be
        NCCL, or gloo with a timeout of half an hour. Collective: every rank constructs its Guard in the same order."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        try:
            return dist.new_group(backend="gloo", timeout=timedelta(seconds=self._agree_s))
        except RuntimeError as e:
            raise SnapGuardError(f"{self.who} waiting for every rank to construct its Guard: {e}") from e

    def _check_daemons_are_peers(self, welcome: P.Welcome) -> None:
        """Refuse a job whose ranks run on several nodes whose daemons are not all peers: a daemon lets a rank
        overwrite its older slot only once every rank of the job has sealed a newer step, and hears of other
        nodes' ranks only from its peers, so the third snapshot would wait for a slot until gate_timeout_s. Refuse
        one whose ranks on two machines name the same node, which would look like one node here and fail the same
        way. Collective: every rank learns every rank's node and machine, then which daemons lack some nodes."""
        if self._pg is None:
            return
        # Sixteen bytes per rank while all is well (a job of thousands of ranks gathers them on every rank); the
        # names only to say what is wrong.
        out = self._all_gather(torch.tensor([_node_hash(welcome.node), _machine_hash()], dtype=torch.int64),
                               "every rank's node, as its daemon names it, and machine (constructing the Guard)")
        machines: dict[int, dict[int, list[int]]] = {}  # node hash -> machine hash -> ranks
        for r, (node, machine) in sorted(out.items()):
            machines.setdefault(node, {}).setdefault(machine, []).append(r)
        shared = {h: by for h, by in machines.items() if len(by) > 1}  # node names that several machines use
        known = {_node_hash(n) for n in (welcome.node, *welcome.peers)}
        strangers = set(machines) - known  # hashes of the job's nodes this rank's daemon lacks
        out = self._all_gather(torch.tensor([len(strangers)], dtype=torch.int64),
                               "whether every rank's daemon is a peer of every other node's (constructing the Guard)")
        if not shared and not any(o[0] for o in out.values()):
            return
        lacks = {r for r, o in out.items() if o[0]}
        t = torch.zeros(_NODE_NAME_BYTES, dtype=torch.uint8)
        name = welcome.node.encode()[:_NODE_NAME_BYTES]  # node ids are at most 64 characters (`check_name`)
        t[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
        out = self._all_gather(t, "every rank's node name (constructing the Guard)")
        nodes = {r: bytes(b for b in row if b).decode(errors="replace") for r, row in out.items()}
        if shared:
            where = "; ".join(f"node {nodes[next(iter(by.values()))[0]]}: "
                              + " and ".join(f"rank{'s' if len(rs) > 1 else ''} {_spans(rs)}" for rs in by.values())
                              for by in shared.values())
            raise ConfigError(
                f"{self.who} this job's ranks on different machines name the same node ({where}, each group on a"
                " machine of its own, by its kernel's boot id). A daemon hears of other machines' ranks only from its"
                " peers, which know each daemon by its node name, so snapshots would soon wait for a slot for good:"
                " give each machine's daemon and trainers a node name of their own (snapguard-daemon --node,"
                " Guard(node=...) or SNAPGUARD_NODE; the default is the host name up to its first dot, which machines"
                " named alike in different domains share).")
        lacking = sorted({nodes[r] for r in lacks})
        unknown = sorted({n for n in nodes.values() if _node_hash(n) in strangers})
        ranks: dict[str, list[int]] = {}
        for r, n in sorted(nodes.items()):
            ranks.setdefault(n, []).append(r)
        where = "; ".join(f"{n}: rank{'s' if len(rs) > 1 else ''} {_spans(rs)}" for n, rs in sorted(ranks.items()))
        lack = (f"daemons of {', '.join(lacking)} are not peers" if len(lacking) > 1
                else f"daemon of {lacking[0]} is not a peer")
        mine = ""
        if unknown:
            has = f"has peers {', '.join(welcome.peers)} but not" if welcome.peers else "has no peers, so not"
            mine = f" This rank's daemon, of node {welcome.node}, {has} {', '.join(unknown)}."
        raise ConfigError(
            f"{self.who} this job's ranks run on {len(ranks)} nodes ({where}), and the {lack} of every other node's"
            " daemon. A daemon lets a rank reuse a slot only once every rank of the job has sealed a newer step, and"
            " hears of other nodes' ranks only from its peers: snapshots would soon wait for a slot for good. Start"
            " every node's snapguard-daemon with --peer-bind and the others as --peer NODE=ADDRESS, or with"
            " --rendezvous." + mine)

    def _spawn_daemon(self) -> None:
        """Start the node's daemon and wait until it (or the one a rank beside this one started first) answers; one
        that exits (bad daemon_args, an unusable directory) is an error at once, with the end of its log."""
        log.info("%s no daemon answers on %s: starting one", self.who, self.endpoint.socket_path)
        spawn_daemon(self.endpoint, default_shm_dir(self.config.shm_dir), self.config.daemon_args,
                     wait_s=self.timeout_s, owned=False)

    def _reserve(self, nbytes: int | None = None) -> None:
        """Have the daemon allocate and pre-fault this rank's slots for shards of `nbytes` (default: the state
        as it is now), and map them here, so that neither cost falls on a snapshot."""
        if nbytes is None:
            tensors, _ = self._capture()
            nbytes = plan_layout(tensor_spec(n, t) for n, t in tensors).nbytes
            self._pin = self._pin or any(t.is_cuda for _, t in tensors)
        reply = self._await_slots(P.Reserve(self.endpoint.job, self.rank, self.world_size, nbytes))
        t0 = time.monotonic()
        fresh = 0
        for path, capacity in reply.info.get("slots", []):
            if capacity and self._mapping(path, capacity)[1]:
                fresh += capacity
        if fresh:
            log.info("%s mapped and pre-faulted %s of snapshot slots in %.2f s", self.who, fmt_bytes(fresh),
                     time.monotonic() - t0)
        self._reserved = max(self._reserved, nbytes)

    def _await_slots(self, msg: P.Reserve) -> P.Ok:
        """Ask the daemon for this rank's slots until it has grown them (it answers `Allocating` meanwhile), saying
        how far it got every _ALLOCATING_NOTICE_S; give up once it has reserved nothing more for timeout_s."""
        start = moved = time.monotonic()
        notice, seen = start + _ALLOCATING_NOTICE_S, -1
        while True:
            reply = self.client.request(msg)
            if not isinstance(reply, P.Allocating):
                return reply
            now = time.monotonic()
            if reply.done != seen:
                seen, moved = reply.done, now
            what = (f"the daemon to reserve this rank's snapshot slots ({fmt_bytes(reply.done)} of"
                    f" {fmt_bytes(reply.total)} so far, after {now - start:.0f} s)")
            if now - moved > self.timeout_s:
                raise DaemonError(f"{self.who}: waited {self.timeout_s:.0f} s for {what} without progress")
            if now > notice:
                notice = now + _ALLOCATING_NOTICE_S
                log.info("%s waiting for %s", self.who, what)
            time.sleep(0.05)

    # ---- save path -------------------------------------------------------------------------------

    def _capture(self) -> tuple[list[tuple[str, torch.Tensor]], Any]:
        return flatten({name: st.state_dict() for name, st in self.states.items()})

    def _guarded_storages(self) -> set[int]:
        """Storages only optimizer.step() changes; copying them may overlap the next forward/backward."""
        ptrs = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    ptrs.add(p.untyped_storage().data_ptr())
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        ptrs.add(v.untyped_storage().data_ptr())
        if self._guarded_fn is not None:
            ptrs.update(t.untyped_storage().data_ptr() for t in self._guarded_fn())
        return ptrs

    def snapshot(self, step: int) -> None:
        """Start a snapshot of the state after `step`; returns at once. Called on every rank, every step."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"{self.who} snapshot step must be a non-negative int, got {step!r}")
        if self._closed:
            raise SnapGuardError(f"{self.who} snapshot({step}) after close()")
        if self._mixed:
            raise RestoreError(f"{self.who} snapshot({step}) refused: a failed restore left the state mixed ({self._mixed});"
                               " the job must not train on from it")
        if step <= self._last_step:  # the daemon refuses it too, but only on the copy thread, after the whole copy
            raise ConfigError(f"{self.who} snapshot({step}) after snapshot or restore of step {self._last_step}: each"
                              " snapshot's step must be newer than the last (snapshot once per optimizer step)")
        self.wait()  # one snapshot in flight: the previous one has had a whole step to seal
        named, tree = self._capture()
        guarded = self._guarded_storages()
        tensors = []
        for _, t in named:
            t = t.detach()
            if t.untyped_storage().data_ptr() not in guarded:
                t = t.clone()  # may change before the copy runs: take it now
            tensors.append(t)
        specs = [tensor_spec(n, t) for n, t in named]
        if self._layout is None or self._layout.signature != tuple((n, d, tuple(s)) for n, d, s in specs):
            if self._layout is not None:
                log.info("%s step %d: state shapes changed, planning a new layout", self.who, step)
            self._layout = plan_layout(specs)
        # The copy runs on a side stream of each device, after everything queued so far on the current stream
        # (the optimizer step that made this state, and the clones above).
        cuda_ready = {}
        for d in {t.device for t in tensors if t.is_cuda}:
            cuda_ready[d] = torch.cuda.Event()
            cuda_ready[d].record(torch.cuda.current_stream(d))
        self._pin = self._pin or bool(cuda_ready)
        job = _Job(step, self._layout, tensors, pack_tree(tree), cuda_ready)
        self._job, self._last_step = job, step
        self._queue.put(job)

    def before_update(self) -> None:
        """Block until the running copy has left the guarded tensors. Installed as every torch optimizer's
        step pre-hook; framework adapters call it before they update parameters or optimizer state."""
        # WARNING: parameters and optimizer state must not change until the running copy is done.
        job = self._job
        if job is None:
            return
        if not job.copy_done.wait(self.timeout_s + self.config.gate_timeout_s):
            raise SnapGuardError(f"{self.who} optimizer.step waited {self.timeout_s + self.config.gate_timeout_s:.0f} s"
                                 f" for the copy of step {job.step} into shared memory")
        if job.error is not None and job.sealed.is_set():
            self._raise(job)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the last snapshot is sealed; re-raise any failure of the background copy or seal."""
        job = self._job
        if job is None:
            return
        limit = timeout_s if timeout_s is not None else self.timeout_s + self.config.gate_timeout_s
        if not job.sealed.wait(limit):
            raise SnapGuardError(f"{self.who} waited {limit:.0f} s for step {job.step} to be sealed")
        self._raise(job)

    def _raise(self, job: _Job) -> None:
        if job.error is not None:
            err, job.error = job.error, None
            raise SnapGuardError(f"{self.who} snapshot of step {job.step} failed: {err}") from err

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._copy_and_seal(job)
            except BaseException as e:  # re-raised on the training thread by wait() / the pre-hook
                job.error = e
                log.error("%s step %d: snapshot failed: %s", self.who, job.step, e)
            finally:
                job.tensors = []
                job.copy_done.set()
                job.sealed.set()

    def _copy_and_seal(self, job: _Job) -> None:
        layout = job.layout
        if layout.nbytes > self._reserved:
            # The state grew (an optimizer creates its state on its first step): grow and pre-fault every free
            # slot at once, rather than one slot on each of the next snapshots.
            self._reserve(layout.nbytes)
        t_begin = time.monotonic()
        granted = self._begin(job.step, layout.nbytes)
        job.begin_s = time.monotonic() - t_begin
        buf, _ = self._mapping(granted.path, granted.capacity)
        if layout.nbytes > min(granted.capacity, buf.numel()):  # the copy writes by address: never past the mapping
            raise DaemonError(f"{self.who} step {job.step}: the daemon granted a slot of {granted.capacity} bytes"
                              f" ({buf.numel()} mapped) for a shard of {layout.nbytes}")
        t0 = time.monotonic()
        streams = {}
        for d, ready in job.cuda_ready.items():
            if d not in self._streams:
                self._streams[d] = torch.cuda.Stream(device=d)
            streams[d] = self._streams[d]
            streams[d].wait_event(ready)
        half = len(layout.entries) // 2
        base = buf.data_ptr()
        mm = self._maps[granted.path].mm
        hasher = ChunkHasher(memoryview(mm), layout.nbytes, self.config.chunk_size) if not streams else None
        with torch.no_grad():
            for i, (e, t) in enumerate(zip(layout.entries, job.tensors)):
                if not e.nbytes:
                    pass
                elif t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
                    # One thread, without the GIL: torch's copy_ would start an OpenMP team in this thread, whose
                    # spinning workers take the cores from the training threads' own team. Each piece of the
                    # source is hashed right after it is copied, while it is still in the cache.
                    src = t.data_ptr()
                    source = address_view(src, e.nbytes) if hasher is not None else None
                    for off in range(0, e.nbytes, _PIECE):
                        n = min(_PIECE, e.nbytes - off)
                        stream_copy(base + e.offset + off, src + off, n)
                        if hasher is not None:
                            hasher.advance(e.offset + off + n, source[off:off + n])
                else:
                    dst = buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape)
                    if t.is_cuda:
                        # Asynchronous into page-locked memory, on the side stream of the tensor's device (the
                        # context makes that device current in this thread too).
                        with torch.cuda.stream(streams[t.device]):
                            dst.copy_(t, non_blocking=True)
                    else:
                        dst.copy_(t)
                    if hasher is not None:
                        hasher.advance(e.offset + e.nbytes)
                if i == half:
                    fault_point("trainer.copy.mid", job.step)
        for stream in streams.values():
            stream.synchronize()
        job.copy_s = time.monotonic() - t0
        job.copy_done.set()  # the state may change now; what is left reads the slot only
        t_hash = time.monotonic()
        if hasher is not None:
            checksums = hasher.finish()
        else:
            checksums = chunk_checksums(memoryview(mm), layout.nbytes, self.config.chunk_size, self._hash_threads())
        job.hash_s = time.monotonic() - t_hash
        fault_point("trainer.copy.done", job.step)
        t1 = time.monotonic()
        manifest = Manifest(MANIFEST_VERSION, self.endpoint.job, self.rank, self.world_size, job.step, layout.nbytes,
                            self.config.chunk_size, list(layout.entries), checksums, job.tree, time.time())
        reply = self.client.request(P.Seal(self.endpoint.job, self.rank, job.step, granted.slot, manifest.to_wire()),
                                    timeout_s=self.timeout_s)
        job.seal_s = time.monotonic() - t1
        self.common_step = reply.common
        self.last_sealed = job.step
        took = job.copy_s + job.hash_s + job.seal_s
        if took > 5.0:
            log.warning("%s step %d: snapshot took %.2f s (copy %.2f s, checksums %.2f s, seal %.2f s)", self.who,
                        job.step, took, job.copy_s, job.hash_s, job.seal_s)

    def _hash_threads(self) -> int:
        return self.config.hash_threads or default_hash_threads()

    def _begin(self, step: int, nbytes: int) -> P.Granted:
        """A slot to write `step` into, waiting while the daemon says wait (saying so after the first few seconds),
        at most gate_timeout_s."""
        start = time.monotonic()
        gate = self.config.gate_timeout_s
        notice, noticed = start + min(_SLOT_NOTICE_S, gate / 2), False
        pause = 0.001
        while True:
            reply = self.client.request(P.Begin(self.endpoint.job, self.rank, self.world_size, step, nbytes))
            if isinstance(reply, P.Granted):
                return reply
            now = time.monotonic()
            if now > start + gate:
                raise SnapGuardError(f"{self.who} step {step}: waited {gate:.0f} s for {_awaited(reply)}")
            if now > notice and not noticed:
                noticed = True
                log.warning("%s step %d: has waited %.0f s for %s; gives up after %.0f s", self.who, step, now - start,
                            _awaited(reply), gate)
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _mapping(self, path: str, capacity: int) -> tuple[torch.Tensor, bool]:
        """This process's mapping of a slot file, and whether it was mapped just now. MAP_POPULATE touches every
        page: the first mapping of a fresh slot zeroes its memory, which is why Guard maps slots up front.
        With CUDA state, the mapping is page-locked too (once), so device-to-host copies run asynchronously."""
        ino = os.stat(path).st_ino
        cached = self._maps.get(path)
        if cached is not None and cached.capacity == capacity and cached.ino == ino:
            if self._pin and cached.pinned is None and capacity:
                cached.pinned = _host_register(cached.t)
            return cached.t, False
        if cached is not None:
            self._unmap(path)
        if capacity:
            mm = map_file(path, writable=True)
            t = torch.frombuffer(mm, dtype=torch.uint8)
        else:  # a shard of no bytes: an empty file, never mapped
            mm, t = b"", torch.empty(0, dtype=torch.uint8)
        self._maps[path] = _Mapped(mm, t, capacity, ino, _host_register(t) if self._pin and capacity else None)
        return t, True

    def _unmap(self, path: str) -> None:
        """Forget a mapping (unmapped once nothing uses its tensor); page-locked memory is released first."""
        m = self._maps.pop(path)
        if m.pinned:
            _host_unregister(m.t)

    # ---- restore path ----------------------------------------------------------------------------

    def restore(self) -> int | None:
        """Restore the newest step every rank holds; return it, or None on a fresh start. Called on every rank.

        Each rank verifies the shard's checksums as it copies it, a chunk at a time, and copies a chunk only once
        its checksum matches. If any rank finds a corrupt chunk, or its daemon cannot rebuild the step from its
        peers with bytes that match their checksums, every rank plans again, after the daemons have checked every
        sealed slot and dropped the corrupt ones (and the steps whose rebuild failed): with an older step if need
        be. A step that fails after that check is not tried again."""
        if self._closed:
            raise SnapGuardError(f"{self.who} restore() after close(): build a new Guard")
        if self._pg is None and self.world_size > 1:  # it would plan with this rank's steps alone, and find none
            raise ConfigError(f"{self.who} restore() in a job of {self.world_size} ranks needs torch.distributed, over"
                              " which the ranks agree on the step, and it was not initialised when this Guard was built:"
                              " call init_process_group() first")
        self._restoring, self._last_step = None, -1  # the daemons forget the steps after the one restored
        try:
            return self._restore()
        except BaseException:
            if self._restoring is not None and self._mixed is None:  # e.g. a gather that timed out after the copy
                self._touched(self._restoring, {})
            raise

    def _restore(self) -> int | None:
        try:
            self.wait()  # the copy thread must be done with the tensors before they are written
            unfinished = None
        except SnapGuardError as e:  # raised after the first gather, so that the others stop at once too
            unfinished = e
        t0 = time.monotonic()
        dropped: list[str] = []
        failed: set[int] = set()  # steps that failed after the daemons checked their slots again
        recheck = False
        for rnd in range(1, _MAX_RESTORE_ROUNDS + 1):
            inv, error, why_not = P.Steps([], []), unfinished, _UNFINISHED
            if error is None:
                try:
                    inv = self.client.request(P.Inventory(self.endpoint.job, self.rank, recheck=recheck))
                except SnapGuardError as e:  # still gathered with the others, who would otherwise wait out _agree_s
                    error, why_not = e, _UNLISTED
            for why in inv.dropped:
                log.warning("%s a sealed snapshot failed verification and is not used: %s", self.who, why)
            dropped += inv.dropped
            # Every decision below is taken from gathered data, so that every rank takes the same branch.
            inventories, epoch, touched, stopped, old_world = self._gather_inventories(inv, self._restoring, rnd,
                                                                                       0 if error is None else why_not)
            if error is not None:
                raise error
            if stopped:
                raise RestoreError(f"{self.who} cannot restore: " + "; ".join(
                    f"ranks {ranks} {_STOPPED_BEFORE_INVENTORY[why]} (their errors say why)"
                    for why, ranks in sorted(stopped.items())) + self._touched(self._restoring, touched))
            plan = plan_restore(inventories, self.world_size)
            if plan.step is None and (any(inventories.values()) or touched):
                # Some ranks hold snapshots, but no step is common: starting afresh would silently lose the
                # job's progress, and training on different steps would corrupt it. Stop and say why.
                detail = "; ".join(dropped)
                reason = plan.reason if any(inventories.values()) else "every snapshot failed verification"
                raise RestoreError(f"{self.who} cannot restore: {reason}" + (f". This rank: {detail}" if detail else "")
                                   + self._touched(self._restoring, touched))
            if plan.step is None:
                log.info("%s nothing to restore: %s", self.who, plan.reason)
                others = other_jobs_on_node(self.endpoint) if self.rank == 0 else []
                if others:
                    log.warning("%s starts afresh, while daemons of other jobs run on node %s: %s. If one of them"
                                " holds this job's snapshots (`snapguard status` lists them), start the job with %s"
                                " set to its id to restore them", self.who, self.endpoint.node, ", ".join(others),
                                ENV_JOB)
                self.client.request(P.Drop(self.endpoint.job, self.rank, -1, epoch))  # keeps an old world's steps
                self.epoch = epoch
                check_agreement(self._gather_restored(None, self.world_size, "starting afresh")[0])
                if old_world:
                    rank, (world, step) = max(old_world.items(), key=lambda kv: kv[1][1])
                    raise WorldSizeChanged(
                        f"{self.who} cannot restore: the daemons hold snapshots of a job of {world} ranks (up to step"
                        f" {step}, rank {rank}'s node), this job has {self.world_size}, and snapguard restores only into"
                        " the world size that took a snapshot. Nothing was restored, and snapshots can go on: load the"
                        " state from a checkpoint and train on (the old snapshots are freed once every rank has sealed"
                        f" a step), or restart with {world} ranks to restore them", world, step)
                return None
            if plan.step in failed:
                break
            state, report, saved_ws, error = None, _CORRUPT, self.world_size, None
            try:
                shard = self._open(plan.step, epoch)
                if shard is not None:
                    man = self._manifest(shard, plan.step)
                    saved_ws = man.world_size
                    if saved_ws == self.world_size:  # else nothing is written: every rank refuses below
                        self.epoch = epoch
                        try:
                            state, shard_nbytes = self._load(shard, man)
                            report = plan.step
                        except ChecksumError as e:
                            log.warning("%s restoring step %d: %s; the daemons check every sealed slot again", self.who,
                                        plan.step, e)
            except SnapGuardError as e:
                error, report = e, _FAILED
            except Exception as e:  # e.g. a tensor of the live state that cannot be written in place: every rank
                # must hear of it at the gather below, not wait there for the collective's timeout
                error = RestoreError(f"{self.who} cannot restore step {plan.step}: {type(e).__name__}: {e}"
                                     + self._touched(self._restoring, {}))
                error.__cause__, report = e, _FAILED
            restored, sizes = self._gather_restored(report, saved_ws, f"restoring step {plan.step}")
            if error is not None:
                raise error
            if _FAILED in restored.values():
                ranks = sorted(r for r, s in restored.items() if s == _FAILED)
                raise RestoreError(f"{self.who} cannot restore step {plan.step}: it failed on ranks {ranks} (their"
                                   " errors say why)" + self._touched(self._restoring, {}))
            wrong = {r: n for r, n in sizes.items() if n != self.world_size}
            if wrong:
                r, n = min(wrong.items())
                raise RestoreError(f"{self.who} cannot restore step {plan.step}: it was taken by a job of {n} ranks"
                                   f" (rank {r}'s shard says so), this job has {self.world_size}; snapguard restores"
                                   " only into the world size that took the snapshot"
                                   + self._touched(self._restoring, {}))
            if _CORRUPT in restored.values():
                if recheck:
                    failed.add(plan.step)
                recheck = True
                continue
            # An object may refuse the state (a layout it cannot take, a scheduler on one side only), on some ranks
            # only: every rank must hear of it, or the others would train on and wait in their next collective.
            refused: tuple[str, Exception] | None = None
            try:
                for name, st in self.states.items():
                    st.load_state_dict(state[name])
            except Exception as e:
                refused = name, e
            loaded, _ = self._gather_restored(_FAILED if refused else plan.step, self.world_size,
                                              f"loading step {plan.step}")
            if refused is not None:
                name, e = refused
                raise RestoreError(f"{self.who} cannot restore step {plan.step}: {name!r} refused it:"
                                   f" {type(e).__name__}: {e}" + self._touched(self._restoring, {})) from e
            if _FAILED in loaded.values():
                ranks = sorted(r for r, s in loaded.items() if s == _FAILED)
                raise RestoreError(f"{self.who} cannot restore step {plan.step}: ranks {ranks} could not load it into"
                                   " their objects (their errors say why)" + self._touched(self._restoring, {}))
            check_agreement(restored)
            self.last_sealed = self.common_step = self._last_step = plan.step
            self.restored_from = "disk" if plan.step in inv.persisted else "memory"
            if shard_nbytes > self._reserved:  # larger than at construction (optimizer state): pre-fault for it
                try:
                    self._reserve(shard_nbytes)
                except Exception as e:  # the ranks agreed and hold the step: this rank alone must not stop
                    log.warning("%s restored step %d, but could not reserve snapshot slots of %s for the next"
                                " snapshots (the first one tries again, and fails if this persists): %s", self.who,
                                plan.step, fmt_bytes(shard_nbytes), e)
            if self.restored_from == "disk":
                log.warning("%s restored step %d from disk in %.2f s: shared memory held no good copy of the newest step"
                            " that every rank can restore (%s)", self.who, plan.step, time.monotonic() - t0, plan.reason)
            else:
                log.info("%s restored step %d in %.2f s (%s)%s", self.who, plan.step, time.monotonic() - t0,
                         plan.reason, "; newer snapshots were corrupt and skipped" if dropped or failed else "")
            self._mixed = None  # every tensor holds the step now
            return plan.step
        raise RestoreError(f"{self.who} steps {sorted(failed)} failed verification or could not be rebuilt on some"
                           " ranks even after the daemons checked their sealed slots again (this rank's warnings and"
                           " the daemons' logs say why)" + self._touched(self._restoring, {}))

    def _touched(self, loaded: int | None, others: dict[int, int]) -> str:
        """What a failed restore left in the state: this rank's, or other ranks' (`others`: rank -> step). A mixed
        state must not be snapshotted as if it were a step: `snapshot()` refuses until a restore succeeds."""
        if loaded is not None:
            self._mixed = f"this rank's state holds verified chunks of step {loaded}"
            return f". This rank's state holds verified chunks of step {loaded} now, so it must not train on"
        if others:
            self._mixed = f"ranks {sorted(others)} hold chunks of the snapshot in their state"
            return (f". Ranks {sorted(others)} hold chunks of the snapshot in their state now, so the job must not"
                    " train on")
        return ""

    def _open(self, step: int, epoch: int) -> P.Shard | None:
        """Ask the daemon for this rank's shard of `step`; None if it cannot rebuild it from its peers or read it
        from disk, or only with bytes that fail their checksums (it says why, and no longer offers that step), or if
        another rank's Open failed (its error says why, and every rank stops after the next gather).

        A step on disk only is read in the daemon's background, and a step this node lost is rebuilt there from
        its peers (it answers Loading meanwhile, and first reserves the memory of a slot too small for the shard):
        this asks again until the shard is in a slot, saying every 10 s how far the daemon is, and gives up once it
        has made no progress for `gate_timeout_s`. Meanwhile the ranks gather every `_OPEN_ROUND_S` whether each has
        its answer, so that a rank whose shard is ready waits for the others as long as their loads move, each
        gather far shorter than the collectives' timeout."""
        got: P.Shard | None = None
        error: SnapGuardError | None = None
        loading: P.Loading | None = None
        moved, seen, pause = time.monotonic(), None, 0.002
        told = moved
        round_s = min(_OPEN_ROUND_S, self.timeout_s / 2, self.config.gate_timeout_s / 2)
        rnd = 0
        while True:
            rnd += 1
            until = time.monotonic() + round_s
            while error is None and (rnd == 1 or loading is not None):
                try:
                    reply = self._ask_open(step, epoch)
                except SnapGuardError as e:
                    error = e
                    break
                loading = reply if isinstance(reply, P.Loading) else None
                if loading is None:
                    got = reply
                    break
                now = time.monotonic()
                if loading.slot:  # the memory of the slots to write into comes first
                    what = (f"reserved {fmt_bytes(loading.reserved)} of {fmt_bytes(loading.slot)} of shared memory"
                            f" for the slots it {'rebuilds' if loading.source == 'peers' else 'reads'} the"
                            f" {fmt_bytes(loading.total)} into")
                    stuck = "is the node short of memory?"
                else:
                    done = f"{fmt_bytes(loading.done)} of {fmt_bytes(loading.total)}"
                    what = (f"rebuilt {done} of the node's shards from its peers" if loading.source == "peers"
                            else f"read {done} of this rank's shard from disk")
                    stuck = ("its peers stopped sending chunks?" if loading.source == "peers"
                             else "is the disk under --persist-dir stuck?")
                if (loading.done, loading.reserved, loading.slot) != seen:
                    moved, seen = now, (loading.done, loading.reserved, loading.slot)
                elif now - moved > self.config.gate_timeout_s:
                    error = RestoreError(f"{self.who} restoring step {step}: the daemon has {what}, and moved no"
                                         f" further for {self.config.gate_timeout_s:.0f} s; {stuck}")
                    break
                if now - told >= 10.0:
                    told = now
                    log.info("%s restoring step %d: the daemon has %s", self.who, step, what)
                if now >= until:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
            mine = _OPEN_FAILED if error is not None else _LOADING if loading is not None else _OPENED
            out = self._all_gather(torch.tensor([mine], dtype=torch.int64),
                                   f"whether every rank's shard of step {step} is in a slot (round {rnd})")
            if error is not None:
                raise error
            if any(o[0] == _OPEN_FAILED for o in out.values()):
                return None  # and the restore stops: those ranks report _FAILED
            waiting = sorted(r for r, o in out.items() if o[0] == _LOADING)
            if not waiting:
                return got
            now = time.monotonic()
            if loading is None and now - told >= 10.0:
                told = now
                log.info("%s restoring step %d: waiting for ranks %s, whose daemons still read or rebuild their"
                         " shards", self.who, step, waiting)

    def _ask_open(self, step: int, epoch: int) -> P.Shard | P.Loading | None:
        """One Open: the shard, how far the daemon's read or rebuild of it is, or None if it cannot be rebuilt or
        read with bytes that match their checksums."""
        try:
            # The Open that starts a read or a rebuild first allocates the slots of the node's ranks, and a
            # rebuild first asks every peer what it holds (--peer-timeout for each that does not answer):
            # that may take longer than other requests (a daemon that dies meanwhile is noticed at once).
            return self.client.request(P.Open(self.endpoint.job, self.rank, step, epoch),
                                       timeout_s=max(self.timeout_s, self.config.gate_timeout_s))
        except DaemonError as e:
            if e.code == RestoreError.__name__:  # e.g. a snapshot of another world size: refused, nothing changed
                raise RestoreError(f"{self.who} cannot restore: {e}") from e
            if e.code not in (ChecksumError.__name__, UnrecoverableError.__name__):  # the daemon names its exception
                raise
            log.warning("%s restoring step %d: %s; the ranks plan again", self.who, step, e)
            return None

    def _manifest(self, shard: P.Shard, step: int) -> Manifest:
        man = Manifest.from_wire(shard.manifest)
        man.validate(os.stat(shard.path).st_size)
        if (man.job, man.rank, man.step) != (self.endpoint.job, self.rank, step):
            raise RestoreError(f"{self.who} asked the daemon for step {step} of this rank, it handed out step {man.step}"
                               f" of rank {man.rank} of job {man.job!r}")
        return man

    def _load(self, shard: P.Shard, man: Manifest) -> tuple[dict, int]:
        """Copy the shard into this process's tensors, verifying each chunk before its bytes are copied; return
        the state dicts to load and the shard's size. Raise ChecksumError at the first corrupt chunk."""
        current, live_tree = self._capture()
        tree = unpack_tree(man.tree)
        # A NumPy array comes back as a new array, in the order it was saved in, whatever the live one's order (a
        # Fortran-ordered array is stored transposed): compared by its logical shape, never a target of the copy.
        live_arrays, saved_arrays = arrays_in(live_tree), arrays_in(tree)
        check_compatible([dataclasses.replace(e, shape=e.shape[::-1]) if saved_arrays.get(i) else e
                          for i, e in enumerate(man.entries)],
                         [(n, t.permute(*range(t.ndim - 1, -1, -1)) if live_arrays.get(i) else t)
                          for i, (n, t) in enumerate(current)])
        arrays = {current[i][0] for i in live_arrays}
        buf, _ = self._mapping(shard.path, os.stat(shard.path).st_size)
        if buf.numel() < man.nbytes:  # the file shrank since its size was checked
            raise LayoutError(f"{self.who} the shard of step {man.step} holds {buf.numel()} bytes, its manifest says"
                              f" {man.nbytes}")
        sources = [buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape) for e in man.entries]
        # Like torch.distributed.checkpoint, load into the tensors the state dicts hold now: parameters and
        # existing optimizer state are overwritten in place (one copy, no allocation, no page faults); what
        # does not exist yet (a fresh optimizer's moments) gets new memory. Nothing is written before the
        # snapshot is known to hold every state. The state dicts get the live tensors themselves back, not
        # detached aliases: a plain dict's load_state_dict puts its values back, which must be the same objects
        # (a Parameter stays that Parameter, with its requires_grad).
        live = {n: t for n, t in current if n not in arrays}
        targets, values, strided = [], [], []
        for e, src in zip(man.entries, sources):
            dst = live.get(e.name)
            if dst is None:
                targets.append(torch.empty_like(src))
                values.append(targets[-1])
                continue
            if dst.is_meta:
                raise LayoutError(f"tensor {e.name!r} is on the meta device, which holds no memory to restore into:"
                                  " materialize the model (e.g. to_empty()) before restore()")
            if dst.numel() * dst.element_size() != e.nbytes:  # check_compatible compared them: never copy past it
                raise LayoutError(f"tensor {e.name!r}: {e.nbytes} bytes in the snapshot, the live tensor has"
                                  f" {dst.numel() * dst.element_size()}")
            if dst.is_contiguous() and not (dst.is_conj() or dst.is_neg()) and dst.device.type in ("cpu", "cuda"):
                targets.append(dst.detach())  # the bytes are copied by address: no autograd, no views
            else:
                targets.append(torch.empty_like(src))  # copied into the live tensor (or device) once verified
                strided.append((dst, targets[-1]))
            values.append(dst)
        state = unflatten(tree, values)
        missing = set(self.states) - set(state)
        if missing:
            raise RestoreError(f"{self.who} the snapshot of step {man.step} holds no state for {sorted(missing)}")
        # Into CPU tensors, verifying and copying are both memory-bound: a few threads, no more than training uses.
        # Into GPU tensors the copies are the device's, and hashing is the work: as many threads as a snapshot's.
        on_gpu = any(t.is_cuda for t in targets)
        threads = self._hash_threads() if on_gpu else min(_RESTORE_THREADS, torch.get_num_threads())
        self._restoring = man.step  # from here on, a failure leaves chunks of this step in the state
        copy_verified(buf, man, targets, threads=max(1, threads))
        with torch.no_grad():
            for dst, verified in strided:
                dst.copy_(verified)  # exact: the conjugate and negative bits are sign flips
        return state, man.nbytes

    def _gather_inventories(self, inv: P.Steps, loaded: int | None, rnd: int, stopped: int) -> _Inventories:
        """Every rank's sealed steps, and what `_Inventories` says beside them. `stopped`: this rank's reason to
        stop before listing its steps, 0 or a key of _STOPPED_BEFORE_INVENTORY."""
        epoch = secrets.randbits(62) + 1
        t = torch.full((_MAX_INVENTORY + 5,), -1, dtype=torch.int64)
        t[0] = epoch
        t[1] = -1 if loaded is None else loaded
        t[2] = stopped
        if len(inv.old_world) == 2:
            t[3], t[4] = inv.old_world
        mine = inv.steps[-_MAX_INVENTORY:]
        t[5:5 + len(mine)] = torch.tensor(mine, dtype=torch.int64)
        out = self._all_gather(t, f"every rank's inventory of sealed steps (restore round {rnd})")
        why: dict[int, list[int]] = {}
        for r, o in sorted(out.items()):
            if o[2] in _STOPPED_BEFORE_INVENTORY:
                why.setdefault(o[2], []).append(r)
        return _Inventories({r: [s for s in o[5:] if s >= 0] for r, o in out.items()}, out[min(out)][0],
                            {r: o[1] for r, o in out.items() if o[1] >= 0}, why,
                            {r: (o[3], o[4]) for r, o in out.items() if o[3] > 0})

    def _gather_restored(self, step: int | None, world_size: int,
                         what: str) -> tuple[dict[int, int | None], dict[int, int]]:
        """What each rank restored (a step, None: nothing, _CORRUPT or _FAILED), and the world size its shard
        was taken with."""
        t = torch.tensor([-1 if step is None else step, world_size], dtype=torch.int64)
        out = self._all_gather(t, f"every rank's result of {what}")
        return {r: (None if o[0] == -1 else o[0]) for r, o in out.items()}, {r: o[1] for r, o in out.items()}

    def _all_gather(self, t: torch.Tensor, what: str) -> dict[int, list[int]]:
        """Every rank's `t`, by rank (called on every rank; without torch.distributed, this rank's only). A rank
        that does not come within _agree_s, or died, is a RestoreError that says what was awaited."""
        if self._pg is None:
            return {self.rank: t.tolist()}
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        t0 = time.monotonic()
        try:
            dist.all_gather(out, t, group=self._pg)
        except RuntimeError as e:  # gloo's timeout, and a peer's closed connection (DistBackendError)
            raise RestoreError(f"{self.who} waited {time.monotonic() - t0:.1f} s (at most {self._agree_s:.0f} s) for"
                               f" {what}: {e}") from e
        return {r: o.tolist() for r, o in enumerate(out)}

    # ---- shutdown --------------------------------------------------------------------------------

    def close(self, shutdown_daemon: bool = False) -> None:
        """Wait for the last snapshot, stop the copy thread; optionally stop the node's daemon (and free its memory)."""
        if self._closed:
            return
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
        try:
            self.wait()
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._queue.put(None)
            job = self._job
            given_up = job is not None and not job.sealed.is_set()
            if given_up:
                # The last snapshot did not seal in time. Once close() returns, the state may change under a copy
                # that is still running: its seal must never reach the daemon (nor any later request of the thread).
                self.client.abort()
            self._worker.join(self.timeout_s)
            if self._worker.is_alive():
                # Its (GPU) copy may still write into a slot: page-locked memory must not be released under it.
                log.warning("%s close(): the copy thread is still busy after %.0f s; its slots stay mapped", self.who,
                            self.timeout_s)
            else:
                for path in list(self._maps):
                    self._unmap(path)
            try:
                if shutdown_daemon:
                    # (an aborted client sends nothing: a client of its own then)
                    client = DaemonClient(self.endpoint.address, self.timeout_s, self.who) if given_up else self.client
                    try:
                        client.request(P.Shutdown(remove=True))
                    finally:
                        if client is not self.client:
                            client.close()
            finally:
                self.client.close()
                self._life.release()
                self._close_group()

    def _close_group(self) -> None:
        """Destroy the Guard's own gloo group (its connections to every other rank): a local act, not a collective."""
        pg, self._pg = self._pg, None
        if pg is None or not dist.is_initialized():  # the default group's destruction took it along
            return
        try:
            dist.destroy_process_group(pg)
        except (ValueError, RuntimeError) as e:  # destroyed already, by the user's own teardown
            log.debug("%s close(): its gloo group is gone already: %s", self.who, e)

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _seal_at_exit(ref: "weakref.ref[Guard]") -> None:
    """At interpreter exit, for a Guard that was never closed: wait (a request timeout at most) for its last snapshot
    to seal, which the copy thread, a daemon thread, would not live to do."""
    g = ref()
    job = None if g is None or g._closed else g._job
    if job is None or (job.sealed.is_set() and job.error is None):
        return
    try:
        g.wait(g.timeout_s)
    except Exception as e:  # exiting: say it, raise nothing
        log.error("%s at exit, without close(): the snapshot of step %d was not sealed: %s", g.who, job.step, e)


class _ListState:
    """Several optimizers as one Stateful."""

    def __init__(self, items: list[Any]):
        self.items = items

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.items)}

    def load_state_dict(self, sd: dict) -> None:
        for i, o in enumerate(self.items):
            o.load_state_dict(sd[str(i)])


def _node_hash(node: str) -> int:
    return int.from_bytes(hashlib.blake2b(node.encode(), digest_size=8).digest(), "little", signed=True)


def _machine_hash() -> int:
    """This machine, as its kernel's boot id (a rank and its daemon share a kernel: they talk over an IPC socket;
    containers on one machine share it too); 0 where there is none to read, which tells no machine apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return _node_hash(f.read().strip())
    except OSError:
        return 0


def _spans(ranks: list[int]) -> str:
    """Sorted ranks as runs: [0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def copy_verified(buf: torch.Tensor, man: Manifest, targets: list[torch.Tensor], threads: int = 1) -> None:
    """Copy a sealed shard (`buf`: the slot's bytes, uint8, on the CPU) into `targets`, one per manifest entry.

    Each chunk is hashed first, which brings it into the CPU cache, and its bytes are copied only once the
    checksum matches, with streaming stores (`memcopy.stream_copy`): one pass over the shard's memory and one
    over the targets', and no corrupt byte ever reaches a target. Threads take contiguous runs of chunks.
    Raise ChecksumError naming the first corrupt chunk found.

    With GPU targets the whole shard is verified first (the device's copies do not read the CPU cache), then
    each tensor is copied in one asynchronous call from the page-locked slot, instead of one call per chunk."""
    cs, nbytes = man.chunk_size, man.nbytes
    nchunks = len(man.checksums)
    base, view = buf.data_ptr(), memoryview(buf.numpy())
    spans = sorted((e.offset, e.nbytes, t) for e, t in zip(man.entries, targets) if e.nbytes)
    devices = {t.device for t in targets if t.is_cuda}
    if devices:
        verify_checksums(view, man, threads=threads)
        fault_point("trainer.restore.mid", man.step)
        for off, n, t in spans:
            if t.device.type == "cpu":
                stream_copy(t.data_ptr(), base + off, n)
            else:
                t.view(-1).view(torch.uint8).copy_(buf[off:off + n], non_blocking=True)
        for d in devices:
            torch.cuda.synchronize(d)
        return
    stop = threading.Event()

    def work(first: int, last: int) -> None:
        mid = (first + last) // 2 if first == 0 else None  # the fault point lies in this thread's run
        try:
            i = 0
            for c in range(first, last):
                if stop.is_set():
                    return
                a, b = c * cs, min((c + 1) * cs, nbytes)
                have = xxhash.xxh3_64_intdigest(view[a:b])
                if have != man.checksums[c]:
                    raise checksum_mismatch(man, c, have)
                while i < len(spans) and spans[i][0] + spans[i][1] <= a:
                    i += 1
                j = i
                while j < len(spans) and spans[j][0] < b:
                    off, n, t = spans[j]
                    x, y = max(off, a), min(off + n, b)
                    stream_copy(t.data_ptr() + (x - off), base + x, y - x)
                    j += 1
                if c == mid:
                    fault_point("trainer.restore.mid", man.step)
        except BaseException:
            stop.set()  # the other threads stop at their next chunk
            raise

    in_threads(nchunks, threads, work, "snapguard-restore")


@dataclass
class _Mapped:
    """A slot file mapped into this process: `t` views `mm`'s bytes; `ino` tells a replaced file from the same.
    `pinned`: page-locked (True), refused by CUDA (False, not asked again), or never asked (None)."""

    mm: Any
    t: torch.Tensor
    capacity: int
    ino: int
    pinned: bool | None


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock a shared-memory mapping so device-to-host copies run asynchronously at full speed; False
    (and a warning) where CUDA refuses, which leaves the copies correct but synchronous."""
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0:
        log.warning("cudaHostRegister of %d bytes failed (%s); copies from the GPU will be slower", t.numel(), err)
        return False
    return True


def _host_unregister(t: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    if int(err) != 0:
        log.warning("cudaHostUnregister of %d bytes failed (%s)", t.numel(), err)
