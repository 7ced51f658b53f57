"""The chaos harness: run a scenario on a simulated cluster, inject its faults, judge the outcome.

1. A reference run: the same job on the same cluster shape, no snapshots, no faults: the truth.
2. The protected run: `snapguard.cluster.Cluster` with every daemon-to-daemon link routed through
   the loopback proxy, supervised like torchrun under Slurm or Kubernetes would be (a dead rank
   restarts every rank, a hang times out, a dead daemon is restarted, a lost node is replaced by an
   empty one). Faults are injected in order, each once training has reached its step and the previous
   fault has played out.
3. The verdict: every loss the run logged (in every attempt) and every byte of the final model and
   optimizer state equal the reference; each fault was noticed by the part that should notice it and
   recovered from, its restart losing no more than the steps whose snapshots were in flight (a job that
   starts again from scratch reproduces the reference too, so this is checked apart); a fault no code
   can survive ended the job with the clear error it must.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from snapguard.cluster import Cluster, ClusterSpec
from snapguard.demo import compare, read_losses, restarts
from snapguard.errors import ConfigError, SnapGuardError
from snapguard.procs import stop_signals_ignored

from snapguard.chaos.faults import KINDS, Fault, Injected
from snapguard.chaos.proxy import PeerProxy
from snapguard.chaos.scenario import ClusterConf, FaultSpec, Scenario

WORKER_TIMEOUT_S = "15"  # trainer-side daemon request timeout in chaos runs (SNAPGUARD_TIMEOUT_S)
REFERENCE_TIMEOUT_S = 600


class _Stop(Exception):
    """Raised from the supervisor's callbacks to end the run: the expected failure has shown itself."""


@dataclass
class FaultRecord:
    index: int
    kind: str
    label: str
    at_step: int
    status: str = "pending"  # pending | armed | injected | not injected
    action: str = ""
    t: float | None = None  # seconds since the protected run started
    wall: float | None = None  # time.time() of the injection
    attempt: int | None = None
    step: int | None = None  # newest step every rank had logged in that attempt
    detected_by: list[str] = field(default_factory=list)
    restarted: bool = False
    failed_attempts: int = 0  # attempts that died because of it (the restart, and any that failed before training)
    reprotected_s: float | None = None  # for faults that take redundancy: until every daemon protected a newer step
    restored_step: int | None = None
    steps_lost: int | None = None  # steps trained before the failure that had to be trained again
    recovery_s: float | None = None  # from the fault to the first step of the attempt that trained on
    caught_up_s: float | None = None  # from the fault to training past the newest step reached before it
    outcome: str = ""
    ok: bool = False
    offsets: dict = field(default_factory=dict, repr=False)


class LossLog:
    """Follows the ranks' loss logs as they grow: per attempt, the steps each rank has logged."""

    def __init__(self, out: str, world: int):
        self.paths = [os.path.join(out, f"loss.r{r}.jsonl") for r in range(world)]
        self.pos = [0] * world
        self.last: dict[int, dict[int, int]] = {}  # attempt -> rank -> newest step
        self.first_t: dict[int, float] = {}  # attempt -> time of its first logged step
        self.first_step: dict[int, int] = {}  # attempt -> lowest first step over ranks

    def poll(self) -> None:
        for r, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.pos[r])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            self.pos[r] += end
            for line in data[:end].splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                a = row["attempt"]
                self.last.setdefault(a, {})[r] = row["step"]
                self.first_t.setdefault(a, row["t"])
                self.first_step[a] = min(self.first_step.get(a, row["step"]), row["step"])

    def progress(self, attempt: int, world: int) -> int:
        """Newest step every rank has logged in `attempt`; -1 while some rank has logged none."""
        last = self.last.get(attempt, {})
        return min((last.get(r, -1) for r in range(world)), default=-1)


