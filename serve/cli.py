"""`cinevivid` command line. Each feature module registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing `register(subparsers)`; a missing optional module is skipped.
COMMAND_MODULES = [
    "serve.model_cli",
    "serve.launcher",
    "serve.admin_cli",
    "client.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cinevivid", description="CineVivid text-to-video serving stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
