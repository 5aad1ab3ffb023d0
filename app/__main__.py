"""``python -m app [--preset P | --model DIR] [--host H] [--port N]`` is ``anygpt app …``."""

import sys

from anygpt.cli import main

sys.exit(main(["app", *sys.argv[1:]]))
