#!/usr/bin/env python
"""Same as `cvae-mammo fit-cvae`: see `cvae-mammo fit-cvae --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit-cvae", *sys.argv[1:]]))
