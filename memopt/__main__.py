"""``python -m memopt``: the same as the ``memopt`` console script."""

import sys

from memopt.cli import main

sys.exit(main())
