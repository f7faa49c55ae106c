"""`python -m tokenreduce.cli`: the same program as the `tokenreduce` console script."""

import sys

from tokenreduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
