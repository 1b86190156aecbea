"""MLproject entry point `probe_head` (parameters: ser.config.ProbeConfig, plus force, recipe)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("probe_head"))
