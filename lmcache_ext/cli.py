"""The ``lmcache-ext`` command: ``config show``, ``config check``, ``serve``, ``route``,
``advise`` and ``warm``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from lmcache_ext.config import (
    ConfigError,
    EngineConfig,
    as_dict,
    default_of,
    describe,
    load_config,
)
from lmcache_ext.sizing.advisor import (
    BYTES_PER_TOKEN,
    KNOWN_MODELS,
    PrefixAdvice,
    advise,
    as_json,
    known_model,
    plan_capacity,
    read_model_config,
    render,
    suggest_prefix_length,
)
from lmcache_ext.sizing.instances import INSTANCES, Instance, get_instance
from lmcache_ext.units import GB, GIB

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _load(args: argparse.Namespace) -> EngineConfig:
    return load_config(path=args.config)


def config_show(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.json:
        sources = {key: config.source_of(key) for key in as_dict(config)}
        print(json.dumps({"config": as_dict(config), "sources": sources,
                          "disk_dir": config.disk_dir}, indent=2))
    else:
        print("\n".join(describe(config)))
    return 0


def config_check(args: argparse.Namespace) -> int:
    """Validate the config, the disk tier's directory (writable, room, O_DIRECT) and the chunk
    keys' env vars; say how each shared tier's chunks are checked (keyed or not)."""
    config = _load(args)
    tiers = ["cpu"] if config.local_cpu else []
    tiers += ["disk"] if config.disk_dir else []
    tiers += ["remote"] if config.remote_url else []
    if config.disk_dir:
        from lmcache_ext.storage.direct_io import check_directory  # imports torch: only here

        found = check_directory(config.disk_dir)
        if found.problem:
            raise ConfigError([f"local_disk: {config.local_disk!r} "
                               f"({config.source_of('local_disk')}): {found.problem}"])
        if config.use_odirect:
            warning = "" if found.odirect else "WARNING: use_odirect is on but "
            fallback = "" if found.odirect else "; the tier will use buffered I/O"
            print(f"local_disk: {warning}{found.odirect_reason}{fallback}")
        if found.free_bytes < config.disk_budget_bytes:
            print(f"local_disk: {config.disk_dir} has {found.free_bytes / GIB:.2f} GiB free, "
                  f"less than max_local_disk_size ({config.max_local_disk_size} GiB): chunks "
                  f"that find no room are not stored")
    _check_integrity(config)
    for name, source in config.not_applicable.items():
        print(f"{name} ({source}): an LMCache-only key, not applicable to lmcache-ext; ignored")
    print(f"config OK: tiers {', '.join(tiers)}")
    return 0


def _check_integrity(config: EngineConfig) -> None:
    """Raise ConfigError for a chunk key env var that is unset or too short; print the notes."""
    from lmcache_ext.storage.auth import chunk_auth, integrity_notes  # imports torch: only here

    for tier, enabled in (("remote", config.remote_url), ("disk", config.local_disk)):
        if enabled:
            chunk_auth(config, tier)
    for warning, text in integrity_notes(config):
        print(f"{'WARNING: ' if warning else ''}{text}")


def serve(args: argparse.Namespace) -> int:
    config = _load(args)
    # Imported here: torch and transformers take seconds to import; config commands stay fast.
    from lmcache_ext.serving.app import build_endpoint, resolve_port

    endpoint = build_endpoint(config, args.model, args.host, resolve_port(args.port),
                              cache_on=not args.no_cache)
    print(f"lmcache-ext serving on {endpoint.url}  (cache {'off' if args.no_cache else 'on'})")
    print(f"  curl -s {endpoint.url}/invocations -H 'Content-Type: application/json' "
          "-d '{\"inputs\": \"What is a KV cache?\", \"parameters\": "
          "{\"max_new_tokens\": 32}, \"stream\": true}'", flush=True)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        endpoint.server.serve_forever()
    except KeyboardInterrupt:
        endpoint.close()
    except Terminated:  # SageMaker's scale-in or replacement, docker stop: drain, then exit
        logging.getLogger(__name__).info("SIGTERM: draining within %g s (drain_timeout_s)",
                                         config.drain_timeout_s)
        endpoint.drain_and_close(config.drain_timeout_s)
    except BaseException:
        endpoint.close()
        raise
    return 0


class Terminated(Exception):
    """SIGTERM arrived (raised out of ``serve_forever`` by the signal handler)."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain
    raise Terminated()


