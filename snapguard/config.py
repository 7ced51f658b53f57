"""Configuration: environment variable names, their precedence, and naming rules.

Precedence everywhere: an explicit argument, then the environment variable, then the default.
Defaults are computed when asked for, never at import time.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from dataclasses import dataclass

from snapguard.errors import ConfigError

ENV_JOB = "SNAPGUARD_JOB"  # job id; falls back to TORCHELASTIC_RUN_ID, then "default"
ENV_NODE = "SNAPGUARD_NODE"  # node id; falls back to the host name up to its first dot
ENV_RUN_DIR = "SNAPGUARD_RUN_DIR"  # directory (0700) of the daemons' IPC sockets
ENV_SHM_DIR = "SNAPGUARD_SHM_DIR"  # where slots live; /dev/shm by default
ENV_TIMEOUT = "SNAPGUARD_TIMEOUT_S"  # trainer-side timeout for every daemon request

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    """Job and node ids end up in file names and socket paths: keep them to a safe alphabet."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{kind} id {value!r} is not valid: use 1-64 characters of letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return value


def default_job(job: str | None = None) -> str:
    job = job or os.environ.get(ENV_JOB) or os.environ.get("TORCHELASTIC_RUN_ID") or "default"
    return check_name("job", job)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def job_id_caveat(job: str | None = None) -> str | None:
    """What a user must know of the job id `default_job(job)` takes from torchrun: its default --rdzv-id is shared by
    every job, and --standalone draws a new one per launch. None for an id given as an argument or SNAPGUARD_JOB."""
    run_id = None if job or os.environ.get(ENV_JOB) else os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id == "none":
        return ("the job id is 'none', torchrun's default --rdzv-id, which every torchrun job started without one"
                " shares: a job restores the snapshots an earlier job of the same shapes left on this node. Set"
                f" {ENV_JOB} (or --rdzv-id) to one id per job")
    if run_id and _UUID.fullmatch(run_id):
        return (f"the job id is {run_id!r}, the random id torchrun --standalone draws for each launch: torchrun's own"
                " restarts (--max-restarts) restore this job's snapshots, but a new torchrun command does not find"
                f" them. Set {ENV_JOB} to the same id in every launch of this job to resume across launches")
    return None


def default_node(node: str | None = None) -> str:
    node = node or os.environ.get(ENV_NODE) or socket.gethostname().split(".")[0] or "node"
    return check_name("node", re.sub(r"[^A-Za-z0-9_.-]", "-", node))


def default_run_dir(run_dir: str | None = None) -> str:
    return run_dir or os.environ.get(ENV_RUN_DIR) or f"/tmp/snapguard-{os.getuid()}"


def default_shm_dir(shm_dir: str | None = None) -> str:
    return shm_dir or os.environ.get(ENV_SHM_DIR) or "/dev/shm"


def check_seconds(where: str, value: object) -> float:
    """A timeout as a float: more than 0 and finite (every wait ends, and not before it began)."""
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        t = float("nan")
    if not 0 < t < 1e7:  # NaN too; ZeroMQ takes whole milliseconds in an int
        raise ConfigError(f"{where} must be a number of seconds, more than 0 and finite, got {value!r}")
    return t


def default_timeout(timeout_s: float | None = None) -> float:
    if timeout_s is not None:
        return check_seconds("timeout_s", timeout_s)
    return check_seconds(f"${ENV_TIMEOUT}", os.environ.get(ENV_TIMEOUT, "60"))


@dataclass(frozen=True)
class Endpoint:
    """Where one node's daemon for one job listens."""

    job: str
    node: str
    run_dir: str

    @classmethod
    def resolve(cls, job: str | None = None, node: str | None = None, run_dir: str | None = None) -> "Endpoint":
        return cls(default_job(job), default_node(node), default_run_dir(run_dir))

    @property
    def stem(self) -> str:
        """The daemon's socket, lock and log are named <job>@<node>.* (see `job_at_node`)."""
        return job_at_node(self.job, self.node)

    @property
    def socket_path(self) -> str:
        path = os.path.join(self.run_dir, f"{self.stem}.sock")
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"the daemon's socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow"
                              f" {_MAX_SOCKET_PATH}: use a shorter run dir (SNAPGUARD_RUN_DIR, --run-dir) or shorter"
                              " job and node ids")
        return path

    @property
    def lock_path(self) -> str:
        return os.path.join(self.run_dir, f"{self.stem}.lock")

    def trainer_lock_path(self, token: str) -> str:
        """The file a trainer of this job on this node holds locked while it runs (`procs.TrainerLock`)."""
        return os.path.join(self.run_dir, f"{self.stem}.trainer-{token}.lock")

    def trainer_locks(self) -> dict[str, str]:
        """Every such file in the run dir, of running trainers and of dead ones: token -> path."""
        head, tail = f"{self.stem}.trainer-", ".lock"
        return {name[len(head):-len(tail)]: os.path.join(self.run_dir, name) for name in os.listdir(self.run_dir)
                if name.startswith(head) and name.endswith(tail)}

    @property
    def address(self) -> str:
        return f"ipc://{self.socket_path}"


_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included


def job_at_node(job: str, node: str) -> str:
    """'<job>@<node>', the part of every file name of one job's daemon on one node. '@' is in neither id's alphabet,
    so no two (job, node) pairs share it; with '.' or '-' they did (job 'a-b' on node 'c', job 'a' on node 'b-c')."""
    return f"{check_name('job', job)}@{check_name('node', node)}"


def daemon_who(job: str, node: str) -> str:
    """How the daemon of `job` on `node` names itself in its messages and logs."""
    return f"[{job}/{node} daemon]"


def slot_dir_name(job: str, node: str) -> str:
    """The directory, inside the shm dir, of one job's slots on one node."""
    return f"snapguard-{job_at_node(job, node)}"


def within(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies under it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def ensure_private_dir(path: str) -> str:
    """Create `path` with mode 0700, or check that an existing one is a real directory of ours that no one else can
    write, and take away others' right to read it.

    A symlink is refused, never followed: in a directory everyone may write (/dev/shm, /tmp), another user can
    plant one at our name pointing at a directory of ours, which we would chmod, fill and empty. A directory
    others could write is refused too: they may have planted files (or symlinks) in it before we came."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"{path} is a symlink or not a directory, so it may not be ours: refusing to use it;"
                              " remove it, or choose another directory") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}): choose another"
                              " directory")
        if st.st_mode & 0o022:
            raise ConfigError(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}), so what is in it"
                              " may not be ours: refusing to use it; remove it, or choose another directory")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path
