"""cordumctl: the operator's command line.

This release: `cordumctl version` and `cordumctl up` (the local control plane, the same as
`python -m cordum.dev.stack`). The commands that talk to a running gateway arrive with the services;
until then they say so and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import cordum

# Commands of the Go cordumctl that arrive with the services (listed in --help).
LATER = ("status", "job", "workflow", "approval", "dlq", "worker", "policy", "pack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cordumctl",
        description="Cordum control plane command line.",
        epilog="Not available yet in this release: " + ", ".join(LATER) + ".",
    )
    parser.add_argument("--version", action="version", version=f"cordumctl {cordum.__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        help="version: print the version; up: run the control plane locally "
        "(options: cordumctl up --help)",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "version":
        print(f"cordumctl {cordum.__version__}")
        return 0
    if args.command == "up":
        from cordum.dev import stack

        return stack.main(args.args, prog="cordumctl up")
    print(f"cordumctl: {args.command} is not available yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
