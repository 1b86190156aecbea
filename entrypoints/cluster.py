"""MLproject entry point `cluster` (parameters: ser.config.ClusterConfig, plus force)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("cluster"))
