"""Losing a node: how long its replacement takes to rebuild its shard from the survivors, and whether its
daemon serves meanwhile; against reading the same state back with `torch.load`, as a job without
snapguard restarts from its checkpoint.

    .venv/bin/python bench/rebuild.py                      # g=4 m=2, 512 MiB per node, 3 repetitions
    .venv/bin/python bench/rebuild.py --mib 64 --reps 1    # a quick check

Each repetition starts g daemons with one Guard each (bench/ec_protect.py's `Nodes`: loopback TCP,
authenticated), every node protecting a state of --mib MiB. Every node snapshots two steps; once both are
protected, node 0 is lost: its Guard is closed, its daemon SIGKILLed, its shared memory wiped, and an
empty replacement daemon started. A new Guard on node 0 then does what its `restore()` does on that node:
Inventory, Open until the daemon has rebuilt the shard and sealed it (it answers Loading meanwhile), and
the verified copy into the state's tensor, which must then equal the bytes saved. Meanwhile a second
client pings the replacement daemon every 10 ms: the longest round trip is how long the daemon left its
node's requests (and its peers' heartbeats) unanswered. The baseline, in the same run: the same state
saved with `torch.save` to --dir, read back with `torch.load` after the file was dropped from the page
cache (fsync, then POSIX_FADV_DONTNEED), and from the page cache.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core_util as U  # noqa: E402
from ec_protect import MiB, Nodes  # noqa: E402

from snapguard import protocol as P  # noqa: E402
from snapguard.client import DaemonClient  # noqa: E402
from snapguard.guard import Guard  # noqa: E402


class Pinger:
    """Pings a daemon every 10 ms from a thread of its own; keeps every round trip."""

    def __init__(self, address: str):
        self.client = DaemonClient(address, timeout_s=300)
        self.rtts: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self.client.request(P.Ping())
            self.rtts.append(time.perf_counter() - t)
            self._stop.wait(0.01)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(300)
        self.client.close()
        return self.rtts


def rebuild_once(g: int, m: int, mib: int) -> dict:
    nodes = Nodes(g, m, mib)
    try:
        for step in (0, 1):
            for gd in nodes.guards:
                gd.before_update()
            nodes.states[0]["w"][step] ^= 1
            for gd in nodes.guards:
                gd.snapshot(step)
            for gd in nodes.guards:
                gd.wait()
        deadline = time.monotonic() + 300
        while nodes.protected() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("step 1 was not protected within 300 s")
            time.sleep(0.01)
        saved = nodes.states[0]["w"].clone()
        n0 = nodes.names[0]
        nodes.replace(n0)
        state = {"w": torch.zeros_like(saved)}
        guard = Guard(states={"s": state}, rng=False, job=nodes.eps[n0].job, node=n0, run_dir=nodes.eps[n0].run_dir,
                      rank=0, world_size=g, timeout_s=300)
        nodes.guards[0] = guard  # closed with the others
        pinger = Pinger(nodes.eps[n0].address)
        time.sleep(0.05)
        t0 = time.perf_counter()
        steps = guard.client.request(P.Inventory(nodes.eps[n0].job, 0)).steps
        if 1 not in steps:
            raise RuntimeError(f"the replacement daemon cannot rebuild step 1 (it offers {steps})")
        shard = guard._open(1, 0)
        t1 = time.perf_counter()
        man = guard._manifest(shard)
        guard._load(shard, man)
        t2 = time.perf_counter()
        time.sleep(0.05)
        rtts = pinger.stop()
        if not torch.equal(state["w"], saved):
            raise RuntimeError("the rebuilt state differs from the state saved")
        return {"rebuild": t1 - t0, "restore": t2 - t0, "ping_max": max(rtts), "ping_median": statistics.median(rtts),
                "pings": len(rtts)}
    finally:
        nodes.close()


def torch_load(mib: int, directory: str, cold: bool) -> float:
    d = tempfile.mkdtemp(prefix="sg-rebuild-", dir=directory)
    path = os.path.join(d, "state.pt")
    try:
        torch.save({"w": torch.randint(0, 255, (mib * MiB,), dtype=torch.uint8)}, path)
        if cold:
            U.sync_and_drop(d)
        t = time.perf_counter()
        torch.load(path)
        return time.perf_counter() - t
    finally:
        os.unlink(path)
        os.rmdir(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--mib", type=int, default=512, help="state per node, MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp", help="where torch.save writes (a local disk)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.monotonic()
    print(f"# bench/rebuild.py: g={a.g} m={a.m}, {a.mib} MiB per node, {a.reps} repetitions;"
          f" {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {U.cpu_model()}, {os.cpu_count()} CPUs; python {sys.version.split()[0]}, torch {torch.__version__};"
          f" load average at start: {U.loadavg()}")
    runs, cold, warm = [], [], []
    for _ in range(a.reps):
        runs.append(rebuild_once(a.g, a.m, a.mib))
        cold.append(torch_load(a.mib, a.dir, cold=True))
        warm.append(torch_load(a.mib, a.dir, cold=False))
    med = statistics.median
    rebuild, restore = med(r["rebuild"] for r in runs), med(r["restore"] for r in runs)
    print(U.table(["what (medians)", "s", "/ snapguard restore"], [
        ["snapguard: Inventory + Open until the replacement daemon has rebuilt and sealed the shard", f"{rebuild:.3f}",
         U.ratio(rebuild, restore)],
        ["snapguard: the same + verified copy into the tensor (the node's restore)", f"{restore:.3f}", "1x"],
        [f"torch.load from {a.dir}, dropped from the page cache", f"{med(cold):.3f}", U.ratio(med(cold), restore)],
        [f"torch.load from {a.dir}, in the page cache", f"{med(warm):.3f}", U.ratio(med(warm), restore)],
    ], right=[1, 2]))
    print()
    print(U.table(["rep", "rebuild s", "restore s", "pings answered", "ping round trip median s", "longest s"],
                  [[i, f"{r['rebuild']:.3f}", f"{r['restore']:.3f}", r["pings"], f"{r['ping_median']:.4f}",
                    f"{r['ping_max']:.3f}"] for i, r in enumerate(runs)], right=[0, 1, 2, 3, 4, 5]))
    print(f"# total {time.monotonic() - t_start:.0f} s; load average at end {U.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
