"""MLproject entry point `tapt_pretrain` (parameters: ser.config.TaptConfig, plus force)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("tapt_pretrain"))
