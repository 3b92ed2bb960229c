"""``python -m cvae_mammo`` is the same as ``cvae-mammo``."""

import sys

from cvae_mammo.cli import main

sys.exit(main())
