"""MLproject entry point `search` (parameters: ser.config.SearchConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("search"))
