"""``python -m rprop``: the same as the ``rprop`` command."""

import sys

from rprop.cli import main

sys.exit(main())
