"""The `maccap` command line: one registry of subcommands. Each module in COMMANDS adds its subcommand with
`add_parser(subparsers)` and `set_defaults(run=...)`; `run(args)` returns the exit status. What goes wrong is a
MacCapError, printed as one line (exit status 2)."""

import argparse
import sys

from ..demo import demo
from . import (captioning, convert_original, evaluation, hub, onnx_export, pcm, selfcheck, serve, synthesize, training,
               vqa)
from .errors import MacCapError

COMMANDS = (demo, selfcheck, training, pcm, synthesize, hub, convert_original, captioning, evaluation, vqa, serve,
            onnx_export)


def build_parser():
    parser = argparse.ArgumentParser(prog="maccap", description="MacCap zero-shot captioning")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MacCapError as error:
        print(f"maccap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
