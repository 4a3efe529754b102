"""`python -m flows.cli`: the `radflow` console script."""

import sys

from flows.cli import main

sys.exit(main())
