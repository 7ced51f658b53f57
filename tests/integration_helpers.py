"""Running the examples under torchrun against a private daemon, for the framework integration tests.

Each test module starts one daemon with its own job id, run directory and shared-memory directory
(`private_daemon`), runs an example once without snapguard (the reference: what the user had before
adding it) and once with snapguard and a SIGKILL of one rank in the middle of a snapshot copy, and
compares every logged loss (exact float hex) and every byte of the final state with
`snapguard.demo.compare`. Every process is stopped at teardown by its own pid or process group.

CPU-only framework shims come in through `tests/cpu_shims/sitecustomize.py` (see framework_shims.py);
with SNAPGUARD_TEST_NO_GUARD=1 that same hook swaps the integrations' `protect` for a no-op, which
turns an example into the reference run without a line of test code in the example.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint
from snapguard.demo import compare, read_losses
from snapguard.errors import SnapGuardError
from snapguard.procs import spawn_daemon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
SHIMS = os.path.join(REPO, "tests", "cpu_shims")
NPROC = 2
_ids = itertools.count()


def unique_job(tag: str) -> str:
    return f"it{os.getpid()}-{tag}-{next(_ids)}"[:64]


@dataclass
class PrivateDaemon:
    """One node's daemon for one job, in directories no one else uses."""

    job: str
    run_dir: str
    shm_dir: str
    proc: subprocess.Popen | None = None

    @property
    def ep(self) -> Endpoint:
        return Endpoint(self.job, "n0", self.run_dir)

    @property
    def env(self) -> dict[str, str]:
        return {"SNAPGUARD_JOB": self.job, "SNAPGUARD_NODE": "n0", "SNAPGUARD_RUN_DIR": self.run_dir,
                "SNAPGUARD_SHM_DIR": self.shm_dir}

    def held(self) -> dict[int, list[int]]:
        c = DaemonClient(self.ep.address, timeout_s=10, who=f"test {self.job}")
        try:
            st = c.request(P.Status())
        finally:
            c.close()
        return {r["rank"]: sorted(s["step"] for s in r["slots"] if s["state"] == "sealed") for r in st.ranks}

    def log(self) -> str:
        path = os.path.join(self.run_dir, f"{self.job}@n0.log")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            c = DaemonClient(self.ep.address, timeout_s=5, who=f"test {self.job}")
            try:
                c.request(P.Shutdown(remove=True))
                self.proc.wait(10)
            except (SnapGuardError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
            finally:
                c.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)


@contextlib.contextmanager
def private_daemon(tag: str):
    run_dir = tempfile.mkdtemp(prefix=f"sgi-{tag}-", dir="/tmp")
    shm_dir = tempfile.mkdtemp(prefix=f"sgi-{os.getpid()}-", dir="/dev/shm")
    d = PrivateDaemon(unique_job(tag), run_dir, shm_dir)
    try:
        d.proc = spawn_daemon(d.ep, shm_dir, ["--log-level", "WARNING"])
        yield d
    finally:
        d.stop()


@dataclass
class Run:
    """One torchrun job of an example."""

    script: str
    args: list[str]
    out: str
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 0
    nproc: int = NPROC
    cpu_shims: bool = True   # False on a GPU: the frameworks run unpatched
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0

    @property
    def log_path(self) -> str:
        return os.path.join(self.out, "launcher.log")

    def log(self) -> str:
        return open(self.log_path, errors="replace").read() if os.path.exists(self.log_path) else ""

    def start(self) -> "Run":
        os.makedirs(self.out, exist_ok=True)
        cmd = [sys.executable, "-m", "snapguard.torchrun", "--standalone", f"--nproc-per-node={self.nproc}",
               f"--max-restarts={self.max_restarts}", "--monitor-interval=0.1",
               os.path.join(EXAMPLES, self.script), "--out", self.out, *self.args]
        pythonpath = os.pathsep.join(p for p in (SHIMS, os.environ.get("PYTHONPATH")) if p)
        # A fresh rendezvous store per restart: with the shared one, restarted gloo workers hang.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGUARD_")}
        # PYTHONFAULTHANDLER: a worker that hangs is sent SIGABRT, and prints every thread's stack to the log.
        env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=pythonpath,
                   PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1", **self.env)
        if self.cpu_shims:
            env["SNAPGUARD_CPU_SHIMS"] = "1"
        self.started = time.monotonic()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        return self

    def wait(self, timeout_s: float = 180.0) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            hung = self._workers()
            for pid in hung:
                os.kill(pid, signal.SIGABRT)  # the fault handler prints where each thread of it waits
            time.sleep(2.0)
            self.stop()
            raise AssertionError(f"{self.script} {self.args} did not finish within {timeout_s:.0f} s; workers"
                                 f" {hung} still ran; log tail:\n{self.log()[-8000:]}") from None
        self.seconds = time.monotonic() - self.started
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # torchrun stops its workers on SIGTERM
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        for pid in self._workers():  # workers left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _workers(self) -> list[int]:
        """The workers of this run that are still alive, by the pids they wrote."""
        alive = []
        for r in range(self.nproc):
            try:
                pid = int(open(os.path.join(self.out, f"pid.r{r}")).read().split()[0])
                if self.out.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    alive.append(pid)
            except (OSError, ValueError):
                pass
        return alive


