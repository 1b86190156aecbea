"""MLproject entry point `finetune` (ser.config.FinetuneConfig, plus force, register_as)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("finetune"))
