"""``lmcache-ext advise``: the sizing advisor on the command line (arithmetic in ``advisor``)."""

from __future__ import annotations

import argparse
import json
import sys

from lmcache_ext.container.advisor import (
    KNOWN_MODELS,
    advise,
    as_json,
    known_model,
    plan_capacity,
    read_model_config,
    render,
)
from lmcache_ext.container.instances import GB, GIB, INSTANCES, Instance, get_instance


class AdviseError(ValueError):
    """A bad argument combination or an unreadable model config; the CLI prints it, exits 2."""


def _model(args: argparse.Namespace):
    try:
        if args.model_config:
            return read_model_config(args.model_config)
        return known_model(args.model)
    except KeyError as exc:
        raise AdviseError(str(exc.args[0]) if exc.args else str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise AdviseError(f"--model-config {args.model_config}: {exc}") from exc


def _instance(args: argparse.Namespace) -> Instance:
    custom = (args.gpus, args.gpu_mem, args.ram)
    if args.instance:
        try:
            return get_instance(args.instance)
        except KeyError as exc:
            raise AdviseError(str(exc.args[0])) from exc
    if None in custom:
        raise AdviseError("give --instance, or all of --gpus, --gpu-mem and --ram (and --nvme)")
    return Instance("custom", args.gpus, args.gpu_mem, args.ram, (args.nvme or 0) * GIB / GB)


def run_advise(args: argparse.Namespace) -> int:
    capacity = plan_capacity(_model(args), _instance(args), tp=args.tp)
    advice = advise(capacity, args.context) if args.context else None
    if args.json:
        print(json.dumps(as_json(capacity, advice), indent=2))
    else:
        print("\n".join(render(capacity, advice)))
    return 0


def add_advise_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    advise_parser.add_argument("--json", action="store_true", help="print JSON")
    advise_parser.set_defaults(handler=_handle)
    return advise_parser


def _handle(args: argparse.Namespace) -> int:
    try:
        return run_advise(args)
    except AdviseError as exc:
        print(f"lmcache-ext advise: {exc}", file=sys.stderr)
        return 2
