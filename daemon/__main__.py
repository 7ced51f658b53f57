"""`snapguard-daemon --job ID`: the per-node snapshot daemon."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import zmq

from snapguard.config import (Endpoint, check_name, check_seconds, daemon_who, default_job, default_node,
                              default_run_dir, default_shm_dir, within)
from snapguard.daemon.peers import ENV_SECRET, load_secret
from snapguard.daemon.protect import KEEP_COMPLETE_BYTES, KEEP_COMPLETE_STEPS
from snapguard.daemon.server import AlreadyRunning, Daemon, DaemonConfig, NodeLock
from snapguard.errors import ConfigError, SnapGuardError
from snapguard.procs import ALREADY_RUNNING_EXIT

log = logging.getLogger("snapguard.daemon")

RENDEZVOUS_TIMEOUT_S = 600.0


def parse_size(text: str) -> int:
    """'8G', '512MiB', '64K', '1000000': bytes, at least 1."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
        if not 1 <= n < 1 << 62:
            raise ValueError
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8G, 512M or 65536") from None
    return int(n)


def _pairs(flag: str, items: list[str], what: str) -> dict[str, str]:
    """``NODE=VALUE`` flags into a dict, refusing a node given twice."""
    out: dict[str, str] = {}
    for item in items:
        node, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"{flag} {item!r} is not NODE={what}")
        check_name("node", node)
        if node in out:
            raise ConfigError(f"{flag} gives node {node} twice ({out[node]!r} and {value!r})")
        out[node] = value
    return out


def _check_static_group(node: str, peer_bind: str | None, peers: dict[str, str], group: tuple[str, ...],
                        ec_m: int, ec_m_given: bool) -> None:
    """Before anything starts: an EC group given with --peer/--ec-group/--ec-m is one this daemon can join."""
    if not peer_bind:
        given = [flag for flag, v in (("--peer", peers), ("--ec-group", group), ("--ec-m", ec_m_given)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} make(s) this daemon a member of an EC group, which needs --peer-bind"
                              " (the address its peers reach it at); without it the daemon would run alone, with no"
                              " erasure coding")
        return
    from snapguard.rendezvous import static_roster
    from snapguard.stripes import plan_stripes

    static_roster(node, peer_bind, tuple(peers.items()), {})  # addresses are tcp://HOST:PORT, no node twice
    members = group or tuple(sorted([node, *peers]))
    for n in members:
        check_name("node", n)
    if len(set(members)) != len(members):
        raise ConfigError(f"--ec-group {','.join(members)} names a node twice")
    if node not in members:
        raise ConfigError(f"--ec-group {','.join(members)} does not include this node ({node})")
    missing = [n for n in members if n != node and n not in peers]
    if missing:
        raise ConfigError(f"--ec-group members {missing} have no --peer NODE=ADDRESS")
    plan_stripes(len(members), ec_m)  # g and m in range


