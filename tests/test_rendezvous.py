"""Daemons find their peers and EC group through a rendezvous in a real torch.distributed TCPStore.

The store is a real TCPStore on loopback, hosted by the test (or by a daemon with
--rendezvous-host); daemons are real processes, or threads calling `join` the way a daemon does.
Checked: every daemon gets the same roster and computes the same groups, no group holds two nodes of
one failure domain, a rendezvous that never completes says who is missing, a node that joins again
counts once (at another address, or as a second daemon of one node name, it is refused), nothing in
the store is trusted (and nothing is unpickled), conflicting flags are refused, and a simulated cluster configured only through the rendezvous survives losing a node
bit-identically.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest

from conftest import Node, make_dirs, unique_id
from snapguard.procs import free_port
from snapguard.client import DaemonClient
from snapguard.daemon.__main__ import main as daemon_main
from snapguard.demo import compare
from snapguard.errors import ConfigError, ProtocolError, SnapGuardError
from snapguard.procs import daemon_command
from snapguard.rendezvous import (Member, RendezvousError, join, key, open_store, plan_peers, static_roster)
from test_cluster import _assert_restores_from_memory, _reference, _run_with_losses

SECRET = "0123456789abcdef0123456789abcdef"
# Connecting to a TCPStore resolves the peer's address back to a name; where DNS is slow (this sandbox
# loses a query now and then, and the resolver waits 5 s) a connection takes seconds. Connections get
# this long; the rendezvous timeouts under test are separate and short.
CONNECT_S = 30.0


@pytest.fixture
def store():
    """A TCPStore hosted on loopback by the test, as a launcher would host it: (address, store)."""
    s = open_store("127.0.0.1:0", CONNECT_S, host=True)
    yield f"127.0.0.1:{s.port}", s
    del s


def member(i: int, domain: str | None = None, port: int | None = None) -> Member:
    return Member(f"n{i}", f"tcp://127.0.0.1:{port or 7100 + i}", domain or f"n{i}")


def join_one(address: str, job: str, me: Member, nodes: int, timeout_s: float = 20.0, settings=None, store=None):
    """What one daemon does: connect to the store (unless given a connection), then `join`.

    Returns the roster, or the error for the test to check."""
    try:
        return join(store or open_store(address, CONNECT_S), job, me, nodes, timeout_s, settings)
    except Exception as e:
        return e


def join_all(address: str, job: str, members: list[Member], nodes: int, timeout_s: float = 20.0, settings=None) -> list:
    """Daemons joining at the same time, each from a thread of its own: connected first, so that a slow
    connection cannot eat into a short rendezvous timeout."""
    stores = [open_store(address, CONNECT_S) for _ in members]
    with ThreadPoolExecutor(len(members)) as ex:
        futures = [ex.submit(join_one, address, job, m, nodes, timeout_s, settings, st) for m, st in zip(members, stores)]
        return [f.result() for f in futures]


# ---- meeting and grouping ------------------------------------------------------------------------

def test_daemons_meeting_in_a_store_agree_on_roster_and_groups_with_no_domain_twice(store):
    address, _ = store
    racks = {0: "rack0", 1: "rack0", 2: "rack1", 3: "rack1", 4: "rack2", 5: "rack2"}
    members = [member(i, racks[i]) for i in range(6)]
    rosters = join_all(address, "job", members[::-1], 6, settings={"ec_g": 3, "ec_m": 1})
    assert all(r == tuple(members) for r in rosters), rosters
    plans = {m.node: plan_peers(roster, m.node, 3, 1) for m, roster in zip(members[::-1], rosters)}
    groups = {p.groups for p in plans.values()}
    assert len(groups) == 1, f"daemons computed different groups: {groups}"
    (groups,) = groups
    assert groups == (("n0", "n2", "n4"), ("n1", "n3", "n5"))
    domain = {m.node: m.domain for m in members}
    for g in groups:
        assert len({domain[n] for n in g}) == len(g), f"group {g} holds two nodes of one failure domain"
    for m in members:
        p = plans[m.node]
        assert m.node in p.ec_group and p.ec_group in groups
        assert p.peers == tuple((x.node, x.address) for x in members if x != m), "held steps must reach every daemon"


def test_an_impossible_domain_layout_is_a_clear_config_error(store):
    address, _ = store
    members = [member(0, "rack0"), member(1, "rack0"), member(2, "rack0"), member(3, "rack1")]
    rosters = join_all(address, "job", members, 4)
    with pytest.raises(ConfigError, match=r"cannot form 2 EC group\(s\) of g=2 .* domain 'rack0' has 3 nodes"):
        plan_peers(rosters[0], "n0", 2, 1)


def test_a_rendezvous_that_never_completes_names_who_joined_and_how_many_are_missing(store):
    address, _ = store
    errors = join_all(address, "job", [member(0), member(1)], 3, timeout_s=1.0)
    for e in errors:
        assert isinstance(e, RendezvousError), e
        assert "waited 1 s for 3 daemons of job job to join the rendezvous: 2 of 3 joined (n0, n1), 1 still missing" in str(e)


def test_a_node_that_joins_again_at_its_address_counts_once(store):
    address, s = store
    assert "1 of 3 joined (n0)" in str(join_one(address, "job", member(0), 3, timeout_s=0.3))
    errors = join_all(address, "job", [member(0), member(1)], 3, timeout_s=0.5)
    assert all("2 of 3 joined (n0, n1), 1 still missing" in str(e) for e in errors), errors
    rosters = join_all(address, "job", [member(0), member(1), member(2)], 3)
    assert all(r == (member(0), member(1), member(2)) for r in rosters), rosters
    # after a node loss: the replacement daemon of n1, at the address its peers know, joins alone and gets the
    # roster at once
    connection = open_store(address, CONNECT_S)
    t0 = time.monotonic()
    assert join_one(address, "job", member(1), 3, timeout_s=5.0, store=connection) == (member(0), member(1), member(2))
    assert time.monotonic() - t0 < 2
    assert s.get(key("job", "joins", "n0")) == b"3" and s.get(key("job", "joins", "n1")) == b"3"


def test_two_daemons_of_one_node_name_at_different_addresses_are_refused(store):
    """gpu1.rackA and gpu1.rackB both default to node gpu1: the second must not take over the first's record."""
    address, s = store
    first, second = member(1, port=7101), member(1, port=7109)
    assert "1 of 2 joined (n1)" in str(join_one(address, "job", first, 2, timeout_s=0.3))
    e = join_one(address, "job", second, 2, timeout_s=5.0)
    assert isinstance(e, ConfigError), e
    assert "node n1 at tcp://127.0.0.1:7109 cannot join: a daemon of node n1 at tcp://127.0.0.1:7101 has joined" \
           " already" in str(e) and "--node" in str(e), e
    assert Member.from_wire(s.get(key("job", "member", "n1")), "") == first, "the refused daemon wrote its record"
    assert s.get(key("job", "joins", "n1")) == b"1"
    # the job completes with the first daemon's address, and it may still rejoin there
    rosters = join_all(address, "job", [member(0), first], 2)
    assert all(r == (member(0), first) for r in rosters), rosters
    assert isinstance(join_one(address, "job", second, 2), ConfigError), "a complete job refuses it too"
    # nor may it rejoin in another failure domain (its --domain forgotten): the others planned with the first one
    moved = Member(first.node, first.address, "rack9")
    e = join_one(address, "job", moved, 2)
    assert isinstance(e, ConfigError), e
    assert f"node n1 cannot join in failure domain 'rack9': a daemon of node n1 has joined already in domain" \
           f" {first.domain!r}" in str(e), e
    assert Member.from_wire(s.get(key("job", "member", "n1")), "") == first


