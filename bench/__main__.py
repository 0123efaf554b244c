"""`python -m bench ...`: the `bench` command, for environments without its console script."""

import sys

from bench.cli import main

sys.exit(main())
