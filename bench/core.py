"""snapguard's core against the checkpoints a user would otherwise pick, on one CPU machine, in one run.

    .venv/bin/python bench/core.py                          # GPT-style model, ~88M params + Adam: ~1.06 GB
    .venv/bin/python bench/core.py --scale 0.1 --rounds 1   # a quick check (~10M params)
    .venv/bin/python bench/core.py --steps-only --batch 4   # section 1 alone, with longer steps

1. Step time with a save every step, against none: `guard.snapshot()`, `torch.save` (to disk and to
   /dev/shm), and `torch.distributed.checkpoint.async_save` (as documented: a new default stager per
   call; and torchtitan-style: one reused stager that stages in the background, waited for before
   `optimizer.step()`). Modes run in interleaved blocks, so load from other processes hits all of them
   alike; the first steps of each block are discarded, so every counted step both waits for the
   previous save and starts the next one. `--modes none,snapguard,snapguard_sync` adds, as a reference,
   the same snapshot waited for at once: how much of its cost the background copy hides;
   `snapguard_memmove`, the same snapshot copied with memmove instead of streaming stores.
2. Restore time: `guard.restore()` in a fresh Guard (daemon memory to tensors), against `torch.load`
   and `dcp.load` of the same state, with the files in the page cache (as they are right after
   writing) and dropped from it (fsync, then POSIX_FADV_DONTNEED).
3. First-snapshot cost: Guard construction (the daemon allocates and pre-faults the slots on the
   Reserve message), the first snapshots against steady state, the same without Reserve, and copy
   bandwidth into fresh shared memory prepared three ways.

Run alone: other processes on the machine add noise, and the load average is printed to judge it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("SNAPGUARD_TIMEOUT_S", "300")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core_util as U  # noqa: E402

import snapguard.guard as sg_guard  # noqa: E402
from snapguard import protocol as P  # noqa: E402
from snapguard.config import Endpoint  # noqa: E402
from snapguard.guard import Guard  # noqa: E402
from snapguard.memcopy import STREAM_KIND, stream_copy  # noqa: E402
from snapguard.procs import spawn_daemon  # noqa: E402

warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", message=".*existing checkpoint.*")

NODE = "bench"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {U.loadavg()}] {msg}", file=sys.stderr, flush=True)


# ---- one training step, and what each save mode adds to it --------------------------------------

@dataclass
class StepRecord:
    mode: str
    total: float
    fwdbwd: float
    wait: float  # blocked before optimizer.step() (snapguard's pre-hook, dcp's staging wait)
    opt: float
    save: float  # the save call after optimizer.step() (including any wait for the previous save)
    cpu: float  # this process's CPU seconds (all threads) during the step
    counted: bool = True
    round: int = -1


class Mode:
    """A way to save the state every step. Subclasses time what they add before and after optimizer.step()."""

    name = "none"
    label = "no snapshot"

    def before_optimizer(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def drain(self) -> None:
        """Finish any save in flight (outside the timed steps)."""

    def close(self) -> None:
        self.drain()


class SnapguardMode(Mode):
    name = "snapguard"
    label = "snapguard `guard.snapshot()`"

    def __init__(self, guard: Guard):
        self.guard = guard
        self.jobs: list[Any] = []  # the Guard's background jobs, for their copy and seal times

    def before_optimizer(self) -> None:
        self.guard.before_update()  # what the pre-hook does; called here so it is timed on its own

    def after_step(self, step: int) -> None:
        self.guard.snapshot(step)
        self.jobs.append(self.guard._job)

    def drain(self) -> None:
        self.guard.wait()


class SnapguardSyncMode(SnapguardMode):
    """The same snapshot, waited for at once: what it costs when nothing overlaps it with training. Not a
    baseline: a reference for how much of the work the background copy hides (none, where no core is idle)."""

    name = "snapguard_sync"
    label = "snapguard `snapshot()` + `wait()` (no overlap)"

    def after_step(self, step: int) -> None:
        super().after_step(step)
        self.guard.wait()


class SnapguardMemmoveMode(SnapguardMode):
    """The same snapshot with the copy of the library before streaming stores: memmove (the destination read into
    the cache before it is written) instead of `snapguard.memcopy.stream_copy`. A reference for what they save."""

    name = "snapguard_memmove"
    label = "snapguard `guard.snapshot()`, copied with memmove"

    def after_step(self, step: int) -> None:
        sg_guard.stream_copy = ctypes.memmove  # until drain(): this mode's block of steps
        super().after_step(step)

    def drain(self) -> None:
        super().drain()
        sg_guard.stream_copy = stream_copy


class TorchSaveMode(Mode):
    def __init__(self, name: str, label: str, path: str, model, optimizer):
        self.name, self.label, self.path = name, label, path
        self.model, self.optimizer = model, optimizer

    def after_step(self, step: int) -> None:
        torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "step": step}, self.path)


class DcpMode(Mode):
    """dcp.async_save to a directory. `reuse`: one DefaultStager kept across saves (its staging buffers are
    reused), staging in the background and waited for before optimizer.step(), as torchtitan does."""

    def __init__(self, name: str, label: str, path: str, model, optimizer, reuse: bool):
        self.name, self.label, self.path = name, label, path
        self.model, self.optimizer = model, optimizer
        self.stager = DefaultStager(StagingOptions(False, False, True, False)) if reuse else None
        self.pending: Any = None

    def before_optimizer(self) -> None:
        if self.stager is not None:
            self.stager.synchronize_staging()

    def after_step(self, step: int) -> None:
        self.drain()  # one save in flight: wait for the previous one's upload
        msd, osd = get_state_dict(self.model, self.optimizer)
        sd = {"model": msd, "optim": osd}
        if self.stager is None:
            self.pending = dcp.async_save(sd, checkpoint_id=self.path, no_dist=True)
        else:
            self.pending = dcp.async_save(sd, checkpoint_id=self.path, no_dist=True, async_stager=self.stager)

    def drain(self) -> None:
        if self.pending is None:
            return
        fut = getattr(self.pending, "upload_completion", self.pending)
        if self.stager is not None:
            self.stager.synchronize_staging()
        fut.result()
        self.pending = None

    def close(self) -> None:
        self.drain()
        if self.stager is not None:
            self.stager.close()


class Trainer:
    def __init__(self, model, optimizer, batch: torch.Tensor, vocab: int):
        self.model, self.optimizer, self.batch, self.vocab = model, optimizer, batch, vocab

    def step(self, mode: Mode, step: int, counted: bool = True) -> StepRecord:
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.model(self.batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, self.vocab), self.batch[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        t1 = time.perf_counter()
        mode.before_optimizer()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        mode.after_step(step)
        t4 = time.perf_counter()
        return StepRecord(mode.name, t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.process_time() - c0, counted)


# ---- the daemons ---------------------------------------------------------------------------------

@dataclass
class DaemonHandle:
    endpoint: Endpoint
    proc: subprocess.Popen
    log_path: str

    def cpu_s(self) -> float:
        try:
            return U.proc_cpu_s(self.proc.pid)
        except OSError:
            return float("nan")

    def allocations(self) -> list[tuple[float, float]]:
        """(MiB, seconds) of every slot allocation the daemon logged."""
        with open(self.log_path, errors="replace") as f:
            return [(float(m.group(1)), float(m.group(2)))
                    for m in re.finditer(r"allocated rank \d+ slot \d+: ([\d.]+) MiB in ([\d.]+) s", f.read())]

    def stop(self) -> None:
        """Shutdown over the wire (removes its shared memory), then SIGTERM this pid only if needed."""
        if self.proc.poll() is None:
            from snapguard.client import DaemonClient
            c = DaemonClient(self.endpoint.address, 10.0, "bench")
            with contextlib.suppress(Exception):
                c.request(P.Shutdown(remove=True))
            c.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(30)


def start_daemon(job: str, run_dir: str, extra: list[str] | tuple[str, ...] = ()) -> DaemonHandle:
    """A daemon for `job`, started with `extra` command-line options, logging into run_dir."""
    ep = Endpoint(job, NODE, run_dir)
    log_path = os.path.join(run_dir, f"{job}.log")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    return DaemonHandle(ep, spawn_daemon(ep, extra=extra, log_path=log_path), log_path)


class NoReserveGuard(Guard):
    """A Guard that skips the Reserve message: the daemon allocates slots when the first snapshots begin."""

    def _reserve(self, nbytes: int | None = None) -> None:
        pass


def make_guard(cls, model, optimizer, job: str, run_dir: str) -> Guard:
    return cls(model=model, optimizer=optimizer, job=job, node=NODE, run_dir=run_dir, rank=0, world_size=1)


# ---- section 1: step time -----------------------------------------------------------------------

def run_interleaved(trainer: Trainer, modes: list[Mode], rounds: int, block: int, warmup: int,
                    daemon: DaemonHandle, first_step: int) -> tuple[list[StepRecord], dict[str, float]]:
    records: list[StepRecord] = []
    daemon_cpu: dict[str, list[float]] = {m.name: [] for m in modes}
    step = first_step
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate, so no mode always follows another
        for mode in order:
            d0 = daemon.cpu_s()
            for i in range(block):
                rec = trainer.step(mode, step, counted=i >= warmup)
                rec.round = r
                records.append(rec)
                step += 1
            mode.drain()
            daemon_cpu[mode.name].append((daemon.cpu_s() - d0) / block)
            done = [x for x in records if x.mode == mode.name and x.counted]
            progress(f"round {r + 1}/{rounds} {mode.name:<16} median step {U.median([x.total for x in done]):.2f} s")
    return records, {k: U.mean(v) for k, v in daemon_cpu.items()}


def report_steps(records: list[StepRecord], modes: list[Mode], daemon_cpu: dict[str, float],
                 state_gb: float) -> dict[str, float]:
    by = {m.name: [x for x in records if x.mode == m.name and x.counted] for m in modes}
    base = by["none"]
    b_med, b_mean = U.median([x.total for x in base]), U.mean([x.total for x in base])
    b_cpu = U.mean([x.cpu for x in base])
    over = {}
    rows = []
    rounds = sorted({x.round for x in base})
    for m in modes:
        xs = by[m.name]
        med, mn = U.median([x.total for x in xs]), U.mean([x.total for x in xs])
        over[m.name] = (med - b_med, mn - b_mean)
        # Paired: this mode's block median over the same round's no-snapshot block median, then the median of those.
        paired = U.median([U.median([x.total for x in xs if x.round == r]) /
                           U.median([x.total for x in base if x.round == r]) - 1 for r in rounds])
        over[m.name + "_paired"] = (paired, paired)
        rows.append([m.label, len(xs), f"{med:.3f}", f"{mn:.3f}", U.pct(med / b_med - 1), U.pct(mn / b_mean - 1),
                     U.pct(paired),
                     f"{U.median([x.fwdbwd for x in xs]):.3f}", f"{U.median([x.wait for x in xs]):.3f}",
                     f"{U.median([x.opt for x in xs]):.3f}", f"{U.median([x.save for x in xs]):.3f}",
                     f"{U.mean([x.cpu for x in xs]) - b_cpu:+.2f}", f"{daemon_cpu.get(m.name, 0.0):.2f}"])
    print(U.table(["mode", "steps", "median s", "mean s", "overhead (median)", "overhead (mean)",
                   "overhead (paired by round)", "fwd+bwd s", "wait before opt.step s", "opt.step s", "save call s",
                   "extra trainer CPU s/step", "daemon CPU s/step"], rows, right=range(1, 13)))
    print()
    sg_med, sg_mean = over.get("snapguard", (float("nan"),) * 2)
    sg_paired = over.get("snapguard_paired", (float("nan"),) * 2)[0]
    rows = []
    for m in modes:
        if m.name in ("none", "snapguard"):
            continue
        o_med, o_mean = over[m.name]
        o_paired = over[m.name + "_paired"][0]
        rows.append([m.label, f"{o_med:+.3f}", f"{o_mean:+.3f}", f"{sg_med:+.3f}", f"{sg_mean:+.3f}",
                     U.ratio(sg_med, o_med), U.ratio(sg_mean, o_mean), U.ratio(sg_paired, o_paired)])
    if rows:
        print("Overhead per step, snapguard's against each other mode's (target: at most 1/5 = 0.2x of async_save's):")
        print()
        print(U.table(["other mode", "its overhead s (median)", "(mean)", "snapguard's s (median)", "(mean)",
                       "snapguard / other (median)", "(mean)", "(paired by round)"], rows, right=range(1, 8)))
        print()
    for m in modes:
        done = [j for j in getattr(m, "jobs", []) if j.sealed.is_set() and j.error is None]
        if done:
            copy, seal = U.median([j.copy_s for j in done]), U.median([j.seal_s for j in done])
            print(f"{m.name} background work per snapshot (median of {len(done)}): copy and checksums {copy:.3f} s"
                  f" ({state_gb / copy:.2f} GB/s), seal {seal:.3f} s (the daemon's verification + round trip),"
                  f" fwd+bwd it must hide behind: {U.median([x.fwdbwd for x in by[m.name]]):.3f} s")
    return {"none_med": b_med, "none_mean": b_mean, "sg_med": sg_med, "sg_mean": sg_mean, "sg_paired": sg_paired,
            **{f"over_{k}_med": v[0] for k, v in over.items()}, **{f"over_{k}_mean": v[1] for k, v in over.items()}}


# ---- section 2: restore -------------------------------------------------------------------------

class RestoreTimer:
    """Wraps a Guard's daemon requests, slot mappings and load_state_dict calls to time them."""

    def __init__(self, guard: Guard):
        self.t: dict[str, float] = {}
        orig = guard.client.request

        def request(msg, *a, **k):
            t = time.perf_counter()
            try:
                return orig(msg, *a, **k)
            finally:
                self.add(f"daemon {msg.TYPE}", time.perf_counter() - t)

        guard.client.request = request
        for st in guard.states.values():
            st.load_state_dict = self._timed("load_state_dict", st.load_state_dict)
        self._orig_map = sg_guard.map_file
        sg_guard.map_file = self._timed("map (MAP_POPULATE)", self._orig_map)
        self._orig_copy = sg_guard.copy_verified
        sg_guard.copy_verified = self._timed("verify + copy into the tensors", self._orig_copy)

    def _timed(self, key, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t)
        return run

    def add(self, key: str, s: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + s

    def undo(self) -> None:
        sg_guard.map_file = self._orig_map
        sg_guard.copy_verified = self._orig_copy


def torch_load_into(path: str, model, optimizer, map_location: str | None = None) -> tuple[float, float]:
    t = time.perf_counter()
    sd = torch.load(path, weights_only=True, map_location=map_location)
    loaded = time.perf_counter() - t
    model.load_state_dict(sd["model"])
    optimizer.load_state_dict(sd["optim"])
    del sd
    return loaded, time.perf_counter() - t


def dcp_load_into(path: str, model, optimizer) -> tuple[float, float]:
    t = time.perf_counter()
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    loaded = time.perf_counter() - t
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return loaded, time.perf_counter() - t


def restore_section(trainer: Trainer, guard: Guard, model, optimizer, job: str, run_dir: str, paths: dict[str, str],
                    reps: int, cold_reps: int, fresh_reps: int, dims_: tuple[int, int, int, int],
                    step: int) -> tuple[Guard, dict[str, float]]:
    # The same state in every place: one more step, snapshot it, and write it with torch.save and dcp.save.
    trainer.step(Mode(), step)
    guard.snapshot(step)
    guard.wait()
    for key in ("torch_disk", "torch_shm"):
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, paths[key])
    msd, osd = get_state_dict(model, optimizer)
    shutil.rmtree(paths["dcp_disk"], ignore_errors=True)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=paths["dcp_disk"], no_dist=True)
    guard.close()

    t = time.perf_counter()
    fresh = make_guard(Guard, model, optimizer, job, run_dir)
    construct = time.perf_counter() - t
    timer = RestoreTimer(fresh)
    res: dict[str, list[tuple[float, float, float | None, int]]] = {}  # name -> [(read s, total s, resident, faults)]

    def note(name: str, loaded: float, total: float, resident: float | None, faults: int) -> None:
        res.setdefault(name, []).append((loaded, total, resident, faults))

    progress("restore: warm reps")
    breakdowns = []

    def sg_restore(memmove: bool = False) -> None:
        """`memmove`: with the copy of the library before streaming stores, a reference for what they save."""
        timer.t.clear()
        f0 = U.minor_faults()
        sg_guard.stream_copy = ctypes.memmove if memmove else stream_copy
        try:
            t = time.perf_counter()
            got = fresh.restore()
            total = time.perf_counter() - t
        finally:
            sg_guard.stream_copy = stream_copy
        assert got == step, f"restored step {got}, expected {step}"
        if not memmove:
            breakdowns.append(dict(timer.t, total=total))
        note("sg_memmove" if memmove else "sg", total, total, None, U.minor_faults() - f0)

    def file_restore(key: str, fn, cold: bool) -> None:
        if cold:
            synced = U.sync_and_drop(paths[key])
            fsync_s.setdefault(key, synced)
        resident = U.resident_fraction(paths[key])
        f0 = U.minor_faults()
        loaded, total = fn(paths[key], model, optimizer)
        note(key + ("_cold" if cold else ""), loaded, total, resident, U.minor_faults() - f0)

    fsync_s: dict[str, float] = {}
    warm = [sg_restore, lambda: sg_restore(memmove=True), lambda: file_restore("torch_disk", torch_load_into, False),
            lambda: file_restore("torch_shm", torch_load_into, False),
            lambda: file_restore("dcp_disk", dcp_load_into, False)]
    for r in range(reps):  # rotated: which one allocates into memory the previous one freed changes every rep
        for fn in warm[r % len(warm):] + warm[:r % len(warm)]:
            fn()
    progress("restore: cold reps")
    for i in range(cold_reps):
        file_restore("torch_disk", torch_load_into, True)
        file_restore("dcp_disk", dcp_load_into, True)
    timer.undo()

    if fresh_reps:
        progress("restore: fresh processes")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_restore.py")
    dims = ["--width", str(dims_[0]), "--layers", str(dims_[1]), "--vocab", str(dims_[2]), "--seq", str(dims_[3])]
    for _ in range(fresh_reps):
        for key, method, path, cold in (("sg_proc", "snapguard", "", False),
                                        ("torch_disk_proc", "torch_load", paths["torch_disk"], False),
                                        ("torch_disk_cold_proc", "torch_load", paths["torch_disk"], True),
                                        ("dcp_disk_proc", "dcp_load", paths["dcp_disk"], False)):
            if cold:
                U.sync_and_drop(path)
            resident = U.resident_fraction(path) if path else None
            cmd = [sys.executable, script, method, path, "--job", job, "--run-dir", run_dir, *dims]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            note(key, r.get("read_s", r.get("guard_s", r["total_s"])), r["total_s"], resident, r["minflt"])

    def row(label: str, key: str, cache: str, base: float) -> list[object]:
        xs = res[key]
        loaded, total = U.median([x[0] for x in xs]), U.median([x[1] for x in xs])
        resident = [x[2] for x in xs if x[2] is not None]
        where = cache if not resident else f"{cache} ({U.mean(resident) * 100:.0f}% resident)"
        faults = U.median([x[3] for x in xs])
        return [label, where, len(xs), f"{loaded:.3f}", f"{total:.3f}", U.ratio(total, base),
                f"{faults:.0f} ({faults * 4096 / U.GB:.2f} GB)"]

    sg_total = U.median([x[1] for x in res["sg"]])
    sg_proc = U.median([x[1] for x in res.get("sg_proc", [])])
    print(U.table(
        ["restore", "source", "reps", "read s (median)", "read + load_state_dict s (median)", "time / snapguard's",
         "minor page faults (x 4 KiB)"],
        [row("snapguard `guard.restore()` (fresh Guard)", "sg", "daemon shared memory", sg_total),
         row("snapguard `guard.restore()`, copied with memmove", "sg_memmove", "daemon shared memory", sg_total),
         row("`torch.load` + load_state_dict", "torch_disk", "disk file, in page cache", sg_total),
         row("`torch.load` + load_state_dict", "torch_disk_cold", "disk file, dropped from page cache", sg_total),
         row("`torch.load` + load_state_dict", "torch_shm", "/dev/shm file", sg_total),
         row("`dcp.load` + set_state_dict", "dcp_disk", "disk dir, in page cache", sg_total),
         row("`dcp.load` + set_state_dict", "dcp_disk_cold", "disk dir, dropped from page cache", sg_total)]
        + ([row("fresh process: snapguard Guard() + restore()", "sg_proc", "daemon shared memory", sg_proc),
            row("fresh process: `torch.load` + load_state_dict", "torch_disk_proc", "disk file, in page cache", sg_proc),
            row("fresh process: `torch.load` + load_state_dict", "torch_disk_cold_proc",
                "disk file, dropped from page cache", sg_proc),
            row("fresh process: `dcp.load` + set_state_dict", "dcp_disk_proc", "disk dir, in page cache", sg_proc)]
           if "sg_proc" in res else []),
        right=range(2, 7)))
    print()
    keys = sorted({k for b in breakdowns for k in b} - {"total"})
    parts = ", ".join(f"{k} {U.median([b.get(k, 0.0) for b in breakdowns]):.3f} s" for k in keys)
    known = U.median([sum(v for k, v in b.items() if k != "total") for b in breakdowns])
    print(f"snapguard restore breakdown (median of {len(breakdowns)}): {parts}; the rest (all-gathers, manifest,"
          f" unflatten) {sg_total - known:.3f} s. Fresh Guard() construction (Hello, Reserve,"
          f" mapping the slots): {construct:.3f} s.")
    print(f"fsync of the freshly written files before dropping them from the page cache: torch.save file"
          f" {fsync_s.get('torch_disk', float('nan')):.2f} s, dcp dir {fsync_s.get('dcp_disk', float('nan')):.2f} s.")
    out = {k: U.median([x[1] for x in v]) for k, v in res.items()}
    return fresh, out


