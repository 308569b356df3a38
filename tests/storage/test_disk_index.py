"""The disk tier's bookkeeping without files: reserve / commit / abandon, two-phase eviction and
removal, LRU order, padded sizes, and a budget that is never exceeded."""

from __future__ import annotations

import random

from lmcache_ext.storage.direct_io import ALIGN
from lmcache_ext.storage.disk_index import DiskEntry, DiskIndex

BLOCK = ALIGN  # one small chunk file, padded


def name(n: int) -> str:
    return f"{n:032x}"


def stored(index: DiskIndex, n: int, nbytes: int = BLOCK) -> DiskEntry:
    """Reserve and commit chunk ``n``, as a write that found room does."""
    reservation = index.reserve(name(n), nbytes)
    assert reservation.entry is not None, reservation
    assert index.commit(reservation.entry)
    return reservation.entry


def make_room(index: DiskIndex, n: int, nbytes: int = BLOCK) -> list[DiskEntry]:
    """Reserve chunk ``n`` as the tier does: delete (here: nothing) and release victims until the
    reservation is decided; commit it. Returns every victim."""
    evicted = []
    while True:
        reservation = index.reserve(name(n), nbytes)
        if not reservation.victims:
            assert reservation.entry is not None and index.commit(reservation.entry)
            return evicted
        evicted += reservation.victims
        index.release(reservation.victims)


def verify_order(index: DiskIndex, *numbers: int) -> None:
    assert index.names() == [name(n) for n in numbers], "least recent first"


def test_a_reservation_counts_its_bytes_and_is_invisible_until_committed():
    index = DiskIndex(4 * BLOCK)
    reservation = index.reserve(name(1), BLOCK)
    assert reservation.entry is not None and not reservation.stored
    assert index.used_bytes == BLOCK
    assert not index.contains(name(1)) and index.use(name(1)) is None
    assert index.commit(reservation.entry)
    assert index.contains(name(1)) and index.use(name(1)) is reservation.entry


def test_padded_bytes_are_counted():
    index = DiskIndex(4 * BLOCK)
    assert index.reserve(name(1), BLOCK + 1).entry.size == 2 * BLOCK
    assert index.reserve(name(2), 1).entry.size == BLOCK
    assert index.used_bytes == 3 * BLOCK
    assert index.adopt(name(3), 100).size == BLOCK  # a file found at start, padded too
    assert index.used_bytes == 4 * BLOCK


def test_a_second_reservation_of_the_same_chunk_is_already_stored():
    """Scenario: two threads store the same chunk; the second one writes nothing."""
    index = DiskIndex(4 * BLOCK)
    first = index.reserve(name(1), BLOCK)
    assert index.reserve(name(1), BLOCK).stored  # while the first write is in flight
    index.commit(first.entry)
    assert index.reserve(name(1), BLOCK).stored
    assert index.used_bytes == BLOCK and len(index) == 1


def test_abandon_gives_the_bytes_back_once():
    index = DiskIndex(4 * BLOCK)
    entry = index.reserve(name(1), BLOCK).entry
    index.abandon(entry)
    index.abandon(entry)
    assert index.used_bytes == 0 and len(index) == 0
    assert not index.contains(name(1))


def test_a_chunk_larger_than_the_budget_is_refused():
    index = DiskIndex(BLOCK)
    reservation = index.reserve(name(1), BLOCK + 1)
    assert reservation.entry is None and not reservation.stored and not reservation.victims
    assert index.used_bytes == 0


def test_eviction_is_least_recently_used_first():
    index = DiskIndex(3 * BLOCK)
    for n in (1, 2, 3):
        stored(index, n)
    index.use(name(1))  # 1 is now the most recent; 2 the least
    verify_order(index, 2, 3, 1)
    assert [e.name for e in make_room(index, 4)] == [name(2)]
    verify_order(index, 3, 1, 4)


def test_touch_leaves_a_prefix_first_chunk_most_recent():
    """Scenario: a prompt's chunks are used in order; its first chunk is needed longest."""
    index = DiskIndex(4 * BLOCK)
    for n in (1, 2, 3, 4):
        stored(index, n)
    index.touch([name(1), name(2), "unknown"])
    verify_order(index, 3, 4, 2, 1)


