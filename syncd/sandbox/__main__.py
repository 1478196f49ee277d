"""``python -m syncd.sandbox``."""

import sys

from syncd.sandbox.cli import main

sys.exit(main())
