#!/usr/bin/env python
"""Same as `cvae-mammo preprocess`: see `cvae-mammo preprocess --help`."""

import sys

from cvae_mammo.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