# ---- section 3: first snapshot ------------------------------------------------------------------

@dataclass
class FirstSnapshot:
    rec: StepRecord
    copy_s: float
    seal_s: float
    begin_s: float  # Begin request (the daemon allocates the slot here when nothing was reserved)
    map_s: float  # the trainer maps the slot (MAP_POPULATE) the first time it uses it
    daemon_cpu_s: float
    done_after_s: float  # from the snapshot() call until the background job sealed it


def first_snapshots(trainer: Trainer, guard: Guard, daemon: DaemonHandle, n: int, step: int,
                    baseline: int = 3) -> tuple[list[FirstSnapshot], list[StepRecord]]:
    """`baseline` steps without a snapshot (the local reference: the machine's speed drifts), then `n` with."""
    base = [trainer.step(Mode(), step + i) for i in range(baseline)]
    spans: dict[str, list[float]] = {"_begin": [], "_mapping": [], "_copy_and_seal": []}
    ends: list[float] = []
    for name, times in spans.items():  # time two of the Guard's steps, on this instance only
        def timed(*a, _orig=getattr(guard, name), _times=times):
            t = time.perf_counter()
            try:
                return _orig(*a)
            finally:
                _times.append(time.perf_counter() - t)
                if _times is spans["_copy_and_seal"]:
                    ends.append(time.perf_counter())
        setattr(guard, name, timed)
    mode = SnapguardMode(guard)
    recs, cpu, calls = [], [], []
    for i in range(n):
        c0 = daemon.cpu_s()
        recs.append(trainer.step(mode, step + baseline + i))
        calls.append(time.perf_counter() - recs[-1].save)  # when snapshot() was called
        cpu.append(daemon.cpu_s() - c0)
    guard.wait()
    for name in spans:
        delattr(guard, name)
    return [FirstSnapshot(r, j.copy_s, j.seal_s, b, m, c, e - call)
            for r, j, b, m, c, e, call in zip(recs, mode.jobs, spans["_begin"], spans["_mapping"], cpu, ends, calls)], base


