"""MLproject entry point `demo_corpus`: parse parameters and call ser."""

import sys

from ser.cli import demo_corpus_main

if __name__ == "__main__":
    sys.exit(demo_corpus_main())
