"""The ``hesse`` console script: ``hesse.cli`` (click, torch, the report) imported lazily.

Without the ``cli`` extra, or on Ctrl-C while the command is still loading, this prints
one line instead of a traceback. ``python -m hesse`` runs the same command.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CLI_REQUIREMENTS = ("click",)


def _exit_now(status: int) -> None:
    """Flush the output and end the process with ``status`` at once.

    Not ``sys.exit``: when Ctrl-C lands in code that an extension runs through
    ``PyRun_String`` while torch is being imported (pybind11's ``exec``), CPython marks the
    interrupt as unhandled even though it was caught here, and at exit kills itself with
    SIGINT instead of returning ``status``. Nothing has been written yet, so there is nothing
    for the interpreter's shutdown to finish. After start-up the command has already finished
    (or abandoned) its writes when it exits with 130, so the same exit is used there.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _interrupted_while_starting(*_: object) -> None:
    """SIGINT handler while the command loads: nothing is written yet, so stop at once.

    A ``KeyboardInterrupt`` raised inside a third-party import (numpy, scipy, torch) can be
    half-handled there and leave that module broken, so during start-up the signal never
    becomes an exception.
    """
    print("hesse: interrupted while starting; nothing was written.", file=sys.stderr)
    _exit_now(EXIT_INTERRUPTED)


def entry() -> None:
    """Import ``hesse.cli`` and run its command group."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        cli = importlib.import_module("hesse.cli")
    except KeyboardInterrupt:
        _interrupted_while_starting()
    except ModuleNotFoundError as error:
        if error.name not in CLI_REQUIREMENTS:
            raise
        print(f"error: the hesse command needs {error.name}; install it with: pip install 'hesse[cli]'",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli.main()
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:  # the same CPython mark can be left by a Ctrl-C after start-up
            _exit_now(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    entry()
