"""MLproject entry point `prepare_iemocap`: parse parameters and call ser."""

import sys

from ser.cli import prepare_iemocap_main

if __name__ == "__main__":
    sys.exit(prepare_iemocap_main())
