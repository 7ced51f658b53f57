"""The chaos harness, tested on real processes: every injector in a scenario, and the verdict both ways.

A few runs carry all the injectors (each restart costs a few seconds of starting ranks on this
machine): one scenario with every fault a correct system survives, which must PASS with each fault
detected by the right part; one on 4 nodes with m=2 that loses a node in the middle of another's
rebuild (recovered) and then more nodes than m, which must PASS as an expected failure; and one with
a deliberately broken restore (no RNG state), which must FAIL. The soak (50+ random faults) is marked
slow; run it with
    .venv/bin/python -m pytest tests/test_chaos.py -m slow -s
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from snapguard.chaos import generate, load, run_scenario
from snapguard.chaos.faults import KINDS
from snapguard.chaos.harness import run_reference
from snapguard.chaos.scenario import from_dict
from snapguard.errors import ConfigError

CLUSTER = {"nodes": 3, "ranks_per_node": 1, "m": 1, "steps": 40, "step_sleep": 0.05, "hang_timeout_s": 6.0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One fault-free run shared by every scenario of this shape."""
    d = str(tmp_path_factory.mktemp("chaos-ref"))
    run_reference(from_dict({"cluster": CLUSTER}).cluster, d)
    return d


@pytest.fixture(autouse=True)
def _short_run_dirs():
    """Runs whose output directory is too long for IPC socket paths put their files in /tmp/snapguard-chaos-run-*."""
    before = set(glob.glob("/tmp/snapguard-chaos-run-*"))
    yield
    for d in set(glob.glob("/tmp/snapguard-chaos-run-*")) - before:
        shutil.rmtree(d, ignore_errors=True)


def _run(tmp_path, reference, faults: list[dict], **cluster) -> dict:
    scenario = from_dict({"name": tmp_path.name, "cluster": {**CLUSTER, **cluster}, "fault": faults})
    return run_scenario(scenario, str(tmp_path), seed=7, reference_dir=reference)