def route(args: argparse.Namespace) -> int:
    """A router in front of ``--replicas N`` built-in replicas (started here) or ``--backend``
    URLs (already running)."""
    from lmcache_ext.routing.policy import PrefixAware, make_policy
    from lmcache_ext.routing.router import Backend, Router

    if (args.replicas is not None) == bool(args.backend):
        print("lmcache-ext route: give --replicas N or --backend URL (repeated), not both",
              file=sys.stderr)
        return 2
    try:
        if args.replicas is not None and args.replicas < 1:
            raise ValueError(f"--replicas: {args.replicas} must be >= 1")
        if args.timeout_s <= 0:
            raise ValueError(f"--timeout-s: {args.timeout_s} must be > 0")
        policy = make_policy(args.mode, settings=PrefixAware(args.prefix_length,
                                                             args.concurrency_threshold))
        backends = [Backend.from_url(url, f"backend-{i}") for i, url in
                    enumerate(args.backend or [])]
    except ValueError as exc:
        print(f"lmcache-ext route: {exc}", file=sys.stderr)
        return 2
    from lmcache_ext.serving.app import resolve_port  # imports torch

    replicas = None
    if args.replicas:
        from lmcache_ext.routing.replicas import start_replicas

        replicas = start_replicas(args.replicas, _load(args), args.model, host=args.host,
                                  cache_on=not args.no_cache)
        backends = replicas.backends
    router = Router(backends, policy, args.host, resolve_port(args.port),
                    timeout_s=args.timeout_s, endpoint_name=args.endpoint_name)
    print(f"lmcache-ext routing on {router.url} ({args.mode}) to "
          f"{', '.join(b.url for b in backends)}", flush=True)
    try:
        router.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        router.close()
        if replicas is not None:
            replicas.close()
    return 0


