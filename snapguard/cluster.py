"""A simulated cluster on one machine: N nodes x G ranks, each node a daemon with its own shared
memory directory and IPC directory, daemons talking over loopback TCP with the job's secret.

The supervisor behaves like Slurm or Kubernetes running an elastic job: when any rank dies, it
SIGKILLs every rank and starts them all again; a node that was lost (daemon and ranks SIGKILLed, its
shared memory wiped) is replaced by a fresh, empty daemon first. Used by the tests and the chaos harness.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from snapguard import protocol as P
from snapguard.client import DaemonClient
from snapguard.config import Endpoint
from snapguard.errors import SnapGuardError
from snapguard.procs import spawn_daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    slots_per_rank: int = 2
    worker_args: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)


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
        self.out = os.path.join(spec.workdir, "out")
        os.makedirs(self.out, exist_ok=True)

    # ---- nodes ---------------------------------------------------------------------------------

    def endpoint(self, node: str) -> Endpoint:
        return Endpoint(self.spec.job, node, os.path.join(self.spec.workdir, "run", node))

    def shm_dir(self, node: str) -> str:
        return os.path.join(self.shm_root, node)

    def start_daemon(self, node: str) -> None:
        os.makedirs(self.shm_dir(node), mode=0o700, exist_ok=True)
        extra = ["--peer-bind", f"tcp://127.0.0.1:{self.ports[node]}", "--ec-group", ",".join(self.names),
                 "--ec-m", str(self.spec.m), "--slots-per-rank", str(self.spec.slots_per_rank), "--peer-timeout", "3",
                 "--log-level", os.environ.get("SNAPGUARD_DAEMON_LOG", "INFO")]
        for other in self.names:
            if other != node:
                extra += ["--peer", f"{other}=tcp://127.0.0.1:{self.ports[other]}"]
        os.environ["SNAPGUARD_SECRET"] = self.secret
        self.daemons[node] = spawn_daemon(self.endpoint(node), self.shm_dir(node), extra,
                                          log_path=os.path.join(self.spec.workdir, f"daemon.{node}.log"))

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

    def status(self, node: str) -> P.StatusReport:
        c = DaemonClient(self.endpoint(node).address, timeout_s=10)
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

    def supervise(self, timeout_s: float, max_restarts: int = 10, on_tick=None) -> int:
        """Run ranks until all finish; on any failure restart every rank (replacing lost nodes' daemons).

        Returns the number of restarts. `on_tick(cluster)` runs every few ms: the place to inject faults.
        """
        deadline = time.monotonic() + timeout_s
        restarts = 0
        for n in self.names:
            if n not in self.daemons:
                self.start_daemon(n)
        self.start_workers()
        while True:
            if time.monotonic() > deadline:
                self.kill_workers()
                raise SnapGuardError(f"the cluster job did not finish within {timeout_s:.0f} s"
                                     f" (attempt {self.attempt}, {restarts} restarts)")
            if on_tick is not None:
                on_tick(self)
            codes = {r: p.poll() for r, p in self.workers.items()}
            if all(c == 0 for c in codes.values()):
                return restarts
            if any(c not in (None, 0) for c in codes.values()):
                self.kill_workers()
                restarts += 1
                if restarts > max_restarts:
                    raise SnapGuardError(f"the cluster job failed {restarts} times; see {self.spec.workdir}/worker.r*.log")
                for n in self.names:
                    if n not in self.daemons or self.daemons[n].poll() is not None:
                        self.daemons.pop(n, None)
                        self.start_daemon(n)  # a replacement node: empty memory, same name
                self.start_workers()
            time.sleep(0.02)

    def close(self) -> None:
        self.kill_workers()
        for n in list(self.daemons):
            self.kill_daemon(n)
        shutil.rmtree(self.shm_root, ignore_errors=True)
