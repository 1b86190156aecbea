"""MLproject entry point `predict` (parameters: ser.config.PredictConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("predict"))
