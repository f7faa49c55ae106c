"""`python -m tokenreduce`: the command line where the `tokenreduce` console script is not on PATH."""

import sys

from tokenreduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
