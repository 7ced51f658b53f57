"""Starting daemons as real processes: shared by Guard's auto-start, the demo, the tests and the chaos harness;
and leaving a torch.distributed job so that its process exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from snapguard.client import DaemonClient
from snapguard.config import Endpoint, ensure_private_dir


def daemon_command(ep: Endpoint, shm_dir: str | None = None, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "snapguard.daemon", "--job", ep.job, "--node", ep.node, "--run-dir", ep.run_dir]
    if shm_dir:
        cmd += ["--shm-dir", shm_dir]
    return cmd + list(extra)


def spawn_daemon(ep: Endpoint, shm_dir: str | None = None, extra: tuple[str, ...] | list[str] = (),
                 log_path: str | None = None, wait_s: float | None = 30.0) -> subprocess.Popen:
    """Start a daemon in a session of its own (it outlives its parent's process group); wait until it answers."""
    ensure_private_dir(ep.run_dir)
    log_path = log_path or os.path.join(ep.run_dir, f"{ep.stem}.log")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(daemon_command(ep, shm_dir, extra), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True)
    if wait_s:
        c = DaemonClient(ep.address, who=f"waiting for daemon {ep.job}/{ep.node}")
        try:
            c.wait_ready(wait_s)
        finally:
            c.close()
    return proc


def leave_process_group() -> None:
    """Wait for every rank, destroy the default process group, and give gloo's worker threads the GIL.

    A gloo worker thread frees each collective's work once it is done, and freeing one can need the GIL (the
    work holds tensors and thread-local state that point at Python objects). When the main thread goes straight
    on to exit, the worker may still be waiting for the GIL as the interpreter finalizes; CPython then ends
    that thread with a forced unwind, which C++ turns into std::terminate ("terminate called without an active
    exception", SIGABRT) after all the work was done. Sleeping a moment releases the GIL to it."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    time.sleep(0.05)
