"""Lowest layer: helpers with no dependency on the rest of memopt."""

from memopt._utils.logging import get_logger, warn_once
from memopt._utils.registry import Registry

__all__ = ["Registry", "get_logger", "warn_once"]
