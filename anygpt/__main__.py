"""``python -m anygpt`` runs the command line."""

import sys

from anygpt.cli import main

sys.exit(main())
