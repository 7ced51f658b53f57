"""Where erasure-coded chunks live across the nodes of an EC group, and how lost nodes are rebuilt.

Pure functions over frozen dataclasses; the daemon only carries the plans out.

An EC group has g nodes, numbered 0..g-1 (``plan_groups`` maps real node ids onto groups). Each
node's shard is split into k = g - m data chunks (``snapguard.codec.ShardChunks``). There are g
codewords, rotating like RAID-6:

- codeword c takes data chunk j (j = 0..k-1) from node ``(c + 1 + j) % g``,
- and stores its parity chunk p (p = 0..m-1) on node ``(c + 1 + k + p) % g``.

So codeword c touches every node exactly once (its k data nodes and m parity nodes are the g
nodes, each once), node n's chunk j is coded in codeword ``(n - 1 - j) % g`` and nowhere else, and
node n holds parity chunk p of codeword ``(n - 1 - k - p) % g``: m parity chunks in all. A node
keeps its own shard whole plus m parity chunks; losing any m nodes erases exactly m chunks of
every codeword, which the code rebuilds; losing more than m erases more than m chunks of every
codeword, so every lost node's shard is gone and ``recoverable`` says so.

Codeword positions follow the codec's chunk numbering: data member j is position j, parity p is
position k + p, so a recovery plan's chunks go straight into ``Codec.decode`` at their positions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from snapguard.codec.chunks import ShardChunks
from snapguard.codec.gf256 import MAX_CODEWORD
from snapguard.errors import ConfigError, UnrecoverableError

__all__ = [
    "ChunkRef",
    "Codeword",
    "CodewordRecovery",
    "RecoveryPlan",
    "StripePlan",
    "plan_groups",
    "plan_stripes",
    "recoverable",
]


@dataclass(frozen=True, order=True)
class ChunkRef:
    """One chunk of one codeword and the node that holds it.

    ``index`` is, for a data chunk, its index in the node's shard (0..k-1), and for a parity
    chunk, its parity number (0..m-1).
    """

    codeword: int
    position: int
    node: int
    parity: bool
    index: int

    def __str__(self) -> str:
        if self.parity:
            return f"parity {self.index} of codeword {self.codeword} on node {self.node}"
        return f"chunk {self.index} of node {self.node}'s shard (codeword {self.codeword})"


@dataclass(frozen=True)
class Codeword:
    """The g chunks of one codeword, in codec order: k data chunks, then m parity chunks."""

    index: int
    chunks: tuple[ChunkRef, ...]
    k: int

    @property
    def data_members(self) -> tuple[tuple[int, int], ...]:
        """``(node, chunk index in that node's shard)`` for positions 0..k-1."""
        return tuple((c.node, c.index) for c in self.chunks[: self.k])

    @property
    def parity_nodes(self) -> tuple[int, ...]:
        """The nodes holding parity chunks 0..m-1 (positions k..g-1)."""
        return tuple(c.node for c in self.chunks[self.k :])


@dataclass(frozen=True)
class StripePlan:
    """Placement of every codeword of a group of g nodes with m parity chunks per codeword."""

    g: int
    m: int
    codewords: tuple[Codeword, ...]

    @property
    def k(self) -> int:
        """Data chunks per codeword, and chunks per node shard: g - m."""
        return self.g - self.m

    def chunks_on(self, node: int) -> tuple[ChunkRef, ...]:
        """Every chunk node ``node`` holds: its k data chunks and its m parity chunks."""
        return tuple(c for word in self.codewords for c in word.chunks if c.node == node)

    def node_bytes(self, shard_len: int) -> int:
        """Bytes a node holds for a shard of ``shard_len`` bytes: k data chunks plus m parity chunks.

        That is ``g * chunk_len`` with ``chunk_len = ShardChunks(shard_len, k).chunk_len``: exactly
        ``shard_len * g / (g - m)`` when shard_len is a multiple of 64 * k, otherwise more by the
        padding, less than 64 * g bytes. (Shards of unequal length share the largest chunk_len.)
        """
        return self.g * ShardChunks(shard_len, self.k).chunk_len


@dataclass(frozen=True)
class CodewordRecovery:
    """One codeword to decode: read ``fetch`` (k surviving chunks), rebuild ``rebuild`` (the lost ones)."""

    codeword: int
    fetch: tuple[ChunkRef, ...]
    rebuild: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class RecoveryPlan:
    """How to rebuild what ``lost_nodes`` held: one entry per codeword that lost a chunk."""

    g: int
    m: int
    lost_nodes: tuple[int, ...]
    codewords: tuple[CodewordRecovery, ...]

    @property
    def lost_chunks(self) -> tuple[ChunkRef, ...]:
        """Every chunk to rebuild, data and parity."""
        return tuple(c for word in self.codewords for c in word.rebuild)

    def reads_from(self, node: int) -> tuple[ChunkRef, ...]:
        """The chunks surviving node ``node`` must send."""
        return tuple(c for word in self.codewords for c in word.fetch if c.node == node)


def plan_stripes(g: int, m: int) -> StripePlan:
    """Place the g codewords of a group of g nodes with m parity chunks each (see the module docstring)."""
    if isinstance(g, bool) or not isinstance(g, int) or not 2 <= g <= MAX_CODEWORD:
        raise ConfigError(f"EC group size g must be an int in 2..{MAX_CODEWORD}, got {g!r}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m < g:
        raise ConfigError(f"parity chunks m must be an int in 1..g-1 = 1..{g - 1} for g={g}, got {m!r}")
    k = g - m
    codewords = []
    for c in range(g):
        data = [ChunkRef(c, j, (c + 1 + j) % g, False, j) for j in range(k)]
        parity = [ChunkRef(c, k + p, (c + 1 + k + p) % g, True, p) for p in range(m)]
        codewords.append(Codeword(c, tuple(data + parity), k))
    return StripePlan(g, m, tuple(codewords))


def recoverable(plan: StripePlan, lost_nodes: Iterable[int]) -> RecoveryPlan:
    """Plan the rebuild of everything ``lost_nodes`` held, or raise UnrecoverableError.

    For each codeword that lost a chunk: fetch its k lowest-position surviving chunks (data before
    parity, so a codeword that lost only parity is simply re-encoded) and rebuild the lost ones.
    If any codeword lost more than m chunks, raises UnrecoverableError naming the nodes whose shards
    are gone and, per codeword, the chunks lost.
    """
    lost = tuple(sorted(set(lost_nodes)))
    outside = [n for n in lost if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < plan.g]
    if outside:
        raise ConfigError(f"lost nodes {outside} are not members 0..{plan.g - 1} of this g={plan.g} group")
    recoveries, beyond = [], []
    for word in plan.codewords:
        gone = tuple(c for c in word.chunks if c.node in lost)
        if len(gone) > plan.m:
            beyond.append((word, gone))
        elif gone:
            fetch = tuple(c for c in word.chunks if c.node not in lost)[: plan.k]
            recoveries.append(CodewordRecovery(word.index, fetch, gone))
    if beyond:
        unrecoverable = sorted({c.node for _, gone in beyond for c in gone if not c.parity})
        details = "; ".join(
            f"codeword {word.index} lost {len(gone)} chunks: " + ", ".join(str(c) for c in gone)
            for word, gone in beyond
        )
        raise UnrecoverableError(
            f"{len(lost)} nodes lost ({', '.join(map(str, lost))}) in an EC group of g={plan.g} that "
            f"survives at most m={plan.m}: the shards of node(s) {', '.join(map(str, unrecoverable))} "
            f"are unrecoverable. {details}"
        )
    return RecoveryPlan(plan.g, plan.m, lost, tuple(recoveries))


def plan_groups(
    nodes: Sequence[Hashable],
    g: int,
    failure_domain: Mapping[Hashable, Hashable] | None = None,
) -> tuple[tuple[Hashable, ...], ...]:
    """Partition ``nodes`` into EC groups of ``g``, never two nodes of one failure domain in a group.

    Deterministic: nodes are lined up domain by domain (domains in order of first appearance,
    nodes in input order) and dealt round-robin over the ``len(nodes) // g`` groups. A domain's
    nodes are consecutive in that line, so a domain with at most one node per group never lands
    twice in a group; that bound is also necessary, so this fails exactly when no valid partition
    exists. Without ``failure_domain`` every node
    is its own domain (node i goes to group i % groups, spreading neighbours apart).
    Group members keep input order; a group's member i is node i of ``plan_stripes``.
    """
    if isinstance(g, bool) or not isinstance(g, int) or g < 2:
        raise ConfigError(f"EC group size g must be an int >= 2, got {g!r}")
    repeated = sorted({str(n) for n, count in Counter(nodes).items() if count > 1})
    if repeated:
        raise ConfigError(f"nodes listed more than once: {', '.join(repeated)}")
    if len(nodes) % g:
        raise ConfigError(
            f"{len(nodes)} nodes do not split into EC groups of g={g}: add {g - len(nodes) % g} "
            f"or remove {len(nodes) % g} node(s), or pick a g that divides {len(nodes)}"
        )
    if failure_domain is None:
        domain = {node: node for node in nodes}
    else:
        missing = [str(n) for n in nodes if n not in failure_domain]
        if missing:
            raise ConfigError(f"failure_domain has no entry for node(s) {', '.join(missing)}")
        domain = {node: failure_domain[node] for node in nodes}
    groups = len(nodes) // g
    members: dict[Hashable, list[Hashable]] = {}
    for node in nodes:
        members.setdefault(domain[node], []).append(node)
    crowded = {d: len(ns) for d, ns in members.items() if len(ns) > groups}
    if crowded:
        worst = max(crowded.values())
        listing = ", ".join(f"domain {d!r} has {count} nodes" for d, count in crowded.items())
        raise ConfigError(
            f"cannot form {groups} EC group(s) of g={g} from {len(nodes)} nodes with no failure domain "
            f"twice in a group: {listing}, but a domain can give at most one node to each of the "
            f"{groups} group(s); need at least {worst} groups ({worst * g} nodes), a smaller g, or "
            f"those domains' nodes spread over more domains"
        )
    ordered = [node for ns in members.values() for node in ns]
    dealt: list[list[Hashable]] = [[] for _ in range(groups)]
    for i, node in enumerate(ordered):
        dealt[i % groups].append(node)
    position = {node: i for i, node in enumerate(nodes)}
    return tuple(tuple(sorted(group, key=position.__getitem__)) for group in dealt)
