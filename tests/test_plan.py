"""Restore agreement: the newest step every rank holds, and ranks that disagree are an error."""

from __future__ import annotations

import itertools
import random

import pytest

from snapguard.errors import RestoreError
from snapguard.plan import check_agreement, plan_restore


def test_newest_step_every_rank_holds():
    plan = plan_restore({0: [4, 5], 1: [5, 6], 2: [4, 5], 3: [5]})
    assert plan.step == 5
    assert "step 5 is the newest step all 4 ranks hold" in plan.reason


def test_drifted_ranks_restore_the_older_shared_step():
    # rank 0 sealed step 7 and is copying 8; rank 1 has not sealed 7 yet: 6 is the one they share
    assert plan_restore({0: [6, 7], 1: [5, 6]}).step == 6


def test_a_rank_without_snapshots_means_no_common_step():
    plan = plan_restore({0: [3, 4], 1: [3, 4]}, world_size=3)
    assert plan.step is None
    assert "no step is held by every rank" in plan.reason and "2: []" in plan.reason


def test_no_snapshots_anywhere_is_a_fresh_start():
    for inv in ({}, {0: [], 1: []}):
        plan = plan_restore(inv, world_size=2)
        assert plan.step is None and "fresh start" in plan.reason


def test_disjoint_inventories_say_what_each_rank_holds():
    plan = plan_restore({0: [7, 8], 1: [5, 6]})
    assert plan.step is None
    assert plan.reason == "no step is held by every rank (held: {0: [7, 8], 1: [5, 6]})"


def test_no_ranks_is_an_error():
    with pytest.raises(RestoreError, match="no ranks"):
        plan_restore({}, world_size=0)
    with pytest.raises(RestoreError, match="no ranks"):
        plan_restore({})


def test_plan_equals_brute_force_on_random_inventories():
    rnd = random.Random(7)
    for _ in range(2000):
        n = rnd.randint(1, 6)
        inv = {r: rnd.sample(range(8), rnd.randint(0, 3)) for r in range(n) if rnd.random() < 0.95}
        shared = [s for s in range(8) if all(s in inv.get(r, ()) for r in range(n))]
        assert plan_restore(inv, world_size=n).step == (max(shared) if shared else None), inv


def test_agreement_passes_when_every_rank_restored_the_same_step():
    assert check_agreement({0: 5, 1: 5, 2: 5}) == 5
    assert check_agreement({0: None, 1: None}) is None
    assert check_agreement({}) is None


@pytest.mark.parametrize("restored", [{0: 5, 1: 4}, {0: 5, 1: None}, {0: None, 1: None, 2: 3}])
def test_a_rank_that_restored_another_step_is_an_error_naming_every_rank(restored):
    with pytest.raises(RestoreError) as e:
        check_agreement(restored)
    for r, s in restored.items():
        assert f"rank {r}: {s}" in str(e.value)
    assert "refusing to train on" in str(e.value)


def test_agreement_is_independent_of_rank_order():
    for perm in itertools.permutations([(0, 3), (1, 3), (2, 4)]):
        with pytest.raises(RestoreError):
            check_agreement(dict(perm))
