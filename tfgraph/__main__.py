"""``python -m tfgraph``: the same as the ``tfgraph`` command."""

import sys

from tfgraph.cli import main

sys.exit(main())
