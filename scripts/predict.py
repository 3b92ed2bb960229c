#!/usr/bin/env python
"""Same as `cvae-mammo predict`: see `cvae-mammo predict --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