def test_eviction_is_two_phase_bytes_stay_counted_until_released():
    """Scenario: a full index evicts for a new chunk; the victim's file is still on disk until the
    tier deletes it, so its bytes count until then and the new chunk waits for them."""
    index = DiskIndex(2 * BLOCK)
    stored(index, 1)
    stored(index, 2)
    first = index.reserve(name(3), BLOCK)
    assert first.entry is None and [e.name for e in first.victims] == [name(1)]
    assert not index.contains(name(1))  # phase one: out of the index at once
    assert index.used_bytes == 2 * BLOCK  # its file is not deleted yet
    index.release(first.victims)  # phase two: the file is gone
    assert index.used_bytes == BLOCK
    second = index.reserve(name(3), BLOCK)
    assert second.entry is not None and index.used_bytes == 2 * BLOCK


def test_writes_in_flight_are_never_evicted_and_a_full_budget_of_them_refuses():
    index = DiskIndex(2 * BLOCK)
    index.reserve(name(1), BLOCK)
    index.reserve(name(2), BLOCK)
    refused = index.reserve(name(3), BLOCK)
    assert refused.entry is None and not refused.victims and not refused.stored


def test_removing_a_write_in_flight_makes_its_commit_fail_and_its_writer_give_the_bytes_back():
    """Scenario: a chunk is removed while its file is being written."""
    index = DiskIndex(2 * BLOCK)
    entry = index.reserve(name(1), BLOCK).entry
    assert index.remove(name(1)) is entry
    index.release([entry])  # nothing: its temporary file still exists, the writer owns it
    assert index.used_bytes == BLOCK
    assert not index.commit(entry)
    index.abandon(entry)  # the writer deleted its temporary file
    assert index.used_bytes == 0 and len(index) == 0


def test_remove_with_an_expected_entry_leaves_a_newer_one_alone():
    """Scenario: a reader found a corrupt file, but meanwhile the chunk was stored again."""
    index = DiskIndex(2 * BLOCK)
    old = stored(index, 1)
    index.release([index.remove(name(1))])
    new = stored(index, 1)
    assert index.remove(name(1), expected=old) is None
    assert index.use(name(1)) is new
    assert index.remove(name(1), expected=new) is new


def test_abandoning_an_old_entry_leaves_a_newer_one_of_the_same_name():
    index = DiskIndex(2 * BLOCK)
    old = index.reserve(name(1), BLOCK).entry
    index.remove(name(1))
    new = stored(index, 1)
    index.abandon(old)
    assert index.use(name(1)) is new and index.used_bytes == BLOCK


def test_adopted_files_over_the_budget_are_evicted_oldest_first():
    """Scenario: a restart finds more files than the (now smaller) budget holds."""
    index = DiskIndex(2 * BLOCK)
    for n in (1, 2, 3):
        index.adopt(name(n), BLOCK)  # in mtime order, least recent first
    victims = index.evict(0)
    assert [e.name for e in victims] == [name(1)]
    index.release(victims)
    assert index.used_bytes == 2 * BLOCK
    verify_order(index, 2, 3)


def test_the_budget_is_never_exceeded_under_random_operations():
    rng = random.Random(7)
    index = DiskIndex(8 * BLOCK)
    everything: list[DiskEntry] = []
    in_flight: list[DiskEntry] = []  # reserved, being written
    retired: list[DiskEntry] = []  # taken out, files not yet deleted
    for _ in range(3000):
        op = rng.random()
        n = rng.randrange(40)
        if op < 0.4:
            reservation = index.reserve(name(n), rng.randint(1, 3 * BLOCK))
            in_flight += [reservation.entry] if reservation.entry else []
            everything += [reservation.entry] if reservation.entry else []
            retired += reservation.victims
        elif op < 0.6 and in_flight:
            entry = in_flight.pop(rng.randrange(len(in_flight)))
            if not index.commit(entry):
                index.abandon(entry)
        elif op < 0.7 and in_flight:
            index.abandon(in_flight.pop(rng.randrange(len(in_flight))))
        elif op < 0.8:
            removed = index.remove(name(n))
            retired += [removed] if removed else []
        elif op < 0.9 and retired:
            index.release([retired.pop(rng.randrange(len(retired)))])
        else:
            index.use(name(n))
        assert index.used_bytes == sum(e.size for e in everything if e.counted)
        assert index.used_bytes <= index.budget_bytes
        assert index.peak_used_bytes <= index.budget_bytes
        # Every byte that may be on disk (a temporary, a chunk, a file awaiting deletion) counts;
        # an entry removed while in flight has no file of its own to delete.
        assert all(e.counted for e in in_flight)
        assert all(e.counted for e in retired if e.ready)
