"""`python -m loadtest.harness run|compare|report ...` (the same as `irouter loadtest ...`)."""

from __future__ import annotations

import sys

from loadtest.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
