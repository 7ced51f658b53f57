"""Erasure-coded protection across nodes, on a simulated cluster of real daemons and real ranks.

Each node is a daemon process with its own shared-memory and IPC directories; daemons exchange
chunks over loopback TCP, authenticated with the job's secret. Losing a node SIGKILLs its daemon
and ranks and wipes its shared memory; a replacement daemon starts empty and must rebuild the lost
shards from the survivors. The verdict is the same as for a crash: every logged loss and every byte
of the final state equals an unbroken run, and no restart went back further than a step or two.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from snapguard import protocol as P
from snapguard.cluster import Cluster, ClusterSpec
from snapguard.demo import compare, progress, read_losses
from snapguard.errors import SnapGuardError
from snapguard.guard import Guard
from snapguard import procs
from snapguard.procs import _ephemeral_range, free_port

from conftest import Node, make_dirs, wait_until

STEPS_BETWEEN_LOSSES = 3


def _reference(tmp_path_factory, nodes: int, steps: int) -> str:
    work = str(tmp_path_factory.mktemp(f"ref{nodes}"))
    c = Cluster(ClusterSpec(workdir=work, nodes=nodes, m=1, steps=steps, worker_args=["--no-snapshot"], job="ref"))
    try:
        c.supervise(timeout_s=240, max_restarts=0)
    finally:
        c.close()
    return c.out


def _run_with_losses(work: str, nodes: int, m: int, steps: int, losses: list[tuple[int, ...]], **spec) -> Cluster:
    """Train, losing each set of nodes in turn once training has moved on from the previous restore.

    `spec`: more ClusterSpec fields (e.g. rendezvous=True).
    """
    c = Cluster(ClusterSpec(workdir=work, nodes=nodes, m=m, steps=steps, step_sleep=0.03, job="ec", **spec))
    pending = list(losses)
    state = {"next_at": STEPS_BETWEEN_LOSSES, "attempt": 0}

    def tick(cl: Cluster) -> None:
        if not pending or cl.attempt != state["attempt"]:
            return
        if progress(cl.out, cl.world) >= state["next_at"]:
            for i in pending.pop(0):
                cl.lose_node(cl.names[i])
            state["attempt"] += 1
            state["next_at"] = progress(cl.out, cl.world) + STEPS_BETWEEN_LOSSES

    try:
        restarts = c.supervise(timeout_s=600, max_restarts=len(losses), on_tick=tick)
    except BaseException:
        c.close()
        raise
    assert not pending, f"the run ended before every loss was injected: {pending} left"
    assert restarts == len(losses)
    return c


def _assert_restores_from_memory(out: str, world: int, attempts: int) -> None:
    """Every restart resumed near where the previous attempt stopped: rebuilt, not started over."""
    rows = read_losses(out, world)
    for a in range(1, attempts + 1):
        before = max(r["step"] for r in rows if r["attempt"] == a - 1)
        after = min(r["step"] for r in rows if r["attempt"] == a)
        assert 0 < after and after >= before - 2, f"attempt {a} restarted at step {after}, previous reached {before}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_g4_m2_survives_every_loss_of_one_and_two_nodes(tmp_path_factory):
    """Every node and all six pairs in turn, each pair lost at once, on real training (every pair after the first
    rebuilt from nodes an earlier loss had rebuilt). Slow: the default suite loses two nodes at once on real daemons
    (test_g4_m2_daemons_that_lose_two_nodes_at_once_rebuild_both_and_protect_on), a node and then another in its
    rebuild on real training (tests/test_chaos.py), every erasure pattern byte for byte (tests/test_codec.py)."""
    losses = [(i,) for i in range(4)] + list(itertools.combinations(range(4), 2))
    steps = STEPS_BETWEEN_LOSSES * (len(losses) + 2)
    ref = _reference(tmp_path_factory, 4, steps)
    c = _run_with_losses(str(tmp_path_factory.mktemp("g4m2")), 4, 2, steps, losses)
    try:
        assert compare(ref, c.out, c.world) == []
        _assert_restores_from_memory(c.out, c.world, len(losses))
        rebuilt = sum(open(os.path.join(c.spec.workdir, f"daemon.{n}.log")).read().count("rebuilt step") for n in c.names)
        assert rebuilt == sum(len(l) for l in losses), "every lost node is rebuilt exactly once per loss"
        for n in c.names:
            st = c.status(n)
            assert st.protected == steps - 1 and st.sealed == steps - 1
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_g3_m1_xor_survives_the_loss_of_one_node_and_then_of_another(tmp_path_factory):
    """Slow: a single g=3 m=1 loss on real daemons is the rendezvous end-to-end test and the chaos run's lose_node;
    a node lost after another's rebuild is the g4 test above."""
    # Nodes are alike (each holds data of two codewords and the parity of the third), so two losses cover the roles.
    losses = [(0,), (2,)]
    steps = STEPS_BETWEEN_LOSSES * (len(losses) + 2)
    ref = _reference(tmp_path_factory, 3, steps)
    c = _run_with_losses(str(tmp_path_factory.mktemp("g3m1")), 3, 1, steps, losses)
    try:
        assert compare(ref, c.out, c.world) == []
        _assert_restores_from_memory(c.out, c.world, len(losses))
    finally:
        c.close()


