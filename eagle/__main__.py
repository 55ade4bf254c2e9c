"""``python -m eagle``: the same command line as the ``eagle`` console script."""

import sys

from eagle.cli import main

sys.exit(main())
