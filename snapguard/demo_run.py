"""`snapguard demo`: train on several ranks, SIGKILL trainers at random moments, restore, compare.

It starts a daemon, runs the job once without failures (the reference), then again with
snapshots every step while it SIGKILLs random trainers at random moments; torch's elastic launcher
restarts all ranks, which restore the newest step every rank holds and finish. The verdict compares
every logged loss and every byte of the final model and optimizer state with the reference, and
checks that no restart went back further than the steps whose snapshots were in flight.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

from snapguard.config import Endpoint, default_shm_dir, slot_dir_name
from snapguard.demo import MAX_STEPS_LOST, JobSpec, compare, launch, progress, read_losses, restarts, steps_lost_problems
from snapguard.procs import spawn_daemon, stop_signals_ignored
from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.errors import ConfigError, SnapGuardError

RUN_TIMEOUT_S = 600


def _stop(proc) -> None:
    """Stop a job torchrun still runs: SIGTERM, on which it stops its workers and exits; SIGKILL its process group
    if it has not within 30 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group is still its
        proc.wait(10)


def _wait(proc, what: str, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise SnapGuardError(f"{what} did not finish within {timeout_s:.0f} s") from None
    except BaseException:  # Ctrl-C, or SIGTERM through snapguard.cli: no job outlives the demo
        _stop(proc)
        raise


def _pid_of(out: str, rank: int) -> tuple[int, int]:
    """(pid, attempt) of the newest worker of `rank`, as it wrote them when it started."""
    with open(os.path.join(out, f"pid.r{rank}")) as f:
        pid, attempt = f.read().split()[:2]
        return int(pid), int(attempt)


def check_args(a) -> None:
    """Refuse a demo that cannot run as asked, before anything starts."""
    if a.nproc < 1 or a.steps < 1 or a.kills < 0:
        raise ConfigError(f"demo: need --nproc >= 1, --steps >= 1 and --kills >= 0, got {a.nproc}, {a.steps}"
                          f" and {a.kills}")
    if a.kills and a.steps < a.kills + 2:
        raise ConfigError(f"demo: {a.kills} SIGKILL(s) need at least {a.kills + 2} steps, got --steps {a.steps}: each"
                          " falls in a step of its own, after the first and before the last")


def run_demo(a) -> int:
    check_args(a)
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    work = a.workdir or tempfile.mkdtemp(prefix="snapguard-demo-")
    os.makedirs(work, exist_ok=True)
    ep = Endpoint(f"demo{os.getpid()}", "node0", os.path.join(work, "run"))
    print(f"snapguard demo: {a.nproc} ranks, {a.steps} steps, {a.kills} SIGKILL(s), seed {seed}, work dir {work}")
    t0 = time.monotonic()
    ref = JobSpec(out=os.path.join(work, "reference"), nproc=a.nproc, steps=a.steps, snapshot=False)
    print("[1/3] reference run, no snapshots, no failures ...", flush=True)
    if _wait(launch(ref), "the reference run", RUN_TIMEOUT_S) != 0:
        print(f"reference run failed: see {ref.out}/launcher.log")
        return 1
    print(f"      done in {time.monotonic() - t0:.1f} s")
    daemon = spawn_daemon(ep, extra=["--log-level", "WARNING"])
    env = {"SNAPGUARD_JOB": ep.job, "SNAPGUARD_NODE": ep.node, "SNAPGUARD_RUN_DIR": ep.run_dir}
    run = JobSpec(out=os.path.join(work, "protected"), nproc=a.nproc, steps=a.steps, step_sleep=0.02,
                  max_restarts=a.kills + 1, env=env)
    print(f"[2/3] protected run: snapshot every step, {a.kills} trainer(s) SIGKILLed at random moments ...", flush=True)
    t1 = time.monotonic()
    proc = launch(run)
    killed = []
    try:
        for i in range(a.kills):
            lo = (i + 1) * a.steps // (a.kills + 2)
            deadline = time.monotonic() + 120
            while progress(run.out, a.nproc) < lo and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise SnapGuardError(f"the protected run did not reach step {lo} within 120 s")
                time.sleep(0.02)
            time.sleep(rnd.random() * 0.3)
            rank = rnd.randrange(a.nproc)
            pid, attempt = _pid_of(run.out, rank)
            step = progress(run.out, a.nproc)
            finished = proc.poll() is not None
            if not finished:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    finished = True
            if finished:
                print(f"      rank {rank} had finished its steps before SIGKILL {i + 1} of {a.kills}: no more"
                      " failures injected", flush=True)
                break
            killed.append((rank, step))
            print(f"      SIGKILL rank {rank} (pid {pid}) near step {step}", flush=True)
            # wait for the launcher to restart every rank before the next fault, which may then fall in its restore
            deadline = time.monotonic() + 120
            while proc.poll() is None and any(_pid_of(run.out, r)[1] <= attempt for r in range(a.nproc)):
                if time.monotonic() > deadline:
                    raise SnapGuardError(f"the launcher did not restart every rank within 120 s of rank {rank}'s"
                                         " SIGKILL")
                time.sleep(0.05)
        rc = _wait(proc, "the protected run", RUN_TIMEOUT_S)
    finally:
        with stop_signals_ignored():  # a second Ctrl-C must not leave the daemon and its memory behind
            _stop(proc)  # still running only when a kill above failed or the demo was interrupted
            c = DaemonClient(ep.address, timeout_s=5)
            try:
                c.request(P.Shutdown(remove=True))
                daemon.wait(10)
            except (SnapGuardError, subprocess.TimeoutExpired):
                daemon.kill()
                daemon.wait(10)
                shutil.rmtree(os.path.join(default_shm_dir(), slot_dir_name(ep.job, ep.node)), ignore_errors=True)
            finally:
                c.close()
    print(f"      done in {time.monotonic() - t1:.1f} s (exit code {rc})")
    print("[3/3] verdict")
    rows = read_losses(run.out, a.nproc)
    problems = compare(ref.out, run.out, a.nproc) if rc == 0 else [f"protected run failed: see {run.out}/launcher.log"]
    problems += steps_lost_problems(rows)
    attempts = sorted({r["attempt"] for r in rows})
    redone = len(rows) - a.nproc * a.steps
    # torchrun numbers its attempts; one killed before it logged a step has no rows
    print(f"      failures injected: {len(killed)}; restarts: {max(attempts, default=0)}; steps trained twice: {redone}")
    for attempt, restored, reached in restarts(rows):
        print(f"      attempt {attempt} restored step {restored} after step {reached} had been trained"
              f" ({reached - restored} steps lost; at most {MAX_STEPS_LOST} may be)")
    if problems:
        print("FAIL: the protected run differs from the reference or lost snapshots:")
        for p in problems[:20]:
            print("   ", p)
        return 1
    print(f"PASS: every loss of every attempt and every byte of the final model and optimizer state on all"
          f" {a.nproc} ranks equal the unbroken run, and no restart lost more than {MAX_STEPS_LOST} steps"
          f" ({time.monotonic() - t0:.1f} s in all)")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0
