"""MLproject entry point `tapt` (parameters: ser.config.TaptMethodConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("tapt"))
