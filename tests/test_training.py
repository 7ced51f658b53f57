"""The acceptance tests of issue #2: 4 ranks under torchrun, snapshot every step, SIGKILL, restore, compare.

Every run here is a real job: torchrun (`python -m snapguard.torchrun`) starts 4 workers of `snapguard.demo`
(DDP over gloo, a small transformer with dropout, Adam), a real daemon holds their snapshots in
shared memory, and trainers die by SIGKILL: sent by the test at random moments or at moments it
sees on the daemon, or by the trainers themselves at named fault points. torchrun restarts all
ranks; they restore the newest step every rank holds and finish. The verdict is
`snapguard.demo.compare`: every logged loss of every attempt and every byte of the final model and
optimizer state must equal a run without snapshots and without failures.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from snapguard import protocol as P
from snapguard.demo import JobSpec, compare, read_losses

from conftest import Jobs, Node, is_worker_of, stop_with_sigterm, wait_until, worker_pids

NPROC = 4
STEPS = 30
RUN_TIMEOUT_S = 240


# ---- the reference: computed once per session, per model shape ------------------------------------

@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`reference(width)` -> the output directory of a run with no snapshots and no failures."""
    cache: dict[tuple, str] = {}
    jobs = Jobs()

    def get(width: int = 64, steps: int = STEPS) -> str:
        key = (width, steps)
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"reference-w{width}-s{steps}"))
            spec = JobSpec(out=out, nproc=NPROC, steps=steps, width=width, snapshot=False, max_restarts=0)
            rc = jobs.finish(jobs.launch(spec), out, RUN_TIMEOUT_S)
            assert rc == 0, f"the reference run failed: see {out}/launcher.log"
            assert len(read_losses(out, NPROC)) == NPROC * steps
            cache[key] = out
        return cache[key]

    yield get
    jobs.close()


# ---- watching a run --------------------------------------------------------------------------------

def steps_by_attempt(out: str, nproc: int = NPROC) -> dict[int, dict[int, list[int]]]:
    """attempt -> rank -> the steps that rank logged in that attempt, in order."""
    got: dict[int, dict[int, list[int]]] = {}
    for row in read_losses(out, nproc):
        got.setdefault(row["attempt"], {}).setdefault(row["rank"], []).append(row["step"])
    return got


def progress_in(out: str, attempt: int, nproc: int = NPROC) -> int:
    """The newest step every rank has logged in `attempt`, -1 if some rank has logged none."""
    ranks = steps_by_attempt(out, nproc).get(attempt, {})
    return min((max(ranks[r]) if ranks.get(r) else -1) for r in range(nproc))


def wait_for_attempt(out: str, attempt: int, proc, nproc: int = NPROC) -> dict[int, int]:
    """Wait until every rank of `attempt` has started (written its pid); return rank -> pid."""
    def ready():
        if proc.poll() is not None:
            pytest.fail(f"the job exited with {proc.returncode} before attempt {attempt} started; see {out}/launcher.log")
        pids = worker_pids(out, nproc)
        return len(pids) == nproc and all(a == attempt for _, a in pids.values()) and {r: p for r, (p, _) in pids.items()}
    return wait_until(ready, 120, f"all {nproc} ranks of attempt {attempt} to start")


def wait_for_progress(out: str, attempt: int, step: int, proc, nproc: int = NPROC) -> None:
    def there():
        if proc.poll() is not None:
            pytest.fail(f"the job exited with {proc.returncode} in attempt {attempt} before step {step}")
        return progress_in(out, attempt, nproc) >= step
    wait_until(there, 120, f"attempt {attempt} to reach step {step}")


def sigkill_rank(out: str, rank: int, attempt: int, nproc: int = NPROC) -> int:
    pid, got = worker_pids(out, nproc)[rank]
    assert got == attempt and is_worker_of(pid, out), f"rank {rank}'s pid file does not name a live worker of attempt {attempt}"
    os.kill(pid, signal.SIGKILL)
    return pid


def restart_problems(out: str) -> list[str]:
    """Each restart must resume all ranks at one step, and lose at most the step that was in flight.

    A rank logs step s only after snapshot(s) has waited for step s-1 to be sealed. So when every rank
    has logged step L, every rank holds L-1 sealed or newer, two slots keep a step all of them share,
    and the next attempt must resume at L or later: never from scratch, never from an older step.
    """
    problems = []
    attempts = steps_by_attempt(out)
    newest = {r: -1 for r in range(NPROC)}
    for a in sorted(attempts):
        ranks = attempts[a]
        if a > 0 and ranks:
            firsts = {r: ranks[r][0] for r in ranks}
            if len(set(firsts.values())) != 1 or len(firsts) != NPROC:
                problems.append(f"attempt {a}: ranks resumed at different steps {firsts}")
            lower = min(newest.values())
            start = min(firsts.values())
            if start < lower:
                problems.append(f"attempt {a} resumed at step {start}, but every rank had logged step {lower}:"
                                f" restore lost sealed steps")
        for r, steps in ranks.items():
            newest[r] = max(newest[r], max(steps))
    return problems


