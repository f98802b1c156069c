"""Progress bars: off, on, or automatic (``None``: only on an interactive terminal, and only
for work that lasts more than two seconds).

Library functions default to ``progress=None``; the ``hesse`` CLI turns bars on when its
standard error is a terminal and prints plain one-line stage messages otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

AUTO_DELAY_S = 2.0


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool | None = None, unit: str = "it") -> Any:
    """A tqdm bar (imported lazily) or a silent stand-in with the same ``update``/``close`` API.

    ``enabled=None`` shows the bar only when stderr is a terminal and the work takes more
    than :data:`AUTO_DELAY_S` seconds.
    """
    if enabled is False or (enabled is None and not _interactive()):
        return _Silent(iterable)
    from tqdm.auto import tqdm

    delay = AUTO_DELAY_S if enabled is None else 0.0
    return tqdm(iterable, total=total, desc=desc, leave=False, unit=unit, delay=delay)


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Silent:
    """A do-nothing progress bar."""

    def __init__(self, iterable: Iterable | None = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        return None