def test_a_daemon_whose_record_is_overwritten_while_it_joins_is_refused(store):
    """Both daemons of one name passed the check before either wrote: the one whose record lost sees it in
    the roster it reads back and is refused, naming the other's address."""
    address, s = store
    other = member(1, port=7109)

    class Racing:
        """The store as the first daemon sees it: the other daemon's record lands just after its own."""

        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return getattr(self.store, name)

        def set(self, k, v):
            self.store.set(k, v)
            if k == key("job", "member", "n1"):
                self.store.set(k, other.to_wire())

    e = join_one(address, "job", member(1), 1, store=Racing(open_store(address, CONNECT_S)))
    assert isinstance(e, ConfigError), e
    assert "node n1 at tcp://127.0.0.1:7101 cannot join: a daemon of node n1 at tcp://127.0.0.1:7109 joined while" \
           " this one was joining" in str(e), e
    assert join_one(address, "job", other, 1) == (other,), "the daemon whose record is in the store joins"


def test_daemons_that_disagree_on_the_job_size_or_a_full_rendezvous_are_refused(store):
    address, _ = store
    rosters = join_all(address, "job", [member(0), member(1)], 2, settings={"ec_g": None, "ec_m": 1})
    assert rosters[0] == rosters[1] == (member(0), member(1))
    e = join_one(address, "job", member(2), 3, settings={"ec_g": None, "ec_m": 1})
    assert isinstance(e, ConfigError) and "nodes=2 (this daemon: 3)" in str(e), e
    e = join_one(address, "job", member(2), 2, settings={"ec_g": None, "ec_m": 2})
    assert isinstance(e, ConfigError) and "ec_m=1 (this daemon: 2)" in str(e), e
    e = join_one(address, "job", member(2), 2, settings={"ec_g": None, "ec_m": 1})
    assert isinstance(e, ConfigError) and "its 2 slots belong to n0, n1, and node n2 is not one of them" in str(e), e
    assert join_one(address, "other-job", member(2), 1) == (member(2),), "jobs are namespaced"


