"""``python -m minivae ...`` and the ``minivae`` console script (``entry``): the command line.

Nothing is imported at module level but ``sys``, and the package's ``__init__`` imports nothing, so a
Ctrl-C that lands while the command line itself is being imported (argparse, then numpy, numba...)
still gives the one line ``minivae: interrupted`` and exit 130 (minivae.cli.console does the rest).
The first thing ``entry`` does is put in minivae.interrupts' handler, which remembers a Ctrl-C that
Python drops (one that lands in a finalizer or a weakref callback, as importlib runs).
"""
import sys


def entry():
    """The program: minivae.cli.console, imported under the same Ctrl-C guard."""
    try:
        from . import interrupts
        interrupts.install()
        from .cli import console
        interrupts.raise_if_pending()            # a Ctrl-C dropped while the imports ran
    except KeyboardInterrupt:  # pragma: no cover - timing-dependent (tests/test_hardening_runs.py)
        sys.stderr.write("minivae: interrupted\n")
        sys.exit(130)
    except Exception:          # pragma: no cover - an import that a Ctrl-C broke (minivae.cli.main)
        guard = sys.modules.get(f"{__package__}.interrupts")
        if guard is None or not guard.pending():
            raise
        sys.stderr.write("minivae: interrupted\n")
        sys.exit(130)
    console()


if __name__ == "__main__":
    entry()