def resolve_peers(a: argparse.Namespace, job: str, node: str):
    """The flags into DaemonConfig's ``peers`` and ``ec_group``, and the rendezvous store this daemon hosts.

    Three ways, one per job: explicit ``--peer`` and ``--ec-group`` (as before); ``--peer`` with
    ``--ec-g`` and ``--failure-domain``, grouped by ``plan_groups``; or ``--rendezvous``, where the
    daemons announce themselves in a TCPStore and are grouped the same way. Returns
    ``(peers, ec_group, store)``; ``store`` is the TCPStore this daemon hosts (keep it alive) or None.
    """
    from_rendezvous = {"--peer": a.peer, "--ec-group": a.ec_group, "--failure-domain": a.failure_domain}
    needs_rendezvous = {"--nodes": a.nodes is not None, "--domain": a.domain, "--rendezvous-host": a.rendezvous_host,
                        "--rendezvous-timeout": a.rendezvous_timeout is not None}
    if a.ec_group and a.ec_g is not None:
        raise ConfigError("--ec-group lists this node's group, --ec-g computes groups of G from every node and its"
                          " failure domain: give one or the other")
    if a.ec_group and a.failure_domain:
        raise ConfigError("--failure-domain is used to compute the groups (with --ec-g), but --ec-group gives the"
                          " group explicitly: drop --ec-group")
    if a.rendezvous:
        given = [flag for flag, v in from_rendezvous.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} conflict(s) with --rendezvous: with a rendezvous every daemon"
                              " announces itself (--peer-bind, --domain) and the groups are computed from the roster")
        if a.nodes is None:
            raise ConfigError("--rendezvous needs --nodes: how many daemons of the job to wait for")
        if not a.peer_bind:
            raise ConfigError("--rendezvous needs --peer-bind: the address this daemon announces to its peers")
        from snapguard.rendezvous import Member, join, open_store, plan_peers
        from snapguard.stripes import plan_groups, plan_stripes

        # What --nodes, --ec-g and --ec-m allow is known before the rendezvous: say it now, not after waiting for
        # the others (or the rendezvous timeout); the failure domains are known only once all have joined.
        g = a.nodes if a.ec_g is None else a.ec_g
        try:
            plan_groups([str(i) for i in range(a.nodes)], g)
            plan_stripes(g, a.ec_m)
        except ConfigError as e:
            raise ConfigError(f"--nodes {a.nodes}" + ("" if a.ec_g is None else f" --ec-g {a.ec_g}")
                              + f" --ec-m {a.ec_m}: {e}") from None
        _check_bindable(a.peer_bind)
        me = Member(node, a.peer_bind, a.domain or node)
        timeout_s = RENDEZVOUS_TIMEOUT_S if a.rendezvous_timeout is None else a.rendezvous_timeout
        store = open_store(a.rendezvous, timeout_s, host=a.rendezvous_host)
        roster = join(store, job, me, a.nodes, timeout_s, {"ec_g": a.ec_g, "ec_m": a.ec_m})
        plan = plan_peers(roster, node, a.ec_g, a.ec_m)
        store = store if a.rendezvous_host else None
        how = f"{len(roster)} daemons met at {a.rendezvous}"
    else:
        given = [flag for flag, v in needs_rendezvous.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --rendezvous HOST:PORT"
                              + (" (with --peer flags give each node's domain with --failure-domain NODE=DOMAIN)"
                                 if "--domain" in given else ""))
        peers = _pairs("--peer", a.peer, "ADDRESS")
        domains = _pairs("--failure-domain", a.failure_domain, "DOMAIN")
        if a.ec_g is None and not domains:
            group = tuple(n.strip() for n in a.ec_group.split(",")) if a.ec_group else ()
            _check_static_group(node, a.peer_bind, peers, group, a.ec_m, a.ec_m_given)
            return tuple(peers.items()), group, None
        if not a.peer_bind:
            raise ConfigError("--ec-g and --failure-domain group this node with its peers: they need --peer-bind")
        from snapguard.rendezvous import plan_peers, static_roster

        roster = static_roster(node, a.peer_bind, tuple(peers.items()), domains)
        plan = plan_peers(roster, node, a.ec_g, a.ec_m)
        store = None
        how = f"{len(roster)} nodes from --peer and --failure-domain"
    log.info("%s %s; EC group %s (g=%d, m=%d), all groups %s; peers %s", daemon_who(job, node), how,
             ",".join(plan.ec_group), len(plan.ec_group), a.ec_m, " ".join(",".join(g) for g in plan.groups),
             ", ".join(f"{n}={addr}" for n, addr in plan.peers))
    return plan.peers, plan.ec_group, store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapguard-daemon", description=__doc__)
    ap.add_argument("--job", help="job id (default: $SNAPGUARD_JOB, $TORCHELASTIC_RUN_ID, 'default')")
    ap.add_argument("--node", help="node id (default: $SNAPGUARD_NODE or the host name up to its first dot;"
                    " machines named alike in different domains need one each)")
    ap.add_argument("--run-dir", help="0700 directory of the IPC socket (default: $SNAPGUARD_RUN_DIR or /tmp/snapguard-UID)")
    ap.add_argument("--shm-dir", help="where slots live (default: $SNAPGUARD_SHM_DIR or /dev/shm)")
    ap.add_argument("--shm-limit", type=parse_size, help="most shared memory this daemon may allocate, e.g. 8G")
    ap.add_argument("--slots-per-rank", type=int, help="shared-memory slots per rank (default: 2, or 3 with"
                    " --peer-bind: the protected step, the newest sealed one, and one to write, so that training"
                    " never waits for protection)")
    ap.add_argument("--hash-threads", type=int, help="threads that verify a sealed shard's checksums (default:"
                    " half the cores, 1 to 8)")
    ap.add_argument("--keep-on-exit", action="store_true", help="leave the slots in shared memory when stopping")
    ap.add_argument("--persist-dir", help="also write sealed steps to this directory, in the background, and restore"
                    " from it when memory holds no step that every rank can restore (a shared file system serves a"
                    " job of several nodes)")
    ap.add_argument("--persist-every", type=int, metavar="N", help="with --persist-dir: write one step"
                    " in every N of each rank (default: 100)")
    ap.add_argument("--persist-keep", type=int, metavar="K", help="with --persist-dir: keep the newest K"
                    " persisted steps of each rank (default: 2)")
    ap.add_argument("--peer-bind", help="TCP address peers reach this daemon at, e.g. tcp://10.0.0.5:7100")
    ap.add_argument("--peer", action="append", default=[], metavar="NODE=ADDRESS",
                    help="another daemon of the job (repeat for each)")
    ap.add_argument("--ec-group", help="comma-separated nodes of this node's EC group, same order on every member"
                    " (default: this node and every peer, sorted)")
    ap.add_argument("--ec-g", type=int, help="EC group size: split the job's nodes into groups of G, no failure"
                    " domain twice in a group (default: every node in one group)")
    ap.add_argument("--failure-domain", action="append", default=[], metavar="NODE=DOMAIN",
                    help="with --peer: the failure domain (rack, switch, host) of each node, this one included"
                    " (default: every node its own)")
    ap.add_argument("--ec-m", type=int, help="parity chunks per codeword: lost nodes the group survives (default: 1)")
    ap.add_argument("--ec-keep-mib", type=int, metavar="MIB",
                    help="complete parity kept of steps newer than the group's protected one, per parity chunk held,"
                    f" once more than the newest {KEEP_COMPLETE_STEPS} are kept (default: {KEEP_COMPLETE_BYTES >> 20})")
    ap.add_argument("--rendezvous", metavar="HOST:PORT", help="meet the job's other daemons in the torch.distributed"
                    " TCPStore at HOST:PORT instead of listing them with --peer")
    ap.add_argument("--nodes", type=int, help="with --rendezvous: how many daemons the job has")
    ap.add_argument("--domain", help="with --rendezvous: this node's failure domain (default: the node id)")
    ap.add_argument("--rendezvous-host", action="store_true", help="host the TCPStore at --rendezvous in this daemon"
                    " (tests, small jobs: the store lives and dies with it, so if this daemon restarts or its node is"
                    " lost, the new one finds an empty store and waits for daemons that do not join again)")
    ap.add_argument("--rendezvous-timeout", type=float,
                    help=f"seconds to wait for every daemon to join (default: {RENDEZVOUS_TIMEOUT_S:.0f})")
    ap.add_argument("--secret-file", help=f"file (0600) with the job's secret for peer traffic (default: ${ENV_SECRET})")
    ap.add_argument("--peer-timeout", type=float, help="seconds before a silent peer counts as lost"
                    " (default: 10)")
    ap.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    a = ap.parse_args(argv)
    a.ec_m_given, a.ec_m = a.ec_m is not None, 1 if a.ec_m is None else a.ec_m
    logging.basicConfig(level=a.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job, node = default_job(a.job), default_node(a.node)
        if a.hash_threads is not None and a.hash_threads < 1:
            raise ConfigError(f"--hash-threads must be at least 1, got {a.hash_threads}")
        for flag, value in (("--persist-every", a.persist_every), ("--persist-keep", a.persist_keep)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1 step, got {value}")
        if a.ec_keep_mib is not None and a.ec_keep_mib < 0:
            raise ConfigError(f"--ec-keep-mib must be 0 or more, got {a.ec_keep_mib}")
        for flag, secs in (("--peer-timeout", a.peer_timeout), ("--rendezvous-timeout", a.rendezvous_timeout)):
            if secs is not None:
                check_seconds(flag, secs)
        # A flag that only means something with another one would be ignored without it: say so instead.
        for needed, given, flags in (("--peer-bind", a.peer_bind, (("--secret-file", a.secret_file),
                                                                   ("--peer-timeout", a.peer_timeout),
                                                                   ("--ec-keep-mib", a.ec_keep_mib))),
                                     ("--persist-dir", a.persist_dir, (("--persist-every", a.persist_every),
                                                                       ("--persist-keep", a.persist_keep)))):
            unused = [flag for flag, value in flags if value is not None]
            if unused and not given:
                raise ConfigError(f"{', '.join(unused)} need(s) {needed}: without it this daemon would ignore them")
        secret = load_secret(a.secret_file) if a.peer_bind else b""  # before a rendezvous: fail alone, not the job
        run_dir = default_run_dir(a.run_dir)
        # The node's lock before the rendezvous: a second daemon of this job and node stops here, without joining.
        lock = NodeLock(Endpoint(job, node, run_dir))
        try:
            peers, group, store = resolve_peers(a, job, node)  # noqa: F841 (a hosted store lives with the daemon)
            cfg = DaemonConfig(job, node, run_dir,
                               default_shm_dir(a.shm_dir), a.shm_limit, a.slots_per_rank, not a.keep_on_exit,
                               hash_threads=a.hash_threads,
                               peer_bind=a.peer_bind, peers=peers, ec_group=group, ec_m=a.ec_m,
                               ec_keep_bytes=KEEP_COMPLETE_BYTES if a.ec_keep_mib is None else a.ec_keep_mib << 20,
                               secret=secret, persist_dir=a.persist_dir,
                               **{k: v for k, v in (("peer_timeout_s", a.peer_timeout),  # else DaemonConfig's default
                                                    ("persist_every", a.persist_every),
                                                    ("persist_keep", a.persist_keep)) if v is not None})
            d = Daemon(cfg)
        except BaseException:
            lock.release()
            raise
        try:
            d.start(lock)
        except BaseException:
            d.abandon()  # releases the lock too
            raise
    except AlreadyRunning as e:
        print(e, file=sys.stderr)
        return ALREADY_RUNNING_EXIT
    except (SnapGuardError, zmq.ZMQError, OSError) as e:  # a busy --peer-bind port, an unusable directory
        print(f"snapguard-daemon: {_naming_its_option(a, e)}", file=sys.stderr)
        return 2
    d.serve_forever()
    return 0


def _check_bindable(address: str) -> None:
    """Listen at `address` once, before the rendezvous announces it to the other daemons: a port in use is said now.
    Found only when the daemon starts to serve, it stopped the daemon after the others had planned with the address,
    and the rendezvous then refuses this node at any other one."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            raise ConfigError(f"--peer-bind {address}: cannot listen there: {os.strerror(e.errno)}; this daemon did"
                              " not join the rendezvous") from None
        finally:
            sock.close(0)
    finally:
        ctx.term()


def _naming_its_option(a: argparse.Namespace, e: Exception) -> str:
    """`e`, led by the option whose directory (or a directory in it, or above it) it could not use: an OSError names
    only the path."""
    where = getattr(e, "filename", None)
    if not isinstance(where, str):
        return str(e)
    where = os.path.abspath(where)
    for flag, path in (("--persist-dir", a.persist_dir), ("--shm-dir", default_shm_dir(a.shm_dir)),
                       ("--run-dir", default_run_dir(a.run_dir))):
        path = path and os.path.abspath(path)
        if path and (within(where, path) or within(path, where)):
            return f"cannot use the {flag} directory {path}: {e}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
