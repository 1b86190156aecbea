"""MLproject entry point `probe` (parameters: ser.config.ProbeMethodConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("probe"))
