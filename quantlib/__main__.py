"""`python -m quantlib …`: the command line (see quantlib.cli)."""

import sys

from quantlib.cli import main

sys.exit(main())
