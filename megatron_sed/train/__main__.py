"""python -m megatron_sed.train (console script megatron-sed-train)."""

import sys

from megatron_sed.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
