"""The fault injectors: each a named, parameterised class that does one real thing to a running cluster.

Every injector acts on real processes and files: SIGKILL and SIGSTOP to pids, bytes flipped in a
shared-memory slot file, daemon-to-daemon traffic dropped, delayed or duplicated by the loopback proxy
between the daemons (`chaos.proxy`). None of them mocks what is tested. An injector also says what a
correct system does about it (`restart`: the ranks must restart; `expect_failure`: the job must stop
with a clear error) and which evidence in the logs shows that the fault was noticed (`detect`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack

from snapguard.config import slot_dir_name
from snapguard.demo import MAX_STEPS_LOST
from snapguard.errors import ConfigError, SnapGuardError

if TYPE_CHECKING:  # the harness: cluster, proxy, log offsets
    from snapguard.chaos.harness import FaultRecord, Run

PHASES = {"copy.mid": "trainer.copy.mid", "copy.done": "trainer.copy.done", "restore.mid": "trainer.restore.mid"}


@dataclass
class Injected:
    """What an injector did, for the report."""

    action: str
    rank: int | None = None
    node: str | None = None


class Fault:
    kind: ClassVar[str] = ""
    params: ClassVar[dict[str, type]] = {}  # accepted parameters and their types
    restart: ClassVar[bool] = True  # a correct system restarts the ranks after this fault
    rides_out: ClassVar[bool] = False  # a correct system never restarts the ranks for this fault
    min_m: ClassVar[int] = 1  # the parity chunks a cluster needs for this fault to be survivable
    expect_failure: ClassVar[bool] = False  # a correct system stops with a clear error
    # it destroys data or parity the daemons hold, so the cluster tolerates fewer losses until every daemon has
    # protected a newer step: the next fault waits for that, else it could be one loss more than m covers
    takes_redundancy: ClassVar[bool] = False

    def __init__(self, **kw: Any):
        self.kw = kw

    def arm(self, run: "Run", index: int) -> None:
        """Before the run starts: prepare what must be in place from the first attempt on."""

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        raise NotImplementedError

    def fired(self, run: "Run") -> float | None:
        """For faults armed to fire by themselves (a phase kill): the time it fired, or None."""
        return None

    def detect(self, run: "Run", since: "dict[str, int]") -> list[str]:
        """Evidence, in the daemons' and workers' logs written since injection, that the fault was noticed."""
        return []

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        """Whose evidence (the prefix of a `detect` line: "restore", "daemon") must show that a correct system
        noticed the fault, as it played out in `rec`; None where noticing it is not required."""
        return None

    def remark(self, run: "Run", rec: "FaultRecord") -> str:
        """Anything the report should say about how the fault played out, besides its outcome."""
        return ""

    def failed_attempts_needed(self) -> int:
        """How many attempts this fault must have ended, as it was armed, for its test to have happened."""
        return 0

    def max_steps_lost(self, run: "Run") -> int | None:
        """How many of the steps trained before this fault a restart may have to train again: the step whose
        snapshot was in flight, and one more (a step some rank had sealed past the newest one every rank
        holds, or a newest step found corrupt). More means state was lost. None: no bound in steps."""
        return MAX_STEPS_LOST

    def settle(self, run: "Run") -> None:
        """Called when the fault has played out (recovery or the end of the run): undo what the harness set up."""


def _pid(run: "Run", rank: int) -> int:
    p = run.cluster.workers.get(rank)
    if p is None or p.poll() is not None:
        raise SnapGuardError(f"rank {rank} is not running (attempt {run.cluster.attempt})")
    return p.pid


def _grep(run: "Run", since: dict[str, int], prefix: str, needle: str) -> list[str]:
    """Lines containing `needle` in the logs named prefix.* written after the offsets in `since`."""
    hits = []
    for path in sorted(glob.glob(os.path.join(run.cluster.spec.workdir, f"{prefix}.*.log"))):
        try:
            with open(path, "rb") as f:
                f.seek(since.get(path, 0))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            continue
        hits += [f"{os.path.basename(path)}: {line.strip()}" for line in text.splitlines() if needle in line]
    return hits


class KillRank(Fault):
    """SIGKILL one rank: now (a random moment of the step it is in), or at a named phase of the snapshot
    protocol (copy.mid: half of its tensors are in the slot; copy.done: all bytes copied, seal not sent)
    via the trainer's own fault points, or mid-restore (restore.mid: the rank is killed now and its next
    attempt dies half-way through loading the snapshot, so recovery itself is interrupted)."""

    kind = "kill_rank"
    params = {"rank": int, "phase": str}

    def arm(self, run: "Run", index: int) -> None:
        phase = self.kw.get("phase")
        if phase in ("copy.mid", "copy.done"):
            self.once = os.path.join(run.cluster.out, f"fault{index}.once")
            self.rank = self.kw.get("rank", run.rnd.randrange(run.cluster.world))
            self.step = run.specs[index].at_step + 1
            run.add_worker_fault(f"{PHASES[phase]}@{self.step}/r{self.rank}#{self.once}")

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        phase = self.kw.get("phase")
        if phase in ("copy.mid", "copy.done"):
            return Injected(f"armed: rank {self.rank} SIGKILLs itself at {PHASES[phase]} of step {self.step}",
                            rank=self.rank)
        rank = self.kw.get("rank", rnd.randrange(run.cluster.world))
        pid = _pid(run, rank)
        extra = ""
        if phase == "restore.mid":
            once = os.path.join(run.cluster.out, f"fault-restore-{time.time_ns()}.once")
            run.add_worker_fault(f"{PHASES[phase]}/r{rank}#{once}")
            extra = f"; its next attempt dies at {PHASES[phase]}"
        os.kill(pid, signal.SIGKILL)
        return Injected(f"SIGKILL rank {rank} (pid {pid}){extra}", rank=rank)

    def failed_attempts_needed(self) -> int:
        return 2 if self.kw.get("phase") == "restore.mid" else 0  # killed, then killed again half-way through restoring

    def fired(self, run: "Run") -> float | None:
        once = getattr(self, "once", None)
        if once and os.path.exists(once):
            return os.path.getmtime(once)
        return None


class HangRank(Fault):
    """SIGSTOP one rank: it holds its sockets and memory but never answers; the others block in their
    next collective. Only the supervisor's hang timeout (torchrun's) gets the job going again."""

    kind = "hang_rank"
    params = {"rank": int}

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        rank = self.kw.get("rank", rnd.randrange(run.cluster.world))
        pid = _pid(run, rank)
        os.kill(pid, signal.SIGSTOP)
        return Injected(f"SIGSTOP rank {rank} (pid {pid})", rank=rank)


class KillDaemon(Fault):
    """SIGKILL one node's daemon; the supervisor restarts it at once and it re-adopts its sealed slots
    from shared memory. Ranks whose request was in flight fail and restart; others carry on."""

    kind = "kill_daemon"
    params = {"node": str}
    restart = False  # either outcome is correct: ranks ride it out, or restart and restore
    takes_redundancy = True  # the parity the daemon held for its peers lived in its memory

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        node = self.kw.get("node") or rnd.choice(run.cluster.names)
        d = run.cluster.daemons.get(node)
        if d is None or d.poll() is not None:
            raise SnapGuardError(f"the daemon of {node} is not running")
        os.kill(d.pid, signal.SIGKILL)  # left in cluster.daemons: the supervisor sees it die
        self.node = node
        return Injected(f"SIGKILL daemon of {node} (pid {d.pid})", node=node)

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        hits = _first_in(_grep(run, since, "daemon", "re-adopted rank"), getattr(self, "node", None))
        return [f"daemon: {h.split(': ', 1)[0]} re-adopted its slots after the restart" for h in hits]

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        # past step 0 every rank has sealed a step (the first may still be on its way): the restarted daemon must
        # have taken its slots back
        return "daemon" if (rec.step or 0) >= 1 or (rec.attempt or 0) > 0 else None


class LoseNode(Fault):
    """A machine dies: SIGKILL its daemon and ranks, wipe its shared memory. Its replacement starts
    empty and rebuilds the lost shards from the surviving nodes' data and parity."""

    kind = "lose_node"
    params = {"node": str}
    takes_redundancy = True

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        self.node = self.kw.get("node") or rnd.choice(run.cluster.names)
        run.cluster.lose_node(self.node)
        return Injected(f"lost {self.node}: daemon and ranks SIGKILLed, shared memory wiped", node=self.node)

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        node = getattr(self, "node", None)
        return [f"restore: {h}" for h in _first_in(_grep(run, since, "daemon", "rebuilt step"), node)]

    def max_steps_lost(self, run: "Run") -> int | None:
        return _node_loss_bound(run)


