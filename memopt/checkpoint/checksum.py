"""File checksums (crc32c or zlib's crc32), computed over pieces in parallel and combined.

``checksum_fn(name)`` is the running checksum ``f(data, previous)``. ``parallel_checksum``
computes the checksum of a large buffer as the checksums of its pieces on a few threads (both
C implementations release the GIL), combined in order with ``combine``: the CRC of ``A + B``
from ``crc(A)``, ``crc(B)`` and ``len(B)``, which is ``crc(A)`` multiplied by x^(8 len(B))
modulo the polynomial, XOR ``crc(B)`` (zlib's ``crc32_combine``; the pre- and post-inversion of
both CRCs cancel). Arithmetic is in the reflected bit order of both CRCs: bit 31 is x^0.
Why: the writer's checksum pass over a GB-sized file is its only CPU-heavy work; on busy
cores one thread can fall behind the disk, two rarely do. The pieces run on ``Workers``
(``memopt._utils.workers``: threads started up front, not a ``concurrent.futures`` pool, which
refuses work once the main thread has returned, while a save may still be finishing).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

from memopt._utils.workers import Workers

_crc32c: Any
try:  # crc32c has wheels for every CPython we support; zlib is the fallback
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - exercised only without the package
    _crc32c = None

__all__ = ["checksum_fn", "combine", "parallel_checksum", "resolve_checksum"]

POLYS = {"crc32": 0xEDB88320, "crc32c": 0x82F63B78}  # reflected polynomials
Checksum = Callable[[bytes | memoryview, int], int]


def checksum_fn(name: str) -> Checksum:
    """The running checksum ``f(data, previous) -> value`` called ``name``."""
    if name == "crc32c":
        if _crc32c is None:
            raise ValueError(
                "checksum 'crc32c' needs the crc32c package (pip install crc32c), or use "
                "checksum='crc32'"
            )
        return lambda data, prev: int(_crc32c.crc32c(data, prev))
    if name == "crc32":
        return lambda data, prev: zlib.crc32(data, prev)
    raise ValueError(f"unknown checksum {name!r} (expected 'crc32c' or 'crc32')")


def resolve_checksum(name: str) -> str:
    if name == "auto":
        return "crc32c" if _crc32c is not None else "crc32"
    checksum_fn(name)  # raises if unavailable
    return name


def _mult(a: int, b: int, poly: int) -> int:
    """a * b modulo the polynomial (reflected: bit 31 is x^0)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


@functools.lru_cache(maxsize=64)
def _shift_op(nbytes: int, poly: int) -> int:
    """x^(8 nbytes) modulo the polynomial, by repeated squaring of x^8."""
    result, power = 1 << 31, 1 << 23  # x^0, x^8
    while nbytes:
        if nbytes & 1:
            result = _mult(power, result, poly)
        power = _mult(power, power, poly)
        nbytes >>= 1
    return result


def combine(name: str, crc_a: int, crc_b: int, len_b: int) -> int:
    """The checksum ``name`` of A + B, from crc(A), crc(B) and len(B)."""
    return _mult(_shift_op(len_b, POLYS[name]), crc_a, POLYS[name]) ^ crc_b


def parallel_checksum(
    name: str,
    view: memoryview,
    piece: int,
    previous: int = 0,
    workers: int = 2,
    pool: Workers | None = None,
) -> int:
    """The running checksum of ``view`` after ``previous``, ``workers`` pieces at a time, on
    ``pool`` (else on threads made for this call; where none can be started, as while the
    interpreter exits on Python 3.12, in one pass on the calling thread)."""
    fn = checksum_fn(name)
    starts = range(0, len(view), piece)
    if workers <= 1 or len(starts) <= 1:
        return fn(view, previous)
    own = None
    if pool is None:
        try:
            pool = own = Workers(workers, "memopt-crc")
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return fn(view, previous)
    try:
        parts = pool.map(lambda lo: fn(view[lo : lo + piece], 0), starts)
    finally:
        if own is not None:
            own.close()
    value = previous
    for lo, part in zip(starts, parts, strict=True):
        value = combine(name, value, part, min(piece, len(view) - lo))
    return value