class _Unpickled:
    """Pickled into the store: unpickling it would create the file `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _record(**fields) -> bytes:
    d = {"v": 1, "node": "n1", "address": "tcp://127.0.0.1:7101", "domain": "n1", **fields}
    return json.dumps({k: v for k, v in d.items() if v is not None}).encode()


@pytest.mark.parametrize("where, value, error", [
    ("member", "pickle", "is not a JSON record"),
    ("member", b"\xff\xfe\x00garbage", "is not a JSON record"),
    ("member", b"[1, 2]", "expected a JSON object, got list"),
    ("member", _record(address=7101), "address must be a string, got int"),
    ("member", _record(domain=None), "expected fields address, domain, node, v"),
    ("member", _record(v=2), "record version 2"),
    ("member", _record(node="../n1"), "node id '../n1' is not valid"),
    ("member", _record(node="n2"), "holds the record of node n2, not of n1"),
    ("member", _record(address="http://10.0.0.1:80"), "is not tcp://HOST:PORT"),
    ("member", _record(domain="x" * 5000), "more than the 4096"),
    ("member", None, "names node n1, which has no record"),
    ("slot", "pickle", "is not a node name"),
    ("slot", b"../../etc/passwd", "is not a node name"),
    ("settings", "pickle", "is not a JSON record"),
])
def test_a_value_in_the_store_that_is_not_ours_is_refused_never_unpickled(store, tmp_path, where, value, error):
    address, s = store
    canary = tmp_path / "unpickled"
    if value == "pickle":
        value = pickle.dumps(_Unpickled(str(canary)))
    if where == "settings":
        s.set(key("job", "settings"), value)
    elif where == "slot":
        s.set(key("job", "slot", 0), value)
        s.set(key("job", "slot", 1), value)
    else:
        s.set(key("job", "slot", 0), "n1")
        if value is not None:
            s.set(key("job", "member", "n1"), value)
    e = join_one(address, "job", member(0), 2, timeout_s=5.0)
    assert isinstance(e, ProtocolError) and error in str(e), e
    assert not canary.exists(), "a value from the store was unpickled"


# ---- static flags and real daemons ---------------------------------------------------------------

def test_static_roster_refuses_unknown_missing_and_repeated_nodes():
    peers = [("b", "tcp://127.0.0.1:2"), ("c", "tcp://127.0.0.1:3")]
    with pytest.raises(ConfigError, match="names node\\(s\\) x, which are neither this node \\(a\\) nor a --peer"):
        static_roster("a", "tcp://127.0.0.1:1", peers, {"a": "r0", "b": "r0", "c": "r1", "x": "r1"})
    with pytest.raises(ConfigError, match="given for some nodes but not for b, c"):
        static_roster("a", "tcp://127.0.0.1:1", peers, {"a": "r0"})
    with pytest.raises(ConfigError, match="node\\(s\\) a listed more than once"):
        static_roster("a", "tcp://127.0.0.1:1", [*peers, ("a", "tcp://127.0.0.1:4")], {})
    roster = static_roster("a", "tcp://127.0.0.1:1", peers, {})
    assert plan_peers(roster, "b", None, 1).ec_group == ("a", "b", "c"), "no --ec-g: every node in one group"
    with pytest.raises(ConfigError, match=r"parity chunks m must be an int in 1..g-1 = 1..2 for g=3, got 3"):
        plan_peers(roster, "b", None, 3)


PEERS = ["--peer-bind", "tcp://127.0.0.1:7100", "--peer", "b=tcp://127.0.0.1:7101", "--peer", "c=tcp://127.0.0.1:7102",
         "--peer", "d=tcp://127.0.0.1:7103"]


@pytest.mark.parametrize("flags, error", [
    (["--ec-group", "a,b", "--ec-g", "2", *PEERS], "--ec-group lists this node's group, --ec-g computes groups"),
    (["--ec-group", "a,b,c,d", "--failure-domain", "a=r0", *PEERS], "drop --ec-group"),
    (["--rendezvous", "127.0.0.1:1", "--nodes", "4", *PEERS], "--peer conflict(s) with --rendezvous"),
    (["--rendezvous", "127.0.0.1:1", "--peer-bind", "tcp://127.0.0.1:7100"], "--rendezvous needs --nodes"),
    (["--rendezvous", "127.0.0.1:1", "--nodes", "2"], "--rendezvous needs --peer-bind"),
    (["--rendezvous", "localhost", "--nodes", "2", "--peer-bind", "tcp://127.0.0.1:7100"], "is not HOST:PORT"),
    (["--nodes", "4", "--domain", "r0", *PEERS], "--nodes, --domain need(s) --rendezvous HOST:PORT"),
    (["--ec-g", "2", "--failure-domain", "a=r0", "--failure-domain", "b=r0", "--failure-domain", "c=r0",
      "--failure-domain", "d=r1", *PEERS], "cannot form 2 EC group(s) of g=2 from 4 nodes"),
    (["--ec-g", "3", *PEERS], "4 nodes do not split into EC groups of g=3"),
    (["--ec-g", "2", "--failure-domain", "a=r0", "--failure-domain", "a=r1", *PEERS], "gives node a twice"),
    # known before the rendezvous (here: a store no one serves), so said at once
    (["--rendezvous", "127.0.0.1:1", "--nodes", "4", "--ec-g", "3", "--peer-bind", "tcp://127.0.0.1:7100"],
     "--nodes 4 --ec-g 3 --ec-m 1: 4 nodes do not split into EC groups of g=3"),
    (["--rendezvous", "127.0.0.1:1", "--nodes", "3", "--ec-m", "3", "--peer-bind", "tcp://127.0.0.1:7100"],
     "--nodes 3 --ec-m 3: parity chunks m must be an int in 1..g-1 = 1..2 for g=3, got 3"),
    (["--rendezvous", "127.0.0.1:1", "--nodes", "1", "--peer-bind", "tcp://127.0.0.1:7100"],
     "--nodes 1 --ec-m 1: EC group size g must be an int >= 2, got 1"),
    # flags that would be ignored without the one they belong to
    (["--peer-timeout", "5"], "--peer-timeout need(s) --peer-bind: without it this daemon would ignore them"),
    (["--secret-file", "/nowhere", "--ec-keep-mib", "9"], "--secret-file, --ec-keep-mib need(s) --peer-bind"),
    (["--persist-every", "5", "--persist-keep", "3"], "--persist-every, --persist-keep need(s) --persist-dir"),
])
def test_conflicting_flags_and_impossible_groups_stop_the_daemon_with_a_clear_message(flags, error, capsys,
                                                                                     monkeypatch, tmp_path):
    monkeypatch.setenv("SNAPGUARD_SECRET", SECRET)
    rc = daemon_main(["--job", "j", "--node", "a", "--run-dir", str(tmp_path), *flags])
    assert rc == 2
    assert error in capsys.readouterr().err


def test_a_peer_port_in_use_is_said_before_the_rendezvous_announces_it(capsys, monkeypatch, tmp_path):
    # Found only once the daemon serves, the others would have planned with this address, and the rendezvous would
    # refuse the node at any other one. Here no store is served at all: the daemon must not get as far as asking it.
    import socket

    monkeypatch.setenv("SNAPGUARD_SECRET", SECRET)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = daemon_main(["--job", "j", "--node", "a", "--run-dir", str(tmp_path), "--rendezvous", "127.0.0.1:1",
                          "--nodes", "2", "--rendezvous-timeout", "2", "--peer-bind", f"tcp://127.0.0.1:{port}"])
    assert rc == 2
    assert f"--peer-bind tcp://127.0.0.1:{port}: cannot listen there: Address already in use; this daemon did not" \
           " join the rendezvous" in capsys.readouterr().err


@pytest.fixture
def nodes(monkeypatch):
    """Nodes a, b (, ...) of one job whose daemons are not started yet; everything is removed at teardown."""
    monkeypatch.setenv("SNAPGUARD_SECRET", SECRET)
    job = unique_id("rdv")
    made: list[Node] = []

    def make(name: str) -> Node:
        run_dir, shm_dir = make_dirs(name)
        made.append(Node(job, name, run_dir, shm_dir))
        return made[-1]

    yield make
    for n in made:
        n.close()
        shutil.rmtree(n.run_dir, ignore_errors=True)
        shutil.rmtree(n.shm_dir, ignore_errors=True)


def test_static_ec_g_and_failure_domains_resolve_to_the_planned_group(nodes):
    a = nodes("a")
    a.start(["--peer-bind", f"tcp://127.0.0.1:{free_port()}", *PEERS[2:], "--ec-g", "2", "--failure-domain", "a=r0", "--failure-domain", "b=r0",
             "--failure-domain", "c=r1", "--failure-domain", "d=r1"])
    assert a.status().peers == ["b", "c", "d"]
    log = a.log()
    assert "EC group a,c (g=2, m=1), all groups a,c b,d;" in log, log
    assert "erasure coding in group ['a', 'c'] with m=1" in log


def wait_ready(n: Node, timeout_s: float) -> None:
    """Wait until `n`'s daemon answers; fail at once, with its log, if it exits first."""
    deadline = time.monotonic() + timeout_s
    c = DaemonClient(n.ep.address, who=f"test waiting for {n.node}")
    try:
        while True:
            assert n.proc.poll() is None, f"daemon {n.node} exited with {n.proc.returncode}:\n{n.log()}"
            try:
                return c.wait_ready(0.5)
            except SnapGuardError:
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for daemon {n.node}:\n{n.log()}")
    finally:
        c.close()