def first_steps(out: str) -> dict[int, int | None]:
    """attempt -> the step it resumed at (None if it logged nothing)."""
    attempts = steps_by_attempt(out)
    return {a: (min(s[0] for s in attempts[a].values()) if attempts.get(a) else None) for a in range(max(attempts) + 1)}


def restored_steps(out: str) -> list[int]:
    """Every 'restored step N' a worker logged, in order."""
    with open(os.path.join(out, "launcher.log"), errors="replace") as f:
        return [int(m) for m in re.findall(r"\] restored step (\d+) in ", f.read())]


def start_daemon(node: Node) -> None:
    node.start(["--log-level", "INFO"])


def finish_and_judge(jobs: Jobs, proc, spec: JobSpec, ref: str, node: Node, attempts: int) -> None:
    rc = jobs.finish(proc, spec.out, RUN_TIMEOUT_S)
    assert rc == 0, f"the protected run failed: see {spec.out}/launcher.log"
    pids = worker_pids(spec.out, NPROC)
    assert {a for _, a in pids.values()} == {attempts - 1}, f"expected {attempts} attempts, pid files say {pids}"
    assert compare(ref, spec.out, NPROC) == []
    assert restart_problems(spec.out) == []
    # the last snapshot of every rank is sealed, and the daemon holds the last two steps of all of them
    assert node.held() == {r: [spec.steps - 2, spec.steps - 1] for r in range(NPROC)}
    assert node.status().common == spec.steps - 1


# ---- the tests ------------------------------------------------------------------------------------

def test_sigkill_at_random_moments_resumes_bit_identically(node, jobs, reference, tmp_path):
    """Three SIGKILLs of random ranks at random moments of random steps (seeded); losses and final state exact."""
    ref = reference()
    start_daemon(node)
    rnd = random.Random(0x5EED)
    kills = 3
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=STEPS, max_restarts=kills, env=node.env)
    proc = jobs.launch(spec)
    for k in range(kills):
        wait_for_attempt(spec.out, k, proc)
        target = (k + 1) * STEPS // (kills + 2) + rnd.randrange(-2, 3)
        wait_for_progress(spec.out, k, target, proc)
        # the fault schedule, not a wait: a random moment within the next step or so (a step takes
        # 50-150 ms here), which lands mid-copy, between copy and seal, mid-forward or mid-allreduce
        time.sleep(rnd.uniform(0.0, 0.1))
        rank = rnd.randrange(NPROC)
        sigkill_rank(spec.out, rank, k)
    finish_and_judge(jobs, proc, spec, ref, node, kills + 1)


def test_sigkill_at_named_phases_mid_copy_after_copy_and_mid_restore(node, jobs, reference, tmp_path):
    """Rank 2 dies half-way through copying step 7, rank 3 half-way through restoring, rank 1 after
    copying step 15 but before sealing it. No torn or unsealed snapshot is ever restored."""
    ref = reference()
    start_daemon(node)
    once = [str(tmp_path / f"fired.{i}") for i in range(3)]
    faults = (f"trainer.copy.mid@7/r2#{once[0]},trainer.restore.mid/r3#{once[1]},"
              f"trainer.copy.done@15/r1#{once[2]}")
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=STEPS, max_restarts=3,
                   env={**node.env, "SNAPGUARD_FAULTS": faults})
    proc = jobs.launch(spec)
    finish_and_judge(jobs, proc, spec, ref, node, attempts=4)
    assert all(os.path.exists(p) for p in once), "every fault point fired"
    starts = first_steps(spec.out)
    assert starts[1] is None, "attempt 1 died restoring, before training a step"
    # Rank 2 never sealed step 7, so 7 cannot be restored. It was writing 7 over its slot of step 5,
    # which the daemon grants only once every rank has sealed 6: so 6 is held by all, and the newest
    # such step. Likewise for step 15 on rank 1. Restore must pick exactly these.
    assert (starts[2], starts[3]) == (7, 15), starts
    # attempt 1 restored nothing (rank 3 died, the others never passed the agreement); 2 and 3 did
    assert restored_steps(spec.out) == [starts[2] - 1] * NPROC + [starts[3] - 1] * NPROC


