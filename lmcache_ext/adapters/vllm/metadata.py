"""What the connector's scheduler side hands its worker side each step (vLLM carries it across
the process boundary with the scheduler output)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, kw_only=True)
class TransferOp:
    """One request's load or save: token positions [start, end) in ``block_ids``.

    ``digests`` are the chained digests of the request's chunks from the first (hashed once, by
    the scheduler; each rank names its copy with its own namespace), over ``num_tokens`` tokens:
    chunk i covers [i * chunk_size, min((i + 1) * chunk_size, num_tokens)). A load also names
    the pin its lookup took (``pin_id``), which the worker drops once the load is done. A
    ``background`` load runs off the step; the worker reports it finished in ``get_finished``.
    A save of a request in a SageMaker session names the session (``session``): the worker
    keeps the saved conversation pinned for it until the session is closed or expires.
    Built by keyword only: its ints and lists cannot be told apart by position.
    """

    req_id: str
    digests: list[bytes]
    num_tokens: int
    block_ids: list[int]
    start: int
    end: int
    pin_id: int = 0
    background: bool = False
    session: str | None = None


@dataclass
class LMCacheExtMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per step."""

    loads: list[TransferOp] = field(default_factory=list)
    saves: list[TransferOp] = field(default_factory=list)
    # Decode saves: a finished request's prompt + output chunks (``save_decode_cache``), its
    # blocks held by vLLM until get_finished reports the request.
    decode_saves: list[TransferOp] = field(default_factory=list)
    num_scheduled_tokens: int = 0  # the step's tokens (the workers time the forward pass)
