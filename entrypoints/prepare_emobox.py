"""MLproject entry point `prepare_emobox` (parameters: ser.config.PrepareEmoboxConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("prepare_emobox"))
