"""Byte accounting of saved activations: what is held where, now and at peak.

Every activation manager reports through one ``SavedLedger``: a saved tensor is counted once
per storage (duplicate saves and views of one buffer share the count) under a *place*
(``"device"``: still on the compute device; ``"host"``/``"nvme"``: swapped out) and a *block*
name. ``hold`` returns a ``Token``; the bytes are released when the token is released
explicitly or garbage-collected (autograd drops a packed object right after the backward
node that used it, so a token stored in the packed object ends exactly when autograd frees
the activation). ``peak(place)`` is the high-water mark since the last ``reset_peak``.
Thread-safe: swap copies complete on background threads.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch

__all__ = ["SavedLedger", "Token", "storage_key"]


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory behind ``t`` (views of one buffer share it)."""
    return (str(t.device), t.untyped_storage().data_ptr())


class Token:
    """One hold on a storage in the ledger; release once (idempotent), or let GC do it."""

    __slots__ = ("_ledger", "_key", "__weakref__")

    def __init__(self, ledger: SavedLedger, key: tuple[str, str, tuple[str, int]]) -> None:
        self._ledger: SavedLedger | None = ledger
        self._key = key

    def release(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger._drop(self._key)

    def __del__(self) -> None:
        self.release()


@dataclass
class _Entry:
    nbytes: int
    refs: int


class SavedLedger:
    """Current and peak bytes of saved activations per place and per block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, tuple[str, int]], _Entry] = {}
        self._current: dict[str, int] = defaultdict(int)
        self._peak: dict[str, int] = defaultdict(int)
        self._block_current: dict[tuple[str, str], int] = defaultdict(int)
        self._block_peak: dict[tuple[str, str], int] = defaultdict(int)

    def hold(self, t: torch.Tensor, *, place: str = "device", block: str = "") -> Token:
        """Count ``t``'s whole storage under ``place``/``block`` until the token is released."""
        key = (place, block, storage_key(t))
        nbytes = t.untyped_storage().nbytes()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.refs += 1
            else:
                self._entries[key] = _Entry(nbytes, 1)
                self._add(place, block, nbytes)
        return Token(self, key)

    def hold_bytes(
        self, nbytes: int, *, key: tuple[str, int], place: str, block: str = ""
    ) -> Token:
        """Count ``nbytes`` under ``key`` (bytes that are no tensor's whole storage: a slot of
        the host arena, a range of an NVMe file) until the token is released."""
        full = (place, block, key)
        with self._lock:
            entry = self._entries.get(full)
            if entry is not None:
                entry.refs += 1
            else:
                self._entries[full] = _Entry(nbytes, 1)
                self._add(place, block, nbytes)
        return Token(self, full)

    def _drop(self, key: tuple[str, str, tuple[str, int]]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs == 0:
                del self._entries[key]
                self._add(key[0], key[1], -entry.nbytes)

    def _add(self, place: str, block: str, delta: int) -> None:
        self._current[place] += delta
        self._peak[place] = max(self._peak[place], self._current[place])
        self._block_current[(place, block)] += delta
        pb = (place, block)
        self._block_peak[pb] = max(self._block_peak[pb], self._block_current[pb])

    def current(self, place: str = "device") -> int:
        with self._lock:
            return self._current[place]

    def peak(self, place: str = "device") -> int:
        with self._lock:
            return self._peak[place]

    def block_peaks(self, place: str = "device") -> dict[str, int]:
        """Peak bytes each block held under ``place`` since the last reset."""
        with self._lock:
            return {b: v for (p, b), v in self._block_peak.items() if p == place}

    def reset_peak(self) -> None:
        """Start a new high-water mark from what is held now."""
        with self._lock:
            for place, cur in self._current.items():
                self._peak[place] = cur
            for pb, cur in self._block_current.items():
                self._block_peak[pb] = cur
