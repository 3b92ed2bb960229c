#!/usr/bin/env python
"""Same as `cvae-mammo report`: see `cvae-mammo report --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
