"""Leave a finished multi-process test script without interpreter teardown.

Called after the script's results are saved and every rank has met at a barrier and
destroyed its process groups. What remains is CPython's finalization, where gloo can still
abort the process (SIGABRT, "terminate called without an active exception") when its worker
threads release objects that hold tensors; upstream describes it in pytorch/pytorch#179291
(an atexit fix there was abandoned), and memopt._utils.dist_teardown has the reproduction
with plain torch. It hit test_accelerate's 2-process launch once on 2026-11-23 after the
barrier. These scripts test training results, so they end here; memopt's own leave order
is tested in tests/sharding/test_teardown.py.
"""

from __future__ import annotations

import os
import sys


def leave_now() -> None:
    """Flush stdout/stderr and exit with status 0 without running finalizers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
