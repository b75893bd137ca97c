"""The `unipelt-fast` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unipelt-fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="latency and memory benchmarks (issue 8)")
    parser.parse_args(argv)
    print("unipelt-fast bench is not written yet (issue 8)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