class Run:
    """One protected run of a scenario. Faults reach the cluster, proxy and logs through this object."""

    PROTECT_POLL_S = 0.1  # while a fault waits for redundancy: how often the daemons are asked what they protect
    STATUS_TIMEOUT_S = 0.5  # and how long each may take to answer

    def __init__(self, scenario: Scenario, workdir: str, reference_out: str, seed: int | None = None,
                 say: Callable[[str], None] = print):
        self.scenario, self.conf = scenario, scenario.cluster
        self.workdir, self.reference_out = workdir, reference_out
        self.rnd = random.Random(scenario.seed if seed is None else seed)
        self._say = say
        self.specs: list[FaultSpec] = list(scenario.faults)
        self.faults: list[Fault] = []
        for i, spec in enumerate(self.specs):
            f = KINDS[spec.kind](**spec.params)
            f.index = i
            self.faults.append(f)
        self.records = [FaultRecord(i, s.kind, s.label, s.at_step) for i, s in enumerate(self.specs)]
        self.on_restart: list[Callable[["Run", int], bool]] = []
        self.on_tick: list[Callable[["Run"], bool]] = []  # called every tick while they return True
        self.timeline: list[dict] = []
        self.worker_faults: list[str] = []
        c = self.conf
        job = f"chaos{os.getpid()}{secrets.token_hex(2)}"
        self.cluster = Cluster(ClusterSpec(
            workdir=workdir, nodes=c.nodes, ranks_per_node=c.ranks_per_node, m=c.m, steps=c.steps, width=c.width,
            layers=c.layers, step_sleep=c.step_sleep, job=job, slots_per_rank=c.slots_per_rank,
            worker_args=list(c.worker_args), env={"SNAPGUARD_TIMEOUT_S": WORKER_TIMEOUT_S},
            persist_every=c.persist_every))
        self.proxy = PeerProxy(self.cluster.names, self.cluster.peer_address, job, self.cluster.secret.encode(),
                               seed=self.rnd.randrange(1 << 30))
        self.cluster.peer_routes.update(self.proxy.routes())
        self.losses = LossLog(self.cluster.out, self.cluster.world)
        self.next = 0
        self.t0 = time.time()
        self._last_poll = 0.0
        self._announced: set[int] = set()
        self._progress_line = 0
        self._attempt_offsets: dict[int, dict[str, int]] = {}
        self._inject_tries = 0
        self._last_protect_poll = 0.0
        self._awaiting_protection: set[int] = set()
        self.completed = False
        self.end_reason = ""

    # ---- helpers for the faults ----------------------------------------------------------------

    def say(self, what: str, kind: str = "info") -> None:
        step = self.losses.progress(self.cluster.attempt, self.cluster.world)
        t = time.time() - self.t0
        self.timeline.append({"t": round(t, 3), "attempt": self.cluster.attempt, "step": step, "kind": kind, "what": what})
        self._say(f"[{t:7.1f} s] step {step:>4}  attempt {max(self.cluster.attempt, 0):>2}  {kind.upper():<7} {what}")

    def add_worker_fault(self, entry: str) -> None:
        """Arm a trainer fault point (snapguard.faults) for every attempt started from now on."""
        self.worker_faults.append(entry)
        self.cluster.spec.env["SNAPGUARD_FAULTS"] = ",".join(self.worker_faults)

    def add_daemon_fault(self, entry: str) -> None:
        """Arm a daemon fault point (snapguard.faults) in every daemon started from now on."""
        env = self.cluster.daemon_env
        env["SNAPGUARD_FAULTS"] = ",".join(filter(None, [env.get("SNAPGUARD_FAULTS", ""), entry]))

    def log_offsets(self) -> dict[str, int]:
        out = {}
        for name in os.listdir(self.workdir):
            if name.endswith(".log"):
                path = os.path.join(self.workdir, name)
                out[path] = os.path.getsize(path)
        return out

    # ---- the supervisor's callbacks ------------------------------------------------------------

    def _settled(self, rec: FaultRecord, attempt: int, progress: int) -> bool:
        """Has the fault played out, so the next one may be injected? For a fault that took data or parity
        away, that includes every daemon protecting a step newer than the fault: until then the cluster
        survives fewer losses than m, and the next fault could be one too many."""
        if rec.status == "armed":
            return False
        if rec.attempt is None:
            return True
        f = self.faults[rec.index]
        if attempt > rec.attempt:
            if attempt not in self.losses.first_t:
                return False
        elif f.restart or f.expect_failure or progress < (rec.step or 0) + 2:
            return False
        if not f.takes_redundancy or rec.reprotected_s is not None:
            return True
        if rec.index not in self._awaiting_protection:
            self._awaiting_protection.add(rec.index)
            self.say(f"#{rec.index} {rec.label}: the next fault waits until every daemon protects step"
                     f" {self._reprotect_step(rec)} or newer", "wait")
        return False

    @staticmethod
    def _reprotect_step(rec: FaultRecord) -> int:
        # rec.step is the slowest rank's newest logged step; a faster one may have sealed the next one, whose
        # protection may predate the fault (parity of it now lost, or holding a chunk since corrupted)
        return (rec.step or 0) + 2

    def _watch_protection(self) -> None:
        """For each fault that took redundancy away: note when every daemon protects a step after it again."""
        waiting = [r for r, f in zip(self.records, self.faults)
                   if f.takes_redundancy and r.status == "injected" and r.reprotected_s is None]
        now = time.monotonic()
        if not waiting or now - self._last_protect_poll < self.PROTECT_POLL_S:
            return
        self._last_protect_poll = now
        lowest = None
        for node in self.cluster.names:
            d = self.cluster.daemons.get(node)
            if d is None or d.poll() is not None:
                return  # down: it protects nothing
            try:
                p = self.cluster.status(node, timeout_s=self.STATUS_TIMEOUT_S).protected
            except SnapGuardError:  # too busy to answer (a restore, a rebuild): it protects nothing new yet
                return
            lowest = p if lowest is None else min(lowest, p)
        for rec in waiting:
            if lowest is not None and lowest >= self._reprotect_step(rec):
                rec.reprotected_s = round(time.time() - rec.wall, 2)
                self.say(f"#{rec.index} {rec.label}: every daemon protects step {lowest} or newer again,"
                         f" {rec.reprotected_s} s after the fault", "info")

    def tick(self, cluster: Cluster) -> None:
        now = time.monotonic()
        if now - self._last_poll < 0.05:
            return
        self._last_poll = now
        self.losses.poll()
        a, world = cluster.attempt, cluster.world
        p = self.losses.progress(a, world)
        if a not in self._announced and a in self.losses.first_t:
            self._announced.add(a)
            if a > 0:
                self.say(f"attempt {a} trains on from step {self.losses.first_step[a]}"
                         f" (restored step {self.losses.first_step[a] - 1})", "resume")
        if p >= self._progress_line + 10:
            self._progress_line = p - p % 10
            self.say(f"all {world} ranks have trained step {p}", "step")
        self._check_armed(a, p)
        self._watch_protection()
        self.on_tick[:] = [cb for cb in self.on_tick if cb(self)]
        if self.next >= len(self.records):
            return
        rec = self.records[self.next]
        if p < rec.at_step or (self.next and not self._settled(self.records[self.next - 1], a, p)):
            return
        offsets = self.log_offsets()
        try:
            done: Injected = self.faults[self.next].inject(self, self.rnd)
        except ConfigError:
            raise  # a fault that can never be injected as written: waiting for it would only run out the clock
        except SnapGuardError as e:
            self._inject_tries += 1
            if self._inject_tries % 20 == 1:
                self.say(f"#{rec.index} {rec.label} cannot be injected yet: {e}", "wait")
            return
        self._inject_tries = 0
        rec.action, rec.offsets = done.action, offsets
        if done.action.startswith("armed"):
            rec.status = "armed"
        else:
            rec.status, rec.wall, rec.attempt, rec.step = "injected", time.time(), a, p
            rec.t = rec.wall - self.t0
        self.say(f"#{rec.index} {rec.label}: {done.action}", "fault")
        self.next += 1

    def _check_armed(self, attempt: int, progress: int) -> None:
        for rec, f in zip(self.records, self.faults):
            if rec.status == "armed":
                fired = f.fired(self)
                if fired is not None:
                    rec.status, rec.wall, rec.t, rec.attempt = "injected", fired, fired - self.t0, attempt
                    rec.step = progress
                    self.say(f"#{rec.index} {rec.label} fired", "fault")

    def event(self, cluster: Cluster, kind: str, detail: dict) -> None:
        a = cluster.attempt
        if kind == "attempt":
            self._attempt_offsets[a] = self.log_offsets()
            if a > 0:
                self.say(f"supervisor restarts every rank: attempt {a}", "restart")
            return
        if kind == "daemon_restarted":
            self.say(f"supervisor restarted the daemon of {detail['node']}", "restart")
            return
        if kind == "daemon_exit":
            why = f"supervisor: daemon of {detail['node']} exited (code {detail['code']})"
            self.say(why, "detect")
            for rec in self._injected_in(a):
                if rec.kind == "kill_daemon":
                    rec.detected_by.append(why)
            return
        self.losses.poll()
        self._check_armed(a, self.losses.progress(a, cluster.world))
        if kind == "rank_exit":
            codes = detail["codes"]
            why = "supervisor: " + ", ".join(f"rank {r} {'was SIGKILLed' if c == -9 else f'exited with code {c}'}"
                                             for r, c in sorted(codes.items()))
        else:
            why = f"supervisor: no rank logged a step for {detail['idle_s']:.1f} s (hang timeout {detail['timeout_s']:.0f} s)"
        self.say(why + "; SIGKILL every rank", "detect")
        blamed = self._injected_in(a)
        causes = [r for r in blamed if self.faults[r.index].restart or self.faults[r.index].expect_failure]
        # a net fault shares an attempt with a kill: the kill caused the restart; else the latest fault did
        blamed = causes or self._latest_to_blame(blamed)
        if not blamed and a not in self.losses.first_t:
            # an attempt that died before it trained: part of the recovery from the last fault
            injected = [r for r in self.records if r.status == "injected" and r.attempt is not None]
            blamed = self._latest_to_blame(injected)
        for rec in blamed:
            rec.detected_by.append(why if rec.attempt == a else f"{why} (attempt {a}, before it trained)")
            rec.restarted = True
            rec.failed_attempts += 1
        self.on_restart[:] = [cb for cb in self.on_restart if cb(self, a)]
        for rec, f in zip(self.records, self.faults):
            if f.expect_failure and rec.status == "injected" and a > rec.attempt:
                found = f.detect(self, self._attempt_offsets.get(a, {}))
                if found or a >= rec.attempt + 3:
                    self.end_reason = (f"stopped after the expected failure of #{rec.index} {rec.label}" if found else
                                       f"#{rec.index} {rec.label}: {a - rec.attempt} attempts failed without the expected error")
                    raise _Stop(self.end_reason)

    def _latest_to_blame(self, records: list[FaultRecord]) -> list[FaultRecord]:
        """The latest of `records` whose fault may restart the job (a daemon's kill, before a net fault), else the
        latest: a fault a correct system rides out is blamed only when nothing else can be, and is judged for it."""
        return [r for r in records if not self.faults[r.index].rides_out][-1:] or records[-1:]

    def _injected_in(self, attempt: int) -> list[FaultRecord]:
        return [r for r in self.records if r.status == "injected" and r.attempt == attempt]

    # ---- running -------------------------------------------------------------------------------

    def execute(self) -> None:
        c = self.conf
        for i, f in enumerate(self.faults):
            f.arm(self, i)
        max_restarts = c.max_restarts if c.max_restarts is not None else 2 * len(self.faults) + 3
        self.proxy.start()
        self.t0 = time.time()
        self.say(f"protected run: {c.nodes} nodes x {c.ranks_per_node} ranks, m={c.m}, {c.steps} steps, "
                 f"{len(self.faults)} fault(s); work dir {self.workdir}", "start")
        try:
            self.cluster.supervise(c.timeout_s, max_restarts, on_tick=self.tick, hang_timeout_s=c.hang_timeout_s,
                                   watch_daemons=True, on_event=self.event)
            self.completed = True
            self.end_reason = "every rank finished"
        except _Stop:
            pass
        except SnapGuardError as e:
            self.end_reason = str(e)
            self.say(f"the run failed: {e}", "end")
        finally:
            # A second Ctrl-C (or SIGTERM, which `snapguard` turns into one) must not leave daemons and ranks
            # behind, nor may a fault that fails to settle.
            with stop_signals_ignored():
                try:
                    for f in self.faults:
                        f.settle(self)
                    self.losses.poll()
                finally:
                    try:
                        self.cluster.close()
                    finally:
                        self.proxy.close()
        self.say(f"protected run over: {self.end_reason}", "end")

    # ---- the verdict ---------------------------------------------------------------------------

    def judge(self) -> dict:
        world = self.cluster.world
        rows = read_losses(self.cluster.out, world)
        by_attempt: dict[int, list[dict]] = {}
        for row in rows:
            by_attempt.setdefault(row["attempt"], []).append(row)
        expect_failure = [r for r, f in zip(self.records, self.faults) if f.expect_failure]
        for rec, f in zip(self.records, self.faults):
            if rec.status != "injected":
                rec.status = "not injected" if rec.status == "pending" else "armed, never fired"
                rec.outcome, rec.ok = f"{rec.status}: the run ended first", False
                prev = self.records[rec.index - 1] if rec.index else None
                if rec.status == "not injected" and prev and prev.index in self._awaiting_protection \
                        and prev.reprotected_s is None:
                    rec.outcome += (f", while #{prev.index} {prev.label} waited for every daemon to protect step"
                                    f" {self._reprotect_step(prev)}")
                continue
            rec.detected_by += [d for d in f.detect(self, rec.offsets) if d not in rec.detected_by]
            later = sorted(a for a in by_attempt if a > rec.attempt)
            if f.expect_failure:
                trained_on = [a for a in later if any(r["step"] > (rec.step or 0) for r in by_attempt[a])]
                evidence = [d for d in rec.detected_by if not d.startswith("supervisor")]
                rec.ok = bool(evidence) and not trained_on and not self.completed
                rec.outcome = ("expected failure detected" if rec.ok else
                               "FAIL: the job trained on after an unrecoverable fault" if trained_on or self.completed else
                               "FAIL: the job did not stop with the expected clear error")
                continue
            if rec.restarted and later:
                b = later[0]
                before = [r["step"] for a in by_attempt if rec.attempt <= a < b for r in by_attempt[a]]
                reached = max(before, default=-1)
                first = min(r["step"] for r in by_attempt[b])
                rec.restored_step = first - 1
                rec.steps_lost = max(0, reached - rec.restored_step)
                rec.recovery_s = round(min(r["t"] for r in by_attempt[b]) - rec.wall, 2)
                past = [r["t"] for r in by_attempt[b] if r["step"] > reached]
                rec.caught_up_s = round(min(past) - rec.wall, 2) if past else None
            needs = f.evidence_needed(self, rec)
            if needs and not any(d.startswith(needs) for d in rec.detected_by):
                rec.ok, rec.outcome = False, ("FAIL: it touched no message (no daemon-to-daemon traffic in its window):"
                                              " nothing was tested" if needs == "proxy" else
                                              f"FAIL: not detected by the {needs}")
            elif rec.restarted and not later:
                rec.ok, rec.outcome = False, "FAIL: the job never trained again"
            elif rec.failed_attempts < (need := f.failed_attempts_needed()):
                rec.ok, rec.outcome = False, (f"FAIL: it ended {rec.failed_attempts} attempt(s), not {need} as armed:"
                                              " the recovery it was to interrupt did not happen")
            elif rec.restored_step is not None and rec.restored_step < 0 and (rec.step or 0) >= 1:
                # every rank had logged step 1, so every rank had sealed step 0: nothing may start from scratch
                rec.ok, rec.outcome = False, (f"FAIL: the restart started from scratch after step {rec.steps_lost - 1}:"
                                              " every snapshot was lost")
            elif (bound := f.max_steps_lost(self)) is not None and (rec.steps_lost or 0) > bound:
                rec.ok, rec.outcome = False, (f"FAIL: {rec.steps_lost} steps lost: the restart restored step"
                                              f" {rec.restored_step} after step {rec.restored_step + rec.steps_lost}"
                                              f" (at most {bound} may be)")
            elif f.rides_out and rec.restarted:
                rec.ok, rec.outcome = False, ("FAIL: the ranks restarted after it and no other fault explains that:"
                                              " a correct system rides it out")
            elif f.restart and not rec.restarted:
                rec.ok, rec.outcome = False, "FAIL: no failure was seen (no restart)"
            else:
                rec.ok = True
                rec.outcome = "; ".join(x for x in ("recovered" if rec.restarted else "tolerated", f.remark(self, rec)) if x)
        if expect_failure:
            problems = _compare_logged(self.reference_out, self.cluster.out, world)
        elif self.completed:
            problems = compare(self.reference_out, self.cluster.out, world)
        else:
            problems = [f"the run did not finish: {self.end_reason}"]
        problems += self._unexplained_restarts(rows, by_attempt, expect_failure)
        bad = [f"fault #{r.index} {r.label}: {r.outcome}" for r in self.records if not r.ok]
        passed = not problems and not bad
        ref_rows = read_losses(self.reference_out, world)
        return {
            "scenario": self.scenario.to_dict(), "workdir": self.workdir, "reference": self.reference_out,
            "verdict": "PASS" if passed else "FAIL", "completed": self.completed, "end": self.end_reason,
            "expected_failure": bool(expect_failure), "problems": problems + bad,
            "restarts": max(by_attempt, default=0), "steps_logged": len(rows), "steps_retrained": _retrained(rows),
            "duration_s": round(time.time() - self.t0, 1),
            "faults": [{k: v for k, v in asdict(r).items() if k != "offsets"} for r in self.records],
            "timeline": self.timeline, "proxy": self.proxy.stats(),
            "losses": {"reference": _mean_curve(ref_rows), "run": _attempt_curves(rows)},
        }

    def _unexplained_restarts(self, rows: list[dict], by_attempt: dict[int, list[dict]],
                              expect_failure: list[FaultRecord]) -> list[str]:
        """The restarts no fault's record judges (the first attempt that trained after a fault that restarted the job):
        a crash nothing injected is a failure of its own, and its restart may have lost anything. After an expected
        failure, the job may only fail again."""
        judged = {min(later) for rec in self.records if rec.restarted and rec.attempt is not None
                  and (later := [a for a in by_attempt if a > rec.attempt])}
        cutoff = min((r.attempt for r in expect_failure if r.attempt is not None), default=None)
        return [f"attempt {a} began after a failure no fault explains, and "
                + (f"started from scratch after step {reached}" if restored < 0 else
                   f"restored step {restored} after step {reached}")
                for a, restored, reached in restarts(rows)
                if a not in judged and (cutoff is None or a <= cutoff)]