def test_kills_while_another_rank_is_mid_copy_never_lose_the_shared_step(node, jobs, reference, tmp_path):
    """Attack the two-slot window: with copies made slow by a wider model, SIGKILL a rank at the moment
    the daemon shows another rank writing its slot, again and again (and first, rank 1 halfway through
    a copy while the others run ahead). The daemon is polled throughout: once every rank holds a step,
    some step is held by all of them at every observed instant, and it never goes back; every restart
    resumes after the step all ranks held when the kill was sent."""
    width, steps, kills = 256, 28, 3
    ref = reference(width, steps)
    start_daemon(node)
    rnd = random.Random(0xA77AC)
    fired = str(tmp_path / "fired")
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=steps, width=width, max_restarts=kills + 1,
                   env={**node.env, "SNAPGUARD_FAULTS": f"trainer.copy.mid@4/r1#{fired}"})
    client = node.client(timeout_s=10)
    proc = jobs.launch(spec)
    history = [-1]  # the step every rank holds, as the daemon reported it at each poll
    drift = 0  # polls at which the ranks' newest sealed steps differed

    def observe() -> tuple[P.StatusReport, list[int]]:
        nonlocal drift
        st = client.request(P.Status())
        assert isinstance(st, P.StatusReport)
        sealed = {r["rank"]: [s["step"] for s in r["slots"] if s["state"] == "sealed"] for r in st.ranks}
        if len(sealed) == NPROC and all(sealed.values()):
            newest = [max(v) for v in sealed.values()]
            drift += max(newest) != min(newest)
        assert st.common >= history[-1], (f"the step every rank held went from {history[-1]} to {st.common};"
                                          f" sealed now: {sealed}")
        history.append(st.common)
        return st, [r["rank"] for r in st.ranks if any(s["state"] == "writing" for s in r["slots"])]

    def watching(cond, what):
        def check():
            got = observe()
            if proc.poll() is not None:
                pytest.fail(f"the job exited with {proc.returncode} while waiting for {what}; see {spec.out}/launcher.log")
            return cond(got)
        return check

    def attempt_started(a):
        pids = worker_pids(spec.out, NPROC)
        return len(pids) == NPROC and all(got == a for _, got in pids.values())

    def trained_in(a):
        ranks = steps_by_attempt(spec.out).get(a, {})
        return min(len(ranks.get(r, [])) for r in range(NPROC))

    wait_until(watching(lambda _: os.path.exists(fired), "the copy.mid fault"), 120, "the copy.mid fault", 0.005)
    killed = []  # (attempt, victim, rank seen writing, step all ranks held)
    for a in range(1, kills + 1):
        wait_until(watching(lambda _: attempt_started(a), f"attempt {a}"), 120, f"attempt {a} to start", 0.005)
        wait_until(watching(lambda _: trained_in(a) >= 2, f"attempt {a} to train"), 120, f"attempt {a} to train", 0.005)
        st, writing = wait_until(watching(lambda got: got if got[1] and got[0].common >= 0 else None, "a writer"),
                                 60, "a rank writing its slot", 0.002)
        victim = rnd.choice([r for r in range(NPROC) if r != writing[0]])
        sigkill_rank(spec.out, victim, a)
        killed.append((a, victim, writing[0], st.common))

    def finished():
        observe()
        return proc.poll() is not None
    wait_until(finished, RUN_TIMEOUT_S, "the job to finish", 0.005)
    finish_and_judge(jobs, proc, spec, ref, node, attempts=kills + 2)
    starts = first_steps(spec.out)
    assert starts[1] == 4, "rank 1 died writing step 4 over step 2, which it may do only once all ranks sealed 3"
    for a, victim, writer, common in killed:
        assert starts[a + 1] is None or starts[a + 1] >= common + 1, (
            f"attempt {a + 1} resumed at step {starts[a + 1]}, but when rank {victim} was killed (rank {writer}"
            f" writing) every rank held step {common}")
    assert drift > 0, "the daemon never showed ranks a step apart: the window under attack never opened"
    assert len(history) > 500, "the daemon must have been watched closely"


def test_a_restore_without_rng_state_is_caught(node, jobs, reference, tmp_path):
    """The comparison can fail: snapshots without RNG state resume with other dropout masks."""
    ref = reference()
    start_daemon(node)
    fired = str(tmp_path / "fired")
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=STEPS, max_restarts=1, rng=False,
                   env={**node.env, "SNAPGUARD_FAULTS": f"trainer.copy.done@10/r0#{fired}"})
    proc = jobs.launch(spec)
    assert jobs.finish(proc, spec.out, RUN_TIMEOUT_S) == 0, f"see {spec.out}/launcher.log"
    assert os.path.exists(fired)
    problems = compare(ref, spec.out, NPROC)
    assert problems, "a restore that loses the RNG state must not pass as bit-exact"
    # before the kill the run is the reference; after the restore it is not
    assert not any("(attempt 0)" in p for p in problems), problems[:5]
    assert any("(attempt 1)" in p for p in problems)
    assert any("final state differs from the reference" in p for p in problems)
    assert restart_problems(spec.out) == []


