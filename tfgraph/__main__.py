"""``python -m tfgraph``: the same as the ``tfgraph`` command."""

import sys

from tfgraph.cli.main import main

sys.exit(main())
