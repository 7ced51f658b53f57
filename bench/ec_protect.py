"""Protection across nodes: lag from seal to protected, memory per node, network bytes per snapshot.

Starts g real daemons (one per simulated node, loopback TCP, authenticated) and one Guard per node
in this process, each protecting one rank's state of `--mib` MiB. Every step: snapshot on every
node, then time until every daemon reports the step protected (parity complete on every holder).
Compares memory per node with the design's g/(g-m) and with plain replication's m+1, and reports chunk
bytes sent per node per snapshot. Memory per node is measured: the slots in /dev/shm, and the daemon's own
memory above what it held before the first snapshot (`snapguard status`'s "daemon memory outside shm":
parity, the chunks on their way), at its peak (sampled at every status poll) and at the end.

With `--pace S`, snapshots are taken every S seconds, as a training loop with an S-second step would
take them, without waiting for protection; the same run is made with the same daemons minus erasure
coding. It reports how long each snapshot held the "training loop" up (the `snapshot()` call, which
waits for the previous seal, plus the slot grant, copy and seal in the background), and how long after
its seal each step was covered by a protected step at least as new: protection may skip steps, but
training must not wait for it.

    .venv/bin/python bench/ec_protect.py [--g 4 --m 2] [--sizes 16,64,256] [--steps 6]
    .venv/bin/python bench/ec_protect.py --g 3 --m 1 --sizes 1024 --pace 1.7 --steps 12
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.procs import free_port
from snapguard.config import Endpoint
from snapguard.guard import Guard
from snapguard.procs import spawn_daemon

MiB = 1 << 20


def status(ep: Endpoint) -> P.StatusReport:
    c = DaemonClient(ep.address, timeout_s=30)
    try:
        return c.request(P.Status())
    finally:
        c.close()


class Nodes:
    """g daemons on this machine, with erasure coding across them (ec=True) or without, one Guard each."""

    def __init__(self, g: int, m: int, mib: int, ec: bool = True):
        self.work = tempfile.mkdtemp(prefix="sg-ecbench-")
        self.shm = f"/dev/shm/sg-ecbench-{secrets.token_hex(3)}"
        self.names = names = [f"n{i}" for i in range(g)]
        ports = {n: free_port() for n in names}
        os.environ["SNAPGUARD_SECRET"] = secrets.token_hex(16)
        job = f"ecb{os.getpid()}"
        self.eps = {n: Endpoint(job, n, os.path.join(self.work, n)) for n in names}
        self.procs, self.guards, self.args = [], [], {}
        try:
            for n in names:
                os.makedirs(os.path.join(self.shm, n), mode=0o700)
                extra = ["--log-level", "WARNING"]
                if ec:
                    extra += ["--peer-bind", f"tcp://127.0.0.1:{ports[n]}", "--ec-group", ",".join(names),
                              "--ec-m", str(m)]
                    extra += [a for o in names if o != n for a in ("--peer", f"{o}=tcp://127.0.0.1:{ports[o]}")]
                self.args[n] = extra
                self.procs.append(spawn_daemon(self.eps[n], os.path.join(self.shm, n), extra,
                                               log_path=os.path.join(self.work, f"{n}.log")))
            gen = torch.Generator().manual_seed(0)
            # One state for every node: g states of a GiB each would not fit beside g daemons' slots on this VM.
            # The daemons' work is the same (parity of equal chunks costs what any parity costs).
            w = torch.randint(0, 255, (mib * MiB,), dtype=torch.uint8, generator=gen)
            self.states = [{"w": w} for _ in names]
            for i, n in enumerate(names):
                # Without EC the daemons never hear of each other's ranks: each node is a job of one rank.
                rank, world = (i, g) if ec else (0, 1)
                w = self.states[i]["w"]
                # `guarded`: the state changes only after before_update(), as parameters change only in
                # optimizer.step(), so the copy overlaps the "step" instead of cloning the state first.
                self.guards.append(Guard(states={"s": self.states[i]}, rng=False, job=job, node=n,
                                         run_dir=self.eps[n].run_dir, rank=rank, world_size=world, timeout_s=120,
                                         guarded=lambda w=w: [w]))
            self.idle = {n: status(self.eps[n]).memory_bytes for n in names}
            self.peak = dict.fromkeys(names, 0)
        except BaseException:
            self.close()
            raise

    def protected(self) -> int:
        """Newest step protected on every node; notes each daemon's peak memory on the way."""
        reports = self.reports()
        return min(r.protected for r in reports)

    def reports(self) -> list[P.StatusReport]:
        reports = [status(self.eps[n]) for n in self.names]
        for n, r in zip(self.names, reports):
            self.peak[n] = max(self.peak[n], r.memory_bytes - self.idle[n])
        return reports

    def memory(self, shard: int, reports: list[P.StatusReport]) -> dict:
        """Per node, in shards (mean over nodes): slots, the daemon's memory above idle at its peak and as `reports`
        (from `self.reports()`) say it is now."""
        return {"slots": statistics.mean(r.shm_used for r in reports) / shard,
                "daemon_peak": statistics.mean(self.peak.values()) / shard,
                "daemon_end": statistics.mean(r.memory_bytes - self.idle[n] for n, r in zip(self.names, reports)) / shard}

    def replace(self, n: str) -> None:
        """Lose node `n`: close its Guard, SIGKILL its daemon and wipe its shared memory; then start an empty
        replacement daemon under the same name, as on a new machine."""
        i = self.names.index(n)
        self.guards[i].close()
        self.procs[i].kill()
        self.procs[i].wait(10)
        shm = os.path.join(self.shm, n)
        shutil.rmtree(shm)
        os.makedirs(shm, mode=0o700)
        self.procs[i] = spawn_daemon(self.eps[n], shm, self.args[n], log_path=os.path.join(self.work, f"{n}.log"))

    def close(self) -> None:
        for gd in self.guards:
            gd.close()
        for p in self.procs:
            p.kill()
            p.wait(10)
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)