def test_losing_more_nodes_than_m_is_a_clear_error_not_a_fresh_start(tmp_path):
    c = Cluster(ClusterSpec(workdir=str(tmp_path), nodes=3, ranks_per_node=1, m=1, steps=40, step_sleep=0.03,
                            job="lossy"))
    lost = []

    def tick(cl: Cluster) -> None:
        if not lost and progress(cl.out, cl.world) >= 4:
            cl.lose_node("node0")
            cl.lose_node("node2")
            lost.append(progress(cl.out, cl.world))

    try:
        with pytest.raises(SnapGuardError, match="failed 2 times"):
            c.supervise(timeout_s=300, max_restarts=1, on_tick=tick)
    finally:
        c.close()
    rows = read_losses(c.out, c.world)
    assert [r for r in rows if r["attempt"] > 0] == [], "no rank may train on after an unrecoverable loss"
    logs = "".join(open(os.path.join(str(tmp_path), f"worker.r{r}.log")).read() for r in range(c.world))
    assert "RestoreError" in logs and "cannot restore" in logs
    assert "cannot be rebuilt: nodes node0, node2 are lost" in logs
    assert "unrecoverable" in logs


def test_free_port_never_hands_out_a_port_twice():
    # Each probe socket is closed before its port is used, so the kernel may offer the same port again;
    # among this many picks it does, and two daemons of one cluster then fight over one address.
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)


def test_free_ports_lie_outside_the_ephemeral_range():
    # Between the probe and the bind, the kernel may give a port of that range to any outgoing connection.
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if low <= p <= high]


def test_free_port_lets_the_kernel_pick_where_the_ephemeral_range_leaves_no_room(monkeypatch):
    monkeypatch.setattr(procs, "_ephemeral_range", lambda: (1024, 65535))
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports) and all(1024 <= p <= 65535 for p in ports)


WORKER = """
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
with open(os.path.join(sys.argv[1], f"port.r{dist.get_rank()}"), "w") as f:
    f.write(os.environ["MASTER_PORT"])
dist.destroy_process_group()
"""


def test_torchrun_gives_the_workers_a_store_port_outside_the_ephemeral_range(tmp_path):
    # The demo's and the tests' launcher: without it, rank 0's store binds, seconds after torchrun probed it,
    # a port that a gloo or ZeroMQ connection of a job beside it may have taken (EADDRINUSE).
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "snapguard.torchrun", "--standalone", "--nproc-per-node=2",
                    str(script), str(tmp_path)], env=env, check=True, timeout=120, capture_output=True)
    ports = {int((tmp_path / f"port.r{r}").read_text()) for r in range(2)}
    low, high = _ephemeral_range()
    assert len(ports) == 1 and not low <= ports.pop() <= high


