"""Reserving a node's slots: how long until every rank has its slots, and how long the daemon leaves a request
unanswered meanwhile. With `--from-disk`, the slots a restore from disk needs on a new node.

Starts one real daemon; `--ranks` clients, one per rank as each rank's Guard() would, ask it at once for
`--slots-per-rank` slots of `--gib` GiB each (a Reserve, asked again while the daemon answers Allocating),
while another client pings it every 20 ms. The slots are reserved only (posix_fallocate), never touched: the
trainers' first touch (their MAP_POPULATE) is their own, in parallel, and not measured here.

    .venv/bin/python bench/reserve.py [--ranks 4] [--gib 1] [--slots-per-rank 2] [--reps 3] [--timeout 600]

`--timeout` is each client's request timeout (a Guard's `timeout_s`): a rank whose request is not answered
within it gives up, as its Guard() would, and is counted.

    .venv/bin/python bench/reserve.py --from-disk [--ranks 2] [--gib 1] [--slots-per-rank 2] [--reps 2]

`--from-disk`: first every rank's Guard snapshots a state of `--gib` GiB into a daemon that persists it to a
directory, and that daemon shuts down with its shared memory removed (a node lost and replaced). Then, per rep,
a new daemon starts and every rank, having reserved slots for nothing yet (as a Guard reserves for its state
before the optimizer's first step), asks it to Open that step until the shard is in a slot: the daemon must
reserve the slots, then read the shard into one. Timed: until every rank has its shard, and the pings.

    .venv/bin/python bench/reserve.py --grow-from 0.33 [--ranks 2] [--gib 1] [--reps 3]

`--grow-from`: every rank's slots are first reserved at that many GiB (as a Guard reserves for the parameters,
before the optimizer's first step creates its moments), then grown to `--gib` (timed). A thread samples the
memory the slot directory's files take every 2 ms: its peak during the growth, against the slots' final size.

Works against any snapguard that speaks the same protocol version, so that a tree from before the daemon
reserved slots in threads can be measured with the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import tempfile
import threading
import time

import torch

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint
from snapguard.errors import SnapGuardError
from snapguard.guard import Guard
from snapguard.procs import spawn_daemon

GiB = 1 << 30


def persist_steps(ep: Endpoint, disk: str, ranks: int, nbytes: int, slots: int) -> None:
    """Every rank's Guard snapshots step 0, a state of `nbytes`, which the daemon persists under `disk`; then the
    daemon shuts down and its shared memory goes."""
    shm = f"/dev/shm/sg-bench-reserve-{secrets.token_hex(3)}"
    os.makedirs(shm, mode=0o700)
    proc = spawn_daemon(ep, shm, ["--slots-per-rank", str(slots), "--persist-dir", disk, "--persist-every", "1"])
    try:
        for r in range(ranks):
            g = Guard(states={"s": {"w": torch.zeros(nbytes, dtype=torch.uint8)}}, rng=False, job=ep.job, node=ep.node,
                      run_dir=ep.run_dir, rank=r, world_size=ranks, timeout_s=600)
            g.snapshot(0)
            g.wait()
            g.close()
        manifests = [os.path.join(disk, f"snapguard-{ep.job}", f"r{r}.s0.manifest") for r in range(ranks)]
        deadline = time.monotonic() + 600
        while not all(map(os.path.exists, manifests)):
            if time.monotonic() > deadline:
                raise SystemExit(f"step 0 was not persisted under {disk} within 600 s")
            time.sleep(0.1)
        c = DaemonClient(ep.address, timeout_s=600)
        c.request(P.Shutdown(remove=True))
        c.close()
        proc.wait(600)
    finally:
        proc.kill()
        shutil.rmtree(shm, ignore_errors=True)


def taken(directory: str) -> int:
    """The memory the files under `directory` take (tmpfs: their pages)."""
    total = 0
    for root, _, names in os.walk(directory):
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, n)).st_blocks * 512
    return total


def one_run(ranks: int, nbytes: int, slots: int, timeout_s: float, disk: str | None = None,
            ep: Endpoint | None = None, grow_from: int | None = None) -> dict:
    run_dir = tempfile.mkdtemp(prefix="sg-bench-reserve-")
    shm = f"/dev/shm/sg-bench-reserve-{secrets.token_hex(3)}"
    os.makedirs(shm, mode=0o700)
    ep = Endpoint(ep.job, ep.node, run_dir) if ep else Endpoint(f"reserve{secrets.token_hex(2)}", "n0", run_dir)
    extra = ["--persist-dir", disk, "--persist-every", "1000"] if disk else []
    proc = spawn_daemon(ep, shm, ["--slots-per-rank", str(slots), *extra])
    done: dict[int, float] = {}
    gave_up: list[str] = []
    pings: list[float] = []
    stop = threading.Event()
    grown = threading.Barrier(ranks + 1) if grow_from is not None else None
    peak = [0]

    def rank(r: int, start: float) -> None:
        c = DaemonClient(ep.address, timeout_s=timeout_s)
        try:
            if disk:  # slots for nothing yet; then the step on disk, until it is in one
                c.request(P.Reserve(ep.job, r, ranks, 0))
                while not isinstance(c.request(P.Open(ep.job, r, 0)), P.Shard):
                    time.sleep(0.005)
            else:
                if grown is not None:  # the parameters' slots first; the growth is timed from when all have them
                    while not isinstance(c.request(P.Reserve(ep.job, r, ranks, grow_from)), P.Ok):
                        time.sleep(0.05)
                    grown.wait(timeout_s)
                    start = started[0]
                while not isinstance(c.request(P.Reserve(ep.job, r, ranks, nbytes)), P.Ok):
                    time.sleep(0.05)
            done[r] = time.monotonic() - start
        except SnapGuardError as e:
            gave_up.append(f"rank {r}: {e}")
        finally:
            c.close()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], taken(shm))
            time.sleep(0.002)

    def pinger() -> None:
        c = DaemonClient(ep.address, timeout_s=600)
        try:
            while not stop.is_set():
                t = time.monotonic()
                c.request(P.Ping())
                pings.append(time.monotonic() - t)
                time.sleep(0.02)
        finally:
            c.close()

    try:
        p = threading.Thread(target=pinger)
        p.start()
        time.sleep(0.2)
        start = time.monotonic()
        started = [start]
        threads = [threading.Thread(target=rank, args=(r, start)) for r in range(ranks)]
        for t in threads:
            t.start()
        if grown is not None:
            grown.wait(timeout_s)  # every rank has its first slots
            started[0] = time.monotonic()
            threads.append(threading.Thread(target=sampler))
            threads[-1].start()
        for t in threads[:ranks]:
            t.join()
        final = taken(shm)
        stop.set()
        p.join()
        for t in threads[ranks:]:
            t.join()
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"all": max(done.values(), default=float("nan")), "first": min(done.values(), default=float("nan")),
            "ping_max": max(pings), "ping_median": statistics.median(pings), "gave_up": gave_up,
            "peak": peak[0], "final": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--gib", type=float, default=1.0, help="GiB per slot")
    ap.add_argument("--slots-per-rank", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0, help="each rank's request timeout, s (a Guard's timeout_s)")
    ap.add_argument("--from-disk", action="store_true", help="time the slots and the read of a restore from disk")
    ap.add_argument("--grow-from", type=float, help="GiB per slot reserved first; then time the growth to --gib")
    a = ap.parse_args()
    nbytes = int(a.gib * GiB)
    grow_from = None if a.grow_from is None else int(a.grow_from * GiB)
    total = a.ranks * a.slots_per_rank * nbytes
    what = "reserved at once" if not a.from_disk else "reserved, and a shard of each rank read from disk, at once"
    if grow_from is not None:
        what = f"grown at once from {a.grow_from:g} GiB each"
    print(f"# bench/reserve.py: {a.ranks} ranks x {a.slots_per_rank} slots x {a.gib:g} GiB = {total / GiB:g} GiB"
          f" {what}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    has = "its shard" if a.from_disk else "its slots"
    print(f"| rep | ranks that gave up (timeout {a.timeout:g} s) | every other rank has {has}, s | first rank, s |"
          " longest ping, s | median ping, s |" + (" slots' memory at its peak / at the end |" if grow_from else ""))
    print("| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if grow_from else ""))
    with contextlib.ExitStack() as stack:
        disk = ep = None
        if a.from_disk:
            disk = stack.enter_context(tempfile.TemporaryDirectory(prefix="sg-bench-disk-", dir="/var/tmp"))
            ep = Endpoint(f"reserve{secrets.token_hex(2)}", "n0", stack.enter_context(tempfile.TemporaryDirectory()))
            persist_steps(ep, disk, a.ranks, nbytes, a.slots_per_rank)
        for i in range(a.reps):
            r = one_run(a.ranks, nbytes, a.slots_per_rank, a.timeout, disk, ep, grow_from)
            mem = f" {r['peak'] / GiB:.2f} / {r['final'] / GiB:.2f} GiB ({r['peak'] / r['final']:.2f}x) |" if grow_from else ""
            print(f"| {i + 1} | {len(r['gave_up'])} | {r['all']:.2f} | {r['first']:.2f} | {r['ping_max']:.3f} |"
                  f" {r['ping_median']:.4f} |{mem}", flush=True)
            for why in r["gave_up"]:
                print(f"#   {why}")


if __name__ == "__main__":
    main()
