"""Which chunk rows can move as whole blocks, as runs inside one block, or only token by token.

Bookkeeping only: plain Python on a slot list, no tensors, so it is tested on its own. The CPU
copy path (``block_copy.py``) turns a ``CopyPlan`` into a few strided copies.

A slot mapping (``slot = block_id * block_size + position % block_size``, negative = skip) is cut
into *pieces*: maximal runs of chunk rows whose slots are consecutive and inside one block. A
piece that fills a whole block is copied with its neighbours as one block-indexed copy; other
pieces are copied as one strided slice each; when a mapping is so irregular that it has many
short pieces, the short ones fall back to the per-token copy.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SPANS = 8  # more partial pieces than this and the short ones go token by token
MIN_SPAN = 4  # rows: the shortest piece worth its own strided copy in an irregular mapping


@dataclass(frozen=True)
class BlockGroup:
    """Chunk rows ``[row, row + len(blocks) * block_size)`` <- whole ``blocks``, in that order.

    ``runs``: ``(index in blocks, first block, count)`` for each maximal run of consecutive ids.
    """

    row: int
    blocks: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]


def block_runs(blocks: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """``(index, first block, count)`` of each maximal run of consecutive ids in ``blocks``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[i - 1] + 1:
            runs.append((start, blocks[start], i - start))
            start = i
    return tuple(runs)


@dataclass(frozen=True)
class Span:
    """Chunk rows ``[row, row + length)`` <- slots ``[slot, slot + length)``, inside one block."""

    row: int
    slot: int
    length: int


@dataclass(frozen=True)
class CopyPlan:
    """Every row with a slot >= 0 is in exactly one of: a group, a span, or ``rows``.

    ``rows``/``slots``: the per-token fallback, ascending rows and their slots.
    """

    groups: tuple[BlockGroup, ...]
    spans: tuple[Span, ...]
    rows: tuple[int, ...]
    slots: tuple[int, ...]


def _piece_length(slots: list[int], row: int, limit: int) -> int:
    """How many rows from ``row`` (at most ``limit``) continue ``slots[row]`` one by one."""
    first = slots[row]
    if slots[row:row + limit] == list(range(first, first + limit)):  # the usual case, at C speed
        return limit
    length = 1
    while length < limit and slots[row + length] == first + length:
        length += 1
    return length


def _is_one_run(slots: list[int]) -> bool:
    if not slots or slots[0] < 0 or slots[-1] - slots[0] != len(slots) - 1:
        return False  # the ends tell most mappings apart without building a list
    return slots == list(range(slots[0], slots[0] + len(slots)))


def pieces(slots: list[int], block_size: int) -> list[tuple[int, int, int]]:
    """The mapping cut into maximal runs of consecutive slots inside one block, as ``(row,
    slot, length)`` in row order; negative slots are left out. O(tokens / block_size) Python
    steps for block-wise mappings."""
    count = len(slots)
    out: list[tuple[int, int, int]] = []
    row = 0
    while row < count:
        slot = slots[row]
        if slot < 0:
            row += 1
            continue
        length = _piece_length(slots, row, min(block_size - slot % block_size, count - row))
        out.append((row, slot, length))
        row += length
    return out


def _one_run_plan(first: int, count: int, block_size: int) -> CopyPlan:
    """The plan of slots ``[first, first + count)``: a partial head block, consecutive whole
    blocks, a partial tail block (each may be absent), without walking the blocks."""
    head = min(-first % block_size, count)
    whole = (count - head) // block_size
    tail = count - head - whole * block_size
    spans = []
    if head:
        spans.append(Span(0, first, head))
    if tail:
        spans.append(Span(count - tail, first + count - tail, tail))
    groups = ()
    if whole:
        block = (first + head) // block_size
        groups = (BlockGroup(head, tuple(range(block, block + whole)), ((0, block, whole),)),)
    return CopyPlan(groups, tuple(spans), (), ())


def _groups(whole: list[tuple[int, int]], block_size: int) -> tuple[BlockGroup, ...]:
    """Whole-block pieces ``(row, block)`` in row order, joined where their rows touch."""
    groups: list[BlockGroup] = []
    start = 0
    for i in range(1, len(whole) + 1):
        if i == len(whole) or whole[i][0] != whole[i - 1][0] + block_size:
            blocks = tuple(block for _, block in whole[start:i])
            groups.append(BlockGroup(whole[start][0], blocks, block_runs(blocks)))
            start = i
    return tuple(groups)


def plan_copy(slots: list[int], block_size: int) -> CopyPlan:
    """Sort the pieces of ``slots`` into block groups, strided spans and per-token rows. One
    run of slots (a fresh prompt's chunk) is recognised at once, in a single list comparison."""
    if _is_one_run(slots):
        return _one_run_plan(slots[0], len(slots), block_size)
    whole: list[tuple[int, int]] = []
    partial: list[Span] = []
    for row, slot, length in pieces(slots, block_size):
        if length == block_size:
            whole.append((row, slot // block_size))
        else:
            partial.append(Span(row, slot, length))
    spans, rows, row_slots = partial, [], []
    if len(partial) > MAX_SPANS:
        spans = [p for p in partial if p.length >= MIN_SPAN]
        for p in partial:
            if p.length < MIN_SPAN:
                rows.extend(range(p.row, p.row + p.length))
                row_slots.extend(range(p.slot, p.slot + p.length))
    return CopyPlan(_groups(whole, block_size), tuple(spans), tuple(rows), tuple(row_slots))
