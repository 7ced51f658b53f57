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


def create_slot(path: str, nbytes: int, once_reserved: Callable[[], None] | None = None,
                progress: Callable[[int], None] | None = None) -> None:
    """Make `path` (0600) hold `nbytes` of reserved memory: create it, or grow it in place, keeping its bytes, so
    that a growth takes only the memory it adds (a bigger file beside the old one would need both for a while, and
    a trainer's mapping keeps the old one's pages until it maps the new). `once_reserved` runs once the memory is
    there; if it is not, the file is left as it was and `once_reserved` does not run. `progress(bytes added so
    far)` is called before each RESERVE_PIECE and once all are reserved; it may raise to stop.

    posix_fallocate reserves the space, so ENOSPC surfaces here as a clear error. On tmpfs it leaves the
    pages unwritten: the first mapping that touches them zeroes them, at a few percent of memcpy speed
    (on a VM, the hypervisor backs each page then too). The trainer pays for that once, when its Guard
    maps its slots with MAP_POPULATE at construction, so no snapshot does. Reserving takes time too
    (0.3 s per GiB on the 2-core dev VM), which is why the daemon grows slots in the background.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        old = os.fstat(fd).st_size
        try:
            for off in range(old, nbytes, RESERVE_PIECE):
                if progress is not None:
                    progress(off - old)
                try:
                    os.posix_fallocate(fd, off, min(RESERVE_PIECE, nbytes - off))
                except OSError as e:
                    why = (f"could not allocate {(nbytes - old) / MiB:.1f} MiB more for {path}: {e.strerror};"
                           f" {free_bytes(os.path.dirname(path)) / MiB:.1f} MiB free")
                    raise ShmSpaceError(why) from None
            if progress is not None:
                progress(max(nbytes - old, 0))
        except BaseException:
            os.ftruncate(fd, old)  # gives back what this growth added; the bytes before it are untouched
            raise
    finally:
        os.close(fd)
    if once_reserved is not None:
        once_reserved()


def write_private(path: str, data: bytes) -> None:
    """Replace `path` with a file (0600) holding `data`, atomically: a crash leaves the old file or the new one,
    and at worst a stray `path.new` (`SlotTable.adopt` removes those)."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
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
