"""MLproject entry point `pretrain_w2v1` (parameters: ser.config.Phase1Config, plus force)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("pretrain_w2v1"))
