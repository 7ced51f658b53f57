"""A simulated cluster on one machine: N nodes x G ranks, each node a daemon with its own shared
memory directory and IPC directory, daemons talking over loopback TCP with the job's secret.

The supervisor behaves like Slurm or Kubernetes running an elastic job: when any rank dies, it
SIGKILLs every rank and starts them all again; a node that was lost (daemon and ranks SIGKILLed, its
shared memory wiped) is replaced by a fresh, empty daemon first. Used by the tests and the chaos harness.

Daemons learn their peers and EC group from explicit flags (``--peer``, ``--ec-group``) by default. With
``ClusterSpec.rendezvous`` they meet instead in a TCPStore hosted by this process, as a real job's daemons
meet through its launcher's store; a replacement daemon rejoins it under its node's name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint
from snapguard.errors import SnapGuardError
from snapguard.procs import free_port, spawn_daemon


@dataclass
class ClusterSpec:
    workdir: str
    nodes: int = 4
    ranks_per_node: int = 2
    m: int = 2
    steps: int = 20
    width: int = 32
    layers: int = 1
    step_sleep: float = 0.0
    job: str = "cluster"
    slots_per_rank: int | None = None  # the daemon's default (3 with erasure coding)
    worker_args: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    # Opt-in, off by default: daemons meet in a TCPStore this process hosts (--rendezvous) instead of
    # being given --peer and --ec-group. `ec_g` splits the nodes into EC groups of that size (default: one
    # group of all nodes) and `domains` (node -> failure domain) keeps a domain's nodes in different groups;
    # without `rendezvous` these become the static flags --ec-g and --failure-domain.
    rendezvous: bool = False
    ec_g: int | None = None
    domains: dict[str, str] = field(default_factory=dict)
    # Opt-in: every daemon also persists one step in every `persist_every` to <workdir>/persist, one directory
    # for all nodes (a shared file system), so that the job survives losing more nodes than erasure coding covers.
    persist_every: int | None = None


class Cluster:
    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.names = [f"node{i}" for i in range(spec.nodes)]
        self.world = spec.nodes * spec.ranks_per_node
        self.secret = secrets.token_hex(16)
        self.shm_root = os.path.join("/dev/shm", f"snapguard-cluster-{os.getpid()}-{secrets.token_hex(3)}")
        self.ports = {n: free_port() for n in self.names}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.workers: dict[int, subprocess.Popen] = {}
        self.attempt = -1
        # Optional, for the chaos harness: the address a node's daemon uses for each peer (a proxy in
        # between), extra arguments per node's daemon (e.g. --shm-limit), extra environment for daemons.
        self.peer_routes: dict[tuple[str, str], str] = {}
        self.daemon_args: dict[str, list[str]] = {}
        self.daemon_env: dict[str, str] = {}
        self.out = os.path.join(spec.workdir, "out")
        os.makedirs(self.out, exist_ok=True)
        self.persist_dir = os.path.join(spec.workdir, "persist")  # with `persist_every`: shared by every node
        self.store = None
        if spec.rendezvous:
            from snapguard.rendezvous import open_store

            self.store = open_store("127.0.0.1:0", 60, host=True)

    # ---- nodes ---------------------------------------------------------------------------------

    def endpoint(self, node: str) -> Endpoint:
        return Endpoint(self.spec.job, node, os.path.join(self.spec.workdir, "run", node))

    def shm_dir(self, node: str) -> str:
        return os.path.join(self.shm_root, node)

    def peer_address(self, node: str) -> str:
        """Where `node`'s daemon listens for its peers (the real address, not a route through a proxy)."""
        return f"tcp://127.0.0.1:{self.ports[node]}"

    @property
    def rendezvous_address(self) -> str | None:
        """HOST:PORT of the TCPStore the daemons meet in, when `spec.rendezvous`."""
        return None if self.store is None else f"127.0.0.1:{self.store.port}"

    def _peer_flags(self, node: str) -> list[str]:
        """How `node`'s daemon learns its peers and EC group: a rendezvous, or flags naming every peer."""
        spec = self.spec
        sizing = ["--ec-g", str(spec.ec_g)] if spec.ec_g is not None else []
        if spec.rendezvous:
            if self.peer_routes:
                raise SnapGuardError("peer routes need --peer flags: in a rendezvous each daemon announces its own"
                                     " address")
            domain = ["--domain", spec.domains[node]] if node in spec.domains else []
            return ["--rendezvous", self.rendezvous_address, "--nodes", str(len(self.names)),
                    "--rendezvous-timeout", "60", *sizing, *domain]
        flags = sizing + [f for n, d in spec.domains.items() for f in ("--failure-domain", f"{n}={d}")]
        if not flags:
            flags = ["--ec-group", ",".join(self.names)]
        for other in self.names:
            if other != node:
                addr = self.peer_routes.get((node, other), f"tcp://127.0.0.1:{self.ports[other]}")
                flags += ["--peer", f"{other}={addr}"]
        return flags

    def start_daemon(self, node: str, wait_s: float | None = 30.0) -> None:
        """Start `node`'s daemon; wait until it answers unless `wait_s` is None (see `start_daemons`)."""
        os.makedirs(self.shm_dir(node), mode=0o700, exist_ok=True)
        extra = ["--peer-bind", f"tcp://127.0.0.1:{self.ports[node]}", "--ec-m", str(self.spec.m),
                 "--peer-timeout", "3", "--log-level", os.environ.get("SNAPGUARD_DAEMON_LOG", "INFO"),
                 *self._peer_flags(node)]
        if self.spec.slots_per_rank is not None:
            extra += ["--slots-per-rank", str(self.spec.slots_per_rank)]
        if self.spec.persist_every is not None:
            extra += ["--persist-dir", self.persist_dir, "--persist-every", str(self.spec.persist_every)]
        extra += self.daemon_args.get(node, [])
        env = {**self.daemon_env, "SNAPGUARD_SECRET": self.secret}  # the daemon's only: no trainer started later has it
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.daemons[node] = spawn_daemon(self.endpoint(node), self.shm_dir(node), extra,
                                              log_path=self.daemon_log(node), wait_s=wait_s)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_daemons(self, nodes: list[str], timeout_s: float = 90.0) -> None:
        """Start the daemons of `nodes` and wait until each answers.

        One by one with explicit flags. In a rendezvous, a daemon answers only once every daemon has
        joined, so all are spawned first, then awaited; a daemon that exits meanwhile fails at once.
        """
        if not self.spec.rendezvous:
            for n in nodes:
                self.start_daemon(n)
            return
        for n in nodes:
            self.start_daemon(n, wait_s=None)
        deadline = time.monotonic() + timeout_s
        for n in nodes:
            c = DaemonClient(self.endpoint(n).address, who=f"waiting for daemon {self.spec.job}/{n}")
            try:
                while True:
                    if self.daemons[n].poll() is not None:
                        raise SnapGuardError(f"daemon {n} exited with code {self.daemons[n].returncode} before it"
                                             f" answered; see {self.daemon_log(n)}")
                    try:
                        c.wait_ready(0.5)
                        break
                    except SnapGuardError:
                        if time.monotonic() > deadline:
                            raise SnapGuardError(f"daemon {n} did not answer within {timeout_s:.0f} s of the"
                                                 f" rendezvous at {self.rendezvous_address}; see"
                                                 f" {self.daemon_log(n)}") from None
            finally:
                c.close()

    def daemon_log(self, node: str) -> str:
        return os.path.join(self.spec.workdir, f"daemon.{node}.log")

    def node_of(self, rank: int) -> str:
        return self.names[rank // self.spec.ranks_per_node]

    def lose_node(self, node: str) -> None:
        """SIGKILL the node's daemon and ranks and wipe its shared memory: the machine is gone."""
        for r, p in self.workers.items():
            if self.node_of(r) == node and p.poll() is None:
                p.kill()
        d = self.daemons.pop(node, None)
        if d is not None:
            d.kill()
            d.wait(10)
        shutil.rmtree(self.shm_dir(node), ignore_errors=True)

    def kill_daemon(self, node: str) -> None:
        d = self.daemons.pop(node, None)
        if d is not None:
            d.kill()
            d.wait(10)

    def status(self, node: str, timeout_s: float = 10) -> P.StatusReport:
        c = DaemonClient(self.endpoint(node).address, timeout_s=timeout_s)
        try:
            return c.request(P.Status())
        finally:
            c.close()

    # ---- ranks ---------------------------------------------------------------------------------

    def start_workers(self) -> None:
        self.attempt += 1
        port = free_port()
        for r in range(self.world):
            node = self.node_of(r)
            ep = self.endpoint(node)
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(self.world), LOCAL_RANK=str(r % self.spec.ranks_per_node),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT=str(self.attempt),
                       SNAPGUARD_JOB=ep.job, SNAPGUARD_NODE=node, SNAPGUARD_RUN_DIR=ep.run_dir, OMP_NUM_THREADS="1",
                       **self.spec.env)
            cmd = [sys.executable, "-m", "snapguard.demo", "worker", "--out", self.out, "--steps", str(self.spec.steps),
                   "--width", str(self.spec.width), "--layers", str(self.spec.layers),
                   "--step-sleep", str(self.spec.step_sleep), *self.spec.worker_args]
            with open(os.path.join(self.spec.workdir, f"worker.r{r}.log"), "ab") as logf:
                self.workers[r] = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                                   start_new_session=True)

    def kill_workers(self) -> None:
        for p in self.workers.values():
            if p.poll() is None:
                p.kill()
        for p in self.workers.values():
            p.wait(30)

    def supervise(self, timeout_s: float, max_restarts: int = 10, on_tick=None, *, hang_timeout_s: float | None = None,
                  startup_timeout_s: float = 180.0, watch_daemons: bool = False, on_event=None) -> int:
        """Run ranks until all finish; on any failure restart every rank (replacing lost nodes' daemons).

        Returns the number of restarts. `on_tick(cluster)` runs every few ms: the place to inject faults.
        Optional, off by default: `hang_timeout_s`, torchrun's timeout: once an attempt has logged a step,
        no new step logged by any rank within that time SIGKILLs every rank and restarts them (before its
        first step an attempt gets `startup_timeout_s` more). `watch_daemons`: a daemon that exits while
        its node is not lost is restarted at once, as a node's process manager would (it re-adopts its
        sealed slots from shared memory). `on_event(cluster, kind, detail)` hears what the supervisor
        saw and did: "attempt", "rank_exit", "hang", "daemon_exit", "daemon_restarted".
        """
        deadline = time.monotonic() + timeout_s
        restarts = 0

        def event(kind: str, **detail) -> None:
            if on_event is not None:
                on_event(self, kind, detail)

        self.start_daemons([n for n in self.names if n not in self.daemons])
        self.start_workers()
        event("attempt", attempt=self.attempt)
        watch = _StepWatch(self.out, self.world) if hang_timeout_s is not None else None
        while True:
            if time.monotonic() > deadline:
                self.kill_workers()
                raise SnapGuardError(f"the cluster job did not finish within {timeout_s:.0f} s"
                                     f" (attempt {self.attempt}, {restarts} restarts)")
            if on_tick is not None:
                on_tick(self)
            if watch_daemons:
                for n, d in list(self.daemons.items()):
                    if d.poll() is not None:
                        event("daemon_exit", node=n, code=d.returncode)
                        self.daemons.pop(n, None)
                        self.start_daemon(n)
                        event("daemon_restarted", node=n)
            codes = {r: p.poll() for r, p in self.workers.items()}
            if all(c == 0 for c in codes.values()):
                return restarts
            failed = {r: c for r, c in codes.items() if c not in (None, 0)}
            hung = None
            if not failed and watch is not None:
                hung = watch.idle(hang_timeout_s, startup_timeout_s)
            if failed or hung is not None:
                self.kill_workers()
                if failed:
                    event("rank_exit", codes=failed)
                else:
                    event("hang", idle_s=hung, timeout_s=hang_timeout_s)
                restarts += 1
                if restarts > max_restarts:
                    raise SnapGuardError(f"the cluster job failed {restarts} times; see {self.spec.workdir}/worker.r*.log")
                for n in self.names:
                    if n not in self.daemons or self.daemons[n].poll() is not None:
                        self.daemons.pop(n, None)
                        self.start_daemon(n)  # a replacement node: empty memory, same name
                self.start_workers()
                event("attempt", attempt=self.attempt)
                if watch is not None:
                    watch.reset()
            time.sleep(0.02)

    def close(self) -> None:
        self.kill_workers()
        for n in list(self.daemons):
            self.kill_daemon(n)
        self.store = None  # a hosted store stops with its last reference
        shutil.rmtree(self.shm_root, ignore_errors=True)


class _StepWatch:
    """Notices when no rank has logged a new step for a while: the loss logs stop growing."""

    def __init__(self, out: str, world: int):
        self.paths = [os.path.join(out, f"loss.r{r}.jsonl") for r in range(world)]
        self.reset()

    def _size(self) -> int:
        total = 0
        for p in self.paths:
            try:
                total += os.stat(p).st_size
            except FileNotFoundError:
                pass
        return total

    def reset(self) -> None:
        self.size = self._size()
        self.since = time.monotonic()
        self.stepped = False

    def idle(self, timeout_s: float, startup_s: float) -> float | None:
        """Seconds without a new step if that exceeds the timeout (plus startup_s before the first step), else None."""
        size = self._size()
        now = time.monotonic()
        if size != self.size:
            self.size, self.since, self.stepped = size, now, True
            return None
        idle = now - self.since
        return idle if idle > timeout_s + (0 if self.stepped else startup_s) else None