def run(g: int, m: int, mib: int, steps: int, snapshot_gap_s: float) -> dict:
    nodes = Nodes(g, m, mib)
    states, guards = nodes.states, nodes.guards
    try:
        lags, seals = [], []
        for step in range(steps):
            for gd in guards:
                gd.before_update()
            states[0]["w"][step % 1000] ^= 1
            t0 = time.monotonic()
            for gd in guards:
                gd.snapshot(step)
            for gd in guards:
                gd.wait()
            t1 = time.monotonic()
            deadline = t1 + 120
            while nodes.protected() < step:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"step {step} not protected within 120 s")
                time.sleep(0.002)
            seals.append(t1 - t0)
            lags.append(time.monotonic() - t1)
            time.sleep(snapshot_gap_s)
        reports = nodes.reports()
        shard = mib * MiB
        parity = statistics.mean(r.parity_bytes for r in reports)
        sent = statistics.mean(r.sent_bytes for r in reports) / steps
        return {"g": g, "m": m, "mib": mib, "seal_s": statistics.median(seals[1:]),
                "lag_s": statistics.median(lags[1:]), "lag_max_s": max(lags[1:]),
                "parity_per_shard": parity / shard, "sent_per_shard": sent / shard,
                **nodes.memory(shard, reports)}
    finally:
        nodes.close()