def run_all(*runs: Run, timeout_s: float = 180.0) -> list[int]:
    """Start every run at once (their start-ups overlap), wait for all, stop all on any failure to finish."""
    for r in runs:
        r.start()
    deadline = time.monotonic() + timeout_s
    try:
        return [r.wait(max(1.0, deadline - time.monotonic())) for r in runs]
    finally:
        for r in runs:
            r.stop()


@dataclass
class Scenario:
    """A framework run twice: without snapguard or failures (the reference), and with snapguard and a SIGKILL."""

    daemon: PrivateDaemon
    ref: Run
    run: Run
    steps: int
    rcs: list[int] = field(default_factory=list)

    def check(self) -> None:
        for r, rc in zip((self.ref, self.run), self.rcs):
            assert rc == 0, f"{r.script} {r.args} exited with {rc}; log tail:\n{r.log()[-5000:]}"
        assert_same_as_reference(self.ref, self.run, self.steps)


@contextlib.contextmanager
def scenarios(workdir: str, specs: dict[str, tuple[str, list[str], int]], nproc: int = NPROC, cpu_shims: bool = True):
    """Run each (script, args, steps) of `specs` as a Scenario, all at once (start-ups overlap); yield them by
    name with their daemons still holding the snapshots; `args` must make the example train `steps` steps.
    Each job has `nproc` ranks; the last of them is SIGKILLed."""
    with contextlib.ExitStack() as stack:
        out: dict[str, Scenario] = {}
        for name, (script, args, steps) in specs.items():
            d = stack.enter_context(private_daemon(name))
            base = os.path.join(workdir, name)
            out[name] = Scenario(d, Run(script, args, os.path.join(base, "ref"), env=reference_env(), nproc=nproc,
                                        cpu_shims=cpu_shims),
                                 Run(script, args, os.path.join(base, "run"), env=fault_env(d, base, rank=nproc - 1),
                                     max_restarts=1, nproc=nproc, cpu_shims=cpu_shims),
                                 steps)
        rcs = run_all(*(r for s in out.values() for r in (s.ref, s.run)))
        for i, s in enumerate(out.values()):
            s.rcs = rcs[2 * i:2 * i + 2]
        yield out


def reference_env() -> dict[str, str]:
    """The environment of a reference run: the example exactly as written, with snapguard's protect() a no-op."""
    return {"SNAPGUARD_TEST_NO_GUARD": "1"}


def fault_env(daemon: PrivateDaemon, workdir: str, step: int = 3, rank: int = 1) -> dict[str, str]:
    """SIGKILL `rank` once, halfway through copying its snapshot of `step` into shared memory."""
    once = os.path.join(workdir, f"fault-{daemon.job}.once")
    return dict(daemon.env, SNAPGUARD_FAULTS=f"trainer.copy.mid@{step}/r{rank}#{once}")


def assert_same_as_reference(ref: Run, run: Run, steps: int) -> None:
    """Every logged loss of every attempt and every byte of the final state equal the unbroken run."""
    problems = compare(ref.out, run.out, run.nproc)
    assert not problems, "differs from the run without failures:\n  " + "\n  ".join(problems[:10]) + \
        f"\nlog tail:\n{run.log()[-3000:]}"
    rows = read_losses(run.out, run.nproc)
    attempts = sorted({r["attempt"] for r in rows})
    assert attempts == [0, 1], f"expected one failure and one restart, saw attempts {attempts}:\n{run.log()[-3000:]}"
    for r in range(run.nproc):
        assert sorted({row["step"] for row in rows if row["rank"] == r}) == list(range(steps))
    # The restart resumed from a snapshot: attempt 1 did not start again from step 0.
    first = min(row["step"] for row in rows if row["attempt"] == 1)
    assert first > 0, f"the restarted job began again at step {first}: nothing was restored\n{run.log()[-3000:]}"


def layout_error(log: str) -> str:
    """The LayoutError a failed restore raised, as the launcher log shows it (the last one: an adapter's,
    which wraps the core's)."""
    found = re.findall(r"LayoutError: (.*)", log)
    assert found, f"no LayoutError in the log:\n{log[-4000:]}"
    return found[-1]


def check_step_waits_for_the_copy(monkeypatch, guard, step, model, at: int) -> None:
    """With the background copy slowed down, `step()` right after `guard.snapshot(at)` must wait for it, and the
    restore must give `model` back its state from before that step (the copy read the weights in place)."""
    import threading

    import torch

    import snapguard.guard

    slow = threading.Event()
    monkeypatch.setattr(snapguard.guard, "fault_point",
                        lambda point, step=None: time.sleep(0.5) if point == "trainer.copy.mid" and slow.is_set() else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slow.set()
    guard.snapshot(at)
    t0 = time.monotonic()
    step()
    waited = time.monotonic() - t0
    slow.clear()
    assert waited > 0.3, f"the optimizer step did not wait for the copy ({waited:.3f} s)"
    assert guard.restore() == at
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