def _compare_logged(reference: str, run: str, world: int) -> list[str]:
    """Every logged loss of the run (any attempt) against the reference; for runs that stop early."""
    ref = {(r["rank"], r["step"]): r["loss"] for r in read_losses(reference, world)}
    return [f"rank {r['rank']} step {r['step']} (attempt {r['attempt']}): loss {float.fromhex(r['loss'])!r},"
            f" reference {ref.get((r['rank'], r['step'])) and float.fromhex(ref[(r['rank'], r['step'])])!r}"
            for r in read_losses(run, world) if ref.get((r["rank"], r["step"])) != r["loss"]]


def _retrained(rows: list[dict]) -> int:
    seen, again = set(), 0
    for r in rows:
        key = (r["rank"], r["step"])
        again += key in seen
        seen.add(key)
    return again


def _mean_curve(rows: list[dict]) -> list[list[float]]:
    per: dict[int, list[float]] = {}
    for r in rows:
        per.setdefault(r["step"], []).append(float.fromhex(r["loss"]))
    return [[s, sum(v) / len(v)] for s, v in sorted(per.items())]


def _attempt_curves(rows: list[dict]) -> dict[str, list[list[float]]]:
    """attempt -> [[step, mean loss over ranks, time]]."""
    per: dict[int, dict[int, list]] = {}
    for r in rows:
        per.setdefault(r["attempt"], {}).setdefault(r["step"], []).append((float.fromhex(r["loss"]), r["t"]))
    return {str(a): [[s, sum(x for x, _ in v) / len(v), max(t for _, t in v)] for s, v in sorted(steps.items())]
            for a, steps in sorted(per.items())}