SHRINK_WORKER = r'''
import datetime, hashlib, json, os, sys
import torch, torch.distributed as dist
from snapguard.errors import WorldSizeChanged
from snapguard.guard import Guard

rank, world, node, port, out, steps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
                                       int(sys.argv[6]))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
torch.manual_seed(rank)
model = torch.nn.Linear(64, 64)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
loop = {"step": -1}
g = Guard(model, opt, loop, rng=False, node=node, timeout_s=10.0)
result = {"digests": {}}
try:
    result["restored"] = g.restore()
except WorldSizeChanged as e:
    result["world_changed"] = [e.world_size, e.step]
digest = lambda: hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in
                                         [*model.parameters(), *[v for s in opt.state.values() for v in s.values()]])).hexdigest()
if result.get("restored") is not None:
    result["restored_digest"] = digest()
for step in range(loop["step"] + 1, steps):
    loss = model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    loop["step"] = step
    g.snapshot(step)
    g.wait()
    result["digests"][step] = digest()
g.close()
with open(os.path.join(out, f"r{rank}.json"), "w") as f:
    json.dump(result, f)
os._exit(0)
'''


def _run_ranks(c: Cluster, script: str, nodes: list[str], steps: int, tag: str) -> dict[int, dict]:
    """One rank per entry of `nodes` (rank r on nodes[r]), a gloo job of that size, run to its end."""
    out = os.path.join(c.spec.workdir, tag)
    os.makedirs(out)
    port = free_port()
    ps = []
    for r, node in enumerate(nodes):
        ep = c.endpoint(node)
        env = dict(os.environ, SNAPGUARD_JOB=ep.job, SNAPGUARD_RUN_DIR=ep.run_dir, OMP_NUM_THREADS="1")
        with open(os.path.join(out, f"log.r{r}"), "w") as log:
            ps.append(subprocess.Popen([sys.executable, script, str(r), str(len(nodes)), node, str(port), out,
                                        str(steps)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for p in ps:
            p.wait(120)
    finally:
        for p in ps:
            p.kill()
    got = {}
    for r in range(len(nodes)):
        path = os.path.join(out, f"r{r}.json")
        assert os.path.exists(path), f"rank {r} wrote no result: {open(os.path.join(out, f'log.r{r}')).read()[-3000:]}"
        with open(path) as f:
            got[r] = json.load(f)
    return got


def test_an_elastic_job_that_shrinks_is_protected_again_and_rebuilt_after_a_node_loss(tmp_path):
    """A job of 4 ranks on 2 nodes (m=1) restarts with 2 ranks, one per node, under the same job id, as an elastic
    job does after losing capacity. Its ranks are told the old snapshots cannot be restored into 2 ranks, and
    start from their own checkpoint (here: fresh). The daemons then protect the new job's steps: each node's
    parity covers its one new rank, not the old slots, which go once both new ranks hold a step. Losing node1
    after that costs nothing: its rank's shard is rebuilt from node0's parity, bit-exactly."""
    script = str(tmp_path / "worker.py")
    with open(script, "w") as f:
        f.write(SHRINK_WORKER)
    c = Cluster(ClusterSpec(workdir=str(tmp_path), nodes=2, m=1, job="shrink"))
    try:
        c.start_daemons(c.names)
        assert "SNAPGUARD_SECRET" not in os.environ, "the job's secret is the daemons': no trainer started later has it"
        old = _run_ranks(c, script, ["node0", "node0", "node1", "node1"], 4, "old")
        assert all(r["restored"] is None for r in old.values())
        new = _run_ranks(c, script, ["node0", "node1"], 6, "new")
        assert all(r["world_changed"] == [4, 3] for r in new.values()), new
        for node, rank in (("node0", 0), ("node1", 1)):
            st = wait_until(lambda: (lambda s: s.protected == 5 and s)(c.status(node)), 30,
                            f"{node} to hold step 5 protected")
            assert [r["rank"] for r in st.ranks] == [rank], f"{node} keeps only the rank it serves now"
        c.lose_node("node1")
        c.start_daemon("node1")
        again = _run_ranks(c, script, ["node0", "node1"], 6, "again")
        for r in (0, 1):
            assert again[r]["restored"] == 5 and again[r]["restored_digest"] == new[r]["digests"]["5"], r
        assert "rebuilt step 5 of ranks [1]" in open(c.daemon_log("node1")).read()
    finally:
        c.close()


class _Group:
    """g real daemons of one job in one EC group with `m`, on loopback TCP, one rank each, their Guards in this
    process, each protecting a state of the given size; `faults`: node -> its daemon's SNAPGUARD_FAULTS."""

    def __init__(self, sizes_mib: list[int], m: int, faults: dict[str, str] | None = None):
        faults = faults or {}
        self.run_dir, self.shm_dir = make_dirs("grp")
        self.names = [f"n{i}" for i in range(len(sizes_mib))]
        ports = [free_port() for _ in self.names]
        self.job = f"grp{os.getpid()}"
        self.nodes = [Node(self.job, n, self.run_dir, self.shm_dir) for n in self.names]
        self.args = {n: ["--peer-bind", f"tcp://127.0.0.1:{p}", "--ec-group", ",".join(self.names), "--ec-m", str(m),
                         "--peer-timeout", "1",
                         *(a for o, q in zip(self.names, ports) if o != n for a in ("--peer", f"{o}=tcp://127.0.0.1:{q}"))]
                     for n, p in zip(self.names, ports)}
        gen = torch.Generator().manual_seed(5)
        self.states = [{"w": torch.randint(0, 255, (mib << 20,), dtype=torch.uint8, generator=gen)} for mib in sizes_mib]
        self.guards: list[Guard] = []
        try:
            for nd in self.nodes:
                nd.start(self.args[nd.node], faults=faults.get(nd.node))
            self.guards = [self._guard(i, st) for i, st in enumerate(self.states)]
        except BaseException:
            self.close()
            raise

    def _guard(self, i: int, state: dict, timeout_s: float = 30.0) -> Guard:
        return Guard(states={"s": state}, rng=False, job=self.job, node=self.names[i], run_dir=self.run_dir, rank=i,
                     world_size=len(self.names), timeout_s=timeout_s)

    def protect(self, *steps: int) -> None:
        """Every rank seals each of `steps` in turn; wait until the last is protected on every node."""
        for step in steps:
            for st, g in zip(self.states, self.guards):
                st["w"][step] ^= 1
                g.snapshot(step)
            for g in self.guards:
                g.wait()
        wait_until(lambda: min(nd.status().protected for nd in self.nodes) >= steps[-1], 60,
                   f"step {steps[-1]} to be protected")

    def lose(self, *lost: int, faults: str | None = None, timeout_s: float = 30.0) -> list[torch.Tensor]:
        """Lose the nodes `lost` at once (their daemons SIGKILLed, their memory wiped), then start an empty
        replacement for each, with `faults` as its SNAPGUARD_FAULTS; their ranks' Guards (with `timeout_s`) start
        again on zeroed states. Returns the bytes those states held."""
        saved = [self.states[i]["w"].clone() for i in lost]
        for i in lost:
            self.guards[i].close()
            self.nodes[i].kill()
            shutil.rmtree(self.nodes[i].table_dir)
        for i, before in zip(lost, saved):
            self.nodes[i].start(self.args[self.names[i]], faults=faults)
            self.states[i] = {"w": torch.zeros_like(before)}
            self.guards[i] = self._guard(i, self.states[i], timeout_s)
        return saved

    def restore(self, i: int, step: int = 1) -> None:
        """Do what restore() does on rank i once the ranks agree on `step` (they would need a process group)."""
        g = self.guards[i]
        assert step in g.client.request(P.Inventory(self.job, i)).steps
        shard = g._open(step, 0)
        g._load(shard, g._manifest(shard, step))

    def lose_and_restore(self, *lost: int, step: int = 1) -> bool:
        """`lose` the nodes `lost` at once and `restore` their ranks, all at once: whether their states then hold the
        bytes saved."""
        saved = self.lose(*lost)
        with concurrent.futures.ThreadPoolExecutor(len(lost)) as pool:
            for f in [pool.submit(self.restore, i, step) for i in lost]:
                f.result()
        return all(torch.equal(self.states[i]["w"], before) for i, before in zip(lost, saved))

    def close(self) -> None:
        for g in self.guards:
            g.close()
        for nd in self.nodes:
            nd.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)


def test_nodes_of_unequal_sizes_rebuild_a_chunk_of_several_pieces_bit_exact(monkeypatch):
    """g=3, m=1 on three daemons whose shards are 40, 24 and 8 MiB: node 0's chunk is two pieces, node 1's is one
    shorter than them, so the replacement of node 0 decodes its second piece from bytes of a chunk that ends
    before it (zeros, as the parity counts them). It restores step 1 bit-exact."""
    monkeypatch.setenv("SNAPGUARD_SECRET", "unequal-" + os.urandom(8).hex())
    group = _Group([40, 24, 8], m=1)
    try:
        group.protect(0, 1)
        assert group.lose_and_restore(0)
        assert "rebuilt step 1 of ranks [0]" in group.nodes[0].log()
    finally:
        group.close()


def test_g4_m2_daemons_that_lose_two_nodes_at_once_rebuild_both_and_protect_on(monkeypatch):
    """g=4, m=2, 24 MiB per node. Nodes 0 and 1 are lost at once: both replacements rebuild step 1 (each from the
    other two nodes, or from three once the other replacement has its shard) and their ranks restore it bit-exact.
    Every rank then seals step 2, which the group protects again; nodes 2 and 3 are lost at once, and their
    replacements rebuild step 2 with the two nodes rebuilt first."""
    monkeypatch.setenv("SNAPGUARD_SECRET", "twoatonce-" + os.urandom(8).hex())
    group = _Group([24] * 4, m=2)
    try:
        group.protect(0, 1)
        assert group.lose_and_restore(0, 1)
        for i in (0, 1):
            assert "rebuilt step 1 of ranks [%d]" % i in group.nodes[i].log()
        group.protect(2)
        assert group.lose_and_restore(2, 3, step=2)
        for i in (2, 3):
            assert "rebuilt step 2 of ranks [%d]" % i in group.nodes[i].log()
    finally:
        group.close()


def test_a_node_lost_while_it_serves_a_rebuild_is_replaced_by_another_mid_rebuild(monkeypatch, tmp_path):
    """g=4, m=2, 40 MiB per node: node 0's chunks are two pieces each. Node 0 is lost; while its replacement
    rebuilds, node 1 dies (SIGKILL) as it serves its first fetch, with pieces of it still asked for. After
    --peer-timeout the replacement counts node 1 as lost, fetches what is still missing from nodes 2 and 3,
    and restores step 1 bit-exact: two nodes lost, within m."""
    monkeypatch.setenv("SNAPGUARD_SECRET", "midrebuild-" + os.urandom(8).hex())
    group = _Group([40] * 4, m=2, faults={"n1": f"daemon.serve.fetch@1#{tmp_path / 'n1-died'}"})
    try:
        group.protect(0, 1)
        assert group.lose_and_restore(0)
        assert group.nodes[1].proc.wait(10) == -9, "node 1 died as it served the fetch"
        log = group.nodes[0].log()
        assert "counting peer n1 as lost" in log and "rebuilt step 1 of ranks [0] from peers ['n2', 'n3']" in log, log
    finally:
        group.close()


def test_a_daemon_killed_mid_rebuild_leaves_no_step_and_the_next_one_rebuilds_it(monkeypatch, tmp_path):
    """g=3, m=1, 40 MiB per node: node 0's chunks are four pieces. Node 0 is lost; its replacement dies (SIGKILL)
    once half of them are decoded into its slots (fault point daemon.rebuild.mid). Those slots hold half a step:
    the next daemon of node 0, on the same shared memory, adopts no step from them, rebuilds step 1 from the
    peers again, and restores it bit-exact."""
    monkeypatch.setenv("SNAPGUARD_SECRET", "killedrebuild-" + os.urandom(8).hex())
    group = _Group([40] * 3, m=1)
    try:
        group.protect(0, 1)
        node = group.nodes[0]
        # a request sent after its daemon died waits for a daemon to come, at most the client's timeout: short here
        saved, = group.lose(0, faults=f"daemon.rebuild.mid@1#{tmp_path / 'died'}", timeout_s=3.0)
        with pytest.raises(SnapGuardError, match="daemon"):
            group.restore(0)
        assert node.proc.wait(10) == -9, "the replacement died half-way through the rebuild"
        assert "rebuilt step" not in node.log()
        assert os.listdir(node.table_dir), "the half-rebuilt slots are still in shared memory"
        group.guards[0].close()
        node.start(group.args[node.node])  # the same shared memory
        assert node.held().get(0, []) == [], "no step adopted from half-rebuilt slots"
        group.guards[0] = group._guard(0, group.states[0])
        group.restore(0)
        assert torch.equal(group.states[0]["w"], saved)
        assert "rebuilt step 1 of ranks [0]" in node.log()
    finally:
        group.close()
