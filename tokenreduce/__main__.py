"""`python -m tokenreduce`: the command line where the `tokenreduce` console script is not on PATH."""

from tokenreduce.cli import console

if __name__ == "__main__":
    console()
