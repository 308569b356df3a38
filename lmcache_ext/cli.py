"""The ``lmcache-ext`` command: ``config show``, ``config check`` and ``run``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lmcache_ext.config import ConfigError, EngineConfig, as_dict, describe, load_config

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
    config = _load(args)
    tiers = ["cpu"] if config.local_cpu else []
    tiers += ["disk"] if config.disk_dir else []
    tiers += ["remote"] if config.remote_url else []
    print(f"config OK: tiers {', '.join(tiers)}")
    return 0


def run(args: argparse.Namespace) -> int:
    config = _load(args)
    print("\n".join(describe(config)))
    print("lmcache-ext run: the built-in serving endpoint is not part of this build yet; "
          "the effective config above is valid.")
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
    run_parser = commands.add_parser("run", help="the main job (prints the config for now)")
    run_parser.set_defaults(handler=run)
    for sub in (show, check, run_parser):
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