def _by_kind(rep: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in rep["faults"]:
        out.setdefault(f["kind"], []).append(f)
    return out


# ---- pure: scenarios ----------------------------------------------------------------------------

def test_scenarios_refuse_unknown_keys_kinds_and_places():
    with pytest.raises(ConfigError, match="unknown \\[cluster\\] key"):
        from_dict({"cluster": {"nodez": 3}})
    with pytest.raises(ConfigError, match="known kinds"):
        from_dict({"fault": [{"kind": "meteor", "at_step": 3}]})
    with pytest.raises(ConfigError, match="rank 9 is outside"):
        from_dict({"fault": [{"kind": "kill_rank", "at_step": 3, "rank": 9}]})
    with pytest.raises(ConfigError, match="unknown parameter"):
        from_dict({"fault": [{"kind": "lose_node", "at_step": 3, "rank": 1}]})
    with pytest.raises(ConfigError, match="order of their at_step"):
        from_dict({"fault": [{"kind": "lose_node", "at_step": 5}, {"kind": "kill_rank", "at_step": 3}]})
    with pytest.raises(ConfigError, match="more than m=1"):
        from_dict({"fault": [{"kind": "lose_more_than_m", "at_step": 3, "nodes": ["node0"]}]})
    with pytest.raises(ConfigError, match="needs m >= 2 to be survivable, the cluster has m=1"):
        from_dict({"fault": [{"kind": "lose_node_in_rebuild", "at_step": 3}]})
    with pytest.raises(ConfigError, match="nodes must be an integer"):
        from_dict({"cluster": {"nodes": "3"}})
    with pytest.raises(ConfigError, match="step_sleep must be a number"):
        from_dict({"cluster": {"step_sleep": "x"}})
    with pytest.raises(ConfigError, match="worker_args must be a list of strings"):
        from_dict({"cluster": {"worker_args": "--no-rng"}})
    # faults that could never be injected as written are refused up front, not retried until the run times out
    with pytest.raises(ConfigError, match="rank 0 is not on node1"):
        from_dict({"fault": [{"kind": "corrupt_slot", "at_step": 3, "node": "node1", "rank": 0}]})
    with pytest.raises(ConfigError, match="matches no daemon-to-daemon link"):
        from_dict({"fault": [{"kind": "net_drop", "at_step": 3, "link": "node0->node7"}]})
    assert from_dict({"fault": [{"kind": "net_drop", "at_step": 3, "link": "node0->*"}]}).faults
    # values a fault could not act on (a window that never ends, a size the daemon would refuse mid-run)
    for fault, said in [({"kind": "net_drop", "duration_s": float("inf")}, r"duration_s must be in \(0, 3600\]"),
                        ({"kind": "net_duplicate", "duration_s": float("nan")}, r"duration_s must be in \(0, 3600\]"),
                        ({"kind": "net_delay", "delay_ms": -5}, r"delay_ms must be in \[0, 60000\], got -5"),
                        ({"kind": "corrupt_slot", "nbytes": 0}, "nbytes must be at least 1, got 0"),
                        ({"kind": "fill_shm", "attempts": -1}, "attempts must be at least 0, got -1"),
                        ({"kind": "fill_shm", "free": "lots"}, "free: 'lots' is not a size such as 8G")]:
        with pytest.raises(ConfigError, match=said):
            from_dict({"fault": [{**fault, "at_step": 3}]})
    assert from_dict({"fault": [{"kind": "fill_shm", "at_step": 3, "free": "1M", "attempts": 0}]}).faults


@pytest.mark.parametrize(("scenario", "said"), [
    ({"fault": {"kind": "kill_rank", "at_step": 3}}, "fault must be an array of tables"),  # [fault], not [[fault]]
    ({"fault": [1]}, "fault must be an array of tables"),
    ({"cluster": 3}, "cluster must be a table"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 1.7}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"name": 5}, "name must be a string"),
    ({"cluster": {"hang_timeout_s": math.nan}}, "hang_timeout_s must be in"),
    ({"cluster": {"hang_timeout_s": 0}}, "hang_timeout_s must be in"),
    ({"cluster": {"timeout_s": math.inf}}, "timeout_s must be in"),
    ({"cluster": {"step_sleep": -1}}, "step_sleep must be in"),
    ({"cluster": {"width": 30}}, "width must be a multiple of 4"),
    ({"cluster": {"width": 0}}, "width must be at least 4"),
    ({"cluster": {"layers": 0}}, "layers must be at least 1"),
    ({"cluster": {"max_restarts": -1}}, "max_restarts must be at least 0"),
    ({"cluster": {"slots_per_rank": 1}}, "slots_per_rank must be at least 2"),
    ({"fault": [{"kind": "kill_rank", "at_step": True}]}, "needs an integer at_step"),
    ({"cluster": {"nodes": 3, "m": 1}, "fault": [{"kind": "lose_more_than_m", "at_step": 3,
                                                  "nodes": ["node0", "node0"]}]}, "more than m=1 different nodes"),
    ({"cluster": {"nodes": 3, "m": 1}, "fault": [{"kind": "lose_more_than_m", "at_step": 3, "nodes": [["node0"], 1]}]},
     "more than m=1 different nodes"),
])
def test_scenarios_of_wrong_types_or_values_are_refused_before_anything_runs(scenario, said):
    with pytest.raises(ConfigError, match=said):
        from_dict(scenario)


@pytest.mark.parametrize("mtbf", [math.nan, math.inf, 0.0])
def test_a_random_scenario_needs_a_finite_positive_mtbf(mtbf):
    with pytest.raises(ConfigError, match="mtbf_steps > 0"):
        generate(1, 3, mtbf)


def test_a_scenario_file_of_the_wrong_shape_or_an_unusable_out_dir_is_a_usage_error_not_a_traceback(tmp_path):
    bad = tmp_path / "single.toml"
    bad.write_text('[fault]\nkind = "kill_rank"\nat_step = 3\n')
    taken = tmp_path / "a-file"
    taken.write_text("")
    for args, said in ((["--scenario", str(bad), "--out", str(tmp_path / "out")], "fault must be an array of tables"),
                       (["--out", str(taken)], f"cannot use {taken} as a directory"),
                       (["--out", str(tmp_path / "a,b")], "holds one of ',', '%', '#'")):
        proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "chaos", "run", *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["a-file", "single.toml"], "nothing ran"


