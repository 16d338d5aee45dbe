"""Copy into staging and CRC-32C in one pass (``csrc/aio/copy_crc.cpp``, in the AIO library).

``copy_crc32c(dst, src, previous)`` copies the bytes of a contiguous CPU tensor into a uint8
staging view and returns the running CRC-32C continued over them (what ``crc32c.crc32c(bytes,
previous)`` gives), reading each byte once: the checkpoint's copier computes the data
section's checksum as it stages it, and the writer skips its own pass over the staging.
``available()`` is True only where the native library loaded and the CPU has the CRC-32C
instruction (SSE4.2); elsewhere the pipeline copies and the writer checksums, as before.
The call releases the GIL (ctypes), so the training thread runs meanwhile.
"""

from __future__ import annotations

import ctypes

import torch

from memopt.offload import native_aio

__all__ = ["available", "copy_crc32c", "has_own_memory"]

_bound = False


def _lib() -> ctypes.CDLL | None:
    global _bound
    lib = native_aio._load()
    if lib is not None and not _bound:
        lib.memopt_copy_crc32c.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32,
        ]  # fmt: skip
        lib.memopt_copy_crc32c.restype = ctypes.c_uint32
        lib.memopt_copy_crc32c_hw.argtypes = []
        lib.memopt_copy_crc32c_hw.restype = ctypes.c_int
        _bound = True
    return lib


def available() -> bool:
    """Whether the one-pass copy + CRC-32C runs natively with the CPU's CRC instruction."""
    lib = _lib()
    return lib is not None and bool(lib.memopt_copy_crc32c_hw())


def has_own_memory(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are where ``t.data_ptr()`` says, inside its own storage: a plain
    tensor (or Parameter). A tensor subclass may be a wrapper with no storage at all (a DTensor:
    ``data_ptr()`` is 0 while ``numel()`` counts the global tensor), so native code reading
    ``numel() * element_size()`` bytes from that address would read memory it does not own."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return True
    try:
        storage = t.untyped_storage()
        start, ptr = int(storage.data_ptr()), int(t.data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return ptr != 0 and start <= ptr and ptr + nbytes <= start + int(storage.nbytes())


def copy_crc32c(dst: torch.Tensor, src: torch.Tensor, previous: int = 0) -> int:
    """Copy ``src`` (contiguous, CPU) into ``dst`` (uint8, CPU, exactly ``src``'s bytes) and
    return the CRC-32C of ``src``'s bytes continued from ``previous``. Both must be plain
    tensors over their own memory (``has_own_memory``): anything else is refused here, before
    an address reaches native code."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("copy_crc32c: the native AIO library is not built (setup.py)")
    nbytes = src.numel() * src.element_size()
    if src.device.type != "cpu" or dst.device.type != "cpu" or not src.is_contiguous():
        raise ValueError("copy_crc32c: src must be a contiguous CPU tensor, dst a CPU tensor")
    if dst.dtype != torch.uint8 or not dst.is_contiguous() or dst.numel() != nbytes:
        raise ValueError(
            f"copy_crc32c: dst must be a contiguous uint8 view of {nbytes} bytes, got "
            f"{dst.dtype} with {dst.numel()} elements"
        )
    for what, t in (("src", src), ("dst", dst)):
        if not has_own_memory(t):
            raise TypeError(
                f"copy_crc32c: {what} is a {type(t).__name__} whose data pointer is not "
                "inside memory of its own (a tensor subclass such as a DTensor, or no "
                "storage): copy it with torch (dst.copy_(src)) or pass its local tensor"
            )
    return int(lib.memopt_copy_crc32c(dst.data_ptr(), src.data_ptr(), nbytes, previous))
