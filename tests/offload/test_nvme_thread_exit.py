"""The NVMe tier keeps working for a training loop in another thread after the main thread
has returned (``concurrent.futures`` refuses new work from then on: its exit hook runs when
the main thread ends, before the other non-daemon threads are joined)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import torch
    from memopt.offload.arena import ArenaConfig, PinnedArena
    from memopt.offload.io_backend import ThreadPoolBackend
    from memopt.offload.nvme_file import NVMeConfig
    from memopt.offload.nvme_tier import NVMeTier

    cfg = NVMeConfig(directory=sys.argv[1], capacity_bytes=4 << 20, block_size=64 << 10,
                     queue_depth=4)
    tier = NVMeTier(cfg, arena=PinnedArena(ArenaConfig(pin="off")),
                    backend=ThreadPoolBackend(4, 64 << 10))

    def train() -> None:
        time.sleep(0.5)  # the main thread has returned by now
        x = torch.arange(300_001, dtype=torch.float32)
        handle = tier.allocate(x.shape, x.dtype)
        tier.write_async(handle, x).wait()
        back = torch.zeros_like(x)
        tier.read_async(handle, back).wait()
        assert torch.equal(back, x)
        print("round trip ok", flush=True)
        tier.close()

    threading.Thread(target=train).start()
    """
)


def test_tier_used_by_a_thread_after_main_returned(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    root = str(Path(__file__).resolve().parents[2])  # this checkout's memopt
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round trip ok" in out.stdout, out.stderr[-2000:]
