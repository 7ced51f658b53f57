"""Helpers of bench/core.py: the model, statistics, Markdown tables, page-cache and shared-memory probes.

Nothing here knows about snapguard; bench/core.py puts the pieces together.
"""

from __future__ import annotations

import mmap
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence

import torch

MIB = 1 << 20
GB = 1e9


# ---- the model -----------------------------------------------------------------------------------

def build_gpt(width: int, layers: int, vocab: int, seq: int) -> torch.nn.Module:
    """A GPT-style decoder (pre-norm transformer blocks, causal mask), fp32 on the CPU."""

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, width)
            self.pos = torch.nn.Parameter(torch.zeros(seq, width))
            self.blocks = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, 0.0, batch_first=True,
                                                 norm_first=True)
                for _ in range(layers))
            self.ln = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, vocab, bias=False)
            self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            h = self.emb(idx) + self.pos[: idx.shape[1]]
            for b in self.blocks:
                h = b(h, src_mask=self.mask, is_causal=True)
            return self.head(self.ln(h))

    torch.manual_seed(0)
    return GPT()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    for st in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


# ---- statistics and tables -----------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def ratio(a: float, b: float) -> str:
    if not b or b != b or a != a:
        return "n/a"
    r = a / b
    return f"{r:.3g}x"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A Markdown table; columns whose index is in `right` are right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def best_seconds(run: Callable[[], object], runs: int = 4) -> float:
    run()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


# ---- machine and load ----------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh or newly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def memcpy_bandwidth(nbytes: int) -> dict[str, float]:
    """GB/s of a copy between two faulted-in buffers: torch copy_ with 1 and with all intra-op threads."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    out = {}
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        out[f"torch copy_, {n} thread{'s' if n > 1 else ''}"] = nbytes / best_seconds(lambda: dst.copy_(src)) / GB
    torch.set_num_threads(threads)
    return out


# ---- page cache ----------------------------------------------------------------------------------

def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def resident_fraction(path: str) -> float | None:
    """Fraction of the bytes of `path` (a file or every file under a directory) in the page cache, by fincore."""
    files = files_under(path)
    total = sum(os.path.getsize(f) for f in files)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    res = sum(int(x) for x in out.split())
    return res / total if total else 0.0


def sync_and_drop(path: str) -> float:
    """fsync every file of `path`, then drop its pages from the page cache (no root needed); return the fsync time."""
    t = time.perf_counter()
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    synced = time.perf_counter() - t
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return synced


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in files_under(path))


# ---- first touch of shared memory ----------------------------------------------------------------

def shm_first_touch(directory: str, nbytes: int) -> list[tuple[str, float, float, float, float]]:
    """Copy `nbytes` into a fresh shared-memory file, prepared four ways, and time each phase.

    Returns rows (how, prepare s, map s, first copy GB/s, second copy GB/s). The ways: a file only
    ftruncate'd (every page is allocated and mapped by a fault during the copy); posix_fallocate'd as the
    daemon does (pages exist, the copy still faults them into this process's page table); fallocate'd
    and mapped with MAP_POPULATE as the trainer does (no fault during the copy); and, for reference, the
    same populated mapping copied a second time.
    """
    src = torch.ones(nbytes, dtype=torch.uint8)
    rows = []
    for how in ("ftruncate only (first touch)", "posix_fallocate (daemon)", "posix_fallocate + MAP_POPULATE"):
        path = os.path.join(directory, f"bench-core-touch-{os.getpid()}")
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
        try:
            t = time.perf_counter()
            if how.startswith("ftruncate"):
                os.ftruncate(fd, nbytes)
            else:
                os.posix_fallocate(fd, 0, nbytes)
            prepare = time.perf_counter() - t
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if "POPULATE" in how else 0)
            t = time.perf_counter()
            mm = mmap.mmap(fd, nbytes, flags=flags)
            mapped = time.perf_counter() - t
        finally:
            os.close(fd)
        dst = torch.frombuffer(mm, dtype=torch.uint8)
        t = time.perf_counter()
        dst.copy_(src)
        first = time.perf_counter() - t
        t = time.perf_counter()
        dst.copy_(src)
        second = time.perf_counter() - t
        del dst
        mm.close()
        os.unlink(path)
        rows.append((how, prepare, mapped, nbytes / first / GB, nbytes / second / GB))
    return rows
