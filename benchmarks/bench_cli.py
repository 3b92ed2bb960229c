#!/usr/bin/env python
"""Seconds for ``cvae-mammo COMMAND --help``, each command in a fresh process.

No command's help may import TensorFlow (tests/test_cli.py checks that); the target is
under 1.5 s each. Prints the fastest of ``--rounds`` runs per command and the 1-minute
load average, since a busy machine inflates every figure.

    python benchmarks/bench_cli.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from cvae_mammo.cli import COMMANDS

TARGET_SECONDS = 1.5


def help_seconds(command: str) -> float:
    """Wall-clock seconds of ``python -m cvae_mammo COMMAND --help``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cvae_mammo", command, "--help"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    """Print one line per command; exit status 1 when one misses the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per command (fastest kept)")
    args = parser.parse_args()
    slow = 0
    for command in COMMANDS:
        best = min(help_seconds(command) for _ in range(args.rounds))
        slow += best > TARGET_SECONDS
        print(f"cvae-mammo {command:<15} --help  {best:5.2f} s")
    print(f"1-minute load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"target {TARGET_SECONDS} s")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
