"""``python -m rnnmath``: the same command as ``rnnmath``."""

import sys

from .cli import main

sys.exit(main())
