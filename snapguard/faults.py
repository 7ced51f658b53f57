"""Named fault points: a process kills itself with SIGKILL at a precise phase, for tests and chaos runs.

`SNAPGUARD_FAULTS` holds a comma-separated list of `point[@step][/rRANK][#once-file][%stall-file]`. When
code reaches `fault_point(point, step)` and an entry matches, the process sends itself SIGKILL: the
same death as an OOM kill or a lost machine, at the moment under test. With `#path`, the fault fires
only if `path` can be created (O_EXCL), so a restarted process with the same environment does not die
again (the file then holds the pid of the process that reached the point, for whoever waits for it);
with `/rN`, only the process whose RANK is N dies. With `%path`, the point stalls instead: the thread
that reached it waits while `path` exists (at most STALL_MAX_S), as on a disk or a peer that hangs,
and then goes on. Points in the code:

- trainer.copy.mid       half of a snapshot's tensors are in the slot
- trainer.copy.done      all bytes are in the slot, before the seal is sent
- trainer.restore.mid    half of the tensors are restored
- daemon.seal.verified   the daemon checked the shard but has not written its manifest
- daemon.reserve.piece   a grower thread is about to reserve the next GiB of a rank's slot (`@N`: rank N's)
- daemon.persist.mid     half of a step's chunks are written to disk (`--persist-dir`), its manifest is not
- daemon.persist.read    a restore reads a persisted step back into a slot: the first piece is in
- daemon.serve.fetch     a peer asked for a piece of a chunk to rebuild its node from, not answered yet
- daemon.rebuild.mid     half of the bytes of a step being rebuilt from the peers are in the slots, none sealed
"""

from __future__ import annotations

import os
import signal
import time

ENV_FAULTS = "SNAPGUARD_FAULTS"
STALL_MAX_S = 600.0


def _parse(spec: str) -> list[tuple[str, int | None, str | None, str | None]]:
    out = []
    me = os.environ.get("RANK")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        once = stall = None
        if "%" in item:
            item, stall = item.split("%", 1)
        if "#" in item:
            item, once = item.split("#", 1)
        if "/r" in item:
            item, rank = item.split("/r", 1)
            if rank != me:
                continue
        step = None
        if "@" in item:
            item, s = item.split("@", 1)
            step = int(s)
        out.append((item, step, once, stall))
    return out


_FAULTS = None


def fault_point(point: str, step: int | None = None) -> None:
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = _parse(os.environ.get(ENV_FAULTS, ""))
    for name, at, once, stall in _FAULTS:
        if name != point or (at is not None and at != step):
            continue
        if once is not None:
            try:
                fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        if stall is None:
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + STALL_MAX_S
        while os.path.exists(stall) and time.monotonic() < deadline:
            time.sleep(0.01)
