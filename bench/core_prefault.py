"""Does posix_fallocate pre-fault a tmpfs slot? What the trainer's first MAP_POPULATE costs with and without
the daemon touching the pages first (madvise MADV_POPULATE_WRITE, Linux 5.14+).

    .venv/bin/python bench/core_prefault.py            # 1 GiB files in /dev/shm, 2 rounds

posix_fallocate on tmpfs reserves pages but leaves them unzeroed; the first fault on each page (the
trainer's MAP_POPULATE, on the copy thread at the first snapshot) zero-fills it. The same populate
again, once the pages are filled, only builds page tables. Each "populate" maps the file afresh, as a
new trainer process does.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fallocate(path: str, n: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, n)
    finally:
        os.close(fd)


def mapped(path: str, n: int, populate: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, n, flags=mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0))
    finally:
        os.close(fd)


def populate(path: str, n: int) -> None:
    mapped(path, n, True).close()


def touch(path: str, n: int) -> None:
    mm = mapped(path, n, False)
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    finally:
        mm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    n = a.mib << 20
    print(f"# {a.mib} MiB files in {a.dir}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| round | slot prepared by | fallocate s | daemon touch s | trainer's first MAP_POPULATE s | second MAP_POPULATE s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in range(a.rounds):
        for how in ("posix_fallocate (as shipped)", "posix_fallocate + MADV_POPULATE_WRITE (proposed)"):
            path = os.path.join(a.dir, f"bench-core-prefault-{os.getpid()}")
            try:
                t_alloc = timed(lambda: fallocate(path, n))
                t_touch = timed(lambda: touch(path, n)) if "MADV" in how else 0.0
                first = timed(lambda: populate(path, n))
                second = timed(lambda: populate(path, n))
            finally:
                os.unlink(path)
            print(f"| {r + 1} | {how} | {t_alloc:.3f} | {t_touch:.3f} | {first:.3f} | {second:.3f} |")


if __name__ == "__main__":
    main()
