"""``python -m wsroom COMMAND``: the ``wsroom`` command without the console script."""

import sys

from ._cli import main

sys.exit(main())
