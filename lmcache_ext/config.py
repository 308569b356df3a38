"""The engine's configuration: one declarative table, one frozen config object.

Sources, lowest to highest precedence:
  defaults < YAML file (``--config`` / ``LMCACHE_CONFIG_FILE`` / ``OPTION_LMCACHE_CONFIG_FILE``)
  < ``LMCACHE_<KEY>`` env < ``OPTION_LMCACHE_<KEY>`` env (the LMI convention) < explicit overrides.

Key names follow LMCache's, so an existing ``lmcache_config.yaml`` loads unchanged. Every value is
validated once, here; a bad value is a ``ConfigError`` that names the key, the value, where it came
from and what is allowed. Nothing falls back silently. This is the only module that reads YAML or
the environment for engine settings.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from lmcache_ext.units import GIB

log = logging.getLogger(__name__)
ENV_PREFIXES = ("LMCACHE_", "OPTION_LMCACHE_")  # lowest precedence first
CONFIG_FILE_ENVS = ("OPTION_LMCACHE_CONFIG_FILE", "LMCACHE_CONFIG_FILE")  # first set wins
# Env names under our prefixes that are not engine keys: read by other parts, never an error.
RESERVED_ENV_SUFFIXES = frozenset({"CONFIG_FILE", "AUTO_CONFIG", "LOG_LEVEL", "EXT_TAKEOVER"})
# LMCache's own keys that have no meaning here (LMI's auto-config exports some of them, LMCache
# files carry others). Accepted from a file or env and said in the log as not applicable; never
# an error, never a value. The one list of them: add a key here, nowhere else.
NOT_APPLICABLE_KEYS = frozenset({
    "use_experimental", "track_usage",  # LMCache's switches for its v1 engine / telemetry
    "enable_lazy_memory_allocator", "lazy_memory_initial_ratio",  # LMI's auto-config sets it
    "lazy_memory_expand_trigger_ratio", "lazy_memory_step_ratio", "lazy_memory_safe_size",
    "enable_async_loading", "numa_mode", "lookup_timeout_ms",
    "internal_api_server_enabled", "internal_api_server_host", "internal_api_server_port_start",
})
# LMI's own env prefix: a key with ``lmi_option`` is also read from ``OPTION_<LMI_OPTION>``.
LMI_OPTION_PREFIX = "OPTION_"
REMOTE_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "redis+cluster", "rediss+cluster")
HASH_ALGORITHMS = ("sha256", "xxh3_128")
CHUNK_CODECS = ("raw", "int8", "int4")  # lmcache_ext.codecs.CODECS (tested equal)


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid lmcache-ext configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class ConfigKey:
    """One row of the table. ``check`` returns an error text for a typed value, or None."""

    name: str
    type: type
    default: Any
    description: str
    unit: str = ""
    choices: tuple = ()
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None
    # LMI's name for the same setting (``option.<name>`` / ``OPTION_<NAME>``), read at the lowest
    # env precedence, so the container's LMI setting and this engine never disagree.
    lmi_option: str = ""


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def _chunk_multiple(value: int) -> str | None:
    return None if value > 0 and value % 16 == 0 else "must be a positive multiple of 16"


def _remote_scheme(url: str) -> str | None:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in REMOTE_SCHEMES:
        return None
    return f"scheme must be one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}"


def _disk_location(value: str) -> str | None:
    if "://" in value and not value.startswith("file://"):
        return "must be a directory path or a file:// URL"
    return None if value.strip() else "must not be empty (use null to turn the disk tier off)"


# The extra_config mapping's own keys (LMCache keeps use_odirect there; the seed does too).
EXTRA_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("use_odirect", bool, False, "Read and write the disk tier with O_DIRECT."),
)

TABLE: tuple[ConfigKey, ...] = (
    ConfigKey("chunk_size", int, 256, "Tokens per KV chunk.", "tokens", check=_chunk_multiple),
    ConfigKey("local_cpu", bool, True, "Keep a CPU RAM tier."),
    ConfigKey("max_local_cpu_size", float, 5.0, "CPU tier budget.", "GiB", check=_positive),
    ConfigKey("local_disk", str, None, "Disk tier directory (path or file:// URL); null = off.",
              nullable=True, check=_disk_location),
    ConfigKey("max_local_disk_size", float, 0.0, "Disk tier budget; required with local_disk.",
              "GiB", check=_non_negative),
    ConfigKey("local_disk_auth_key_env", str, None,
              "Like remote_auth_key_env, for the disk tier (for a directory on a shared or "
              "network file system); null = unkeyed checksums.", nullable=True),
    ConfigKey("local_disk_auth_previous_key_env", str, None,
              "Like remote_auth_previous_key_env, for the disk tier.", nullable=True),
    ConfigKey("local_disk_codec", str, "raw",
              "How the disk tier encodes chunks: raw, int8 (~1.75x smaller, lossy) or int4 "
              "(~2.8x smaller, lossy); any reader loads all three.", choices=CHUNK_CODECS),
    ConfigKey("local_disk_encryption_key_env", str, None,
              "Like remote_encryption_key_env, for the disk tier; null = files in the clear.",
              nullable=True),
    ConfigKey("local_disk_encryption_previous_key_env", str, None,
              "Like remote_encryption_previous_key_env, for the disk tier.", nullable=True),
    ConfigKey("remote_url", str, None, "Shared store, e.g. redis://host:6379; null = off.",
              nullable=True, check=_remote_scheme),
    ConfigKey("remote_key_prefix", str, "lmcache-ext",
              "Prefix of every key in the shared store (before the namespace id)."),
    ConfigKey("remote_password_env", str, None,
              "Name of an env var holding the shared store's password (keeps it out of files).",
              nullable=True),
    ConfigKey("remote_auth_key_env", str, None,
              "Name of an env var holding a secret (>= 32 bytes) that signs and checks every "
              "chunk in the shared store (BLAKE3 keyed); null = unauthenticated: anyone who can "
              "write to the store can make this endpoint serve KV of their choosing.",
              nullable=True),
    ConfigKey("remote_auth_previous_key_env", str, None,
              "During a key rotation: name of an env var holding the previous secret, still "
              "accepted when reading the shared store (never used to sign); null = none.",
              nullable=True),
    ConfigKey("remote_timeout_s", float, 1.0, "Timeout of every call to the shared store.", "s",
              check=_positive),
    ConfigKey("remote_backoff_s", float, 5.0,
              "After repeated shared-store errors, stop trying for this long.", "s",
              check=_non_negative),
    ConfigKey("remote_ttl_s", float, 0.0, "Expiry of stored values; 0 = none (the server's "
              "maxmemory policy evicts).", "s", check=_non_negative),
    ConfigKey("remote_serde", str, "naive",
              "How the shared tier encodes chunks: naive (raw KV), int8 (~1.75x smaller, lossy) "
              "or int4 (~2.8x smaller, lossy); cachegen is read as int4. Any reader loads all "
              "three.", choices=("naive", "int8", "int4")),
    ConfigKey("remote_encryption_key_env", str, None,
              "Name of an env var holding a secret (>= 32 bytes) that encrypts every chunk in "
              "the shared store (AES-256-GCM, a key derived from it; may be the same secret as "
              "remote_auth_key_env); unencrypted values are then misses. null = in the clear.",
              nullable=True),
    ConfigKey("remote_encryption_previous_key_env", str, None,
              "During a key rotation: name of an env var holding the previous encryption "
              "secret, still accepted when reading (never used to encrypt); null = none.",
              nullable=True),
    ConfigKey("save_unfull_chunk", bool, False, "Also store the last, partial chunk."),
    ConfigKey("extra_config", dict, {}, "Backend options; known: use_odirect (bool)."),
    ConfigKey("pre_caching_hash_algorithm", str, "sha256",
              "Chunk key hash; sha256 resists poisoning of a shared store.",
              choices=HASH_ALGORITHMS),
    ConfigKey("model_name", str, None, "Model identity in the key namespace (adapters fill it).",
              nullable=True),
    ConfigKey("cache_salt", str, None, "Extra salt in the key namespace (isolates tenants).",
              nullable=True),
    ConfigKey("write_behind_queue_chunks", int, 64,
              "Chunks queued per slower tier before new write-behinds are dropped.", "chunks",
              check=_positive),
    ConfigKey("cost_aware_retrieval", bool, True,
              "Load a cached prefix only where loading beats recomputing it (measured speeds)."),
    ConfigKey("min_retrieve_tokens", int, 0,
              "Recompute instead of loading hits shorter than this.", "tokens",
              check=_non_negative),
    ConfigKey("save_decode_cache", bool, False,
              "vLLM connector: also store whole chunks completed during decode (prompt + "
              "output) when a request finishes."),
    ConfigKey("staging_chunks", int, 4,
              "vLLM connector: chunk-sized transfer buffers per worker on the KV's device, "
              "allocated once; every save (and a GPU's loads) moves KV through them, so the "
              "transfer memory does not grow with the prompt. With a disk or Redis as the first "
              "tier (no CPU tier in front) a save waits at most 50 ms for each buffer to come "
              "back from the tier's writes and skips the chunks left once one does not.",
              "chunks",
              check=_positive),
    ConfigKey("async_load", str, "slow_tiers",
              "vLLM connector: which hits load in the background while other requests keep "
              "decoding (the request waits in WAITING_FOR_REMOTE_KVS): slow_tiers = a hit with "
              "any chunk outside the CPU tier; always; never (every load in the step).",
              choices=("slow_tiers", "always", "never")),
    ConfigKey("worker_lookup_timeout_s", float, 2.0,
              "vLLM connector: how long the scheduler waits for the workers' caches to answer "
              "a lookup (pinning slower tiers' chunks included); no answer in time = a miss.",
              "s", check=_positive),
    ConfigKey("emf_metrics", bool, None,
              "vLLM connector: write the cache's figures to stdout as CloudWatch Embedded "
              "Metric Format lines (CloudWatch metrics with no agent); unset = on where SM_* / "
              "SAGEMAKER_* env vars say this is SageMaker, off elsewhere.", nullable=True),
    ConfigKey("emf_interval_s", float, 60.0,
              "vLLM connector: one EMF line per this interval (while requests are served).",
              "s", check=_positive),
    ConfigKey("emf_namespace", str, "LMCacheExt",
              "vLLM connector: the CloudWatch namespace of the EMF metrics."),
    ConfigKey("worker_lookup_backoff_s", float, 5.0,
              "vLLM connector: after a worker's cache missed that deadline, lookups skip it "
              "(a miss) for this long.", "s", check=_non_negative),
    ConfigKey("use_layerwise", bool, False, "LMCache key; only false is supported.",
              choices=(False,)),
    ConfigKey("enable_stateful_sessions", bool, True,
              "SageMaker stateful sessions on /invocations (create, use, close); on by default, "
              "as in LMI's vLLM service. LMI reads anything but 'true' as off, so its name "
              "takes only true or false.", lmi_option="enable_stateful_sessions"),
    ConfigKey("sessions_expiration_s", float, 1200.0,  # DJL's and the container standards' default
              "A session ends this long after its last use (sliding) and its pins are released.",
              "s", check=_positive, lmi_option="sessions_expiration"),
    ConfigKey("session_pin_max_gib", float, 1.0,
              "Most KV one session keeps pinned in the CPU tier (its conversation's leading "
              "chunks).", "GiB", check=_positive),
    ConfigKey("session_pins_max_fraction", float, 0.5,
              "Most KV all sessions together keep pinned, as a share of the CPU tier's budget; "
              "over it the least recently used session is unpinned. 0 = sessions without pins.",
              check=_fraction),
    ConfigKey("max_open_sessions", int, 10000,
              "Most stateful sessions open at once on a server: a create beyond it is refused "
              "with 429 (nothing grows) until one is closed or expires.", check=_positive),
    ConfigKey("max_concurrent_lookups", int, 16,
              "Most lookups (lmcache-ext warm's, /lookup) one serving process answers at once: "
              "the built-in server, or LMI's handler (each DJL Python worker). One more is "
              "refused at once, never queued: the built-in server answers 429, LMI's handler a "
              "miss. The vLLM scheduler's own lookups run one at a time and are not counted.",
              check=_positive),
    ConfigKey("drain_timeout_s", float, 20.0,
              "On SIGTERM (scale-in, docker stop): most time spent writing open sessions' "
              "pinned chunks, then the write-behind queue, to the shared tier (remote_url) "
              "before exiting; SageMaker sends SIGKILL 30 s after SIGTERM. 0 = no drain.",
              "s", check=_non_negative),
)

_BY_NAME = {k.name: k for k in TABLE}
_EXTRA_BY_NAME = {k.name: k for k in EXTRA_KEYS}
# Values some LMCache files carry that we read as another allowed value, said in the log.
ALIASES = {("pre_caching_hash_algorithm", "builtin"): "sha256",
           ("remote_serde", "cachegen"): "int4"}
# What the log adds when an alias is read, where the two values are not the same thing.
ALIAS_NOTES = {("remote_serde", "cachegen"): ": lmcache-ext's own 4-bit group-quantized codec, "
               "NOT LMCache's CacheGen bitstream (values are not interchangeable with LMCache's)"}


def key_of(name: str) -> ConfigKey:
    """The table's row for key ``name``."""
    return _BY_NAME[name]


