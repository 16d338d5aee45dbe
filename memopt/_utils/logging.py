"""Logging helpers: one logger namespace and warnings that fire once per message."""

from __future__ import annotations

import logging
import warnings

_SEEN: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``memopt`` namespace."""
    return logging.getLogger(name if name.startswith("memopt") else f"memopt.{name}")


def warn_once(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """Warn about ``message`` the first time it is seen in this process.

    Used for configuration that silently has no effect, so a training loop of
    thousands of steps does not repeat the same line thousands of times.
    """
    if message in _SEEN:
        return
    _SEEN.add(message)
    warnings.warn(message, category, stacklevel=stacklevel)


def _reset_warn_once() -> None:
    """Forget which warnings were shown (tests use this)."""
    _SEEN.clear()
