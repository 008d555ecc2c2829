"""``python -m fedhello``: the same command line as the ``fedhello`` script."""

import sys

from fedhello.cli import main

sys.exit(main())
