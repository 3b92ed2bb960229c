#!/usr/bin/env python
"""Same as `cvae-mammo calibrate`: see `cvae-mammo calibrate --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
