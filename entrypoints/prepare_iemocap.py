"""MLproject entry point `prepare_iemocap` (parameters: ser.config.PrepareIemocapConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("prepare_iemocap"))
