#!/usr/bin/env python
"""Same as `cvae-mammo fit-classifier`: see `cvae-mammo fit-classifier --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit-classifier", *sys.argv[1:]]))
