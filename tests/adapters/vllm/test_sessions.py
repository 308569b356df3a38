"""SageMaker session pins through vLLM's real Scheduler and our connector's two sides (CPU
tensors): a request whose kv_transfer_params name a session keeps its conversation pinned in the
worker's CPU tier through traffic that evicts everything else, until the session is closed over
the worker channel (as the LMI handler closes it, from another process's socket)."""

from __future__ import annotations

import pytest

from lmcache_ext.adapters.session_params import SESSION_KEY
from lmcache_ext.adapters.vllm.channel import AllRanksClient
from tests.adapters.vllm.rig import CHUNK, HEAD_DIM, KV_HEADS, LAYERS, Rig, make_request, step
from tests.adapters.vllm.test_connector import LAYOUTS, PROMPT_A, pinned_chunks, rig_for

CHUNK_BYTES = LAYERS * 2 * CHUNK * KV_HEADS * HEAD_DIM * 2  # bfloat16
CPU_CHUNKS = 12
SESSION = "5f0c3a52-8f0e-4d7e-9b1e-2f9a6c1d0e11"  # a uuid, as LMI's session manager makes them
HELD = 96  # PROMPT_A's whole chunks


def session_rig(tmp_path, over_ipc: bool = False, **extra) -> Rig:
    layout, backend = LAYOUTS[0]
    return rig_for(tmp_path, layout, backend, over_ipc=over_ipc,
                   max_local_cpu_size=CPU_CHUNKS * CHUNK_BYTES / 2**30,
                   session_pins_max_fraction=0.5, **extra)


def serve(rig: Rig, req_id: str, prompt: list[int], session: str | None = None) -> None:
    """One request to its end (prefill + one token), in ``session`` if named."""
    params = {SESSION_KEY: session} if session is not None else None
    rig.scheduler.add_request(make_request(req_id, prompt, kv_transfer_params=params))
    step(rig)


def flood(rig: Rig, count: int = 2 * CPU_CHUNKS) -> None:
    """Unrelated traffic: new three-chunk prompts, enough to evict every unpinned chunk."""
    for n in range(count):
        serve(rig, f"flood-{n}", [5000 + n * 100 + i for i in range(HELD)])


def close_session(rig: Rig, session: str) -> list[int | None]:
    """What the LMI handler does on CLOSE: its own channel to every rank, not the scheduler's."""
    caches = AllRanksClient(rig.connector._kv_transfer_config.engine_id, 1, 2.0, 1.0)
    try:
        return caches.release_session(session)
    finally:
        caches.close()


@pytest.mark.parametrize("over_ipc", [False, True])
def test_a_sessions_conversation_stays_pinned_through_traffic_until_closed(tmp_path, over_ipc):
    """Scenario: turn 1 of a session and an unrelated request without a session are saved; a
    flood evicts the unrelated one while the session's chunks stay pinned and hit; the session's
    close (in-process, and over the worker's socket) unpins them, and the next flood evicts
    them too."""
    rig = session_rig(tmp_path, over_ipc)
    sessions = rig.worker.worker.sessions
    serve(rig, "turn-1", PROMPT_A, SESSION)
    serve(rig, "no-session", [9000 + i for i in range(HELD)])
    assert sessions.pinned_bytes(SESSION) == 3 * CHUNK_BYTES
    assert pinned_chunks(rig) == 3
    flood(rig)
    engine = rig.worker.engine
    assert engine.lookup(PROMPT_A) == HELD
    assert engine.lookup([9000 + i for i in range(HELD)]) == 0
    turn_2 = make_request("turn-2", PROMPT_A + [7, 8, 9],
                          kv_transfer_params={SESSION_KEY: SESSION})
    assert rig.connector.get_num_new_matched_tokens(turn_2, 0) == (HELD, False)

    assert close_session(rig, SESSION) == [3 * CHUNK_BYTES]
    assert sessions.pinned_bytes() == 0
    assert pinned_chunks(rig) == 3  # what is left is turn 2's own lookup pin, until it ends
    assert close_session(rig, SESSION) == [0]  # a second close frees nothing, fails nothing
    rig.connector.request_finished(turn_2, [])  # its release is sent, not waited for; the
    flood(rig)  # flood's first lookup, on the same socket, is answered after it
    assert pinned_chunks(rig) == 0
    assert engine.lookup(PROMPT_A) == 0


def test_requests_without_a_valid_session_pin_nothing(tmp_path):
    """Scenario: no session, a malformed one, a non-string one: served and saved as always,
    nothing pinned."""
    rig = session_rig(tmp_path)
    serve(rig, "plain", PROMPT_A)
    rig.scheduler.add_request(make_request("bad", [1 + i for i in range(HELD)],
                                           kv_transfer_params={SESSION_KEY: "no spaces allowed"}))
    step(rig)
    rig.scheduler.add_request(make_request("typed", [2000 + i for i in range(HELD)],
                                           kv_transfer_params={SESSION_KEY: 12}))
    step(rig)
    assert rig.worker.engine.lookup(PROMPT_A) == HELD
    assert rig.worker.worker.sessions.pinned_bytes() == 0 and pinned_chunks(rig) == 0


def test_sessions_off_in_the_config_pins_nothing_and_a_close_frees_nothing(tmp_path):
    rig = session_rig(tmp_path, enable_stateful_sessions=False)
    serve(rig, "turn-1", PROMPT_A, SESSION)
    assert rig.worker.worker.sessions is None and pinned_chunks(rig) == 0
    assert close_session(rig, SESSION) == [0]
