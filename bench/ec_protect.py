"""Protection across nodes: lag from seal to protected, memory per node, network bytes per snapshot.

Starts g real daemons (one per simulated node, loopback TCP, authenticated) and one Guard per node
in this process, each protecting one rank's state of `--mib` MiB. Every step: snapshot on every
node, then time until every daemon reports the step protected (parity complete on every holder).
Compares memory per node with the design's g/(g-m) (plus the local double-buffered slots) and with
plain replication's m+1, and reports chunk bytes sent per node per snapshot.

    .venv/bin/python bench/ec_protect.py [--g 4 --m 2] [--sizes 16,64,256] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time

import torch

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.cluster import free_port
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


def run(g: int, m: int, mib: int, steps: int, snapshot_gap_s: float) -> dict:
    work = tempfile.mkdtemp(prefix="sg-ecbench-")
    shm = f"/dev/shm/sg-ecbench-{secrets.token_hex(3)}"
    names = [f"n{i}" for i in range(g)]
    ports = {n: free_port() for n in names}
    os.environ["SNAPGUARD_SECRET"] = secrets.token_hex(16)
    job = f"ecb{os.getpid()}"
    eps = {n: Endpoint(job, n, os.path.join(work, n)) for n in names}
    procs = []
    guards = []
    try:
        for n in names:
            os.makedirs(os.path.join(shm, n), mode=0o700)
            extra = ["--peer-bind", f"tcp://127.0.0.1:{ports[n]}", "--ec-group", ",".join(names), "--ec-m", str(m),
                     "--log-level", "WARNING"]
            extra += [a for o in names if o != n for a in ("--peer", f"{o}=tcp://127.0.0.1:{ports[o]}")]
            procs.append(spawn_daemon(eps[n], os.path.join(shm, n), extra, log_path=os.path.join(work, f"{n}.log")))
        gen = torch.Generator().manual_seed(0)
        states = [{"w": torch.randint(0, 255, (mib * MiB,), dtype=torch.uint8, generator=gen)} for _ in names]
        for i, n in enumerate(names):
            guards.append(Guard(states={"s": states[i]}, rng=False, job=job, node=n, run_dir=eps[n].run_dir,
                                rank=i, world_size=g, timeout_s=120))
        lags, seals = [], []
        for step in range(steps):
            for st in states:
                st["w"][step % 1000] ^= 1
            t0 = time.monotonic()
            for gd in guards:
                gd.snapshot(step)
            for gd in guards:
                gd.wait()
            t1 = time.monotonic()
            deadline = t1 + 120
            while min(status(eps[n]).protected for n in names) < step:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"step {step} not protected within 120 s")
                time.sleep(0.002)
            seals.append(t1 - t0)
            lags.append(time.monotonic() - t1)
            time.sleep(snapshot_gap_s)
        reports = [status(eps[n]) for n in names]
        shard = mib * MiB
        slot_bytes = statistics.mean(r.shm_used for r in reports)
        parity = statistics.mean(r.parity_bytes for r in reports)
        sent = statistics.mean(r.sent_bytes for r in reports) / steps
        return {"g": g, "m": m, "mib": mib, "seal_s": statistics.median(seals[1:]),
                "lag_s": statistics.median(lags[1:]), "lag_max_s": max(lags[1:]),
                "slots_per_shard": slot_bytes / shard, "parity_per_shard": parity / shard,
                "sent_per_shard": sent / shard}
    finally:
        for gd in guards:
            gd.close()
        for p in procs:
            p.kill()
            p.wait(10)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--sizes", default="16,64,256", help="shard sizes in MiB per node")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gap", type=float, default=0.0, help="pause between snapshots")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# bench/ec_protect.py: g={a.g} m={a.m}, {os.cpu_count()} CPUs, one rank per node, all nodes on this machine")
    print(f"# design: parity per node = m/(g-m) = {a.m / (a.g - a.m):.3f} shard; EC total with one copy"
          f" g/(g-m) = {a.g / (a.g - a.m):.3f}; plain replication m+1 = {a.m + 1}")
    print("| shard MiB | seal s (all nodes) | seal->protected lag s (median / max) | parity held / shard |"
          " EC memory / shard (1 copy + parity) | vs replication m+1 | local slots / shard | sent per snapshot / shard |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mib in (int(x) for x in a.sizes.split(",")):
        r = run(a.g, a.m, mib, a.steps, a.gap)
        ec = 1 + r["parity_per_shard"]
        print(f"| {mib} | {r['seal_s']:.3f} | {r['lag_s']:.3f} / {r['lag_max_s']:.3f} | {r['parity_per_shard']:.3f} |"
              f" {ec:.3f} (design {a.g / (a.g - a.m):.3f}) | {ec / (a.m + 1):.2f}x | {r['slots_per_shard']:.2f} |"
              f" {r['sent_per_shard']:.3f} (design m = {a.m}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
