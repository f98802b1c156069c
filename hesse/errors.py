"""Exceptions raised by hesse, and the one way library code reacts to Ctrl-C.

Every error message names the problem and the fix.

Interrupts: a long computation that is stopped with Ctrl-C (``KeyboardInterrupt``) stops
cleanly and either re-raises the interrupt with the partial result attached as
``error.partial`` (the default, ``on_interrupt="raise"``), or returns that partial result
when the caller asked for it (``on_interrupt="return"``). Partial results carry
``interrupted=True``. Library code never swallows an interrupt otherwise.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

ON_INTERRUPT = ("raise", "return")

T = TypeVar("T")


class HesseError(ValueError):
    """Bad input or an unusable model/data setup; the message says how to fix it."""


class NotConvergedWarning(UserWarning):
    """An iterative method stopped before reaching the requested tolerance."""


def check_on_interrupt(on_interrupt: str) -> None:
    """Refuse anything but ``"raise"`` or ``"return"``."""
    if on_interrupt not in ON_INTERRUPT:
        raise HesseError(f"on_interrupt must be 'raise' or 'return', got {on_interrupt!r}.")


def interrupted(error: KeyboardInterrupt, partial: T, on_interrupt: str, what: str) -> T:
    """Handle Ctrl-C in ``what``: attach ``partial`` to the interrupt and re-raise it, or
    return ``partial`` (with a :class:`NotConvergedWarning`) when ``on_interrupt="return"``.

    Call it as ``except KeyboardInterrupt as e: return interrupted(e, partial, on_interrupt, "trace")``.
    """
    if hasattr(partial, "interrupted"):
        partial.interrupted = True
    if on_interrupt == "return":
        warnings.warn(f"{what} interrupted: returning the partial result (interrupted=True).",
                      NotConvergedWarning, stacklevel=3)
        return partial
    error.partial = partial  # type: ignore[attr-defined]
    raise error
