"""Persistence to disk (`snapguard-daemon --persist-dir`) against the disk checkpoints a user would otherwise take
every K steps, on one CPU machine, in one run.

    .venv/bin/python bench/persist.py                            # the core model (~1.06 GB of state), K = 4
    .venv/bin/python bench/persist.py --scale 0.1 --rounds 2     # a quick check (~10M params)

1. Step time, in interleaved blocks of K steps per mode (a block holds exactly one save of the K-step modes;
   the first round is warm-up): no save; snapguard's snapshot every step (memory only); the same with its
   daemon also persisting one step in every K to disk; `torch.save` of the same state every K steps; and
   `torch.distributed.checkpoint.async_save` every K steps (a reused stager, staging in the background and
   waited for before `optimizer.step()`, as torchtitan does). Between blocks, each mode's save in flight is
   finished outside the timed steps (the daemon's disk write too).
2. Restore from disk, after the node lost its memory: a fresh daemon whose shared memory is empty, and a
   fresh Guard's `restore()` (the daemon reads the persisted shard into a slot and verifies it, the trainer
   copies it into the tensors), against `torch.load` + `load_state_dict` of the same state, with the files in
   the page cache and dropped from it (fsync, then POSIX_FADV_DONTNEED).

Run alone: other processes on the machine add noise, and the load average is printed to judge it.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

os.environ.setdefault("SNAPGUARD_TIMEOUT_S", "300")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import core_util as U  # noqa: E402

from snapguard.guard import Guard  # noqa: E402

NODE = core.NODE


class EveryK(core.Mode):
    """Wraps a save-every-step mode so that it saves on the first step of each block only (blocks are K steps)."""

    def __init__(self, inner: core.Mode, name: str, label: str):
        self.inner, self.name, self.label = inner, name, label
        self.fresh = True

    def before_optimizer(self) -> None:
        self.inner.before_optimizer()

    def after_step(self, step: int) -> None:
        if self.fresh:
            self.inner.after_step(step)
            self.fresh = False

    def drain(self) -> None:
        self.inner.drain()
        self.fresh = True

    def close(self) -> None:
        self.inner.close()


class PersistMode(core.SnapguardMode):
    """Snapshots every step into a daemon that also persists the first step of each block (one in every K)."""

    name = "snapguard_persist"

    def __init__(self, guard: Guard, persist_dir: str, every: int):
        super().__init__(guard)
        self.label = f"snapguard every step, 1 in {every} also to disk"
        self.dir, self.first = persist_dir, None

    def after_step(self, step: int) -> None:
        if self.first is None:
            self.first = step
        super().after_step(step)

    def drain(self) -> None:
        super().drain()
        first, self.first = self.first, None
        if first is not None:  # the daemon's write of this block's step, outside the timed steps
            path = os.path.join(self.dir, f"r0.s{first}.manifest")
            deadline = time.monotonic() + 120
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the daemon did not persist step {first} within 120 s ({path})")
                time.sleep(0.01)


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    core.add_model_args(ap)
    ap.add_argument("--every", type=int, default=4, help="K: steps per save of the disk modes, and per block")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved blocks after the warm-up round")
    ap.add_argument("--restore-reps", type=int, default=2)
    ap.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where disk checkpoints go (default /tmp)")
    args = ap.parse_args()
    if args.every < 2:
        ap.error("--every must be at least 2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()

    work = tempfile.mkdtemp(prefix=f"bench-persist-{os.getpid()}-", dir=args.disk_dir)
    run_dir = os.path.join(work, "run")
    disk = os.path.join(work, "persist")
    jobs = {"mem": f"bench-mem-{os.getpid()}", "disk": f"bench-disk-{os.getpid()}"}
    persisted = os.path.join(disk, f"snapguard-{jobs['disk']}")
    daemons: dict[str, core.DaemonHandle] = {}
    guards: list[Guard] = []
    modes: list[core.Mode] = []
    try:
        model, optimizer, trainer, layers = core.build_trainer(args)
        nparams = sum(p.numel() for p in model.parameters())
        print(f"# disk checkpoints and persistence in {args.disk_dir}")
        core.progress(f"model: {nparams / 1e6:.1f}M params, warming up")
        for i in range(3):
            trainer.step(core.Mode(), i)  # the first creates Adam's moments
        sbytes = U.state_bytes(model, optimizer)
        print(f"# model: GPT-style, {layers} layers, width {args.width}, vocab {args.vocab}, seq {args.seq}, batch"
              f" {args.batch}: {nparams / 1e6:.1f}M fp32 params; training state (params + Adam moments)"
              f" {sbytes / U.GB:.3f} GB; K = {args.every}")

        core.progress("daemons and Guards")
        daemons["mem"] = core.start_daemon(jobs["mem"], run_dir)
        daemons["disk"] = core.start_daemon(jobs["disk"], run_dir,
                                            ["--persist-dir", disk, "--persist-every", str(args.every)])
        g_mem = core.make_guard(Guard, model, optimizer, jobs["mem"], run_dir)
        guards.append(g_mem)
        g_disk = core.make_guard(Guard, model, optimizer, jobs["disk"], run_dir)
        guards.append(g_disk)
        torch_path, dcp_path = os.path.join(work, "state.pt"), os.path.join(work, "dcp")
        modes = [
            core.Mode(),
            core.SnapguardMode(g_mem),
            PersistMode(g_disk, persisted, args.every),
            EveryK(core.TorchSaveMode("torch_save", "", torch_path, model, optimizer), "torch_save_k",
                   f"`torch.save` to disk every {args.every} steps"),
            EveryK(core.DcpMode("dcp", "", dcp_path, model, optimizer, reuse=True), "dcp_async_k",
                   f"`dcp.async_save` to disk every {args.every} steps (reused stager)"),
        ]
        core.progress(f"section 1: 1 + {args.rounds} rounds x {len(modes)} modes x {args.every} steps")
        # Blocks start at multiples of K, so that the daemon, which persists the first step it sees of every
        # interval [n*K, (n+1)*K), writes one step per block of the persisting mode, as the other modes save.
        first = args.every * 2
        records, daemon_cpu = core.run_interleaved(trainer, modes, args.rounds + 1, args.every, 0, daemons["disk"],
                                                   first)
        for r in records:
            r.counted = r.round > 0
        print()
        print(f"## 1. Step time, one save in every {args.every} steps (snapguard: a snapshot every step as well)")
        print()
        print(f"Blocks of {args.every} steps per mode, {args.rounds} rounds after a warm-up round; every step"
              " counted. The daemon CPU column is the persisting daemon's.")
        print()
        s1 = core.report_steps(records, modes, {"snapguard_persist": daemon_cpu["snapguard_persist"]}, sbytes / U.GB)
        step = first + (args.rounds + 1) * len(modes) * args.every
        writes = []
        with open(daemons["disk"].log_path, errors="replace") as f:
            for line in f:
                if "persisted rank 0 step" in line:
                    writes.append(float(line.rsplit(" in ", 1)[1].split()[0]))
        if len(writes) != args.rounds + 1:
            raise SystemExit(f"the daemon wrote {len(writes)} steps, one per block of the persisting mode"
                             f" ({args.rounds + 1}) expected")
        if writes:
            print(f"The daemon's disk writes: {len(writes)}, median {U.median(writes):.2f} s each"
                  f" ({sbytes / U.GB / U.median(writes):.2f} GB/s, verified and fsynced).")
            print()

        # Section 2: the node loses its memory; the same state is on disk from both.
        core.progress("section 2: restore from disk")
        trainer.step(core.Mode(), step)
        g_disk.snapshot(step)
        g_disk.wait()
        modes[2].first = step
        modes[2].drain()  # step `step` opens a new interval: wait for it to be on disk
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, torch_path)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        for m in modes:
            m.close()
        for g in guards:
            g.close()
        guards.clear()
        daemons.pop("mem").stop()
        rows, times = [], {"snapguard": [], "torch_warm": [], "torch_cold": []}
        for rep in range(args.restore_reps):
            for cold in (False, True):
                daemons["disk"].stop()  # a clean shutdown removes its shared memory: nothing left in memory
                if cold:
                    U.sync_and_drop(persisted)
                resident = U.resident_fraction(persisted)
                daemons["disk"] = core.start_daemon(jobs["disk"], run_dir,
                                                    ["--persist-dir", disk, "--persist-every", str(args.every)])
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                t = time.perf_counter()
                g = core.make_guard(Guard, model, optimizer, jobs["disk"], run_dir)
                built = time.perf_counter() - t
                t = time.perf_counter()
                got = g.restore()
                took = time.perf_counter() - t
                if got != step or g.restored_from != "disk":
                    raise SystemExit(f"restore gave step {got} from {g.restored_from}, expected {step} from disk")
                if any(not torch.equal(v, want[k]) for k, v in model.state_dict().items()):
                    raise SystemExit("the state restored from disk differs from what was saved")
                g.close()
                times["snapguard"].append(took)
                rows.append([f"snapguard `restore()` from disk", _pct(resident), f"{took:.3f}", f"{built:.3f}"])
                if cold:
                    U.sync_and_drop(torch_path)
                resident = U.resident_fraction(torch_path)
                loaded, total = core.torch_load_into(torch_path, model, optimizer)
                times["torch_cold" if cold else "torch_warm"].append(total)
                rows.append(["`torch.load` + load_state_dict", _pct(resident), f"{total:.3f}", "-"])
        print("## 2. Restore from disk after the node lost its memory")
        print()
        print("snapguard's files are written with O_DIRECT, so they are not in the page cache unless read since;"
              " odd rows drop both files from it first.")
        print()
        print(U.table(["what", "file in page cache", "restore s", "Guard() s"], rows, right=(1, 2, 3)))
        print()
        sg, tw, tc = (U.median(times[k]) for k in ("snapguard", "torch_warm", "torch_cold"))
        print(f"Medians of {args.restore_reps * 2} and {args.restore_reps}: snapguard from disk {sg:.3f} s,"
              f" `torch.load` {tw:.3f} s (file as torch.save left it), {tc:.3f} s (dropped): torch.load / snapguard"
              f" {U.ratio(tw, sg)} and {U.ratio(tc, sg)}.")
        print()
        # Means, not medians: a mode that saves once in K steps costs nothing in K-1 of them, and all in one.
        o = s1.get("over_snapguard_persist_mean", float("nan"))
        ts = s1.get("over_torch_save_k_mean", float("nan"))
        dc = s1.get("over_dcp_async_k_mean", float("nan"))
        print(f"Summary (means over every step): persisting 1 in {args.every} adds {o - s1['sg_mean']:+.3f} s per step"
              f" to snapguard's {s1['sg_mean']:+.3f} s; `torch.save` every {args.every} steps costs {ts:+.3f} s per"
              f" step, `dcp.async_save` {dc:+.3f} s: snapguard with persistence (a snapshot every step included) /"
              f" torch.save {U.ratio(o, ts)}, / dcp.async_save {U.ratio(o, dc)}.")
        print(f"# total {time.perf_counter() - started:.0f} s; load average at end: {U.loadavg()}")
    finally:
        for m in modes:
            try:
                m.close()
            except Exception:
                pass
        for g in guards:
            g.close()
        for d in daemons.values():
            d.stop()
        for d in glob.glob(os.path.join(work, "*")):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
