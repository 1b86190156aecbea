"""MLproject entry point `ptapt` (parameters: ser.config.PtaptMethodConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("ptapt"))