def default_of(name: str) -> Any:
    """The table's default for key ``name`` (a fresh copy of a mutable one)."""
    default = _BY_NAME[name].default
    return dict(default) if isinstance(default, dict) else default


def _default(name: str) -> Any:
    """An ``EngineConfig`` field whose default is the table's: defaults are written only there."""
    if isinstance(_BY_NAME[name].default, dict):
        return field(default_factory=lambda: default_of(name))
    return field(default=default_of(name))


@dataclass(frozen=True)
class EngineConfig:
    """The effective, validated configuration. Build it with ``load_config``; ``EngineConfig()``
    is every key at its default. Field defaults come from ``TABLE``, never written here."""

    chunk_size: int = _default("chunk_size")
    local_cpu: bool = _default("local_cpu")
    max_local_cpu_size: float = _default("max_local_cpu_size")
    local_disk: str | None = _default("local_disk")
    max_local_disk_size: float = _default("max_local_disk_size")
    local_disk_auth_key_env: str | None = _default("local_disk_auth_key_env")
    local_disk_auth_previous_key_env: str | None = _default("local_disk_auth_previous_key_env")
    local_disk_codec: str = _default("local_disk_codec")
    local_disk_encryption_key_env: str | None = _default("local_disk_encryption_key_env")
    local_disk_encryption_previous_key_env: str | None = _default(
        "local_disk_encryption_previous_key_env")
    remote_url: str | None = _default("remote_url")
    remote_key_prefix: str = _default("remote_key_prefix")
    remote_password_env: str | None = _default("remote_password_env")
    remote_auth_key_env: str | None = _default("remote_auth_key_env")
    remote_auth_previous_key_env: str | None = _default("remote_auth_previous_key_env")
    remote_timeout_s: float = _default("remote_timeout_s")
    remote_backoff_s: float = _default("remote_backoff_s")
    remote_ttl_s: float = _default("remote_ttl_s")
    remote_serde: str = _default("remote_serde")
    remote_encryption_key_env: str | None = _default("remote_encryption_key_env")
    remote_encryption_previous_key_env: str | None = _default("remote_encryption_previous_key_env")
    save_unfull_chunk: bool = _default("save_unfull_chunk")
    extra_config: Mapping[str, Any] = _default("extra_config")
    pre_caching_hash_algorithm: str = _default("pre_caching_hash_algorithm")
    model_name: str | None = _default("model_name")
    cache_salt: str | None = _default("cache_salt")
    write_behind_queue_chunks: int = _default("write_behind_queue_chunks")
    cost_aware_retrieval: bool = _default("cost_aware_retrieval")
    min_retrieve_tokens: int = _default("min_retrieve_tokens")
    save_decode_cache: bool = _default("save_decode_cache")
    staging_chunks: int = _default("staging_chunks")
    async_load: str = _default("async_load")
    worker_lookup_timeout_s: float = _default("worker_lookup_timeout_s")
    worker_lookup_backoff_s: float = _default("worker_lookup_backoff_s")
    emf_metrics: bool | None = _default("emf_metrics")
    emf_interval_s: float = _default("emf_interval_s")
    emf_namespace: str = _default("emf_namespace")
    use_layerwise: bool = _default("use_layerwise")
    enable_stateful_sessions: bool = _default("enable_stateful_sessions")
    sessions_expiration_s: float = _default("sessions_expiration_s")
    session_pin_max_gib: float = _default("session_pin_max_gib")
    session_pins_max_fraction: float = _default("session_pins_max_fraction")
    max_open_sessions: int = _default("max_open_sessions")
    max_concurrent_lookups: int = _default("max_concurrent_lookups")
    drain_timeout_s: float = _default("drain_timeout_s")
    # Where each key's value came from ("default", "file /x.yaml", "env LMCACHE_X", "override").
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # LMCache-only keys that were set, each with its source; they change nothing here.
    not_applicable: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Derived once at construction.
    cpu_budget_bytes: int = field(init=False)
    disk_budget_bytes: int = field(init=False)
    disk_dir: str | None = field(init=False)
    use_odirect: bool = field(init=False)
    remote_codec: str = field(init=False)  # remote_serde as a codec name (naive -> raw)

    def __post_init__(self) -> None:
        derived = {
            "cpu_budget_bytes": int(self.max_local_cpu_size * GIB) if self.local_cpu else 0,
            "disk_budget_bytes": int(self.max_local_disk_size * GIB) if self.local_disk else 0,
            "disk_dir": resolve_disk_dir(self.local_disk) if self.local_disk else None,
            "use_odirect": bool(self.extra_config.get(
                "use_odirect", _EXTRA_BY_NAME["use_odirect"].default)),
            "remote_codec": "raw" if self.remote_serde == "naive" else self.remote_serde,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, "default")


