"""A node's ranks restoring from disk together (`snapguard-daemon --persist-dir`), against each rank's own
`torch.load` of the same state, on one CPU machine, in one run.

    .venv/bin/python bench/persist_node.py                       # 2 ranks x 512 MiB, 3 repetitions
    .venv/bin/python bench/persist_node.py --ranks 4 --mib 64    # a quick check

N trainer processes (ranks of one gloo job, all on this node) each snapshot a state of --mib MiB once; the
daemon persists it. Each repetition then loses the node's memory (a clean daemon shutdown removes it), starts
a fresh daemon, and has every rank build a Guard and `restore()` at the same moment (after a barrier): the
daemon reads every rank's step from disk, each in a thread of its own, and each rank copies its shard out of
the slot. The baseline is what the ranks would otherwise do: each `torch.load`s its own file, written by
`torch.save` at the same step, after the files were dropped from the page cache (fsync, then
POSIX_FADV_DONTNEED; snapguard's files are written and read with O_DIRECT, which bypasses it), and again
with them in the page cache. The node's time is from the first rank's start to the last rank's end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("SNAPGUARD_TIMEOUT_S", "300")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import core_util as U  # noqa: E402

from snapguard.guard import Guard  # noqa: E402


def _state(rank: int, mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return {"w": torch.randn((mib << 20) // 4, generator=g)}


def worker(a: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.ranks,
                            timeout=datetime.timedelta(seconds=600))
    torch_file = os.path.join(a.work, "torch", f"r{a.rank}.pt")
    out: dict[str, float | int | bool] = {}
    if a.worker == "save":
        state = _state(a.rank, a.mib)
        g = Guard(states={"s": state}, rng=False, job=a.job, node=core.NODE, run_dir=a.run_dir, rank=a.rank,
                  world_size=a.ranks)
        g.snapshot(0)
        g.wait()
        torch.save(state, torch_file)
        g.close()
    else:
        state = {"w": torch.zeros((a.mib << 20) // 4)}
        g = None
        if a.worker == "snapguard":
            g = Guard(states={"s": state}, rng=False, job=a.job, node=core.NODE, run_dir=a.run_dir, rank=a.rank,
                      world_size=a.ranks)
        dist.barrier()
        out["t0"] = time.time()
        if g is not None:
            step = g.restore()
            out["from_disk"] = step == 0 and g.restored_from == "disk"
        else:
            state["w"].copy_(torch.load(torch_file)["w"])
        out["t1"] = time.time()
        out["equal"] = torch.equal(state["w"], _state(a.rank, a.mib)["w"])
        if g is not None:
            g.close()
    with open(os.path.join(a.work, f"{a.worker}.r{a.rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def run_ranks(a: argparse.Namespace, what: str) -> list[dict]:
    a.port += 1  # a fresh rendezvous port for every launch
    port = a.port
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", what, "--rank", str(r),
                               "--port", str(port), "--ranks", str(a.ranks), "--mib", str(a.mib), "--job", a.job,
                               "--work", a.work, "--run-dir", a.run_dir])
             for r in range(a.ranks)]
    for p in procs:
        if p.wait(900) != 0:
            raise SystemExit(f"a rank of {what} exited with {p.returncode}")
    out = []
    for r in range(a.ranks):
        path = os.path.join(a.work, f"{what}.r{r}.json")
        with open(path) as f:
            out.append(json.load(f))
        os.unlink(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mib", type=int, default=512, help="state per rank, MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where both kinds of files go (default /tmp)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    started = time.perf_counter()
    print(f"# bench/persist_node.py: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# {U.cpu_model()}, {os.cpu_count()} CPUs, {U.mem_total_gib():.1f} GiB RAM; python"
          f" {sys.version.split()[0]}, torch {torch.__version__}")
    print(f"# load average at start: {U.loadavg()}")
    print(f"# {a.ranks} ranks on this node, {a.mib} MiB of state each ({a.ranks * a.mib} MiB in all), files in"
          f" {a.disk_dir}")
    a.work = tempfile.mkdtemp(prefix=f"bench-node-{os.getpid()}-", dir=a.disk_dir)
    a.run_dir = os.path.join(a.work, "run")
    a.job = f"bench-node-{os.getpid()}"
    disk = os.path.join(a.work, "persist")
    persisted = os.path.join(disk, f"snapguard-{a.job}")
    os.makedirs(os.path.join(a.work, "torch"))
    flags = ["--persist-dir", disk, "--persist-every", "1", "--persist-keep", "1"]
    a.port = 29700 + os.getpid() % 200 * 20
    daemon = core.start_daemon(a.job, a.run_dir, flags)
    try:
        core.progress("save: every rank snapshots step 0 (persisted) and torch.saves the same state")
        run_ranks(a, "save")
        deadline = time.monotonic() + 300
        while (len([n for n in os.listdir(persisted) if n.endswith(".manifest")]) < a.ranks
               and time.monotonic() < deadline):
            time.sleep(0.05)
        daemon.stop()
        times: dict[str, list[float]] = {"snapguard": [], "torch_cold": [], "torch_warm": []}
        rows = []
        for rep in range(a.reps):
            for what in ("snapguard", "torch_cold", "torch_warm"):
                if what != "torch_warm":
                    U.sync_and_drop(persisted)
                    U.sync_and_drop(os.path.join(a.work, "torch"))
                resident = U.resident_fraction(os.path.join(a.work, "torch" if what != "snapguard" else "persist"))
                if what == "snapguard":
                    daemon = core.start_daemon(a.job, a.run_dir, flags)
                got = run_ranks(a, "snapguard" if what == "snapguard" else "torch")
                if what == "snapguard":
                    daemon.stop()
                    if not all(r["from_disk"] for r in got):
                        raise SystemExit("a rank did not restore step 0 from disk")
                if not all(r["equal"] for r in got):
                    raise SystemExit(f"{what}: a rank's restored state differs from what was saved")
                node_s = max(r["t1"] for r in got) - min(r["t0"] for r in got)
                times[what].append(node_s)
                per_rank = ", ".join(f"{r['t1'] - r['t0']:.3f}" for r in got)
                rows.append([rep + 1, what, "-" if resident is None else f"{resident:.0%}", f"{node_s:.3f}", per_rank])
                core.progress(f"rep {rep + 1} {what}: node {node_s:.3f} s")
        print()
        print(U.table(["rep", "restore", "files in page cache", "node s (first start to last end)",
                       "each rank's s"], rows, right=(0, 2, 3)))
        print()
        sg, tc, tw = (U.median(times[k]) for k in ("snapguard", "torch_cold", "torch_warm"))
        print(f"Medians of {a.reps}: snapguard from disk {sg:.3f} s, `torch.load` dropped from the page cache"
              f" {tc:.3f} s, in it {tw:.3f} s: torch.load / snapguard {U.ratio(tc, sg)} and {U.ratio(tw, sg)};"
              f" {a.ranks * a.mib / 1024 / sg:.2f} GiB/s for snapguard's node.")
    finally:
        daemon.stop()
        shutil.rmtree(a.work, ignore_errors=True)
    print(f"# total {time.perf_counter() - started:.0f} s; load average at end: {U.loadavg()}")


if __name__ == "__main__":
    main()
