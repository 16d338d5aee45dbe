"""Loading memopt's optional native libraries (csrc/) and reporting which ones loaded.

The native code is built at install time (setup.py) as plain C ABI shared libraries named
like Python extension modules (``<stem><EXTENSION_SUFFIX>``) and loaded here with ctypes:
no torch or Python headers are involved, so a library keeps working across torch versions.
Every library exports ``<prefix>_abi_version()``; a library whose version differs from the
one the Python side expects (a stale build left in the source tree) is refused, so callers
fall back to their pure-Python path instead of calling a wrong signature.

``native_status()`` maps each library asked for so far to "loaded" or the reason it did not.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch

from memopt._utils.logging import warn_once

_STATUS: dict[str, str] = {}


def find_library(package_dir: Path, stem: str) -> Path | None:
    """The built library ``stem`` in ``package_dir``, or None when it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_library(package_dir: Path, stem: str, abi_prefix: str, abi: int) -> ctypes.CDLL | None:
    """Load ``stem`` from ``package_dir`` if it is there, loads, and has ABI version ``abi``."""
    path = find_library(package_dir, stem)
    if path is None:
        _STATUS[stem] = "not built (the install compiled no native code; torch fallback in use)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
        found = int(getattr(lib, f"{abi_prefix}_abi_version")())
    except (OSError, AttributeError) as exc:
        _STATUS[stem] = f"failed to load {path.name}: {exc}"
        warn_once(f"memopt: native library {path} did not load ({exc}); using the torch fallback")
        return None
    if found != abi:
        _STATUS[stem] = f"stale build {path.name} (ABI {found}, expected {abi})"
        warn_once(
            f"memopt: {path} is a stale build (ABI {found}, expected {abi}); using the torch "
            "fallback. Rebuild with `pip install -e .`"
        )
        return None
    _STATUS[stem] = "loaded"
    return lib


def mark_written(*tensors: object) -> None:
    """Tell autograd that a native (or Triton) kernel wrote these tensors in place.

    Kernels that write through ``data_ptr()`` bypass the version counter torch's own in-place
    ops bump, so a tensor saved for backward and then overwritten (an optimizer step between
    forward and backward) would go unnoticed and the gradients silently be wrong; with the
    bump, backward raises torch's usual "modified by an inplace operation" error. Non-tensors
    (``None``) are skipped.
    """
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    global _BATCH_BUMP
    if _BATCH_BUMP:
        try:  # recent torch takes the whole list in one call (~40 ns a tensor)
            torch._C._increment_version(ts)
            return
        except TypeError:
            _BATCH_BUMP = False
    for t in ts:
        torch.autograd.graph.increment_version(t)


_BATCH_BUMP = True


def native_status() -> dict[str, str]:
    """Each native library asked for so far -> "loaded" or why it is not in use."""
    return dict(_STATUS)
