"""`python -m estimator MODEL [options]`: the command line of ../shared/SPEC.md, a thin shell over the library."""

from __future__ import annotations

import sys

from estimator.cli import main

if __name__ == "__main__":
    sys.exit(main())
