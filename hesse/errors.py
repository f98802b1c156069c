"""Exceptions raised by hesse. Every message names the problem and the fix."""


class HesseError(ValueError):
    """Bad input or an unusable model/data setup; the message says how to fix it."""


class NotConvergedWarning(UserWarning):
    """An iterative method stopped before reaching the requested tolerance."""
