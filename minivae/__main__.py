"""``python -m minivae ...``: the same command line as the ``minivae`` script."""
import sys

from .cli import main

sys.exit(main())