def test_a_node_that_loses_its_memory_restores_from_disk_and_trains_on_bit_identically(node, jobs, reference,
                                                                                        tmp_path):
    """Every rank and the daemon die at once, and the node's shared memory with them (a machine that rebooted).
    The new daemon holds nothing in memory; the ranks restore the newest step persisted to disk (`--persist-dir`)
    and train on exactly as the run without failures did."""
    ref = reference()
    disk = str(tmp_path / "persist")
    flags = ["--log-level", "INFO", "--persist-dir", disk, "--persist-every", "10"]
    node.start(flags)
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=STEPS, max_restarts=1, step_sleep=0.2, env=node.env)
    proc = jobs.launch(spec)
    persisted = os.path.join(disk, f"snapguard-{node.job}")
    wait_until(lambda: all(os.path.exists(os.path.join(persisted, f"r{r}.s20.manifest")) for r in range(NPROC)), 120,
               "step 20 of every rank on disk")
    wait_for_progress(spec.out, 0, 21, proc)
    os.kill(proc.pid, signal.SIGSTOP)  # the launcher restarts the workers once the node is back, not before
    try:
        for pid, _ in worker_pids(spec.out, NPROC).values():
            os.kill(pid, signal.SIGKILL)
        node.kill()
        shutil.rmtree(node.table_dir)
        assert progress_in(spec.out, 0) < STEPS - 1, "the job finished before the node was lost"
        node.start(flags)
        assert node.held() == {}
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert jobs.finish(proc, spec.out, RUN_TIMEOUT_S) == 0, f"see {spec.out}/launcher.log"
    assert compare(ref, spec.out, NPROC) == []
    assert first_steps(spec.out)[1] == 21
    with open(os.path.join(spec.out, "launcher.log"), errors="replace") as f:
        assert len(re.findall(r"\] restored step 20 from disk in ", f.read())) == NPROC
    assert sorted(re.findall(r"rank (\d) restores step 20 from disk", node.log())) == [str(r) for r in range(NPROC)]


@pytest.mark.parametrize(("args", "said"), [
    (["--nproc", "0"], "need --nproc >= 1, --steps >= 1 and --kills >= 0, got 0, 40 and 2"),
    (["--steps", "0"], "need --nproc >= 1, --steps >= 1 and --kills >= 0, got 4, 0 and 2"),
    (["--kills", "-1"], "need --nproc >= 1, --steps >= 1 and --kills >= 0, got 4, 40 and -1"),
    (["--steps", "3"], "2 SIGKILL(s) need at least 4 steps, got --steps 3"),
])
def test_a_demo_that_cannot_run_as_asked_is_refused_before_it_starts(tmp_path, args, said):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "demo", *args, "--workdir", str(work)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not work.exists(), "nothing ran"


def test_more_sigterms_while_the_demo_cleans_up_leaves_no_daemon_or_memory_behind(tmp_path):
    """Stopped by SIGTERM while its protected run trains, the demo stops that job (torchrun and its workers, which run in
    sessions of their own) and its daemon as on Ctrl-C, and says so; SIGTERM again and again while it does so does not
    cut that short: the daemon goes, and its slots leave shared memory with it."""
    import psutil

    from snapguard.config import default_shm_dir, slot_dir_name

    proc = subprocess.Popen([sys.executable, "-m", "snapguard.cli", "demo", "--nproc", "2", "--steps", "100",
                             "--kills", "0", "--workdir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def protected():  # the daemon runs, and the protected run's workers have started
            assert proc.poll() is None, f"the demo exited with code {proc.returncode}"
            if not all((tmp_path / "protected" / f"pid.r{r}").exists() for r in range(2)):
                return None
            kids = psutil.Process(proc.pid).children(recursive=True)
            return kids if any("snapguard.daemon" in k.cmdline() for k in kids) else None

        kids = wait_until(protected, 180, "the demo's protected run to start")
        cmd = next(k.cmdline() for k in kids if "snapguard.daemon" in k.cmdline())
        slots = os.path.join(default_shm_dir(), slot_dir_name(cmd[cmd.index("--job") + 1], "node0"))
        assert os.path.isdir(slots)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stop_with_sigterm(proc, kids, repeat=100)  # SIGTERM after SIGTERM, while it stops the job and its daemon
    assert not os.path.exists(slots), os.listdir(slots)
