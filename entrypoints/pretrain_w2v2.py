"""MLproject entry point `pretrain_w2v2` (parameters: ser.config.Phase2Config, plus force)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("pretrain_w2v2"))
