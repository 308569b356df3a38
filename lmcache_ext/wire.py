"""What crosses the wire between a client, SageMaker's front end and a container, beyond the
session protocol (``sessions/protocol.py``): the payload limit, the custom-attributes header, and
the lookup request and its answer. Shared by the built-in server, the router, the client and the
LMI handler; imports nothing of theirs (nor anything else).
"""

from __future__ import annotations

import re
from typing import Any

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's payload limit for real-time endpoints
# A lookup-only request: the prompt's cached prefix is reported, nothing is generated or stored.
# Through SageMaker only /invocations reaches the container, so the request says so in its custom
# attributes (boto3's CustomAttributes, forwarded verbatim as this header); locally also /lookup.
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
LOOKUP_ATTRIBUTE = "lmcache-ext-lookup"
# What a client sends: key=value, because DJL's front end (LMI) splits the custom attributes on
# ';' into request properties and drops an item without '=' (RequestParser.parseRequest).
LOOKUP_REQUEST = f"{LOOKUP_ATTRIBUTE}=true"
_LOOKUP_OFF = ("false", "0", "no", "off")
LOOKUP_ROUTE = "/lookup"


def wants_lookup(custom_attributes: str | None) -> bool:
    """Whether a request's custom attributes ask for a lookup: ``lmcache-ext-lookup`` as one of
    its items (comma or semicolon separated, blanks ignored, any case), bare or ``=true`` /
    ``=1`` / ``=yes``; ``=false``, ``=0`` or ``=no`` turn it off."""
    for item in re.split(r"[,;]", custom_attributes or ""):
        name, _, value = item.partition("=")
        if name.strip().lower() == LOOKUP_ATTRIBUTE:
            return value.strip().lower() not in _LOOKUP_OFF
    return False


def wants_lookup_property(value: str | None) -> bool:
    """Whether the request property DJL makes of ``lmcache-ext-lookup=<value>`` asks for a
    lookup (None: no such property); values read as in ``wants_lookup``."""
    return value is not None and value.strip().lower() not in _LOOKUP_OFF


# ------------------------------------------------------------------ responses


def format_lookup(prompt_tokens: int, cached_tokens: int, chunk_tokens: int) -> dict[str, Any]:
    """A lookup's answer: the prompt's length, the leading tokens the cache holds now (whole
    chunks), and the chunk size (a prompt's last partial chunk is never stored)."""
    return {"lookup": {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                       "chunk_tokens": chunk_tokens}}
