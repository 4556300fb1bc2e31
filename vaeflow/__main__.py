"""``python -m vaeflow ...`` is the same as the ``vaeflow`` command."""

import sys

from .cli import main

sys.exit(main())