def test_real_daemons_meet_in_a_store_one_of_them_hosts_and_a_restarted_daemon_rejoins(nodes):
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    address = f"127.0.0.1:{free_port()}"
    ports = {n.node: free_port() for n in (a, b, c)}

    def flags(n: Node) -> list[str]:
        host = ["--rendezvous-host"] if n is a else []
        return ["--peer-bind", f"tcp://127.0.0.1:{ports[n.node]}", "--rendezvous", address, "--nodes", "3",
                "--domain", f"rack-{n.node}", "--ec-g", "3", "--rendezvous-timeout", "60", *host]

    for n in (a, b, c):
        n.start(flags(n), wait_s=None)  # each answers only once all have joined: start all, then wait
    for n in (a, b, c):
        wait_ready(n, 60)
        assert n.status().peers == sorted({"a", "b", "c"} - {n.node})
        assert "EC group a,b,c (g=3, m=1)" in n.log(), n.log()
    b.kill()
    b.start(flags(b))  # the roster is complete: the replacement gets it at once
    assert b.status().peers == ["a", "c"]
    assert "rejoined (join 2 of this node)" in b.log()


def _a_and_b_met(nodes) -> tuple[Node, Node, Callable[[int], list[str]], int]:
    """Daemons a and b of one job, met at a rendezvous that a hosts; the flags for another daemon, b's port."""
    a, b = nodes("a"), nodes("b")
    address = f"127.0.0.1:{free_port()}"
    ports = [free_port() for _ in range(2)]

    def flags(port: int, host: bool = False) -> list[str]:
        return ["--peer-bind", f"tcp://127.0.0.1:{port}", "--rendezvous", address, "--nodes", "2",
                "--rendezvous-timeout", "60", *(["--rendezvous-host"] if host else [])]

    a.start(flags(ports[0], host=True), wait_s=None)
    b.start(flags(ports[1]), wait_s=None)
    for n in (a, b):
        wait_ready(n, 60)
    return a, b, flags, ports[1]


