"""MLproject entry point `vft` (parameters: ser.config.MethodConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("vft"))
