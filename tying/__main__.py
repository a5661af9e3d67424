"""``python -m tying``: the ``tying`` command."""

import sys

from .cli import main

sys.exit(main())
