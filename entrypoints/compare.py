"""MLproject entry point `compare` (parameters: ser.config.CompareConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("compare"))
