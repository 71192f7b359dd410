"""python -m tests.parity [--report PATH] [--full] [--device cpu|cuda] [pytest args...]

Runs the parity matrix through pytest and writes the markdown report.
"""

import argparse
import sys

import pytest


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.parity")
    parser.add_argument("--report", default="parity.md", help="markdown report path (default: parity.md)")
    parser.add_argument("--full", action="store_true", help="the full product instead of all pairs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args, rest = parser.parse_known_args()
    selector = "test_parity_gpu or test_pairwise_gpu" if args.device == "cuda" else "test_parity_cpu or test_pairwise_cpu"
    argv = ["tests/parity", "-q", "-k", selector, f"--parity-report={args.report}", *rest]
    if args.full:
        argv.append("--parity-full")
    if args.device == "cuda":
        argv += ["-m", "gpu"]
    return pytest.main(argv)


if __name__ == "__main__":
    sys.exit(main())
