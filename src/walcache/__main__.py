"""``python -m walcache`` is the ``walcache`` command."""

import sys

from .cli import main

sys.exit(main())
