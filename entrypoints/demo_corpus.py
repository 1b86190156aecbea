"""MLproject entry point `demo_corpus` (parameters: ser.config.DemoCorpusConfig)."""

import sys

from ser.cli import entry_main

sys.exit(entry_main("demo_corpus"))