def report_first(label: str, construct: float, allocs: list[tuple[float, float]],
                 firsts: list[FirstSnapshot], base: list[StepRecord], steady: dict[str, float]) -> None:
    alloc = ", ".join(f"{mib:.0f} MiB in {s:.2f} s" for mib, s in allocs) or "none logged"
    print(f"**{label}**: Guard() construction {construct:.3f} s; daemon slot allocations (posix_fallocate): {alloc}.")
    print()
    local = U.median([b.total for b in base])
    rows = []
    for i, f in enumerate(firsts):
        r = f.rec
        rows.append([f"snapshot {i + 1}", f"{r.total:.3f}", U.ratio(r.total, local), f"{r.fwdbwd:.3f}",
                     f"{r.wait:.3f}", f"{r.opt:.3f}", f"{r.save:.3f}", f"{f.begin_s:.3f}", f"{f.map_s:.3f}",
                     f"{f.copy_s:.3f}", f"{f.seal_s:.3f}", f"{f.done_after_s:.3f}", f"{f.daemon_cpu_s:.2f}"])
    rows.append([f"no snapshot, the {len(base)} steps just before (median)", f"{local:.3f}", "1x",
                 f"{U.median([b.fwdbwd for b in base]):.3f}", "", f"{U.median([b.opt for b in base]):.3f}",
                 "", "", "", "", "", "", ""])
    rows.append(["steady state (section 1 median)", f"{steady['sg_total']:.3f}",
                 U.ratio(steady["sg_total"], steady["none"]) + " of section 1's no-snapshot",
                 f"{steady['sg_fwdbwd']:.3f}", f"{steady['sg_wait']:.3f}", f"{steady['sg_opt']:.3f}",
                 f"{steady['sg_save']:.3f}", "", "", f"{steady['sg_copy']:.3f}", f"{steady['sg_seal']:.3f}", "", ""])
    print(U.table(["step", "step s", "/ no-snapshot step", "fwd+bwd s", "wait in pre-hook s", "opt.step s",
                   "snapshot() call s", "Begin s (bg)", "map slot s (bg)", "copy s (bg)", "seal s (bg)",
                   "sealed s after snapshot()", "daemon CPU s in step"], rows, right=range(1, 13)))
    print()


