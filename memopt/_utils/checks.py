"""One check of a number-valued option, shared by the optimizers' groups (``memopt.optim``)
and the offloaded AdamW (``memopt.offload``), which may not import each other."""

from __future__ import annotations

import math
import numbers
from typing import Any


def finite_number(value: Any, key: str, owner: str, low: float = 0.0,
                  inclusive: bool = True) -> float:  # fmt: skip
    """``value`` as a float: a real number (not a bool), finite, ``>= low`` (``> low`` when
    not ``inclusive``). ``nan`` slips through ``x < 0`` comparisons; torch refuses it too."""
    bound = f">= {low:g}" if inclusive else f"> {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {key} must be a number {bound}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        raise ValueError(f"{owner}: {key} must be a finite number {bound}, got {value!r}")
    return number
