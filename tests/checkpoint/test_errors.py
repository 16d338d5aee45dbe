"""Bad input: each a clear error naming what and where; published snapshots never damaged."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

from memopt.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CorruptSnapshotError,
    SnapshotMismatchError,
    fileformat,
)
from tests.checkpoint import _common as T


def _saved(tmp_path, steps=(1, 2)) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt, sched = T.make_all("adamw")
    with AsyncCheckpointer(tmp_path, keep=5) as ckpt:
        for s in steps:
            T.train(model, opt, sched, s - 1, s)
            ckpt.save(s, model=model, optimizer=opt, extra={"s": s})
    return model, opt


def test_not_writable_directory(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create the checkpoint directory"):
        AsyncCheckpointer(blocker / "ck")  # (not a permission problem: ENOTDIR)
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        AsyncCheckpointer(blocker)
    with pytest.raises(ValueError, match="checkpoint directory is empty"):
        AsyncCheckpointer("")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            AsyncCheckpointer(ro)


def test_full_disk_fails_the_save_not_the_snapshots(tmp_path, monkeypatch) -> None:
    model, opt = _saved(tmp_path, steps=(1,))

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileformat.os, "write", full)
    monkeypatch.setattr(fileformat.os, "pwrite", lambda fd, data, off: full(fd, data))
    ckpt = AsyncCheckpointer(tmp_path, keep=1)
    ckpt.save(2, model=model, optimizer=opt, extra={"s": 2})
    with pytest.raises(CheckpointError, match="No space left") as info:
        ckpt.wait()
    assert ".tmp-step_0000000002" in str(info.value)
    monkeypatch.undo()
    assert ckpt.steps() == [1]  # keep=1 did not rotate the good one out
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    assert ckpt.load(model=model)["s"] == 1
    ckpt.save(3, model=model, optimizer=opt, extra={"s": 3})  # the checkpointer goes on
    ckpt.close()
    assert ckpt.steps() == [3]


def test_corrupted_file_falls_back_to_previous(tmp_path) -> None:
    model, opt = _saved(tmp_path)
    path = tmp_path / "step_0000000002" / "rank_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    ckpt = AsyncCheckpointer(tmp_path)
    with pytest.warns(UserWarning, match="rank_00000.safetensors.*checksum"):
        assert ckpt.load(model=model, optimizer=opt)["s"] == 1
    with pytest.raises(CorruptSnapshotError, match="step_0000000002/rank_00000.safetensors"):
        ckpt.load(2, model=model)
    ckpt.close()


def test_truncated_and_missing_rank_files(tmp_path) -> None:
    model, _ = _saved(tmp_path)
    (tmp_path / "step_0000000002" / "rank_00000.json").unlink()
    path = tmp_path / "step_0000000001" / "rank_00000.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with AsyncCheckpointer(tmp_path, verify=False) as ckpt:
        with pytest.raises(CorruptSnapshotError, match="missing rank 0's file rank_00000.json"):
            ckpt.load(2, model=model)
        with pytest.raises(CorruptSnapshotError, match="truncated"):
            ckpt.load(1, model=model)
        with pytest.raises(FileNotFoundError, match="no loadable snapshot"):
            with pytest.warns(UserWarning):
                ckpt.load(model=model)
        with pytest.raises(FileNotFoundError, match="no published snapshot of step 9"):
            ckpt.load(9, model=model)


def test_snapshot_from_another_model(tmp_path) -> None:
    _saved(tmp_path, steps=(1,))
    other = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 5))
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(SnapshotMismatchError, match=r"missing \['0.bias'"):
            ckpt.load(model=other)
        wider = T.make_model()
        wider.mid = nn.Linear(64, 32)
        with pytest.raises(SnapshotMismatchError, match="mid.weight: snapshot \\[64, 64\\]"):
            ckpt.load(model=wider)
        opt = torch.optim.AdamW(wider.parameters())
        with pytest.raises(SnapshotMismatchError, match="optimizer parameters differ"):
            ckpt.load(optimizer=opt)


def test_unstorable_extra_and_bad_step(tmp_path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="extra.fn is a builtin_function_or_method"):
            ckpt.save(1, extra={"fn": print})
        with pytest.raises(ValueError, match="step must be an int"):
            ckpt.save(-1)
        ckpt.save(2, extra={"ok": 1})  # a failed capture took no staging slot
        ckpt.wait()
        assert ckpt.latest() == 2
        model, opt, sched = T.make_all("adamw")
        for kw in ({"model": model}, {"optimizer": opt}, {"scheduler": sched}):
            with pytest.raises(SnapshotMismatchError, match="holds no .* state"):
                ckpt.load(**kw)


def test_lookups_name_what_is_missing_not_corruption(tmp_path) -> None:
    from memopt.checkpoint import Snapshot, export_hf

    model, opt = _saved(tmp_path, steps=(1,))
    with pytest.raises(FileNotFoundError, match=r"no published snapshot of step 9 \(published"):
        export_hf(9, tmp_path / "out", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="is a checkpoint directory, not one snapshot"):
        Snapshot(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Snapshot(str(tmp_path / "nope"))
    with AsyncCheckpointer(tmp_path) as ck:
        with pytest.raises(TypeError, match="step must be an int or None"):
            ck.load("1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="extra must be a mapping"):
            ck.save(2, model=model, extra=[1, 2])  # type: ignore[arg-type]
    # an integer or bool cast wrote all-zero / all-True weights
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        export_hf(tmp_path, tmp_path / "out", dtype=torch.int8)
    written = export_hf(tmp_path, tmp_path / "out", dtype="bf16")
    from safetensors.torch import load_file

    assert all(t.dtype == torch.bfloat16 for t in load_file(written).values())


def test_config_and_keep_together_are_refused(tmp_path) -> None:
    # keep=3 (the default's value) given with config= was silently dropped
    from memopt.checkpoint import CheckpointConfig

    with pytest.raises(TypeError, match="either config=CheckpointConfig"):
        AsyncCheckpointer(tmp_path, keep=3, config=CheckpointConfig(keep=2))
    with AsyncCheckpointer(tmp_path, config=CheckpointConfig(keep=2)) as ck:
        assert ck.config.keep == 2


def test_every_new_optimizer_gets_its_fence(tmp_path) -> None:
    # hooks were keyed by id(optimizer): a new optimizer reusing a freed one's id got no
    # fence, and its next step ran during the copy (snapshots held post-step values)
    import gc

    model = nn.Linear(32, 32)
    with AsyncCheckpointer(tmp_path, keep=1, fsync=False) as ck:
        for step in range(20):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ck.save(step, model=model, optimizer=opt)
            assert len(opt._optimizer_step_pre_hooks) == 1, step
            ck.wait()
            del opt
            gc.collect()


def _groups_after_cycles(rank: int, world: int, directory: str) -> tuple[int, int]:
    import torch.distributed as dist

    before = len(dist.distributed_c10d._world.pg_map)
    for step in range(3):
        with AsyncCheckpointer(directory, keep=1, fsync=False) as ck:
            ck.save(step, model=nn.Linear(4, 4))
    return before, len(dist.distributed_c10d._world.pg_map)


def test_closed_checkpointers_leave_no_process_group(tmp_path) -> None:
    # each one's own gloo group stayed (5 fds and 3 threads per checkpointer)
    from tests._harness.dist import run_distributed

    out = run_distributed(_groups_after_cycles, world_size=2, timeout_s=120, args=(str(tmp_path),))
    assert all(before == after for before, after in out), out