_KEY_FIELDS = {f.name for f in fields(EngineConfig)
               if f.init and f.name not in ("sources", "not_applicable")}
assert _KEY_FIELDS == set(_BY_NAME), "EngineConfig fields and TABLE disagree"


def resolve_disk_dir(local_disk: str) -> str:
    """``file:///tmp/cache/``, ``/tmp/cache/``, the seed's ``file://tmp/cache/`` -> ``/tmp/cache``.

    A ``file://`` URL is always absolute (the seed's two-slash form names /tmp/cache, as LMI
    documents); a plain relative path is taken relative to the working directory.
    """
    if local_disk.startswith("file://"):
        path = "/" + local_disk[len("file://"):].lstrip("/")
    else:
        path = os.path.abspath(local_disk)
    return os.path.normpath(path)


# ---------------------------------------------------------------- parsing and checking values


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """An env var's boolean, in any case; raises ValueError with the allowed words."""
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError("expected a boolean (true/false/1/0)")


def parse_env_value(key: ConfigKey, text: str) -> Any:
    """Turn an env var's text into the key's type; raises ValueError with a short reason."""
    stripped = text.strip()
    if key.nullable and stripped.lower() in ("", "null", "none"):
        return None
    if key.type is bool:
        return parse_bool(stripped)
    if key.type is int:
        return int(stripped)
    if key.type is float:
        return float(stripped)
    if key.type is dict:
        # JSON, or the YAML flow style the seed uses ({'use_odirect': True}); both are data.
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = yaml.safe_load(stripped)
        return value
    return text


