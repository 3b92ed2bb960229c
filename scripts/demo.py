#!/usr/bin/env python
"""Same as `cvae-mammo demo`: see `cvae-mammo demo --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
