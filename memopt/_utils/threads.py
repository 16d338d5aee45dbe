"""Run small CPU linear algebra on the calling thread only.

A projector refresh factors small matrices (a k x k Gram matrix, a k x n sketch, k ~ r + 8).
LAPACK splits such work into many short OpenMP regions, and every region has to wake the
pool's other threads: with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep between regions) or on
a machine where other processes hold the cores, the wake-ups cost more than the work.
Measured on a 2-core Xeon (torch 2.13, MKL): the SVDs of four 136 x 512 sketches take 21 ms
on 2 threads with the default wait policy, 132 ms with PASSIVE, and 16 ms on one thread
with either. Large GEMMs keep the pool; only the factorizations go through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """torch's intra-op CPU threads set to 1 inside (restored after); no-op when disabled.

    ``torch.set_num_threads`` acts on the calling thread's OpenMP setting and MKL's, costs
    well under a microsecond, and is restored even if the body raises.
    """
    before = torch.get_num_threads()
    if not enabled or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
