"""The ``hybrimoe-kt`` command line. Each sub-command lives in ``hybrimoe_kt/commands/<name>.py``
and exposes ``add_parser(subparsers)``; this module only wires them and turns user errors into one
clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# sub-command name -> module under hybrimoe_kt.commands (imported lazily: no torch at start-up)
COMMANDS = {
    "simulate": "simulate",
    "calibrate": "calibrate",
    "record": "record",
    "trace-stats": "trace_stats",
    "synth-trace": "synth_trace",
    "make-tiny-model": "make_tiny_model",
    "rules": "rules",
    "serve": "serve",
    "fidelity": "fidelity",
    "chat": "chat",
    "ab": "ab",
}


class UserError(Exception):
    """An error the user caused (bad flag, bad file): printed as one line, exit code 2."""


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrimoe-kt",
        description="Hybrid CPU-GPU inference of Mixture-of-Experts models (HybriMoE as a kTransformers "
                    "plugin): chat, serve and A/B rule files; simulate, calibrate and inspect routing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # import only the command being run (help lists all of them)
    wanted = [a for a in argv if not a.startswith("-")][:1]
    for name, module in COMMANDS.items():
        if wanted and wanted[0] in COMMANDS and wanted[0] != name:
            sub.add_parser(name)
            continue
        importlib.import_module(f"hybrimoe_kt.commands.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"hybrimoe-kt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
