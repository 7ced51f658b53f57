"""Daemons find their peers and EC group through a rendezvous in torch.distributed's TCPStore.

Every daemon of a job is started with the same store address and the number of daemons to wait for.
Each one publishes who it is (node name, the address its peers reach it at, its failure domain) under
keys namespaced by the job, waits until every daemon has joined, and reads back the full roster.
``plan_peers`` then turns the roster into the daemon's peers and EC group: a pure function of the
roster, so every daemon computes the same groups. Static configuration (``--peer`` flags) goes
through the same planner with ``static_roster``.

Keys, all under ``snapguard/<job>/``:

- ``settings``: what the first daemon to join expected (number of nodes, g, m); a daemon that
  expects something else is refused, so one typo cannot split a job into two plans.
- ``slot/<i>`` for i in 0..nodes-1: the node name that claimed the slot (``compare_set`` from empty,
  linear probing from a hash of the name). A node that joins again (a replacement after a node
  loss, or a restarted daemon) walks the same probe sequence and finds its own slot before any empty
  one, so it never counts twice; a node that finds every slot taken by others is refused.
- ``member/<node>``: the node's record (JSON), written before it claims its slot, so a record
  exists for every claimed slot. A node that joins again at the same address overwrites its record; a
  daemon whose record would replace one at another address (two daemons given one node name, or a
  node come back elsewhere) is refused with a ConfigError naming both addresses, checked before it
  writes its record and again in the roster it reads back (the other may have written in between).
- ``joins/<node>``: how many times the node joined (for the log: a second join is a rejoin).

Nothing read from the store is trusted: records are JSON (never pickle) of bounded size, and every
field is checked (types, lengths, node names and failure domains with ``check_name``, the address
shape) before use; a bad value is a ProtocolError naming its key.

Security: the store is unauthenticated; anyone who can reach it can write keys. Peer traffic stays
authenticated with the job's secret (a MAC on every message, ``snapguard.daemon.peers``), so a
poisoned roster can only cause a denial of service, never a wrong restore: an address it plants
leads to a process that cannot authenticate with the secret; groups it makes inconsistent (or
failure domains it fakes) leave steps unprotected, because daemons refuse chunks that do not fit
their own plan, and a rebuilt shard is sealed only if it matches the checksums of its manifest.

A replacement daemon rejoins under its node's name and gets the roster at once. The other daemons
read the roster once, when they start: a replacement must come back at the address they know (the
same host name or IP and port), as a replacement node does when it takes over the lost one's name.
The store must outlive node losses: host it where the job's launcher runs, or on a node whose loss
ends the job anyway (``--rendezvous-host`` on one daemon is for tests and small jobs). Use a fresh
store or a fresh job id per job: a job's keys are never removed.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from snapguard.config import check_name
from snapguard.errors import ConfigError, ProtocolError, SnapGuardError
from snapguard.stripes import plan_groups, plan_stripes

log = logging.getLogger(__name__)

PREFIX = "snapguard"
VERSION = 1
MAX_VALUE_BYTES = 4096  # a record is ~100 bytes; anything longer is not one of ours
_ADDRESS = re.compile(r"^tcp://[A-Za-z0-9_.:\[\]-]{1,253}:[0-9]{1,5}$")


class RendezvousError(SnapGuardError):
    """The daemons did not meet: the store is unreachable, or not every node joined in time."""


@dataclass(frozen=True, order=True)
class Member:
    """One daemon of the job, as it announced itself."""

    node: str
    address: str  # where its peers reach it, e.g. tcp://10.0.0.5:7100
    domain: str  # its failure domain: no two members of an EC group share one

    def __post_init__(self) -> None:
        check_name("node", self.node)
        check_name("failure domain", self.domain)
        if not isinstance(self.address, str) or not _ADDRESS.match(self.address):
            raise ConfigError(f"node {self.node}: peer address {self.address!r} is not tcp://HOST:PORT")

    def to_wire(self) -> bytes:
        return _encode({"v": VERSION, "node": self.node, "address": self.address, "domain": self.domain})

    @classmethod
    def from_wire(cls, data: bytes, key: str) -> "Member":
        """Decode and check a record read from ``key``; a ProtocolError names the key and what is wrong."""
        d = _decode(data, key)
        if set(d) != {"v", "node", "address", "domain"}:
            raise ProtocolError(f"rendezvous key {key}: expected fields address, domain, node, v; got {sorted(d)}")
        if d["v"] != VERSION:
            raise ProtocolError(f"rendezvous key {key}: record version {d['v']!r}, this daemon reads {VERSION}")
        for name in ("node", "address", "domain"):
            if not isinstance(d[name], str):
                raise ProtocolError(f"rendezvous key {key}: {name} must be a string, got {type(d[name]).__name__}")
        try:
            return cls(d["node"], d["address"], d["domain"])
        except ConfigError as e:
            raise ProtocolError(f"rendezvous key {key}: {e}") from None


@dataclass(frozen=True)
class PeerPlan:
    """A daemon's share of the plan: every other daemon of the job, and its own EC group."""

    peers: tuple[tuple[str, str], ...]  # (node, address) of every other daemon: held steps go to all of them
    ec_group: tuple[str, ...]  # this node's group, in the same order on every member
    groups: tuple[tuple[str, ...], ...]  # every group of the job


