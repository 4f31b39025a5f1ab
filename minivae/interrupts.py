"""Ctrl-C that Python would drop: the program's SIGINT handler remembers every one.

Python's own handler raises KeyboardInterrupt in whatever Python code runs when the signal is
checked. When that code is a ``__del__`` method or a weakref callback (importlib runs one each time
a module lock is freed; numba and numpy run their own), the exception cannot propagate: Python
prints "Exception ignored in: ..." with a traceback and carries on. A Ctrl-C during start-up is then
lost and ``minivae train`` trains on for all its epochs.

``install`` (the program only: ``minivae.__main__.entry``) puts in a handler that counts the signal
before it raises, and an ``unraisablehook`` that keeps such a dropped KeyboardInterrupt quiet
(every other unraisable exception goes to Python's default hook). The command line then asks
``pending()`` where the work can stop cleanly: after its imports, before training starts (the
training loop's own handler takes over there: it finishes the step, saves and stops), and when a
command returns. A Ctrl-C that was dropped still ends the program with the one line and exit 130.

Nothing here is imported but ``signal`` and ``sys``: the handler goes in before numpy or numba load.
Where SIGINT is ignored (a command started with ``&`` by a shell without job control), every one of
minivae's handlers stays out, as Unix programs do, and Ctrl-C at the terminal leaves it running.
"""
import signal
import sys

_received = 0                     # SIGINTs that reached the program's handler


def _on_sigint(signum, frame):
    global _received
    _received += 1
    raise KeyboardInterrupt


def _unraisable(args):
    if isinstance(args.exc_value, KeyboardInterrupt):   # counted by _on_sigint; pending() reports it
        return
    sys.__unraisablehook__(args)


def ignored() -> bool:
    """Whether SIGINT is ignored, as a shell without job control leaves it for a command started
    with ``&``: Ctrl-C at the terminal is not meant for that command, and minivae keeps it so."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def install():
    """The program's SIGINT handler (where Python put its own: not where SIGINT is ignored) and
    unraisable hook. Not for in-process callers of ``minivae.cli.main``: it changes process-wide
    state."""
    sys.unraisablehook = _unraisable
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def pending() -> bool:
    """Whether a Ctrl-C reached the program's handler (dropped or not). False unless ``install``
    ran: in-process callers never see one."""
    return _received > 0


def raise_if_pending():
    """KeyboardInterrupt if a Ctrl-C reached the program's handler: the one that Python dropped
    stops the work here."""
    if _received:
        raise KeyboardInterrupt
