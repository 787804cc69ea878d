"""`python -m genray ...`: the same as the `genray` command."""
import sys

from genray.cli import main

if __name__ == "__main__":
    sys.exit(main())
