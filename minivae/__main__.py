"""``python -m minivae ...``: the same command line as the ``minivae`` script.

A Ctrl-C while this module imports the command line gives the one line and exit 130 too; the
package's ``__init__`` and minivae.cli import nothing heavy, so that window is a few milliseconds.
"""
import sys

try:
    from .cli import console
except KeyboardInterrupt:  # pragma: no cover - timing-dependent (tests/test_hardening_runs.py)
    sys.stderr.write("minivae: interrupted\n")
    sys.exit(130)

console()
