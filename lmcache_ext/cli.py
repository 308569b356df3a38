"""The ``lmcache-ext`` command: ``config show``, ``config check``, ``serve`` and ``advise``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lmcache_ext.config import ConfigError, EngineConfig, as_dict, describe, load_config
from lmcache_ext.container.advise_cli import add_advise_parser

EXIT_CONFIG_ERROR = 2


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
    """Validate the config and, for a disk tier, its directory (writable, room, O_DIRECT)."""
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
            print(f"local_disk: {config.disk_dir} has {found.free_bytes / 2**30:.2f} GiB free, "
                  f"less than max_local_disk_size ({config.max_local_disk_size} GiB): chunks "
                  f"that find no room are not stored")
    print(f"config OK: tiers {', '.join(tiers)}")
    return 0


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
    try:
        endpoint.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
    return 0


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
    add_advise_parser(commands)
    for sub in (show, check, serve_parser):
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