def parse_lmi_bool(text: str) -> bool:
    """An LMI option's boolean: ``true`` or ``false`` in any case. LMI reads every other word as
    off, so one we read another way ("1", "yes") would split the container in two: an error."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError("expected true or false (LMI reads anything but 'true' as off)")


def lmi_env_name(key: ConfigKey) -> str:
    """The LMI env var that also sets ``key`` ("" if none)."""
    return LMI_OPTION_PREFIX + key.lmi_option.upper() if key.lmi_option else ""


def _parse_text(key: ConfigKey, text: str, source: str) -> Any:
    if key.type is bool and key.lmi_option and source == f"env {lmi_env_name(key)}":
        return parse_lmi_bool(text)
    return parse_env_value(key, text)


def _type_error(key: ConfigKey, value: Any) -> str | None:
    if value is None:
        return None if key.nullable else "must not be null"
    expected = key.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if expected is int and isinstance(value, bool):
        return "expected an integer, got a boolean"
    if not isinstance(value, expected):
        return f"expected {expected.__name__}, got {type(value).__name__}"
    return None


def check_value(key: ConfigKey, value: Any) -> tuple[Any, str | None]:
    """Return (normalised value, error text or None)."""
    error = _type_error(key, value)
    if error or value is None:
        return value, error
    if key.type is float:
        value = float(value)
    if key.type is str and (key.name, value) in ALIASES:
        log.info("%s: %r is read as %r%s", key.name, value, ALIASES[key.name, value],
                 ALIAS_NOTES.get((key.name, value), ""))
        value = ALIASES[key.name, value]
    if key.choices and value not in key.choices:
        shown = ", ".join(json.dumps(c) for c in key.choices)
        return value, f"allowed: {shown}"
    if key.check:
        return value, key.check(value)
    if key.type is dict:
        return value, _check_extra(value)
    return value, None


def _check_extra(extra: Mapping[str, Any]) -> str | None:
    for name, value in extra.items():
        sub = _EXTRA_BY_NAME.get(name)
        if sub is None:
            return f"unknown key {name!r} in extra_config{_did_you_mean(name, _EXTRA_BY_NAME)}"
        error = _type_error(sub, value)
        if error:
            return f"extra_config.{name}: {error}"
    return None


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- reading the sources


def read_yaml_file(path: str) -> dict[str, Any]:
    """Read a YAML mapping; raises ConfigError naming the file (and the line for bad YAML)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"config file {path!r} cannot be read: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"config file {path!r} is not valid YAML{where}: {problem}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path!r} must hold a mapping of keys, got "
                           f"{type(data).__name__}"])
    return data


