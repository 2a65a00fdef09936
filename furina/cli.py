"""The `furina` command: one subcommand per module in COMMAND_MODULES.

Each listed module defines `add_cli_parser(subparsers)`, which adds its subcommand and
sets `handler` to a function taking the parsed arguments and returning an exit code.
Errors meant for the user raise `CliError` (or ValueError, or an OSError such as
FileNotFoundError or PermissionError), printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "furina.base_model",
    "furina.demo_data",
    "furina.train",
    "furina.evaluate",
    "service.demo",
    "merger.cli",
    "service.cli",
]


class CliError(Exception):
    """An error with a message for the command-line user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="furina",
        description="Train, merge and serve FURINA mixture-of-LoRA-experts adapters.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except (CliError, ValueError, OSError) as error:
        print(f"furina {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"furina {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