class LoseNodeInRebuild(LoseNode):
    """A second machine dies while the first is being recovered: lose a node, and then the first peer that
    serves a piece of its rebuild, as it serves it. That peer's daemon stalls at its `daemon.serve.fetch` fault
    point, the piece unsent, until the harness has lost its node too. The first node's replacement must count
    the peer as lost once it stops answering, fetch the pieces still missing from the others, and the peer's
    replacement is rebuilt in turn. Two nodes lost: survivable with m >= 2."""

    kind = "lose_node_in_rebuild"
    min_m = 2

    def arm(self, run: "Run", index: int) -> None:
        base = os.path.join(run.cluster.out, f"fault{index}.serve")
        self.once, self.stall = base + ".once", base + ".stall"
        for path in (self.once, self.stall):  # with the once-file in place, no daemon stops at the point yet
            open(path, "w").close()
        run.add_daemon_fault(f"daemon.serve.fetch#{self.once}%{self.stall}")
        self.second = None

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        lost = super().inject(run, rnd)
        os.unlink(self.once)  # the first daemon to serve a fetch from now on creates it, writes its pid, and stalls
        run.on_tick.append(self._lose_server)
        lost.action += "; the first peer to serve a piece of its rebuild is lost as it serves it"
        return lost

    def _lose_server(self, run: "Run") -> bool:
        """Once a daemon stalls at the point: lose its node. True while none has."""
        try:
            with open(self.once) as f:
                pid = f.read()
        except FileNotFoundError:
            return True
        if not pid:
            return True  # created, its pid not written yet
        c = run.cluster
        node = next((n for n, d in c.daemons.items() if d.pid == int(pid)), None)
        if node is None:
            raise SnapGuardError(f"{self.kind}: the daemon that served the fetch (pid {pid}) is none of this cluster's")
        c.lose_node(node)
        self.second = node
        self.settle(run)
        run.say(f"lost {node} as it served a piece of the rebuild of {self.node}", "fault")
        return False

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        if self.second is None:
            return []
        lost = _first_in(_grep(run, since, "daemon", f"counting peer {self.second} as lost"), self.node)
        rebuilt = _grep(run, since, "daemon", "rebuilt step")
        return [f"restore: {h}" for h in lost + _first_in(rebuilt, self.node) + _first_in(rebuilt, self.second)]

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        return "restore"

    def remark(self, run: "Run", rec: "FaultRecord") -> str:
        return f"{self.second} lost in the middle of the rebuild" if self.second else "no peer served the rebuild"

    def settle(self, run: "Run") -> None:
        stall = getattr(self, "stall", None)
        if stall and os.path.exists(stall):
            os.unlink(stall)  # a daemon still stopped at the point goes on


