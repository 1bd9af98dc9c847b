"""``python -m hairdiff_cli``: the ``hairdiff`` console script without installing it."""

import sys

from . import main

sys.exit(main())