# ---- main ---------------------------------------------------------------------------------------

ALL_MODES = ("none", "snapguard", "torch_save_disk", "torch_save_shm", "dcp_async", "dcp_async_reuse")
EXTRA_MODES = ("snapguard_sync", "snapguard_memmove")  # run only when named in --modes


def print_targets(s1: dict) -> None:
    if "over_snapguard_med" not in s1:
        return
    line = (f"# Targets: snapguard overhead {s1['sg_med'] / s1['none_med'] * 100:.1f}% (median) /"
            f" {s1['sg_mean'] / s1['none_mean'] * 100:.1f}% (mean) / {s1['sg_paired'] * 100:.1f}% (paired)"
            f" of the step (target <= 5%)")
    for k in ("dcp_async", "dcp_async_reuse"):
        if f"over_{k}_med" in s1:
            line += (f"; {s1['sg_med'] / s1[f'over_{k}_med']:.2f}x (median) /"
                     f" {s1['sg_mean'] / s1[f'over_{k}_mean']:.2f}x (mean) /"
                     f" {s1['sg_paired'] / s1[f'over_{k}_paired_med']:.2f}x (paired) of {k}'s overhead"
                     f" (target <= 0.2x)")
    print(line)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model's and batch's shape: a GPT-style model of `--scale` x 12 layers (default: ~1.06 GB of state)."""
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 12 transformer layers (default 1.0)")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)


def build_trainer(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, Trainer, int]:
    """The model of `add_model_args`, its Adam optimizer, a Trainer with a fixed batch, and the number of layers;
    prints the machine it runs on."""
    layers = max(1, round(12 * args.scale))
    model = U.build_gpt(args.width, layers, args.vocab, args.seq)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    print(f"# bench/{os.path.basename(sys.argv[0])}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# {U.cpu_model()}, {os.cpu_count()} CPUs, {U.mem_total_gib():.1f} GiB RAM, Linux {platform.release()};"
          f" python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"# load average at start: {U.loadavg()}")
    return model, optimizer, Trainer(model, optimizer, batch, args.vocab), layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved blocks (default 3)")
    ap.add_argument("--block", type=int, default=4, help="steps per mode per round, warm-up included (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="steps discarded at the start of each block (default 1)")
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help=f"comma-separated subset of {','.join(ALL_MODES + EXTRA_MODES)} (default: all but"
                         f" {','.join(EXTRA_MODES)})")
    ap.add_argument("--steps-only", action="store_true",
                    help="section 1 alone (and the first snapshots that build the Guard), e.g. to vary --batch")
    ap.add_argument("--restore-reps", type=int, default=3)
    ap.add_argument("--cold-reps", type=int, default=2)
    ap.add_argument("--fresh-reps", type=int, default=2, help="restores in a fresh process, per method (default 2)")
    ap.add_argument("--touch-mib", type=int, default=512, help="size of the shared-memory first-touch test")
    ap.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where disk checkpoints go (default /tmp)")
    ap.add_argument("--shm-dir", default="/dev/shm")
    args = ap.parse_args()
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "none" not in names or any(m not in ALL_MODES + EXTRA_MODES for m in names):
        ap.error(f"--modes must include none and use only {ALL_MODES + EXTRA_MODES}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the daemons and removes files
    started = time.perf_counter()

    work = tempfile.mkdtemp(prefix=f"bench-core-{os.getpid()}-", dir=args.disk_dir)
    shm_work = tempfile.mkdtemp(prefix=f"bench-core-{os.getpid()}-", dir=args.shm_dir)
    run_dir = os.path.join(work, "run")
    job = f"bench-core-{os.getpid()}"
    paths = {"torch_disk": os.path.join(work, "state.pt"), "torch_shm": os.path.join(shm_work, "state.pt"),
             "dcp_disk": os.path.join(work, "dcp"), "dcp_reuse": os.path.join(work, "dcp-reuse")}
    daemons: list[DaemonHandle] = []
    guards: list[Guard] = []
    try:
        model, optimizer, trainer, layers = build_trainer(args)
        nparams = sum(p.numel() for p in model.parameters())
        progress("memcpy bandwidth")
        bw = U.memcpy_bandwidth(256 * U.MIB)
        print("# memcpy bandwidth (256 MiB, best of 4): " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in bw.items()))
        print(f"# snapguard copies with {STREAM_KIND}")

        progress(f"model: {nparams / 1e6:.1f}M params, warming up")
        trainer.step(Mode(), 0)  # creates Adam's moments
        sbytes = U.state_bytes(model, optimizer)
        print(f"# model: GPT-style, {layers} layers, width {args.width}, vocab {args.vocab}, seq {args.seq}, batch"
              f" {args.batch}: {nparams / 1e6:.1f}M fp32 params; training state (params + Adam moments) {sbytes / U.GB:.3f} GB")
        for i in range(2):
            trainer.step(Mode(), 1 + i)
        step = 3

        # Section 3, first part: a fresh daemon and Guard, and its first snapshots.
        progress("daemon + Guard construction, first snapshots")
        d = start_daemon(job, run_dir)
        daemons.append(d)
        t = time.perf_counter()
        guard = make_guard(Guard, model, optimizer, job, run_dir)
        construct = time.perf_counter() - t
        guards.append(guard)
        firsts, firsts_base = first_snapshots(trainer, guard, d, 4, step)
        step += 7
        allocs = d.allocations()

        # Section 1.
        modes: list[Mode] = []
        for name in names:
            if name == "none":
                modes.append(Mode())
            elif name == "snapguard":
                modes.append(SnapguardMode(guard))
            elif name == "snapguard_sync":
                modes.append(SnapguardSyncMode(guard))
            elif name == "snapguard_memmove":
                modes.append(SnapguardMemmoveMode(guard))
            elif name == "torch_save_disk":
                modes.append(TorchSaveMode(name, f"`torch.save` to disk ({args.disk_dir})", paths["torch_disk"],
                                           model, optimizer))
            elif name == "torch_save_shm":
                modes.append(TorchSaveMode(name, f"`torch.save` to {args.shm_dir}", paths["torch_shm"], model,
                                           optimizer))
            elif name == "dcp_async":
                modes.append(DcpMode(name, "`dcp.async_save` to disk (new default stager per call)",
                                     paths["dcp_disk"], model, optimizer, reuse=False))
            elif name == "dcp_async_reuse":
                modes.append(DcpMode(name, "`dcp.async_save` to disk (reused stager, background staging)",
                                     paths["dcp_reuse"], model, optimizer, reuse=True))
        progress(f"section 1: {args.rounds} rounds x {len(modes)} modes x {args.block} steps")
        load_before = U.loadavg()
        records, daemon_cpu = run_interleaved(trainer, modes, args.rounds, args.block, args.warmup, d, step)
        step += len(records)
        for m in modes:
            m.close()
        load_after = U.loadavg()

        print()
        print(f"## 1. Step time with a save every step ({args.rounds} rounds x {args.block} steps per mode, interleaved;"
              f" first {args.warmup} of each block discarded; load average {load_before} before, {load_after} after)")
        print()
        s1 = report_steps(records, modes, daemon_cpu, sbytes / U.GB)
        print()

        if args.steps_only:
            print_targets(s1)
            print(f"# total {time.perf_counter() - started:.0f} s; load average at end {U.loadavg()}")
            return

        # Section 2.
        progress("section 2: restore")
        print(f"## 2. Restore of the same {sbytes / U.GB:.2f} GB state (load average {U.loadavg()})")
        print()
        fresh, s2 = restore_section(trainer, guard, model, optimizer, job, run_dir, paths, args.restore_reps,
                                    args.cold_reps, args.fresh_reps, (args.width, layers, args.vocab, args.seq), step)
        step += 1
        guards.append(fresh)
        print()
        line = (f"Target: restore at least 10x faster than torch.load from disk. In this process:"
                f" {s2['torch_disk'] / s2['sg']:.2f}x with the file in the page cache,"
                f" {s2['torch_disk_cold'] / s2['sg']:.2f}x with it dropped from it")
        if "sg_proc" in s2:
            line += (f"; in a fresh process: {s2['torch_disk_proc'] / s2['sg_proc']:.2f}x (page cache),"
                     f" {s2['torch_disk_cold_proc'] / s2['sg_proc']:.2f}x (dropped)")
        print(line + ".")
        print()
        fresh.close()

        # Section 3, second part: without Reserve; first touch of shared memory.
        progress("section 3: Guard without Reserve")
        d2 = start_daemon(job + "-noreserve", os.path.join(work, "run2"))
        daemons.append(d2)
        t = time.perf_counter()
        g2 = make_guard(NoReserveGuard, model, optimizer, d2.endpoint.job, d2.endpoint.run_dir)
        construct2 = time.perf_counter() - t
        guards.append(g2)
        firsts2, firsts2_base = first_snapshots(trainer, g2, d2, 4, step)
        step += 7
        allocs2 = d2.allocations()
        g2.close()
        d2.stop()

        by = {m.name: [x for x in records if x.mode == m.name and x.counted] for m in modes}
        sg_mode = next((m for m in modes if m.name == "snapguard"), None)
        sg_jobs = [j for j in (sg_mode.jobs if sg_mode else []) if j.error is None]
        steady = {"none": U.median([x.total for x in by["none"]]),
                  "sg_total": U.median([x.total for x in by.get("snapguard", [])]),
                  "sg_wait": U.median([x.wait for x in by.get("snapguard", [])]),
                  "sg_fwdbwd": U.median([x.fwdbwd for x in by.get("snapguard", [])]),
                  "sg_opt": U.median([x.opt for x in by.get("snapguard", [])]),
                  "none_fwdbwd": U.median([x.fwdbwd for x in by["none"]]),
                  "none_opt": U.median([x.opt for x in by["none"]]),
                  "sg_save": U.median([x.save for x in by.get("snapguard", [])]),
                  "sg_copy": U.median([j.copy_s for j in sg_jobs]),
                  "sg_seal": U.median([j.seal_s for j in sg_jobs])}
        print(f"## 3. First-snapshot cost (load average {U.loadavg()})")
        print()
        report_first("With Reserve (Guard as shipped: the daemon allocates both slots and the Guard maps them"
                     " when it is built)", construct, allocs, firsts, firsts_base, steady)
        report_first("Without Reserve (bench subclass: slots are allocated when each of the first two snapshots begins)",
                     construct2, allocs2, firsts2, firsts2_base, steady)
        progress("section 3: shared-memory first touch")
        nbytes = args.touch_mib * U.MIB
        memcpy = max(bw.values())
        rows = [[how, f"{prep:.3f}", f"{mapped:.3f}", f"{first:.2f}", U.ratio(first, memcpy), f"{second:.2f}",
                 f"{prep + mapped + nbytes / (first * U.GB):.3f}"]
                for how, prep, mapped, first, second in U.shm_first_touch(args.shm_dir, nbytes)]
        print(f"Copy of {args.touch_mib} MiB into a fresh file in {args.shm_dir} (memcpy reference {memcpy:.2f} GB/s):")
        print()
        print(U.table(["file prepared by", "prepare s", "mmap s", "first copy GB/s", "vs memcpy",
                       "second copy GB/s", "prepare + map + first copy s"], rows, right=range(1, 7)))
        print()
        print_targets(s1)
        print(f"# total {time.perf_counter() - started:.0f} s; load average at end {U.loadavg()}")
    finally:
        for g in guards:
            with contextlib.suppress(Exception):
                g.close()
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm_work, ignore_errors=True)


if __name__ == "__main__":
    main()