def test_a_second_daemon_of_one_node_name_exits_at_once_naming_both_addresses(nodes):
    a, b, flags, b_port = _a_and_b_met(nodes)
    b2, port = nodes("b"), free_port()  # b2: another host whose short name is also b
    t0 = time.monotonic()
    with pytest.raises(SnapGuardError) as e:
        b2.start(flags(port), wait_s=60)
    assert time.monotonic() - t0 < 30, "spawn_daemon waited although the daemon had exited"
    assert "exited with code 2 before it answered" in str(e.value), e.value
    assert f"node b at tcp://127.0.0.1:{port} cannot join: a daemon of node b at tcp://127.0.0.1:{b_port}" \
           " has joined already" in str(e.value), e.value
    assert b.status().peers == ["a"] and a.status().peers == ["b"], "the daemons that met are unaffected"


def test_a_second_daemon_of_a_running_node_stops_before_it_joins_the_rendezvous(nodes):
    a, b, flags, b_port = _a_and_b_met(nodes)
    # The same node on the same host, at the same address: the rendezvous would count it as b rejoining.
    r = subprocess.run(daemon_command(b.ep, b.shm_dir, flags(b_port)), capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SNAPGUARD_SECRET": SECRET})
    assert r.returncode == 3 and f"another daemon (pid {b.proc.pid}) already serves" in r.stderr, r.stderr
    assert "rendezvous" not in r.stderr, r.stderr
    assert "join 2" not in a.log() + b.log()
    assert b.status().peers == ["a"] and a.status().peers == ["b"]


def test_a_daemon_whose_rendezvous_never_completes_exits_naming_what_it_waited_for(nodes):
    a = nodes("a")
    a.start(["--peer-bind", f"tcp://127.0.0.1:{free_port()}", "--rendezvous", f"127.0.0.1:{free_port()}",
             "--rendezvous-host", "--nodes", "2", "--rendezvous-timeout", "6"], wait_s=None)
    assert a.proc.wait(60) == 2
    assert f"[{a.job}/a rendezvous] waited 6 s for 2 daemons of job {a.job} to join the rendezvous: 1 of 2 joined (a)," \
           " 1 still missing" in a.log(), a.log()


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_g3_m1_cluster_configured_only_by_rendezvous_survives_a_node_loss(tmp_path_factory):
    """3 nodes x 2 ranks, g=3, m=1: node1 is lost mid-run, its replacement rejoins through the store."""
    steps = 9
    ref = _reference(tmp_path_factory, 3, steps)
    c = _run_with_losses(str(tmp_path_factory.mktemp("rdv")), 3, 1, steps, [(1,)], rendezvous=True, ec_g=3)
    try:
        assert compare(ref, c.out, c.world) == []
        _assert_restores_from_memory(c.out, c.world, 1)
        for n in c.names:
            log = open(c.daemon_log(n)).read()
            args = c.daemons[n].args
            assert "--peer" not in args and "--ec-group" not in args, "daemons must learn their peers from the store"
            assert "3 daemons met at" in log and "EC group node0,node1,node2 (g=3, m=1)" in log
            assert c.status(n).peers == sorted(set(c.names) - {n})
        assert "rejoined (join 2 of this node)" in open(c.daemon_log("node1")).read()
    finally:
        c.close()