# ---- the reference run --------------------------------------------------------------------------

def reference_key(c: ClusterConf) -> str:
    return f"ref-n{c.nodes}x{c.ranks_per_node}-s{c.steps}-w{c.width}-l{c.layers}"


def run_reference(c: ClusterConf, workdir: str, say: Callable[[str], None] = print) -> str:
    """The fault-free run without snapguard; returns its output directory. Reused if already complete."""
    work = os.path.join(workdir, reference_key(c))
    out = os.path.join(work, "out")
    world = c.nodes * c.ranks_per_node
    if all(os.path.exists(os.path.join(out, f"final.r{r}.json")) for r in range(world)):
        say(f"reference run: reusing {out}")
        return out
    os.makedirs(work, exist_ok=True)
    t0 = time.monotonic()
    say(f"reference run: {c.nodes} nodes x {c.ranks_per_node} ranks, {c.steps} steps, no snapshots, no faults ...")
    cl = Cluster(ClusterSpec(workdir=work, nodes=c.nodes, ranks_per_node=c.ranks_per_node, m=c.m, steps=c.steps,
                             width=c.width, layers=c.layers, job=f"ref{os.getpid()}{secrets.token_hex(2)}",
                             worker_args=["--no-snapshot"]))
    try:
        cl.start_workers()
        deadline = time.monotonic() + REFERENCE_TIMEOUT_S
        for r, p in cl.workers.items():
            try:
                rc = p.wait(max(1.0, deadline - time.monotonic()))
            except Exception:
                raise SnapGuardError(f"the reference run did not finish within {REFERENCE_TIMEOUT_S} s"
                                     f" (rank {r}); see {work}/worker.r{r}.log") from None
            if rc != 0:
                raise SnapGuardError(f"the reference run failed: rank {r} exited with code {rc}; see {work}/worker.r{r}.log")
    finally:
        cl.close()
    say(f"reference run: done in {time.monotonic() - t0:.1f} s")
    return out