class CorruptSlot(Fault):
    """SIGKILL a rank, then flip bytes in its newest sealed slot in shared memory (bit rot, a stray write),
    so the restart must restore: the checksums must catch it and restore must use an older step or rebuild
    the shard from the peers, never load the bad bytes."""

    kind = "corrupt_slot"
    params = {"node": str, "rank": int, "nbytes": int}
    takes_redundancy = True  # the flipped chunk of its step is one erasure for that step's rebuilds
    SEAL_GRACE_S = 0.5  # for a Seal the rank sent before it died: the daemon still handles it

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        c = run.cluster
        node = self.kw.get("node") or rnd.choice(c.names)
        ranks = [r for r in range(c.world) if c.node_of(r) == node]
        rank = self.kw.get("rank", rnd.choice(ranks))
        if c.node_of(rank) != node:
            raise ConfigError(f"corrupt_slot: rank {rank} is not on {node}")
        d = os.path.join(c.shm_dir(node), slot_dir_name(c.spec.job, node))
        if not _sealed_steps(d, rank):
            raise SnapGuardError(f"corrupt_slot: rank {rank} has no sealed slot in {d}")
        # Killed first: a rank that lives on may seal a newer step right after the bytes are flipped, and
        # the restart would then restore past them without reading them.
        pid = _pid(run, rank)
        os.kill(pid, signal.SIGKILL)
        try:
            c.workers[rank].wait(10)
        except subprocess.TimeoutExpired:
            raise SnapGuardError(f"corrupt_slot: rank {rank} (pid {pid}) still runs 10 s after SIGKILL") from None
        time.sleep(self.SEAL_GRACE_S)
        sealed = _sealed_steps(d, rank)
        if not sealed:
            raise SnapGuardError(f"corrupt_slot: rank {rank} has no sealed slot in {d} after SIGKILL")
        self.step, path = max(sealed.items())
        self.node, self.rank = node, rank
        n = self.kw.get("nbytes", 16)
        size = os.path.getsize(path)
        where = sorted({0, size // 2, max(0, size // 2 - 4096)})
        with open(path, "r+b") as f:
            for off in where:
                f.seek(off)
                data = bytearray(f.read(min(n, size - off)))
                f.seek(off)
                f.write(bytes(b ^ 0xA5 for b in data))
        return Injected(f"SIGKILL rank {rank} (pid {pid}); flipped {n} bytes at offsets {where} of"
                        f" {os.path.basename(path)}, its newest sealed step {self.step} (on {node})", rank=rank, node=node)

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        if not hasattr(self, "rank"):
            return []
        hits = _grep(run, since, "daemon", "dropping it") + _grep(run, since, "daemon", "not re-adopting")
        mine = [h for h in hits if re.search(rf"\brank {self.rank}\b", h)]  # not another rank's later corruption
        return [f"restore: checksum mismatch caught ({h.split(': ', 1)[0]})" for h in _first_in(mine, self.node)]

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        return None if self._never_read(run, rec) else "restore"

    def remark(self, run: "Run", rec: "FaultRecord") -> str:
        if self._never_read(run, rec):
            return (f"the corrupted step {self.step} was never read: the ranks restored step {rec.restored_step},"
                    " the newest step every rank held, and skipped no corrupt snapshot")
        return ""

    def _never_read(self, run: "Run", rec: "FaultRecord") -> bool:
        """Whether the restart restored an older step than the corrupted one without trying that one: restore falls
        back from a step only when it catches corruption in it, and says so. An older step is restored without
        trying the newer one when some rank had not sealed it (one still waiting for its slot, say)."""
        if rec.restored_step is None or rec.restored_step >= self.step:
            return False
        lines = _grep(run, rec.offsets, "worker", f"restored step {rec.restored_step} in")
        return bool(lines) and not any("corrupt" in line for line in lines)


def _first_in(hits: list[str], node: str | None) -> list[str]:
    """The first of `_grep`'s hits in `node`'s daemon log: the logs are read to the end of the run, and another
    node's lines, or a later fault's, are no evidence of this one's."""
    return [h for h in hits if h.startswith(f"daemon.{node}.log: ")][:1]


def _node_loss_bound(run: "Run") -> int | None:
    """A lost node is rebuilt to the newest step its group protected. With two slots per rank, a rank never
    seals more than one step past that one, so the bound of every other fault holds. With three (the daemon's
    default under erasure coding) a rank may keep overwriting the step being protected while the protected one
    stays put, so the steps lost are bounded in time, not in steps."""
    return MAX_STEPS_LOST if run.conf.slots_per_rank == 2 else None


def _sealed_steps(directory: str, rank: int) -> dict[int, str]:
    """The steps `rank` holds sealed in a daemon's slot directory, and their data files."""
    out = {}
    for path in glob.glob(os.path.join(directory, f"r{rank:05d}.s*.data")):
        try:
            with open(path[:-len(".data")] + ".manifest", "rb") as f:
                out[int(msgpack.unpackb(f.read())["step"])] = path
        except FileNotFoundError:
            continue  # free, or being written
    return out


class _Net(Fault):
    restart, rides_out = False, True
    action: ClassVar[str] = ""

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        link = self.kw.get("link")
        links = run.proxy.links_matching(link)
        if not links:
            raise ConfigError(f"{self.kind}: no daemon-to-daemon link matches {link!r}")
        duration = float(self.kw.get("duration_s", 4.0))
        self.window = run.proxy.set_policy(links, self.action, float(self.kw.get("probability", 1.0)),
                             float(self.kw.get("delay_ms", 0.0)) / 1000, duration)
        what = {"drop": "drop {p:.0%} of", "duplicate": "duplicate {p:.0%} of", "delay": "delay by {d} ms"}[self.action]
        what = what.format(p=float(self.kw.get("probability", 1.0)), d=self.kw.get("delay_ms", 0))
        return Injected(f"proxy: {what} the messages on {len(links)} link(s) for {duration:.1f} s")

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        s = run.proxy.stats(self.window)
        return [f"proxy: {s[k]} message(s) {k}" for k in ("dropped", "delayed", "duplicated") if s[k]]

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        return "proxy"  # a window in which no message was touched tested nothing


class NetDrop(_Net):
    """Drop a fraction of the daemon-to-daemon messages (both directions) for a while."""

    kind, action = "net_drop", "drop"
    params = {"probability": float, "duration_s": float, "link": str}


class NetDelay(_Net):
    """Delay every daemon-to-daemon message by a fixed time for a while (order is kept)."""

    kind, action = "net_delay", "delay"
    params = {"delay_ms": float, "duration_s": float, "link": str}


_REPLAY = re.compile(r"daemon\.(\S+)\.log: .*replayed message from (\S+) \(boot (\d+), seq (\d+);")
# A copy queued for a daemon that died reaches its next run, which refuses both copies of holdings and chunks as
# sent to an earlier run (a request it answers, and refuses the second copy of as a replay)
_EARLIER_RUN = re.compile(r"daemon\.(\S+)\.log: .*Peer\w+ from (\S+) \(boot (\d+), seq (\d+)\)"
                          r" (?:was sent to an earlier run|may predate this run)")


class NetDuplicate(_Net):
    """Send a fraction of the daemon-to-daemon messages twice: the receiving daemon must refuse every
    second copy of a request as a replay, and nothing else may change."""

    kind, action = "net_duplicate", "duplicate"
    params = {"probability": float, "duration_s": float, "link": str}

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        found = super().detect(run, since)
        # The logs are read to the end of the run: count the refusals of this window's copies, not a later one's.
        twice = run.proxy.sent_twice(self.window)
        replays, earlier = set(), set()
        for hit in _grep(run, since, "daemon", ", seq "):  # both kinds of refusal name the copy's boot and seq
            for pattern, refused in ((_REPLAY, replays), (_EARLIER_RUN, earlier)):
                m = pattern.match(hit)
                if m and (m[1], m[2], int(m[3]), int(m[4])) in twice:
                    refused.add((m[1], m[2], int(m[3]), int(m[4])))
        later = earlier - replays
        if replays:
            found.append(f"daemon: {len(replays)} of {len(twice)} duplicated request(s) refused as replays")
        if later:
            found.append(f"daemon: {len(later)} of {len(twice)} duplicated request(s) refused by the next run of a"
                         " daemon that died, as sent to its earlier run")
        return found

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        # A duplicated request must be refused as a replay; a duplicated reply or chunk needs no notice.
        return "daemon" if run.proxy.stats(getattr(self, "window", -1))["duplicated_requests"] else "proxy"


class FillShm(Fault):
    """The node's /dev/shm is full when its machine is replaced: the node is lost and its replacement
    daemon finds only `free` bytes of shared memory (enforced with the daemon's --shm-limit, which uses
    the same check and message as a full tmpfs: this machine's /dev/shm is shared with other jobs and
    is never filled for real). The ranks must fail with a clear ShmSpaceError; after `attempts` failed
    attempts the memory is freed (the replacement daemon restarts without the limit) and the job must
    recover. With attempts = 0 the memory stays full and the job must stop with that error."""

    kind = "fill_shm"
    params = {"node": str, "free": str, "attempts": int}
    takes_redundancy = True  # the node is lost

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        return "daemon"  # the ShmSpaceError

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        node = self.kw.get("node") or rnd.choice(run.cluster.names)
        self.node = node
        self.left = int(self.kw.get("attempts", 1))
        run.cluster.lose_node(node)
        run.cluster.daemon_args[node] = ["--shm-limit", str(self.kw.get("free", "64K"))]
        run.on_restart.append(self._after_failed_attempt)
        return Injected(f"lost {node}; its replacement has only {self.kw.get('free', '64K')} of /dev/shm free", node=node)

    @property
    def expect_failure(self) -> bool:  # type: ignore[override]
        return int(self.kw.get("attempts", 1)) == 0

    def _after_failed_attempt(self, run: "Run", attempt: int) -> bool:
        """After each failed attempt past the first (the loss): free the memory once `attempts` have failed."""
        if attempt == run.records[self.index].attempt:
            return True  # the attempt in which the node was lost; the replacement starts now
        self.left -= 1
        if self.left == 0:
            self.settle(run)
            return False
        return True

    def settle(self, run: "Run") -> None:
        node = getattr(self, "node", None)
        if node and run.cluster.daemon_args.pop(node, None) is not None:
            d = run.cluster.daemons.get(node)
            if d is not None and d.poll() is None:
                d.kill()  # the supervisor starts it again, now without the limit
                d.wait(10)
            run.say(f"freed /dev/shm on {node}: its daemon restarts without the limit")

    def max_steps_lost(self, run: "Run") -> int | None:
        return _node_loss_bound(run)

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        hits = _grep(run, since, "worker", "ShmSpaceError")
        return [f"daemon: refused the slots with a clear ShmSpaceError ({hits[0].split(': ', 1)[0]})"] if hits else []


class LoseMoreThanM(Fault):
    """Lose m+1 nodes (or the named ones) at once: more than the code can rebuild. A correct system
    stops with a clear RestoreError naming the lost nodes; it never trains on from a wrong state or
    from scratch. With persistence to disk (`persist_every`), it restores the newest step every rank
    persisted, and trains on."""

    kind = "lose_more_than_m"
    params = {"nodes": list}
    takes_redundancy = True  # with persistence the job goes on, and every node's parity is new
    persisting = False

    def arm(self, run: "Run", index: int) -> None:
        self.persisting = run.conf.persist_every is not None

    @property
    def expect_failure(self) -> bool:  # type: ignore[override]
        return not self.persisting

    def evidence_needed(self, run: "Run", rec: "FaultRecord") -> str | None:
        return "restore" if self.persisting else None

    def max_steps_lost(self, run: "Run") -> int | None:
        # The newest persisted step is at most an interval old, or two while the newest one is being written.
        return 2 * run.conf.persist_every + MAX_STEPS_LOST if self.persisting else None

    def remark(self, run: "Run", rec: "FaultRecord") -> str:
        return "restored from disk" if self.persisting else ""

    def inject(self, run: "Run", rnd: random.Random) -> Injected:
        c = run.cluster
        nodes = self.kw.get("nodes") or rnd.sample(c.names, c.spec.m + 1)
        for n in nodes:
            c.lose_node(n)
        return Injected(f"lost {len(nodes)} nodes at once ({', '.join(nodes)}), m={c.spec.m}", node=",".join(nodes))

    def detect(self, run: "Run", since: dict[str, int]) -> list[str]:
        if self.persisting:
            return [f"restore: {h}" for h in _grep(run, since, "daemon", "from disk")][:2]
        hits = [h for h in _grep(run, since, "worker", "cannot restore") if "RestoreError" in h and "cannot be rebuilt" in h]
        return [f"restore: RestoreError: cannot restore, shards cannot be rebuilt ({hits[0].split(': ', 1)[0]})"] if hits else []


KINDS: dict[str, type[Fault]] = {f.kind: f for f in (KillRank, HangRank, KillDaemon, LoseNode, LoseNodeInRebuild,
                                                      CorruptSlot, NetDrop, NetDelay, NetDuplicate, FillShm,
                                                      LoseMoreThanM)}
# Kinds a correct system survives (given the parity each needs, `min_m`): what random scenarios draw from.
RANDOM_KINDS = ("kill_rank", "kill_rank", "hang_rank", "kill_daemon", "lose_node", "corrupt_slot", "net_drop",
                "net_delay", "net_duplicate", "fill_shm", "lose_node_in_rebuild")


def check_params(kind: str, params: dict, conf: Any, where: str) -> None:
    """Refuse unknown parameters, wrong types, and ranks or nodes the cluster does not have."""
    cls = KINDS[kind]
    if conf.m < cls.min_m:
        raise ConfigError(f"{where}: {kind} needs m >= {cls.min_m} to be survivable, the cluster has m={conf.m}")
    for k, v in params.items():
        want = cls.params.get(k)
        if want is None:
            raise ConfigError(f"{where}: unknown parameter {k!r}; {kind} takes {sorted(cls.params) or 'none'}")
        ok = isinstance(v, want) or (want is float and isinstance(v, int))
        if not ok or isinstance(v, bool):
            raise ConfigError(f"{where}: {k} must be {want.__name__}, got {v!r}")
    world = conf.nodes * conf.ranks_per_node
    names = [f"node{i}" for i in range(conf.nodes)]
    if "rank" in params and not 0 <= params["rank"] < world:
        raise ConfigError(f"{where}: rank {params['rank']} is outside 0..{world - 1}")
    if "node" in params and params["node"] not in names:
        raise ConfigError(f"{where}: node {params['node']!r} is not one of {names}")
    if "node" in params and "rank" in params and params["rank"] // conf.ranks_per_node != names.index(params["node"]):
        raise ConfigError(f"{where}: rank {params['rank']} is not on {params['node']}"
                          f" (ranks {conf.ranks_per_node}*i .. {conf.ranks_per_node}*i+{conf.ranks_per_node - 1} are on node<i>)")
    if "link" in params and not any(fnmatch.fnmatch(f"{a}->{b}", params["link"]) for a in names for b in names if a != b):
        raise ConfigError(f"{where}: link {params['link']!r} matches no daemon-to-daemon link (named like"
                          f" \"node0->node1\"; shell patterns such as \"node0->*\" work)")
    if "phase" in params and params["phase"] not in PHASES:
        raise ConfigError(f"{where}: phase {params['phase']!r} is not one of {sorted(PHASES)}")
    if "nodes" in params and (not all(isinstance(n, str) for n in params["nodes"])
                              or not set(params["nodes"]) <= set(names) or len(set(params["nodes"])) <= conf.m
                              or len(set(params["nodes"])) < len(params["nodes"])):
        raise ConfigError(f"{where}: nodes must be more than m={conf.m} different nodes of {names}, got"
                          f" {params['nodes']}")
    for k in ("probability",):
        if k in params and not 0 < params[k] <= 1:
            raise ConfigError(f"{where}: {k} must be in (0, 1], got {params[k]}")
    # NaN fails every comparison, so each bound is written to refuse it
    if "duration_s" in params and not 0 < params["duration_s"] <= 3600:
        raise ConfigError(f"{where}: duration_s must be in (0, 3600] seconds, got {params['duration_s']}")
    if "delay_ms" in params and not 0 <= params["delay_ms"] <= 60_000:
        raise ConfigError(f"{where}: delay_ms must be in [0, 60000], got {params['delay_ms']}")
    for k, least in (("nbytes", 1), ("attempts", 0)):
        if k in params and params[k] < least:
            raise ConfigError(f"{where}: {k} must be at least {least}, got {params[k]}")
    if "free" in params:
        import argparse

        from snapguard.daemon.__main__ import parse_size

        try:
            parse_size(params["free"])
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{where}: free: {e}") from None