def _add_route_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from lmcache_ext.routing.policy import (
        DEFAULT_CONCURRENCY_THRESHOLD,
        DEFAULT_PREFIX_LENGTH,
        MODES,
        SAGEMAKER_STRATEGIES,
    )
    from lmcache_ext.routing.router import DEFAULT_TIMEOUT_S

    parser = commands.add_parser(
        "route", help="SageMaker's front end for local replicas (sessions, routing modes)",
        description="Serve /invocations, /ping and SageMaker runtime's REST paths "
                    "(POST /endpoints/NAME/invocations[-response-stream]) in front of N "
                    "replicas: a session stays on the replica that created it, other requests "
                    "go where --mode says.")
    parser.add_argument("--replicas", type=int, help="start N built-in replicas here")
    parser.add_argument("--backend", action="append", help="a running replica's URL "
                                                            "(repeat for each)")
    parser.add_argument("--mode", default="least_outstanding",
                        choices=[*MODES, *SAGEMAKER_STRATEGIES],
                        help="routing of requests without a session, ours or SageMaker's name "
                             "(default least_outstanding)")
    parser.add_argument("--prefix-length", type=int, default=DEFAULT_PREFIX_LENGTH,
                        help="prefix_aware: SageMaker's PrefixLength, bytes of the body hashed "
                             f"(default {DEFAULT_PREFIX_LENGTH})")
    parser.add_argument("--concurrency-threshold", type=int,
                        default=DEFAULT_CONCURRENCY_THRESHOLD,
                        help="prefix_aware: SageMaker's ConcurrencyThreshold, requests in flight "
                             "on the prefix's replica before another takes the request "
                             f"(default {DEFAULT_CONCURRENCY_THRESHOLD})")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="a replica silent this long is an error (default "
                             f"{DEFAULT_TIMEOUT_S:.0f})")
    parser.add_argument("--endpoint-name", help="answer the REST paths for this endpoint name "
                                                "only, as SageMaker does (default: any name)")
    parser.add_argument("--model", help="--replicas: local HF model folder (default SmolLM2)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, help="router port (default "
                                                 "$SAGEMAKER_BIND_TO_PORT or 8080)")
    parser.add_argument("--no-cache", action="store_true", help="--replicas: serve without "
                                                                "the cache")
    parser.set_defaults(handler=route)
    return parser


WARM_HELP = """\
Each document is sent once as a prefill-only request (one new token) so its KV is computed and
stored in every tier; a later question whose prompt starts the same way loads it. The prefix must
match the application's prompt: --template wraps each document, {document} marking where its
text goes (replaced literally), e.g. for an application that sends the document first:
  --template $'Answer from this document.\\n\\n{document}\\n\\nQuestion: '
With --chat the wrapped text is sent as an OpenAI chat request's system message (the endpoint's
chat template renders it as it renders the application's own system message).
Resumable: each document is first looked up (custom attribute lmcache-ext-lookup, answered by
the built-in server and by lmcache-ext's LMI handler) and skipped when its whole chunks are
cached; an endpoint that does not answer lookups (LMI without lmcache-ext's connector) just
warms every document. Behind an endpoint of several
instances a document lands on the instance that served it: the others see it only through a
shared tier (Redis/Valkey). Exit 0: all warmed or skipped; 1: some failed; 2: bad arguments;
130: interrupted (Ctrl-C): what was done is reported, a rerun sends the rest."""


def warm_command(args: argparse.Namespace) -> int:
    """``lmcache-ext warm``: read the documents, warm them, print the summary."""
    from lmcache_ext.client.warm import Progress, read_documents, warm

    try:
        if (args.url is None) == (args.endpoint is None):
            raise ValueError("give --url URL or --endpoint NAME (one of them)")
        if args.concurrency < 1:
            raise ValueError(f"--concurrency: {args.concurrency} must be >= 1")
        template = _warm_template(args)
        documents = read_documents(args.docs, args.text_field)
        if not documents:
            raise ValueError(f"--docs {args.docs}: no documents (*.txt, *.md or JSONL lines)")
        transport = _warm_transport(args)
    except ValueError as exc:
        print(f"lmcache-ext warm: {exc}", file=sys.stderr)
        return 2
    progress = Progress(len(documents))
    try:
        summary = warm(documents, transport, template, args.concurrency, chat=args.chat,
                       on_result=progress)
    except KeyboardInterrupt:
        progress.end()
        done = progress.last
        if done is not None:
            print("\n".join(done.lines()))
        print(f"interrupted: {len(done.results) if done else 0} of {len(documents)} documents "
              f"done; run the same command again to send the rest (done ones are skipped)")
        return EXIT_INTERRUPTED
    progress.end()
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1


def _warm_template(args: argparse.Namespace) -> str:
    from lmcache_ext.client.warm import DEFAULT_TEMPLATE, check_template

    if args.template_file:
        try:
            with open(args.template_file, encoding="utf-8") as file:
                return check_template(file.read())
        except OSError as exc:
            raise ValueError(f"--template-file: {exc}") from exc
    return check_template(args.template if args.template is not None else DEFAULT_TEMPLATE)


def _warm_transport(args: argparse.Namespace):
    from lmcache_ext.client.transport import HttpTransport, SageMakerTransport

    if args.timeout_s <= 0:
        raise ValueError(f"--timeout-s: {args.timeout_s} must be > 0")
    if args.url is not None:
        return HttpTransport(args.url, timeout_s=args.timeout_s)
    try:
        import boto3  # the `client` extra
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError as exc:
        raise ValueError(f"--endpoint needs boto3 (pip install 'lmcache-ext[client]'): "
                         f"{exc}") from exc
    try:
        client = boto3.client("sagemaker-runtime", endpoint_url=args.endpoint_url,
                              region_name=args.region,
                              config=Config(read_timeout=args.timeout_s,
                                            max_pool_connections=max(10, args.concurrency)))
    except BotoCoreError as exc:  # e.g. no region configured
        raise ValueError(f"--endpoint {args.endpoint}: {exc}") from exc
    return SageMakerTransport(args.endpoint, client=client)


def _add_warm_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from lmcache_ext.client.transport import DEFAULT_TIMEOUT_S
    from lmcache_ext.client.warm import DEFAULT_CONCURRENCY

    parser = commands.add_parser(
        "warm", help="pre-warm the cache with documents (prefill-only requests)",
        description=WARM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", required=True, help="a folder of *.txt / *.md files (one "
                        "document each), a .jsonl file (one object per line) or a text file")
    parser.add_argument("--text-field", default="text", help="JSONL: the field holding the "
                        "text (default text; an 'id' field names the document)")
    target = parser.add_argument_group("target (one of)")
    target.add_argument("--url", help="the container or built-in server, e.g. "
                                      "http://127.0.0.1:8080 (POST /invocations)")
    target.add_argument("--endpoint", help="a SageMaker endpoint's name (boto3 sagemaker-runtime)")
    parser.add_argument("--endpoint-url", help="--endpoint: another SageMaker runtime URL, e.g. "
                        "lmcache-ext route's (default: boto3's resolution, "
                        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME included)")
    parser.add_argument("--region", help="--endpoint: AWS region (default: boto3's)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--template", help="the prompt around each document, {document} "
                          "where its text goes (default: the document alone)")
    template.add_argument("--template-file", help="read --template from a file (UTF-8, as is)")
    parser.add_argument("--chat", action="store_true", help="send the wrapped document as a "
                        "chat request's system message (default: LMI schema 'inputs')")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"documents in flight (default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"one request's time limit (default {DEFAULT_TIMEOUT_S:.0f})")
    parser.set_defaults(handler=warm_command)
    return parser


class AdviseError(ValueError):
    """A bad argument combination or an unreadable model config; the CLI prints it, exits 2."""


def _advise_model(args: argparse.Namespace):
    try:
        if args.model_config:
            return read_model_config(args.model_config)
        return known_model(args.model)
    except KeyError as exc:
        raise AdviseError(str(exc.args[0]) if exc.args else str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise AdviseError(f"--model-config {args.model_config}: {exc}") from exc


def _advise_instance(args: argparse.Namespace) -> Instance:
    custom = (args.gpus, args.gpu_mem, args.ram)
    if args.instance:
        try:
            return get_instance(args.instance)
        except KeyError as exc:
            raise AdviseError(str(exc.args[0])) from exc
    if None in custom:
        raise AdviseError("give --instance, or all of --gpus, --gpu-mem and --ram (and --nvme)")
    return Instance("custom", args.gpus, args.gpu_mem, args.ram, (args.nvme or 0) * GIB / GB)


def _advise_prefix(args: argparse.Namespace) -> PrefixAdvice | None:
    if args.shared_prefix_tokens is None:
        if args.group_prefix_tokens is not None:
            raise AdviseError("--group-prefix-tokens: only with --shared-prefix-tokens")
        return None
    if args.bytes_per_token <= 0:
        raise AdviseError(f"--bytes-per-token: {args.bytes_per_token} must be > 0")
    try:
        return suggest_prefix_length(args.chunk_size, args.shared_prefix_tokens,
                                     args.group_prefix_tokens, args.bytes_per_token)
    except ValueError as exc:
        raise AdviseError(str(exc)) from exc


def run_advise(args: argparse.Namespace) -> int:
    capacity = plan_capacity(_advise_model(args), _advise_instance(args), tp=args.tp)
    advice = advise(capacity, args.context) if args.context else None
    prefix = _advise_prefix(args)
    if args.json:
        out = as_json(capacity, advice)
        if prefix is not None:
            out["prefix_aware"] = {"prefix_length": prefix.prefix_length,
                                   "key_tokens": prefix.key_tokens, "reason": prefix.reason}
        print(json.dumps(out, indent=2))
        return 0
    print("\n".join(render(capacity, advice)))
    if prefix is not None:
        print(f"SageMaker PREFIX_AWARE routing: --prefix-length {prefix.prefix_length} (bytes of "
              f"the request body, ~{prefix.key_tokens} tokens): {prefix.reason}")
    return 0


def _add_advise_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    advise_parser = commands.add_parser(
        "advise", help="size the cache tiers for a model on an instance",
        description="KV bytes per token, the GPU KV pool left after the weights, and whether "
                    "a context needs no offloading, CPU RAM or NVMe, with sizes.")
    model = advise_parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-config", help="a Hugging Face config.json (or its folder)")
    model.add_argument("--model", help=f"a known model: {', '.join(KNOWN_MODELS)}")
    advise_parser.add_argument("--instance", help=f"SageMaker instance: {', '.join(INSTANCES)}")
    advise_parser.add_argument("--gpus", type=int, help="GPUs (instead of --instance)")
    advise_parser.add_argument("--gpu-mem", type=float, help="GiB per GPU")
    advise_parser.add_argument("--ram", type=float, help="host RAM, GiB")
    advise_parser.add_argument("--nvme", type=float, help="local NVMe, GiB (default 0)")
    advise_parser.add_argument("--tp", type=int, help="tensor parallel degree (default: chosen)")
    advise_parser.add_argument("--context", type=int,
                               help="tokens of reusable context to plan for")
    advise_parser.add_argument("--shared-prefix-tokens", type=int,
                               help="tokens every request starts with (a system prompt): "
                                    "suggest SageMaker's PREFIX_AWARE PrefixLength")
    advise_parser.add_argument("--group-prefix-tokens", type=int,
                               help="tokens a group of requests shares after that (a document), "
                                    "checked against the suggestion")
    advise_parser.add_argument("--chunk-size", type=int, default=default_of("chunk_size"),
                               help="the cache's chunk_size (default %(default)s)")
    advise_parser.add_argument("--bytes-per-token", type=float, default=BYTES_PER_TOKEN,
                               help="bytes of request body per prompt token (default "
                                    "%(default)s: English text)")
    advise_parser.add_argument("--json", action="store_true", help="print JSON")
    advise_parser.set_defaults(handler=_advise)
    return advise_parser


def _advise(args: argparse.Namespace) -> int:
    try:
        return run_advise(args)
    except AdviseError as exc:
        print(f"lmcache-ext advise: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcache-ext", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="show or check the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the effective config and its sources")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=config_show)
    check = config_commands.add_parser("check", help="exit 0 if the config is valid, else 2")
    check.set_defaults(handler=config_check)
    serve_parser = commands.add_parser("serve", help="serve a model over HTTP, cache on")
    serve_parser.add_argument("--model", help="local HF model folder (default: SmolLM2-135M)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="bind address")
    serve_parser.add_argument("--port", type=int, help="port (default $SAGEMAKER_BIND_TO_PORT "
                                                       "or 8080)")
    serve_parser.add_argument("--no-cache", action="store_true", help="serve without the cache")
    serve_parser.set_defaults(handler=serve)
    route_parser = _add_route_parser(commands)
    _add_advise_parser(commands)
    _add_warm_parser(commands)
    for sub in (show, check, serve_parser, route_parser):
        sub.add_argument("--config", help="YAML config file (else LMCACHE_CONFIG_FILE / "
                                          "OPTION_LMCACHE_CONFIG_FILE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
