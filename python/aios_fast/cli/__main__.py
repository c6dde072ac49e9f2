"""``python -m aios_fast.cli`` runs the ``aios-fast`` command line."""

import sys

from . import main

sys.exit(main())
