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
    """Chunk rows ``[row, row + len(blocks) * block_size)`` <- whole ``blocks``, in that order."""

    row: int
    blocks: tuple[int, ...]

    def runs(self) -> list[tuple[int, int, int]]:
        """``(index in blocks, first block, count)`` for each maximal run of consecutive ids."""
        runs: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(self.blocks) + 1):
            if i == len(self.blocks) or self.blocks[i] != self.blocks[i - 1] + 1:
                runs.append((start, self.blocks[start], i - start))
                start = i
        return runs


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


def pieces(slots: list[int], block_size: int) -> list[Span]:
    """The mapping cut into maximal runs of consecutive slots inside one block, in row order;
    negative slots are left out. O(tokens / block_size) Python steps for block-wise mappings."""
    count = len(slots)
    one_run = count > 0 and slots[0] >= 0 and slots == list(range(slots[0], slots[0] + count))
    out: list[Span] = []
    row = 0
    while row < count:
        slot = slots[row]
        if slot < 0:
            row += 1
            continue
        limit = min(block_size - slot % block_size, count - row)
        length = limit if one_run else _piece_length(slots, row, limit)
        out.append(Span(row, slot, length))
        row += length
    return out


def plan_copy(slots: list[int], block_size: int) -> CopyPlan:
    """Sort the pieces of ``slots`` into block groups, strided spans and per-token rows."""
    groups: list[BlockGroup] = []
    partial: list[Span] = []
    for piece in pieces(slots, block_size):
        if piece.length < block_size:
            partial.append(piece)
            continue
        block = piece.slot // block_size
        last = groups[-1] if groups else None
        if last is not None and last.row + len(last.blocks) * block_size == piece.row:
            groups[-1] = BlockGroup(last.row, (*last.blocks, block))
        else:
            groups.append(BlockGroup(piece.row, (block,)))
    spans, rows, row_slots = partial, [], []
    if len(partial) > MAX_SPANS:
        spans = [p for p in partial if p.length >= MIN_SPAN]
        for p in partial:
            if p.length < MIN_SPAN:
                rows.extend(range(p.row, p.row + p.length))
                row_slots.extend(range(p.slot, p.slot + p.length))
    return CopyPlan(tuple(groups), tuple(spans), tuple(rows), tuple(row_slots))