def test_a_missing_scenario_file_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the scenario"):
        load(str(tmp_path / "missing.toml"))
    proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "chaos", "run", "--scenario", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read the scenario" in proc.stderr, proc.stderr[-2000:]


def test_options_of_a_random_scenario_without_faults_are_a_usage_error_not_ignored(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "chaos", "run", "--nodes", "4", "--m", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--nodes, --m only shape a random scenario: give --faults" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == [], "nothing ran"


def test_random_scenarios_are_reproducible_and_recoverable():
    a, b = generate(11, 50, 3.0), generate(11, 50, 3.0)
    assert a == b and len(a.faults) == 50
    assert all(not KINDS[f.kind](**f.params).expect_failure for f in a.faults)
    gaps = [y.at_step - x.at_step for x, y in zip(a.faults, a.faults[1:])]
    assert min(gaps) >= 2 and a.cluster.steps > a.faults[-1].at_step
    assert generate(12, 50, 3.0) != a
    # two nodes lost, one in the other's rebuild, only where m >= 2 makes it survivable
    assert "lose_node_in_rebuild" not in {f.kind for f in a.faults}
    assert "lose_node_in_rebuild" in {f.kind for f in generate(11, 50, 3.0, nodes=4, m=2).faults}


@pytest.mark.parametrize(("shape", "bad"), [({"nodes": 0}, "nodes=0"), ({"ranks_per_node": 0}, "ranks_per_node=0"),
                                            ({"nodes": 2, "m": 2}, "m=2")])
def test_a_random_scenario_of_an_impossible_shape_is_a_clear_error(tmp_path, shape, bad):
    with pytest.raises(ConfigError, match=rf"need nodes >= 2, ranks_per_node >= 1, 1 <= m < nodes.*{bad}"):
        generate(5, 3, 3.0, **shape)
    flags = [x for k, v in shape.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "chaos", "run", "--faults", "3", *flags,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "need nodes >= 2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == [], "nothing ran"


def test_duplicates_that_reach_the_next_run_of_a_daemon_that_died_count_as_refused(tmp_path):
    """A copy the proxy sends twice to a daemon that dies before it reads them reaches its next run, which refuses
    both copies of a chunk or holding as sent to its earlier run, and logs no replay: that is the duplicate refused
    too. Refusals of messages the window did not duplicate, or of another daemon's copies, count for nothing."""
    from types import SimpleNamespace

    from snapguard.chaos.faults import NetDuplicate

    twice = {("node1", "node0", 7, 41), ("node1", "node2", 9, 5), ("node2", "node0", 7, 12)}
    proxy = SimpleNamespace(stats=lambda w: {"dropped": 0, "delayed": 0, "duplicated": 3, "duplicated_requests": 3},
                            sent_twice=lambda w: set(twice))
    run = SimpleNamespace(proxy=proxy, cluster=SimpleNamespace(spec=SimpleNamespace(workdir=str(tmp_path))))
    who = "WARNING snapguard.daemon.server: [job/node1 daemon] unauthenticated or malformed peer message:"
    (tmp_path / "daemon.node1.log").write_text("\n".join([
        f"{who} PeerChunk from node0 (boot 7, seq 41) was sent to an earlier run of this daemon (boot 3, this run's"
        " is 8)",
        f"{who} PeerHeld from node2 (boot 9, seq 5) may predate this run of this daemon: its sender started before"
        " this run (boot 10) and had not heard from it",
        f"{who} PeerChunk from node0 (boot 7, seq 40) was sent to an earlier run of this daemon (boot 3, this run's"
        " is 8)",  # not one the window duplicated
    ]) + "\n")
    (tmp_path / "daemon.node2.log").write_text(
        f"{who.replace('node1', 'node2')} replayed message from node0 (boot 7, seq 12; already saw boot 7, seq 12)\n")
    f = NetDuplicate(probability=0.5)
    f.window = 1
    found = f.detect(run, {})
    assert "daemon: 1 of 3 duplicated request(s) refused as replays" in found, found
    assert ("daemon: 2 of 3 duplicated request(s) refused by the next run of a daemon that died, as sent to its"
            " earlier run") in found, found


def test_a_network_fault_whose_window_touched_no_message_is_not_judged_tolerated():
    """A drop, delay or duplication window with no daemon-to-daemon traffic in it tested nothing: the proxy's count
    of the messages it touched is the evidence each needs, so such a window fails its fault instead of passing it."""
    from types import SimpleNamespace

    from snapguard.chaos.faults import NetDelay, NetDrop, NetDuplicate

    for touched in (0, 3):
        stats = {"dropped": touched, "delayed": touched, "duplicated": touched, "duplicated_requests": 0}
        run = SimpleNamespace(proxy=SimpleNamespace(stats=lambda w: stats, sent_twice=lambda w: set()),
                              cluster=SimpleNamespace(spec=SimpleNamespace(workdir="/nonexistent")))
        for f, what in ((NetDrop(probability=0.3), "dropped"), (NetDelay(delay_ms=40), "delayed"),
                        (NetDuplicate(probability=0.5), "duplicated")):
            f.window = 1
            needs, found = f.evidence_needed(run, None), f.detect(run, {})
            assert needs == "proxy", (f.kind, needs)
            assert any(d.startswith(needs) for d in found) == bool(touched), (f.kind, found)
            assert (f"proxy: 3 message(s) {what}" in found) == bool(touched), (f.kind, found)


def test_a_network_window_that_touched_nothing_by_its_end_stays_open_until_it_does_or_its_grace_runs_out(
        monkeypatch):
    """A drop, delay or duplication window over a quiet moment (or with a low probability) would end having tested
    nothing: it stays open past its duration until it has touched a message, for at most WINDOW_GRACE_S more."""
    import snapguard.chaos.proxy as proxy_mod
    from snapguard.chaos.proxy import PeerProxy

    proxy = PeerProxy(["a", "b"], lambda node: "tcp://127.0.0.1:9", "job", b"0123456789abcdef0123456789abcdef")
    link = proxy.links["a", "b"]
    message = [b"rid", b"header", b"tag"]
    try:
        w = proxy.set_policy([("a", "b")], "delay", 1.0, 0.01, duration_s=0.05)
        time.sleep(0.1)  # its duration is over, and it touched nothing
        proxy._forward(link, "req", message)
        assert proxy.stats(w)["delayed"] == 1 and link.policy.action == "delay", "it stayed open for that message"
        proxy._forward(link, "req", message)  # over, having touched one
        assert proxy.stats(w)["delayed"] == 1 and link.policy.action == "pass"
        monkeypatch.setattr(proxy_mod, "WINDOW_GRACE_S", 0.05)
        link.queues["req"].clear()
        w = proxy.set_policy([("a", "b")], "delay", 1.0, 0.01, duration_s=0.05)
        time.sleep(0.15)  # past its duration and its grace: no traffic came at all
        proxy._forward(link, "req", message)
        assert proxy.stats(w)["delayed"] == 0 and link.policy.action == "pass"
    finally:
        for lk in proxy.links.values():
            lk.front.close(0)
            lk.back.close(0)
        proxy._gate.close()
        proxy._ctx.term()


def _descendants_once(proc: subprocess.Popen, want, timeout_s: float = 120) -> list:
    """The processes `proc` has started (recursively), once `want(their command lines)` holds."""
    import psutil

    from conftest import wait_until

    me = psutil.Process(proc.pid)

    def ready():
        assert proc.poll() is None, f"exited early with code {proc.returncode}: {proc.stdout.read()[-3000:]}"
        kids = me.children(recursive=True)
        lines = []
        for k in kids:
            try:
                lines.append(" ".join(k.cmdline()))
            except psutil.Error:
                pass
        return kids if want(lines) else None

    return wait_until(ready, timeout_s, "the processes the command starts")


def test_sigterm_stops_a_chaos_run_with_every_daemon_and_rank_it_started(tmp_path, reference):
    """A scheduler's or CI's timeout ends a run with SIGTERM: the harness must stop its daemons and ranks and free
    their shared memory as it does on Ctrl-C, not leave them running."""
    from conftest import stop_with_sigterm

    scenario = tmp_path / "s.toml"
    scenario.write_text("[cluster]\n" + "".join(f"{k} = {v!r}\n" for k, v in CLUSTER.items())
                        + '[[fault]]\nkind = "kill_rank"\nat_step = 30\n')
    proc = subprocess.Popen([sys.executable, "-m", "snapguard.cli", "chaos", "run", "--scenario", str(scenario),
                             "--reference", reference, "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        kids = _descendants_once(proc, lambda lines: sum("snapguard.daemon" in x for x in lines) == 3
                                 and sum("snapguard.demo worker" in x for x in lines) == 3)
        shm = {d for d in os.listdir("/dev/shm") if d.startswith(f"snapguard-cluster-{proc.pid}-")}
        assert shm, "the run's shared memory"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stop_with_sigterm(proc, kids, 60)
    assert not shm & set(os.listdir("/dev/shm")), "shared memory left behind"


def test_shipped_scenario_files_load():
    here = os.path.join(os.path.dirname(__file__), "..", "chaos", "scenarios")
    names = sorted(n for n in os.listdir(here) if n.endswith(".toml"))
    assert names
    for n in names:
        assert load(os.path.join(here, n)).faults


# ---- real runs ----------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_every_survivable_fault_is_detected_and_nothing_is_lost(tmp_path, reference):
    rep = _run(tmp_path, reference, [
        {"kind": "net_duplicate", "at_step": 1, "probability": 0.5, "duration_s": 4.0},
        {"kind": "kill_rank", "at_step": 3},
        {"kind": "kill_rank", "at_step": 6, "phase": "copy.mid", "rank": 1},
        {"kind": "kill_rank", "at_step": 9, "phase": "copy.done", "rank": 2},
        {"kind": "hang_rank", "at_step": 12, "rank": 0},
        {"kind": "kill_daemon", "at_step": 15, "node": "node1"},
        {"kind": "corrupt_slot", "at_step": 18, "node": "node2"},
        {"kind": "net_delay", "at_step": 21, "delay_ms": 30, "duration_s": 3.0},
        {"kind": "net_drop", "at_step": 23, "probability": 0.3, "duration_s": 3.0},
        {"kind": "lose_node", "at_step": 25, "node": "node0"},
        {"kind": "kill_rank", "at_step": 29, "phase": "restore.mid"},
        {"kind": "fill_shm", "at_step": 33, "node": "node2"},
        {"kind": "net_duplicate", "at_step": 36, "probability": 0.5, "duration_s": 2.0},
    ])
    assert rep["verdict"] == "PASS", rep["problems"]
    assert rep["completed"] and not rep["problems"]
    kinds = _by_kind(rep)
    assert set(kinds) == set(KINDS) - {"lose_more_than_m", "lose_node_in_rebuild"}  # those two: tests of their own
    for f in rep["faults"]:
        assert f["ok"] and f["detected_by"], f
    for f in kinds["kill_rank"] + kinds["hang_rank"] + kinds["lose_node"] + kinds["corrupt_slot"]:
        assert f["restarted"] and f["steps_lost"] is not None and f["steps_lost"] <= 2 and f["recovery_s"] > 0, f
    assert any("hang timeout" in d for d in kinds["hang_rank"][0]["detected_by"])
    assert any(d.startswith("supervisor: daemon of node1") for d in kinds["kill_daemon"][0]["detected_by"])
    assert "daemon: daemon.node1.log re-adopted its slots after the restart" in kinds["kill_daemon"][0]["detected_by"]
    assert "restore: checksum mismatch caught (daemon.node2.log)" in kinds["corrupt_slot"][0]["detected_by"]
    assert any(d.startswith("restore: daemon.node0.log: ") and "rebuilt step" in d
               for d in kinds["lose_node"][0]["detected_by"])
    assert any("ShmSpaceError" in d for d in kinds["fill_shm"][0]["detected_by"])
    assert kinds["fill_shm"][0]["failed_attempts"] >= 2  # the loss, then the attempt that found shm full
    restore_mid = [f for f in kinds["kill_rank"] if "restore.mid" in f["label"]][0]
    assert restore_mid["failed_attempts"] >= 2  # killed, then killed again half-way through restoring
    for f in kinds["net_duplicate"]:  # each window's refusals, not the later window's too (the logs are read to the end)
        sent = [int(re.match(r"proxy: (\d+) message\(s\) duplicated$", d)[1]) for d in f["detected_by"]
                if d.startswith("proxy: ") and d.endswith(" duplicated")]
        refused = [tuple(map(int, m.groups())) for d in f["detected_by"]
                   if (m := re.match(r"daemon: (\d+) of (\d+) duplicated request\(s\) refused as replays$", d))]
        assert len(sent) == 1 and len(refused) == 1, f
        assert 1 <= refused[0][0] <= refused[0][1] <= sent[0], f
    assert rep["proxy"]["dropped"] > 0 and rep["proxy"]["delayed"] > 0 and rep["proxy"]["duplicated"] > 0
    _assert_waited_for_redundancy(rep)
    assert os.path.getsize(rep["files"]["png"]) > 10_000
    with open(rep["files"]["json"]) as f:
        assert json.load(f)["verdict"] == "PASS"


def _assert_waited_for_redundancy(rep: dict) -> None:
    """Each fault that took data or parity away was followed by the next fault only once every daemon protected a
    newer step again: two faults closer than that are more losses at once than m covers."""
    for f, nxt in zip(rep["faults"], rep["faults"][1:]):
        if KINDS[f["kind"]].takes_redundancy:
            assert f["reprotected_s"] is not None and f["reprotected_s"] > 0, f
            assert nxt["t"] >= f["t"] + f["reprotected_s"] - 0.01, (f, nxt)


@pytest.mark.timeout(400)
def test_a_node_lost_in_another_nodes_rebuild_is_recovered_and_losing_more_than_m_is_an_expected_failure(
        tmp_path, tmp_path_factory):
    """4 nodes, m=2. A daemon is killed and ridden out, taking the parity in its memory with it. Once every daemon
    protects a newer step, node0 is lost, and the first peer to serve a piece of its rebuild is lost as it serves
    it: node0's replacement counts that peer as lost and finishes from the other two; the peer is rebuilt next, and
    nothing is lost. Then three nodes are lost at once: more than m, the job must stop with a clear error."""
    reference = str(tmp_path_factory.mktemp("chaos-ref-g4"))
    rep = _run(tmp_path, reference, [
        {"kind": "kill_daemon", "at_step": 2, "node": "node3"},
        {"kind": "lose_node_in_rebuild", "at_step": 3, "node": "node0"},
        {"kind": "lose_more_than_m", "at_step": 8},
    ], nodes=4, m=2, steps=16)
    assert rep["verdict"] == "PASS", rep["problems"]
    assert rep["expected_failure"] and not rep["completed"]
    _assert_waited_for_redundancy(rep)
    killed, first, last = rep["faults"]
    assert killed["ok"], killed
    second = first["outcome"].removeprefix("recovered; ").removesuffix(" lost in the middle of the rebuild")
    assert first["ok"] and first["restarted"] and second in ("node1", "node2", "node3"), first
    # evidence from the two replacements' logs: node0's counted the peer lost mid-rebuild; both rebuilt
    assert any(d.startswith("restore: daemon.node0.log: ") and "rebuilding step" in d
               and f"counting peer {second} as lost" in d for d in first["detected_by"]), first
    rebuilt = [d.split(": ")[1] for d in first["detected_by"] if "rebuilt step" in d]
    assert rebuilt == ["daemon.node0.log", f"daemon.{second}.log"], first
    assert last["outcome"] == "expected failure detected"
    assert any("RestoreError" in d and "cannot be rebuilt" in d for d in last["detected_by"])
    # nothing was trained after the unrecoverable loss
    assert [a for a in rep["losses"]["run"] if int(a) > last["attempt"]] == []


@pytest.mark.timeout(400)
def test_losing_more_than_m_nodes_with_persistence_restores_from_disk_and_loses_nothing(tmp_path, reference):
    rep = _run(tmp_path, reference, [
        {"kind": "kill_rank", "at_step": 3, "rank": 2},
        {"kind": "lose_more_than_m", "at_step": 13},
    ], persist_every=5)
    assert rep["verdict"] == "PASS", rep["problems"]
    assert rep["completed"] and not rep["expected_failure"]
    last = rep["faults"][-1]
    assert last["outcome"] == "recovered; restored from disk", last
    assert any(d.startswith("restore: ") and "from disk" in d for d in last["detected_by"]), last
    # the newest step every rank persisted: one in every 5, older than the loss at step 13 (or 14, 15: the
    # fault comes once every rank has logged step 13, and a rank may be ahead)
    assert last["restored_step"] in (5, 10, 15) and last["restored_step"] <= last["at_step"] + 2, last


@pytest.mark.timeout(400)
def test_a_restore_without_rng_state_or_a_crash_no_fault_explains_makes_the_verdict_fail(tmp_path, reference):
    """The harness must catch a restore that is wrong but does not crash, and a rank that dies on its own (a failure
    it did not inject, however well the job recovers): the CLI exits 1, naming losses and that restart. A rank that
    dies on its own after a network fault, which a correct system rides out, fails that fault."""
    args = ["--no-rng", "--crash-once-at", "9", "--crash-once-at", "14"]
    scenario = {"name": "broken-restore", "cluster": {**CLUSTER, "steps": 18, "worker_args": args},
                "fault": [{"kind": "kill_rank", "at_step": 4, "rank": 1},
                          {"kind": "net_delay", "at_step": 12, "delay_ms": 20, "duration_s": 1.0}]}
    path = tmp_path / "broken.toml"
    path.write_text(_toml(scenario))
    assert load(str(path)).cluster.worker_args == tuple(args)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "snapguard.cli", "chaos", "run", "--scenario", str(path), "--out",
                           str(out), "--reference", reference], capture_output=True, text=True, timeout=380)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "VERDICT: FAIL" in proc.stdout
    with open(out / "report.json") as f:
        rep = json.load(f)
    assert rep["verdict"] == "FAIL" and rep["completed"]
    assert rep["faults"][0]["outcome"] == "recovered"  # the fault itself was handled; the state was not
    assert any("loss" in p and "reference" in p for p in rep["problems"])
    assert any("final state differs" in p for p in rep["problems"])
    unexplained = [p for p in rep["problems"] if "a failure no fault explains" in p]
    assert len(unexplained) == 1 and re.fullmatch(r"attempt 2 began after a failure no fault explains, and restored"
                                                   r" step [89] after step 9", unexplained[0]), rep["problems"]
    net = rep["faults"][1]
    assert net["attempt"] == 2 and net["restarted"] and not net["ok"], net
    assert net["outcome"] == "FAIL: the ranks restarted after it and no other fault explains that: a correct system" \
        " rides it out", net
    assert any(d.startswith("proxy: ") and d.endswith(" delayed") for d in net["detected_by"]), net


@pytest.mark.timeout(400)
def test_a_restart_from_scratch_makes_the_verdict_fail(tmp_path, reference):
    """Training again from step 0 reproduces every loss and byte of the reference (the job is deterministic),
    so only the restored step shows that every snapshot was lost: the verdict must still FAIL."""
    rep = _run(tmp_path, reference, [{"kind": "kill_rank", "at_step": 6, "rank": 1}], steps=16,
               worker_args=["--amnesia"])
    assert rep["verdict"] == "FAIL" and rep["completed"]
    f = rep["faults"][0]
    assert f["restarted"] and f["restored_step"] == -1 and f["steps_lost"] >= 7, f
    assert f["outcome"].startswith("FAIL: the restart started from scratch"), f
    # the losses and the final state alone would have passed
    assert rep["problems"] == [f"fault #0 {f['label']}: {f['outcome']}"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_fifty_random_faults_over_four_nodes(tmp_path):
    """`snapguard chaos run --faults 50 --mtbf-steps 3 --nodes 4 --ranks-per-node 1 --m 2 --seed 2024` as a test."""
    scenario = generate(2024, 50, 3.0, nodes=4, ranks_per_node=1, m=2)
    rep = run_scenario(scenario, str(tmp_path), seed=2024)
    assert rep["verdict"] == "PASS", rep["problems"]
    assert len(rep["faults"]) >= 50 and all(f["ok"] for f in rep["faults"])


def _toml(d: dict) -> str:
    """The few TOML shapes scenarios use (tomllib reads, but does not write)."""
    def val(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"name = {val(d['name'])}", "[cluster]"] + [f"{k} = {val(v)}" for k, v in d["cluster"].items()]
    for f in d["fault"]:
        lines += ["[[fault]]"] + [f"{k} = {val(v)}" for k, v in f.items()]
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text)["name"] == d["name"]
    return text
