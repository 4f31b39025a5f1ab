"""The CLI helpers the test files share: run ``minivae`` in-process, and recognise a one-line error."""
from minivae.cli import main


def cli(capsys, *args):
    """(exit code, stdout, stderr) of ``minivae ARGS`` run in this process."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err, prefix="minivae: error:"):
    """The promise of every failure: exactly one line, starting with ``prefix``, no traceback."""
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err