def plan_peers(roster: Sequence[Member], node: str, g: int | None, m: int) -> PeerPlan:
    """This node's peers and EC group, from the roster every daemon of the job holds.

    Pure and deterministic: nodes are sorted by name and grouped by ``plan_groups`` (groups of ``g``,
    default all nodes in one group, no failure domain twice in a group), so every daemon computes the
    same groups from the same roster.
    """
    names = sorted(x.node for x in roster)
    if node not in names:
        raise ConfigError(f"node {node} is not in the roster ({', '.join(names)})")
    g = len(names) if g is None else g
    groups = plan_groups(names, g, {x.node: x.domain for x in roster})
    plan_stripes(g, m)  # m must fit g: refused here with the planner's message, not later in the daemon
    group = next(grp for grp in groups if node in grp)
    peers = tuple(sorted((x.node, x.address) for x in roster if x.node != node))
    return PeerPlan(peers, tuple(group), tuple(tuple(grp) for grp in groups))


def static_roster(node: str, address: str, peers: Sequence[tuple[str, str]],
                  domains: Mapping[str, str]) -> tuple[Member, ...]:
    """The roster of a statically configured job: this node, its ``--peer`` list and ``--failure-domain`` map.

    Without ``domains`` every node is its own failure domain. With them, every node needs an entry,
    and every entry must name a known node: a forgotten or misspelt node would silently become a
    domain of its own.
    """
    nodes = [node, *(n for n, _ in peers)]
    repeated = sorted({n for n in nodes if nodes.count(n) > 1})
    if repeated:
        raise ConfigError(f"node(s) {', '.join(repeated)} listed more than once (this node is {node})")
    unknown = sorted(set(domains) - set(nodes))
    if unknown:
        raise ConfigError(f"--failure-domain names node(s) {', '.join(unknown)}, which are neither this node ({node})"
                          f" nor a --peer")
    if domains:
        missing = [n for n in sorted(nodes) if n not in domains]
        if missing:
            raise ConfigError(f"--failure-domain is given for some nodes but not for {', '.join(missing)}: give one"
                              f" for every node, or none (then every node is its own domain)")
    addresses = {node: address, **dict(peers)}
    return tuple(sorted(Member(n, addresses[n], domains.get(n, n)) for n in nodes))


# ---- the store ------------------------------------------------------------------------------------


