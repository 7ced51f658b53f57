"""Where snapguard's per-snapshot and restore time goes, and what two changes to the library would save.

    .venv/bin/python bench/core_diag.py               # the bench/core.py model's 1.1 GB state
    .venv/bin/python bench/core_diag.py --scale 0.1

Uses a real Guard's layout and slot files are stood in for by one populated shared-memory file, so the
numbers are the library's passes over memory without the daemon round trips:
- save: the copy into the slot, then xxh3 checksums of the slot (trainer), then the same checksums
  again (the daemon's verification on Seal): three passes over the state; against a fused loop that
  hashes each tensor's bytes right after copying them, while they are still in cache.
- restore: verification, then `clone()` of every tensor out of the mapping into fresh memory (page
  faults), then load_state_dict; against copying straight into the live tensors (no allocation).
Each timing is the median of a few runs, on one thread, with the machine's load printed beside it.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

import torch
import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core_util as U  # noqa: E402

from snapguard.layout import DEFAULT_CHUNK, chunk_checksums, plan_layout  # noqa: E402
from snapguard.state import TORCH_DTYPES, flatten, tensor_spec  # noqa: E402


def timed(fn, runs: int) -> float:
    xs = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return U.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    layers = max(1, round(12 * a.scale))
    model = U.build_gpt(768, layers, 4096, 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 4096, (2, 257))
    model(batch[:, :-1]).sum().backward()
    opt.step()
    named, _ = flatten({"model": model.state_dict(), "optimizer": opt.state_dict()})
    layout = plan_layout(tensor_spec(n, t) for n, t in named)
    n = layout.nbytes
    print(f"# bench/core_diag.py: {len(named)} tensors, {n / U.GB:.3f} GB; load average {U.loadavg()}")

    path = f"/dev/shm/bench-core-diag-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, n)
    mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    os.close(fd)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    dsts = [buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape) for e in layout.entries]
    try:
        torch.set_num_threads(1)  # the Guard's copy thread competes with training for the cores

        def copy() -> None:
            for d, (_, t) in zip(dsts, named):
                d.copy_(t)

        def hashes() -> list[int]:
            return chunk_checksums(memoryview(mm), n, DEFAULT_CHUNK)

        def fused() -> list[int]:
            # Copy tensor by tensor; hash every chunk as soon as its last byte is written (still in cache).
            out, done = [], 0
            view = memoryview(mm)
            for d, e, (_, t) in zip(dsts, layout.entries, named):
                d.copy_(t)
                end = e.offset + e.nbytes
                while done + DEFAULT_CHUNK <= end:
                    out.append(xxhash.xxh3_64_intdigest(view[done:done + DEFAULT_CHUNK]))
                    done += DEFAULT_CHUNK
            if done < n:
                out.append(xxhash.xxh3_64_intdigest(view[done:n]))
            return out

        copy()
        assert fused() == hashes()
        t_copy = timed(copy, a.runs)
        t_hash = timed(hashes, a.runs)
        t_fused = timed(fused, a.runs)
        print()
        print("Save path, per snapshot (one thread):")
        print()
        print(U.table(["work", "s", "GB/s", "vs as shipped"], [
            ["copy into the slot", f"{t_copy:.3f}", f"{n / t_copy / U.GB:.2f}", ""],
            ["trainer checksums (second pass)", f"{t_hash:.3f}", f"{n / t_hash / U.GB:.2f}", ""],
            ["daemon verification on Seal (third pass, same work)", f"{t_hash:.3f}", f"{n / t_hash / U.GB:.2f}", ""],
            ["as shipped: copy + checksums + verification", f"{t_copy + 2 * t_hash:.3f}",
             f"{n / (t_copy + 2 * t_hash) / U.GB:.2f}", "1x"],
            ["fused copy+checksum, daemon trusts the trainer's checksums", f"{t_fused:.3f}",
             f"{n / t_fused / U.GB:.2f}", U.ratio(t_fused, t_copy + 2 * t_hash)],
            ["fused copy+checksum, daemon verifies", f"{t_fused + t_hash:.3f}", f"{n / (t_fused + t_hash) / U.GB:.2f}",
             U.ratio(t_fused + t_hash, t_copy + 2 * t_hash)]], right=(1, 2, 3)))

        live = [t for _, t in named]
        srcs = dsts

        def clone_out() -> list[torch.Tensor]:
            return [s.clone() for s in srcs]

        def in_place() -> None:
            for t, s in zip(live, srcs):
                t.copy_(s)

        torch.set_num_threads(2)
        t_clone = timed(lambda: clone_out(), a.runs)
        t_inplace = timed(in_place, a.runs)
        print()
        print("Restore path, out of the populated mapping (all intra-op threads):")
        print()
        print(U.table(["work", "s", "GB/s"], [
            ["daemon Inventory: verify every sealed slot (2 slots)", f"{2 * t_hash:.3f}", f"{n / t_hash / U.GB:.2f}"],
            ["trainer verify of the chosen slot", f"{t_hash:.3f}", f"{n / t_hash / U.GB:.2f}"],
            ["clone() of every tensor into fresh memory (as shipped)", f"{t_clone:.3f}", f"{n / t_clone / U.GB:.2f}"],
            ["copy_() into the live tensors (proposed)", f"{t_inplace:.3f}", f"{n / t_inplace / U.GB:.2f}"]],
            right=(1, 2)))
        print(f"\n# load average at end {U.loadavg()}")
    finally:
        buf = None
        dsts.clear()
        mm.close()
        os.unlink(path)


if __name__ == "__main__":
    main()
