"""``python -m sdo``: the ``sdo`` command."""

import sys

from sdo.app.cli import main

sys.exit(main())