def config_file_from_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(path, env var name) of the config file named by the environment, if any."""
    for name in CONFIG_FILE_ENVS:
        if env.get(name):
            return env[name], name
    return None


def _env_candidates(env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(key name, env var name, text) for every engine key set in env, lowest precedence first:
    LMI's own names, then ``LMCACHE_<KEY>``, then ``OPTION_LMCACHE_<KEY>``."""
    found = [(key.name, var, env[var]) for key in TABLE
             if key.lmi_option and (var := lmi_env_name(key)) in env]
    for prefix in ENV_PREFIXES:
        for var in sorted(env):
            suffix = var[len(prefix):]
            if var.startswith(prefix) and suffix not in RESERVED_ENV_SUFFIXES:
                found.append((suffix.lower(), var, env[var]))
    return found


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EngineConfig:
    """Build the effective config from all sources; raises ConfigError listing every problem.

    ``path`` wins over a file named in the environment. ``env`` defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, Mapping[str, Any], bool]] = []  # (source, values, values_are_text)
    if path is None and (named := config_file_from_env(env)):
        path = named[0]
    if path is not None:
        layers.append((f"file {path}", read_yaml_file(path), False))
    for key_name, var, text in _env_candidates(env):
        layers.append((f"env {var}", {key_name: text}, True))
    if overrides:
        layers.append(("override", dict(overrides), False))
    return _build(layers)


def _build(layers: list[tuple[str, Mapping[str, Any], bool]]) -> EngineConfig:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    ignored: dict[str, str] = {}
    problems: list[str] = []
    named: set[str] = set()  # keys some source set, valid or not
    for source, mapping, is_text in layers:
        for name, raw in mapping.items():
            key = _BY_NAME.get(str(name))
            if key is None and str(name) in NOT_APPLICABLE_KEYS:
                ignored[str(name)] = source
                continue
            if key is None:
                shown = f"env {source.split()[-1]}" if is_text else f"key {name!r}"
                problems.append(f"{shown} ({source}): unknown key"
                                f"{_did_you_mean(str(name), _BY_NAME)}")
                continue
            named.add(key.name)
            try:
                typed = _parse_text(key, raw, source) if is_text else raw
            except (ValueError, yaml.YAMLError) as exc:
                problems.append(f"{key.name}: {raw!r} ({source}) is invalid: {exc}")
                continue
            typed, error = check_value(key, typed)
            if error:
                problems.append(f"{key.name}: {raw!r} ({source}) is invalid: {error}")
                continue
            values[key.name] = typed
            sources[key.name] = source
    problems += _cross_checks(values, sources, named)
    if problems:
        raise ConfigError(problems)
    for name, source in ignored.items():
        log.info("%s (%s): an LMCache-only key, not applicable to lmcache-ext; ignored",
                 name, source)
    return EngineConfig(**values, sources=sources, not_applicable=ignored)


def _cross_checks(given: Mapping[str, Any], sources: Mapping[str, str],
                  named: set[str]) -> list[str]:
    """Rules that involve more than one key (``given``: the keys set to valid values, the rest
    take defaults; ``named``: every key a source set, valid or not)."""
    problems = []
    values = {key.name: given.get(key.name, key.default) for key in TABLE}
    disk = values["local_disk"]
    disk_size = values["max_local_disk_size"]
    if disk and disk_size <= 0:
        problems.append(
            f"max_local_disk_size: {disk_size!r} ({sources.get('max_local_disk_size', 'default')}) "
            f"is invalid: the disk tier local_disk={disk!r} needs a size > 0 (GiB)")
    # A budget with no local_disk at all is a mistake; local_disk: null turns the tier off.
    if "local_disk" not in named and "max_local_disk_size" in given and disk_size > 0:
        problems.append(
            f"max_local_disk_size: {disk_size!r} ({sources.get('max_local_disk_size', 'default')}) "
            "is invalid without local_disk: a disk budget needs the tier's directory")
    if values["extra_config"].get("use_odirect") and not disk:
        problems.append("extra_config.use_odirect: true is invalid without local_disk "
                        "(O_DIRECT applies to the disk tier)")
    no_tier = not values["local_cpu"] and not disk and not values["remote_url"]
    if no_tier:
        problems.append("local_cpu: false leaves no tier: set local_cpu, local_disk or remote_url")
    return problems


def describe(config: EngineConfig) -> list[str]:
    """One line per key: ``name = value  (source)``, for logs and ``config show``."""
    lines = []
    for key in TABLE:
        value = getattr(config, key.name)
        unit = f" {key.unit}" if key.unit and value is not None else ""
        lines.append(f"{key.name} = {json.dumps(value)}{unit}  ({config.source_of(key.name)})")
    if config.disk_dir:
        lines.append(f"(disk tier directory resolves to {config.disk_dir})")
    for name, source in config.not_applicable.items():
        lines.append(f"(not applicable: {name}  ({source}), an LMCache-only key: ignored)")
    return lines


def as_dict(config: EngineConfig) -> dict[str, Any]:
    """Plain mapping of every key (for JSON output)."""
    return {key.name: getattr(config, key.name) for key in TABLE}
