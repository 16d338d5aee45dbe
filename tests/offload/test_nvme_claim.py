"""The NVMe swap file is claimed across processes (flock), not only within one.

Two runs on one directory (two jobs of a sweep, ranks of an ``mp.spawn`` run without
``$RANK``) used to share ``memopt-rank0.swap``: the second one truncated and re-zeroed the
first one's live optimizer state, and its ``close()`` removed the first one's file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **kw: object) -> NVMeConfig:
    base = dict(directory=tmp_path, capacity_bytes=1 << 20, block_size=64 << 10, queue_depth=2,
                direct="prefer", rank=0)  # fmt: skip
    base.update(kw)
    return NVMeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def arena() -> PinnedArena:
    a = PinnedArena(ArenaConfig(chunk_bytes=4 << 20, pin="off"))
    yield a
    a.close()


def _other_process(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter with ``cfg`` (this test's config) and NVMeTier."""
    code = textwrap.dedent(
        f"""
        import os
        from memopt.offload.nvme_file import NVMeConfig
        from memopt.offload.nvme_tier import NVMeTier
        cfg = NVMeConfig(directory={str(tmp_path)!r}, capacity_bytes=1 << 20,
                         block_size=64 << 10, queue_depth=2, direct="prefer", rank=0)
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEMOPT_AIO": "threads"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip


def test_second_process_takes_another_file(tmp_path: Path, arena: PinnedArena) -> None:
    tier = NVMeTier(_config(tmp_path), arena=arena)
    h = tier.allocate((50_000,), torch.float32)
    data = torch.randn(50_000)
    tier.write_async(h, data).wait()
    other = _other_process(tmp_path, """
        t = NVMeTier(cfg)
        print(t.file.path.name)
        t.close()
        """)  # fmt: skip
    assert other.stdout.strip() == "memopt-rank0-1.swap"
    assert "memopt-rank0.swap held by another process" in other.stderr  # logged: which name
    out = torch.empty(50_000)
    tier.read_async(h, out).wait()
    assert torch.equal(out, data)  # not truncated and re-zeroed by the other process
    assert tier.file.path.exists()  # and its close() removed only its own file
    assert not (tmp_path / "memopt-rank0-1.swap").exists()
    tier.close()
    assert not any(tmp_path.iterdir())


def test_file_of_a_dead_process_is_reused(tmp_path: Path, arena: PinnedArena) -> None:
    _other_process(tmp_path, """
        t = NVMeTier(cfg)
        os._exit(0)  # no close, no finalizer: the file stays, its lock goes with the process
        """)  # fmt: skip
    assert (tmp_path / "memopt-rank0.swap").exists()
    tier = NVMeTier(_config(tmp_path), arena=arena)
    assert tier.file.path.name == "memopt-rank0.swap"
    tier.close()
    assert not any(tmp_path.iterdir())


def test_close_removes_only_the_file_it_holds(tmp_path: Path, arena: PinnedArena) -> None:
    tier = NVMeTier(_config(tmp_path), arena=arena)
    path = tier.file.path
    path.unlink()  # removed behind its back, and the name taken by someone else's file
    path.write_bytes(b"not the tier's")
    tier.close()
    assert path.read_bytes() == b"not the tier's"


def test_rank_from_the_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena: PinnedArena
) -> None:
    """mp.spawn sets no RANK: the initialized process group names the file."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    assert _config(tmp_path, rank=None).path().name == "memopt-rank3.swap"
    tier = NVMeTier(_config(tmp_path, rank=None), arena=arena)
    assert tier.file.path.name == "memopt-rank3.swap"
    tier.close()
    monkeypatch.setenv("RANK", "5")  # an exported RANK still wins
    assert _config(tmp_path, rank=None).path().name == "memopt-rank5.swap"
    assert _config(tmp_path, rank=2).path().name == "memopt-rank2.swap"
