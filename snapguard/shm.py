"""Shared-memory slot files: creation (0600, pre-faulted), mapping, and free-space checks."""

from __future__ import annotations

import mmap
import os
from typing import Callable

from snapguard.config import within
from snapguard.errors import ShmSpaceError

MiB = 1 << 20


def fmt_bytes(n: float) -> str:
    """`n` bytes for a person: "512 B", "48.0 KiB", "1.1 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


IN_MEMORY = ("tmpfs", "ramfs", "hugetlbfs")  # file systems whose files are memory, never written back to a disk


def filesystem_type(path: str) -> str:
    """The type of the file system that holds `path` ("tmpfs", "ext4", ...), from /proc/self/mountinfo; "" if unknown."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if within(real, mount) and len(mount) >= len(best):  # the deepest mount holding it; a later one hides an earlier
            best, kind = mount, rest.split()[0]
    return kind


def free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


RESERVE_PIECE = 1 << 30  # bytes reserved per posix_fallocate call: `create_slot` reports progress between them


def create_slot(path: str, nbytes: int, before_replace: Callable[[], None] | None = None,
                progress: Callable[[int], None] | None = None) -> None:
    """Create `path` (0600) holding `nbytes` of reserved memory, replacing what was there; `before_replace` runs
    once the new file is reserved, just before it takes the old one's place (if the memory is not there, neither
    happens). `progress(bytes reserved so far)` is called before each RESERVE_PIECE and once all are reserved; it
    may raise to stop.

    posix_fallocate reserves the space, so ENOSPC surfaces here as a clear error. On tmpfs it leaves the
    pages unwritten: the first mapping that touches them zeroes them, at a few percent of memcpy speed
    (on a VM, the hypervisor backs each page then too). The trainer pays for that once, when its Guard
    maps its slots with MAP_POPULATE at construction, so no snapshot does. Reserving takes time too
    (0.3 s per GiB on the 2-core dev VM), which is why the daemon grows slots in the background.
    """
    tmp = path + ".new"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    try:
        os.fchmod(fd, 0o600)
        for off in range(0, nbytes, RESERVE_PIECE):
            if progress is not None:
                progress(off)
            try:
                os.posix_fallocate(fd, off, min(RESERVE_PIECE, nbytes - off))
            except OSError as e:
                raise ShmSpaceError(f"could not allocate {nbytes / MiB:.1f} MiB for {path}: {e.strerror};"
                                    f" {free_bytes(os.path.dirname(path)) / MiB:.1f} MiB free") from None
        if progress is not None:
            progress(nbytes)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)


def write_private(path: str, data: bytes) -> None:
    """Replace `path` with a file (0600) holding `data`, atomically: a crash leaves the old file or the new one,
    and at worst a stray `path.new` (`SlotTable.adopt` removes those)."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def map_file(path: str, writable: bool, populate: bool = True) -> mmap.mmap:
    """Map a whole slot file shared; MAP_POPULATE fills the page tables up front."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    finally:
        os.close(fd)