def parse_store_address(text: str, host: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) of a TCPStore; port 0 (any free port) only to host one."""
    hostname, sep, port = text.rpartition(":")
    hostname = hostname.removeprefix("[").removesuffix("]")
    lowest = 0 if host else 1
    if not sep or not hostname or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ConfigError(f"rendezvous address {text!r} is not HOST:PORT with a port in {lowest}..65535")
    return hostname, int(port)


def open_store(address: str, timeout_s: float, host: bool = False):
    """Connect to the TCPStore at ``address`` (HOST:PORT), or host it there when ``host``; return the store.

    Connecting retries until ``timeout_s``; the store's own timeout (for ``get``) is ``timeout_s`` too.
    A hosted store lives as long as the returned object: keep it for the life of the daemon.
    """
    from torch.distributed import DistError, TCPStore  # torch only when a rendezvous is asked for

    hostname, port = parse_store_address(address, host)
    try:
        return TCPStore(hostname, port, None, host, timedelta(seconds=timeout_s), wait_for_workers=False)
    except DistError as e:
        what = f"host the rendezvous store on {address}" if host else f"reach the rendezvous store at {address}"
        raise RendezvousError(f"cannot {what} within {timeout_s:g} s: {_first_line(e)}") from None


def key(job: str, *parts: object) -> str:
    """A store key of ``job``: ``snapguard/<job>/<part>/...``."""
    return "/".join([PREFIX, job, *map(str, parts)])


def join(store, job: str, me: Member, nodes: int, timeout_s: float,
         settings: Mapping[str, int | None] | None = None) -> tuple[Member, ...]:
    """Announce ``me`` in ``store``, wait until ``nodes`` daemons of ``job`` have joined; return them, sorted.

    Called by every daemon of the job, once per start. ``settings`` (e.g. g and m) must be the same
    on every daemon: the first to join records them with the number of nodes, later ones are
    checked against them. Raises RendezvousError when fewer than ``nodes`` joined within
    ``timeout_s``, naming who has joined; ConfigError when this daemon disagrees with the job's
    settings, every slot belongs to other nodes, or another daemon of its node name joined at
    another address; ProtocolError for a value in the store that is
    not one of ours.
    """
    from torch.distributed import DistError

    check_name("job", job)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"the number of nodes to wait for must be an int >= 1, got {nodes!r}")
    who = f"[{job}/{me.node} rendezvous]"
    t0 = time.monotonic()
    wanted = {"v": VERSION, "nodes": nodes, **(settings or {})}
    try:
        _agree(store, job, wanted)
        _check_same_daemon(store, job, me)
        store.set(key(job, "member", me.node), me.to_wire())
        slot = _claim_slot(store, job, me.node, nodes)
        count = store.add(key(job, "joins", me.node), 1)
        log.info("%s %s slot %d of %d; waiting up to %g s for the others", who,
                 "joined as" if count == 1 else f"rejoined (join {count} of this node) in its", slot, nodes, timeout_s)
        slots = [key(job, "slot", i) for i in range(nodes)]
        try:
            store.wait(slots, timedelta(seconds=max(0.001, timeout_s - (time.monotonic() - t0))))
        except DistError:
            joined = [_slot_name(store, job, i) for i in range(nodes) if store.check([key(job, "slot", i)])]
            raise RendezvousError(
                f"{who} waited {timeout_s:g} s for {nodes} daemons of job {job} to join the rendezvous: "
                f"{len(joined)} of {nodes} joined ({', '.join(sorted(joined))}), {nodes - len(joined)} still missing"
            ) from None
        roster = []
        for i in range(nodes):
            name = _slot_name(store, job, i)
            where = key(job, "member", name)
            if not store.check([where]):  # every node writes its record before it claims a slot
                raise ProtocolError(f"rendezvous key {key(job, 'slot', i)} names node {name}, which has no record")
            member = Member.from_wire(store.get(where), where)
            if member.node != name:
                raise ProtocolError(f"rendezvous key {where} holds the record of node {member.node}, not of {name}")
            roster.append(member)
        mine = next((x for x in roster if x.node == me.node), None)
        if mine is None:  # our slot is ours (claimed above): its record can only be missing if the store lies
            raise ProtocolError(f"{who} node {me.node} is not in the roster it joined"
                                f" ({', '.join(sorted(x.node for x in roster))})")
        # another daemon of this name may have written its record between our check and our set
        _refuse_other_daemon(job, me, mine, "joined while this one was joining")
    except DistError as e:
        raise RendezvousError(f"{who} lost the rendezvous store: {_first_line(e)}") from None
    log.info("%s all %d daemons joined in %.1f s: %s", who, nodes, time.monotonic() - t0,
             ", ".join(f"{x.node}={x.address} ({x.domain})" for x in sorted(roster)))
    return tuple(sorted(roster))


def _agree(store, job: str, wanted: dict) -> None:
    mine = _encode(wanted)
    got = store.compare_set(key(job, "settings"), "", mine.decode())
    if got != mine:
        theirs = _decode(got, key(job, "settings"))
        diff = ", ".join(f"{k}={theirs.get(k)!r} (this daemon: {wanted.get(k)!r})"
                         for k in sorted(set(theirs) | set(wanted)) if theirs.get(k) != wanted.get(k))
        raise ConfigError(f"job {job}'s rendezvous was started with other settings: {diff}; every daemon of a job"
                          f" must be given the same --nodes, --ec-g and --ec-m")


def _check_same_daemon(store, job: str, me: Member) -> None:
    """Refuse to join when ``member/<node>`` already holds another address (see ``_refuse_other_daemon``)."""
    where = key(job, "member", me.node)
    if store.check([where]):
        theirs = Member.from_wire(store.get(where), where)
        if theirs.node != me.node:
            raise ProtocolError(f"rendezvous key {where} holds the record of node {theirs.node}, not of {me.node}")
        _refuse_other_daemon(job, me, theirs, "has joined already")


def _refuse_other_daemon(job: str, me: Member, theirs: Member, when: str) -> None:
    """ConfigError when ``theirs``, the store's record of ``me.node``, is a daemon at another address or in another
    failure domain.

    A daemon of the same node at the same address (a restarted daemon, or a replacement node that took over
    the lost one's name and address) is the same member and may rejoin. One at another address is not: it
    would overwrite the other's record, both would count as one node, and the peers, which read the roster
    once, would never find it there.
    """
    if theirs.address != me.address:
        raise ConfigError(
            f"job {job}'s rendezvous: node {me.node} at {me.address} cannot join: a daemon of node {me.node} at"
            f" {theirs.address} {when}. Two daemons cannot share a node name (the default is the short"
            f" host name): give each a unique --node. A node that joins again must come back at the address its"
            f" peers know ({theirs.address})")
    if theirs.domain != me.domain:  # the others planned their groups with the domain it joined with first
        raise ConfigError(
            f"job {job}'s rendezvous: node {me.node} cannot join in failure domain {me.domain!r}: a daemon of node"
            f" {me.node} {when} in domain {theirs.domain!r}, and the job's EC groups were planned with it. A node"
            f" that joins again must give the same --domain ({theirs.domain!r}; the default is the node id)")


def _claim_slot(store, job: str, node: str, nodes: int) -> int:
    start = zlib.crc32(node.encode()) % nodes
    taken = []
    for i in range(nodes):
        slot = (start + i) % nodes
        got = store.compare_set(key(job, "slot", slot), "", node)
        name = _check_slot(got, key(job, "slot", slot))
        if name == node:
            return slot
        taken.append(name)
    raise ConfigError(f"job {job}'s rendezvous is full: its {nodes} slots belong to {', '.join(sorted(taken))},"
                      f" and node {node} is not one of them")


def _slot_name(store, job: str, i: int) -> str:
    return _check_slot(store.get(key(job, "slot", i)), key(job, "slot", i))


def _check_slot(data: bytes, where: str) -> str:
    try:
        return check_name("node", data.decode("ascii"))
    except (UnicodeDecodeError, ConfigError) as e:
        raise ProtocolError(f"rendezvous key {where}: {data[:80]!r} is not a node name: {e}") from None


def _encode(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _decode(data: bytes, where: str) -> dict:
    if len(data) > MAX_VALUE_BYTES:
        raise ProtocolError(f"rendezvous key {where}: {len(data)} bytes, more than the {MAX_VALUE_BYTES} a record may have")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"rendezvous key {where}: {data[:80]!r} is not a JSON record: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError(f"rendezvous key {where}: expected a JSON object, got {type(d).__name__}")
    return d


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
