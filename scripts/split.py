#!/usr/bin/env python
"""Same as `cvae-mammo split`: see `cvae-mammo split --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["split", *sys.argv[1:]]))