def run_paced(g: int, m: int, mib: int, steps: int, pace_s: float, ec: bool) -> dict:
    """Snapshot every `pace_s` seconds on every node without waiting for protection."""
    nodes = Nodes(g, m, mib, ec)
    sealed_at: dict[int, float] = {}
    covered_at: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:  # in its own thread: a slow status reply must not delay the next snapshot
        while not stop.is_set():
            p = nodes.protected()
            now = time.monotonic()
            for s in list(sealed_at):
                if s <= p and s not in covered_at:
                    covered_at[s] = now
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)  # without EC it samples the daemons' memory only
    watcher.start()
    stalls, jobs = [], []
    try:
        for step in range(steps + 1):
            t0 = time.monotonic()
            for gd in nodes.guards:
                gd.before_update()  # the optimizer step's pre-hook: the previous copy must be done
            nodes.states[0]["w"][step % 1000] ^= 1
            for gd in nodes.guards:
                gd.wait()  # what snapshot() does first: the previous step must be sealed
            stalls.append(time.monotonic() - t0)
            if step:
                sealed_at[step - 1] = time.monotonic()
            if step == steps:
                break
            for gd in nodes.guards:
                gd.snapshot(step)
            jobs.append([gd._job for gd in nodes.guards])
            time.sleep(pace_s)  # forward and backward of the next step
        begins = [max(j.begin_s for j in js) for js in jobs]
        copies = [max(j.copy_s for j in js) for js in jobs]
        seals = [max(j.seal_s for j in js) for js in jobs]
        if ec:
            deadline = time.monotonic() + 120
            while steps - 1 not in covered_at and time.monotonic() < deadline:
                time.sleep(0.01)
        stop.set()
        if ec and steps - 1 not in covered_at:
            raise RuntimeError(f"step {steps - 1} not protected within 120 s of the last snapshot")
        lags = [covered_at[s] - sealed_at[s] for s in sorted(covered_at) if s >= 1]
        step_s = pace_s + statistics.median(stalls[2:])
        return {"stall": stalls[2:], "begin": begins[1:], "copy": copies[1:], "seal": seals[1:], "lag": lags,
                "lag_steps": [x / step_s for x in lags], **nodes.memory(mib * MiB, nodes.reports())}
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(5)
        nodes.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--sizes", default="16,64,256", help="shard sizes in MiB per node")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gap", type=float, default=0.0, help="pause between snapshots")
    ap.add_argument("--pace", type=float, default=0.0,
                    help="snapshot every PACE seconds without waiting for protection, against the same without EC")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.pace:
        return main_paced(a)
    print(f"# bench/ec_protect.py: g={a.g} m={a.m}, {os.cpu_count()} CPUs, one rank per node, all nodes on this machine")
    print(f"# design: parity per node = m/(g-m) = {a.m / (a.g - a.m):.3f} shard; EC total with one copy"
          f" g/(g-m) = {a.g / (a.g - a.m):.3f}; plain replication m+1 = {a.m + 1}")
    print("# memory per node, in shards: slots in /dev/shm; the daemon's own (above idle) at its peak and at the end;"
          " node total = slots + daemon peak")
    print("| shard MiB | seal s (all nodes) | seal->protected lag s (median / max) | parity held at the end / shard |"
          " slots / shard | daemon memory / shard (peak / end) | node total / shard (design g/(g-m), replication m+1) |"
          " sent per snapshot / shard |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mib in (int(x) for x in a.sizes.split(",")):
        r = run(a.g, a.m, mib, a.steps, a.gap)
        print(f"| {mib} | {r['seal_s']:.3f} | {r['lag_s']:.3f} / {r['lag_max_s']:.3f} | {r['parity_per_shard']:.3f} |"
              f" {memory_cells(r, a)} | {r['sent_per_shard']:.3f} (design m = {a.m}) |", flush=True)
    return 0


def memory_cells(r: dict, a) -> str:
    total = r["slots"] + r["daemon_peak"]
    return (f"{r['slots']:.2f} | {r['daemon_peak']:.2f} / {r['daemon_end']:.2f} | {total:.2f}"
            f" ({a.g / (a.g - a.m):.2f}, {a.m + 1})")


def main_paced(a) -> int:
    med = statistics.median
    print(f"# bench/ec_protect.py --pace: g={a.g} m={a.m}, {os.cpu_count()} CPUs, one rank per node, all nodes on this"
          f" machine; {a.pace:.2f} s of \"forward and backward\" between snapshots, {a.steps} steps, the first left out")
    print("# stall = time the loop was held up: the optimizer pre-hook (previous copy) plus snapshot() (previous seal); begin / copy / seal: the"
          " background phases, slowest node; lag: from a step's seal until a step at least as new is protected")
    print("# memory per node, in shards: slots in /dev/shm; the daemon's own (above idle) at its peak and at the end;"
          " node total = slots + daemon peak")
    print("| shard MiB | daemons | stall s (median / max) | begin s (median / max) | copy s | seal s (median / max) |"
          " seal->covered lag s (median / max) | lag in steps (median / max) | slots / shard |"
          " daemon memory / shard (peak / end) | node total / shard (design g/(g-m), replication m+1) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mib in (int(x) for x in a.sizes.split(",")):
        for ec in (False, True):
            r = run_paced(a.g, a.m, mib, a.steps, a.pace, ec)
            lag = f"{med(r['lag']):.3f} / {max(r['lag']):.3f}" if ec and r["lag"] else "-"
            lag_steps = f"{med(r['lag_steps']):.1f} / {max(r['lag_steps']):.1f}" if ec and r["lag"] else "-"
            print(f"| {mib} | {'EC g=%d m=%d' % (a.g, a.m) if ec else 'no EC'} |"
                  f" {med(r['stall']):.3f} / {max(r['stall']):.3f} | {med(r['begin']):.3f} / {max(r['begin']):.3f} |"
                  f" {med(r['copy']):.3f} | {med(r['seal']):.3f} / {max(r['seal']):.3f} | {lag} |"
                  f" {lag_steps} | {memory_cells(r, a)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
