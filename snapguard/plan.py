"""Restore planning: pure functions over what each rank reports it can restore."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from snapguard.errors import RestoreError


@dataclass(frozen=True)
class RestorePlan:
    step: int | None  # None: no step is held by every rank
    reason: str


def plan_restore(inventories: Mapping[int, Sequence[int]], world_size: int | None = None) -> RestorePlan:
    """The newest step that every rank can restore.

    `inventories` maps each rank to the steps it can restore (locally, or, with erasure coding,
    by decoding). A rank missing from the map holds nothing.
    """
    n = world_size if world_size is not None else len(inventories)
    if n < 1:
        raise RestoreError("no ranks to plan a restore for")
    common: set[int] | None = None
    for r in range(n):
        steps = set(inventories.get(r, ()))
        common = steps if common is None else common & steps
    if common:
        return RestorePlan(max(common), f"step {max(common)} is the newest step all {n} ranks hold")
    empty = [r for r in range(n) if not inventories.get(r)]
    if len(empty) == n:
        return RestorePlan(None, "no rank holds a snapshot: fresh start")
    held = {r: sorted(inventories.get(r, ())) for r in range(n)}
    return RestorePlan(None, f"no step is held by every rank (held: {held})")


def check_agreement(restored: Mapping[int, int | None]) -> int | None:
    """Every rank must have restored the same step; a rank that differs is an error, never silent."""
    steps = set(restored.values())
    if len(steps) > 1:
        detail = ", ".join(f"rank {r}: {s}" for r, s in sorted(restored.items()))
        raise RestoreError(f"ranks restored different steps ({detail}); refusing to train on")
    return next(iter(steps)) if steps else None
