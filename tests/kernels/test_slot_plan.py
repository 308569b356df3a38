"""The copy plan: every valid row goes exactly one way (whole blocks, a span inside one block, or
token by token), and block-wise mappings become few, large pieces. No tensors here."""

from __future__ import annotations

import random

import pytest

from lmcache_ext.kernels import slot_plan
from lmcache_ext.kernels.slot_plan import MAX_SPANS, MIN_SPAN, BlockGroup, Span, plan_copy


def block_slots(blocks: list[int], block_size: int) -> list[int]:
    """The slots of whole ``blocks``, in order."""
    return [b * block_size + p for b in blocks for p in range(block_size)]


def verify_plan_covers(slots: list[int], block_size: int) -> None:
    """Each row with a slot >= 0 is moved once, from/to that slot; skipped rows not at all."""
    plan = plan_copy(slots, block_size)
    moved: dict[int, int] = {}

    def move(row: int, slot: int) -> None:
        assert row not in moved, f"row {row} moved twice"
        moved[row] = slot

    for group in plan.groups:
        for i, block in enumerate(group.blocks):
            for pos in range(block_size):
                move(group.row + i * block_size + pos, block * block_size + pos)
    for span in plan.spans:
        assert span.slot // block_size == (span.slot + span.length - 1) // block_size
        for i in range(span.length):
            move(span.row + i, span.slot + i)
    assert list(plan.rows) == sorted(plan.rows)
    for row, slot in zip(plan.rows, plan.slots, strict=True):
        move(row, slot)
    assert moved == {row: slot for row, slot in enumerate(slots) if slot >= 0}


@pytest.mark.parametrize("block_size", [1, 4, 16, 128])
def test_random_mappings_are_covered_exactly(block_size):
    rng = random.Random(block_size)
    for _ in range(200):
        slots: list[int] = []
        while len(slots) < 3 * block_size:
            kind = rng.choice(["block", "run", "skip", "single"])
            start = rng.randrange(64) * block_size
            if kind == "block":
                slots += range(start, start + block_size)
            elif kind == "run":
                pos = rng.randrange(block_size)
                slots += range(start + pos, start + rng.randint(pos + 1, block_size))
            else:
                slots += [-1] * rng.randint(1, 3) if kind == "skip" else [rng.randrange(9999)]
        verify_plan_covers(slots, block_size)


def test_shuffled_whole_blocks_are_one_group():
    """Scenario: a 256-token chunk over 16 blocks scattered by a long-running cache."""
    blocks = [7, 3, 4, 5, 40, 2, 9, 10, 11, 12, 30, 31, 0, 50, 51, 6]
    plan = plan_copy(block_slots(blocks, 16), 16)
    assert plan.groups[0].blocks == tuple(blocks) and len(plan.groups) == 1
    assert not plan.spans and not plan.rows
    assert plan.groups[0].runs[:3] == ((0, 7, 1), (1, 3, 3), (4, 40, 1))


def test_one_run_from_mid_block_is_head_blocks_tail():
    """Scenario: a chunk that starts and ends inside a block, over consecutive blocks."""
    slots = list(range(5 * 16 + 3, 5 * 16 + 3 + 40))  # rows 0..39 <- slots 83..122
    plan = plan_copy(slots, 16)
    assert plan.spans == (Span(0, 83, 13), Span(29, 112, 11))
    assert plan.groups == (BlockGroup(13, (6,), ((0, 6, 1),)),)


def test_padding_and_partial_last_block():
    """Scenario: vLLM's -1 padding after a prompt whose last block is partial."""
    slots = block_slots([3, 1], 4) + [20, 21] + [-1, -1]
    plan = plan_copy(slots, 4)
    assert plan.groups == (BlockGroup(0, (3, 1), ((0, 3, 1), (1, 1, 1))),)
    assert plan.spans == (Span(8, 20, 2),) and not plan.rows


def test_a_gap_splits_groups():
    slots = block_slots([2], 4) + [-1] + block_slots([5, 6], 4)
    groups = plan_copy(slots, 4).groups
    assert [(g.row, g.blocks, g.runs) for g in groups] == [(0, (2,), ((0, 2, 1),)),
                                                            (5, (5, 6), ((0, 5, 2),))]


def test_irregular_mappings_fall_back_token_by_token():
    """Scenario: a random permutation of slots: no runs, so no strided copies either."""
    slots = list(range(64))
    random.Random(0).shuffle(slots)
    plan = plan_copy(slots, 16)
    assert len(plan.spans) <= MAX_SPANS and all(s.length >= MIN_SPAN for s in plan.spans)
    assert len(plan.rows) > 64 - MIN_SPAN * MAX_SPANS
    verify_plan_covers(slots, 16)


def test_empty_and_all_skipped():
    assert plan_copy([], 16) == plan_copy([-1, -1], 16) == plan_copy([-1], 1)
    assert not plan_copy([], 16).groups


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_one_run_shortcut_equals_the_piecewise_plan(block_size):
    """The one-run plan is the plan the piece walk gives, for every start and length."""
    for first in range(3 * block_size):
        for count in range(1, 4 * block_size):
            slots = list(range(first, first + count))
            pieces = slot_plan.pieces(slots, block_size)
            partial = [Span(*p) for p in pieces if p[2] < block_size]
            whole = [(row, slot // block_size) for row, slot, n in pieces if n == block_size]
            plan = plan_copy(slots, block_size)
            assert plan.spans == tuple(partial)
            assert plan.groups == slot_plan._groups(whole, block_size)
            verify_plan_covers(slots, block_size)
