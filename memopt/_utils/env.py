"""Environment reads on hot paths.

``os.environ.get`` encodes the key and decodes the value on every call (a few microseconds),
which adds up when a switch is read per parameter per step on a step bound by host time.
``getenv_fast`` reads CPython's underlying bytes mapping directly where there is one; it
sees ``os.environ[...] = ...`` and ``monkeypatch.setenv`` (both write through that mapping).
"""

from __future__ import annotations

import os

_KEYS: dict[str, bytes] = {}


def getenv_fast(name: str, default: str) -> str:
    """``os.environ.get(name, default)``, without encoding the key on every call."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    raw = data.get(key)
    return default if raw is None else os.fsdecode(raw)
