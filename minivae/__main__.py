"""``python -m minivae ...`` and the ``minivae`` console script (``entry``): the command line.

Nothing is imported at module level but ``sys``, and the package's ``__init__`` imports nothing, so a
Ctrl-C that lands while the command line itself is being imported (argparse, then numpy, numba...)
still gives the one line ``minivae: interrupted`` and exit 130 (minivae.cli.console does the rest).
"""
import sys


def entry():
    """The program: minivae.cli.console, imported under the same Ctrl-C guard."""
    try:
        from .cli import console
    except KeyboardInterrupt:  # pragma: no cover - timing-dependent (tests/test_hardening_runs.py)
        sys.stderr.write("minivae: interrupted\n")
        sys.exit(130)
    console()


if __name__ == "__main__":
    entry()
