"""Stripe placement and recovery planning, checked by executing plans with the real codec."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapguard.codec import Codec, ShardChunks
from snapguard.errors import ConfigError, UnrecoverableError
from snapguard.stripes import ChunkRef, StripePlan, plan_groups, plan_stripes, recoverable

GROUPS = [(g, m) for g in range(2, 13) for m in range(1, g)]


@st.composite
def group_and_losses(draw: st.DrawFn, extra: int) -> tuple[int, int, list[int]]:
    """A (g, m) and a set of lost nodes: at most m of them (extra=0), or exactly m + 1 (extra=1)."""
    g = draw(st.integers(2, 10))
    m = draw(st.integers(1, g - 1))
    size = draw(st.integers(0, m)) if extra == 0 else m + extra
    lost = draw(st.lists(st.integers(0, g - 1), min_size=size, max_size=size, unique=True))
    return g, m, lost


@pytest.mark.parametrize(("g", "m"), GROUPS)
def test_every_chunk_is_coded_once_and_every_node_holds_m_parity(g: int, m: int) -> None:
    plan = plan_stripes(g, m)
    k = g - m
    assert plan.k == k and len(plan.codewords) == g
    coded = []
    parity_held = {n: 0 for n in range(g)}
    for c, word in enumerate(plan.codewords):
        assert word.index == c and [ref.position for ref in word.chunks] == list(range(g))
        data_nodes = [node for node, _ in word.data_members]
        assert len(word.data_members) == k and len(word.parity_nodes) == m
        assert sorted(data_nodes + list(word.parity_nodes)) == list(range(g)), "a codeword touches every node once"
        coded.extend(word.data_members)
        for node in word.parity_nodes:
            parity_held[node] += 1
    assert sorted(coded) == [(n, j) for n in range(g) for j in range(k)]
    assert parity_held == {n: m for n in range(g)}


@pytest.mark.parametrize(("g", "m"), GROUPS)
def test_memory_per_node_is_shard_times_g_over_g_minus_m(g: int, m: int) -> None:
    plan = plan_stripes(g, m)
    k = g - m
    for node in range(g):
        held = plan.chunks_on(node)
        assert sum(not c.parity for c in held) == k and sum(c.parity for c in held) == m
    for shard_len in [0, 1, 64 * k, 64 * k * 1000, 64 * k * 1000 + 1, 12_345_679]:
        chunk_len = ShardChunks(shard_len, k).chunk_len
        held_bytes = plan.node_bytes(shard_len)
        assert held_bytes == (k + m) * chunk_len
        # Exactly shard * g / (g - m) when the shard fills whole 64-byte-aligned chunks...
        assert held_bytes * k >= shard_len * g
        if shard_len % (64 * k) == 0:
            assert held_bytes * k == shard_len * g
        # ...and never more than the padding (< 64 bytes per chunk) above it.
        assert held_bytes * k < shard_len * g + 64 * g * k


def run_recovery(plan: StripePlan, lost: list[int], shard_len: int, seed: int) -> None:
    """Encode random node shards per the plan, drop the lost nodes, and rebuild from fetched chunks only."""
    codec = Codec(plan.k, plan.m)
    layout = ShardChunks(shard_len, plan.k)
    rng = np.random.default_rng(seed)
    shards = [rng.integers(0, 256, shard_len, dtype=np.uint8) for _ in range(plan.g)]
    chunks = [layout.split(shard) for shard in shards]
    held: dict[int, dict[tuple[bool, int, int], np.ndarray]] = {n: {} for n in range(plan.g)}
    for word in plan.codewords:
        data = [chunks[node][j] for node, j in word.data_members]
        parity = [np.empty(layout.chunk_len, dtype=np.uint8) for _ in range(plan.m)]
        codec.encode(data, parity)
        for ref, buf in zip(word.chunks, data + parity):
            held[ref.node][(ref.parity, ref.codeword, ref.index)] = buf
    original = {n: dict(held[n]) for n in lost}
    for node in lost:
        del held[node]

    recovery = recoverable(plan, lost)
    assert recovery.lost_nodes == tuple(sorted(lost))
    rebuilt_refs = []
    for word in recovery.codewords:
        assert len(word.fetch) == plan.k
        entries: list[np.ndarray | None] = [None] * plan.g
        for ref in word.fetch:
            # A KeyError here would mean the plan fetches from a lost node.
            entries[ref.position] = held[ref.node][(ref.parity, ref.codeword, ref.index)]
        out = {ref.position: np.empty(layout.chunk_len, dtype=np.uint8) for ref in word.rebuild}
        codec.decode(entries, out)
        for ref in word.rebuild:
            assert out[ref.position].tobytes() == original[ref.node][(ref.parity, ref.codeword, ref.index)].tobytes()
            rebuilt_refs.append(ref)
    # Everything the lost nodes held was rebuilt, exactly once; their shards come back whole.
    assert sorted(rebuilt_refs) == sorted(ref for n in lost for ref in plan.chunks_on(n))
    for node in lost:
        restored = np.zeros(shard_len, dtype=np.uint8)
        layout.join([original[node][(False, ref.codeword, ref.index)] for ref in sorted(
            (r for r in plan.chunks_on(node) if not r.parity), key=lambda r: r.index)], restored)
        assert np.array_equal(restored, shards[node])


@settings(max_examples=100, deadline=None)
@given(case=group_and_losses(extra=0), shard_len=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_up_to_m_lost_nodes_are_rebuilt_byte_for_byte(
    case: tuple[int, int, list[int]], shard_len: int, seed: int
) -> None:
    g, m, lost = case
    run_recovery(plan_stripes(g, m), lost, shard_len, seed)


def test_every_loss_of_m_nodes_is_recoverable_exhaustively() -> None:
    for g, m in [(3, 1), (4, 2), (5, 2), (6, 3), (8, 2)]:
        plan = plan_stripes(g, m)
        for lost in itertools.combinations(range(g), m):
            run_recovery(plan, list(lost), 200, seed=g * 100 + m)


@settings(max_examples=100, deadline=None)
@given(case=group_and_losses(extra=1))
def test_more_than_m_lost_nodes_are_reported_unrecoverable(case: tuple[int, int, list[int]]) -> None:
    g, m, lost = case
    plan = plan_stripes(g, m)
    with pytest.raises(UnrecoverableError) as info:
        recoverable(plan, lost)
    message = str(info.value)
    named = re.search(r"the shards of node\(s\) ([\d, ]+) are unrecoverable", message)
    assert named, message
    # Every codeword spans all g nodes, so each lost node's chunks sit in codewords that lost m + 1.
    assert sorted(int(n) for n in named.group(1).split(", ")) == sorted(lost)
    for word in plan.codewords:
        gone = [ref for ref in word.chunks if ref.node in lost]
        assert f"codeword {word.index} lost {len(gone)} chunks: " + ", ".join(map(str, gone)) in message


def test_unrecoverable_message_reads_well() -> None:
    with pytest.raises(UnrecoverableError) as info:
        recoverable(plan_stripes(3, 1), [0, 2])
    assert str(info.value).startswith(
        "2 nodes lost (0, 2) in an EC group of g=3 that survives at most m=1: "
        "the shards of node(s) 0, 2 are unrecoverable. codeword 0 lost 2 chunks: "
        "chunk 1 of node 2's shard (codeword 0), parity 0 of codeword 0 on node 0; "
    )


def test_losing_nothing_needs_nothing() -> None:
    recovery = recoverable(plan_stripes(4, 2), [])
    assert recovery.codewords == () and recovery.lost_chunks == ()


def test_fetches_come_from_survivors_only_and_prefer_data() -> None:
    plan = plan_stripes(6, 2)
    recovery = recoverable(plan, [1, 4])
    for word in recovery.codewords:
        assert all(ref.node not in (1, 4) for ref in word.fetch)
        assert [ref.position for ref in word.fetch] == sorted(ref.position for ref in word.fetch)
    assert all(ref.node == 0 for ref in recovery.reads_from(0)) and recovery.reads_from(1) == ()
    assert recovery.lost_chunks[0] == ChunkRef(0, 0, 1, False, 0)


@pytest.mark.parametrize(
    ("g", "m", "message"),
    [
        (1, 1, "g must be an int in 2..255, got 1"),
        (4, 4, r"m must be an int in 1..g-1 = 1..3 for g=4, got 4"),
        (4, 0, "got 0"),
        (256, 1, "got 256"),
    ],
)
def test_plan_stripes_refuses_bad_sizes(g: int, m: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_stripes(g, m)


def test_recoverable_refuses_strangers() -> None:
    with pytest.raises(ConfigError, match=r"lost nodes \[4\] are not members 0..3 of this g=4 group"):
        recoverable(plan_stripes(4, 1), [4])


# --- grouping nodes ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    groups=st.integers(1, 6),
    g=st.integers(2, 6),
    domains=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_groups_never_share_a_failure_domain_and_fail_only_when_impossible(
    groups: int, g: int, domains: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    nodes = [f"node{i}" for i in range(groups * g)]
    domain = {n: f"rack{rng.integers(0, domains)}" for n in nodes}
    largest = max(list(domain.values()).count(d) for d in set(domain.values()))
    if largest > groups:
        with pytest.raises(ConfigError, match=f"has {largest} nodes.*a domain can give at most one node"):
            plan_groups(nodes, g, domain)
        return
    result = plan_groups(nodes, g, domain)
    assert len(result) == groups and all(len(group) == g for group in result)
    assert sorted(n for group in result for n in group) == sorted(nodes)
    for group in result:
        assert len({domain[n] for n in group}) == g
        assert list(group) == sorted(group, key=nodes.index)


def test_groups_without_domains_and_refusals() -> None:
    assert plan_groups([0, 1, 2, 3, 4, 5], 3) == ((0, 2, 4), (1, 3, 5))
    with pytest.raises(ConfigError, match="7 nodes do not split into EC groups of g=3: add 2 or remove 1"):
        plan_groups(list(range(7)), 3)
    with pytest.raises(ConfigError, match="nodes listed more than once: a"):
        plan_groups(["a", "a", "b", "c"], 2)
    with pytest.raises(ConfigError, match="failure_domain has no entry for node\\(s\\) d"):
        plan_groups(["a", "b", "c", "d"], 2, {"a": 1, "b": 2, "c": 1})
    with pytest.raises(ConfigError, match=r"domain 'r1' has 3 nodes.*need at least 3 groups \(12 nodes\)"):
        plan_groups(list("abcdefgh"), 4, dict(zip("abcdefgh", ["r1", "r1", "r1", "r2", "r2", "r3", "r4", "r5"])))
