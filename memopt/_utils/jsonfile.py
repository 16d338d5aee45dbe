"""Read a JSON config given as a mapping or a path (DeepSpeed configs, in two places)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def json_mapping(cfg: Any, owner: str) -> dict[str, Any]:
    """``cfg`` as a dict: a mapping as is, or a path to a JSON file holding one; errors name
    ``owner`` and the file."""
    if isinstance(cfg, (str, os.PathLike)):
        path = os.fspath(cfg)
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{owner}: {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{owner}: pass a dict or a path to a JSON file holding one, got "
                        f"{type(cfg).__name__}")  # fmt: skip
    return dict(cfg)
