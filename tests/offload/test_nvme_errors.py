"""OS errors of the NVMe tier's file and of the pinned arena's chunks: each keeps its errno,
names what failed and the setting to change, and leaves what was there intact.

Simulated: ``posix_fallocate`` / ``os.open`` / the chunk ``mmap`` raising, a removed tier
directory, a file where the directory should be; real: ``RLIMIT_FSIZE`` in a forked child."""

from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from memopt.activations import ActivationOptions, apply
from memopt.activations.policy import keep, swap
from memopt.offload import OffloadConfig, OffloadedAdamW, hostmem, io_backend
from memopt.offload.arena import ArenaConfig, PinnedArena
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier

MiB = 1 << 20
CAP = 2 * MiB


@pytest.fixture(autouse=True)
def _thread_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_AIO", "threads")  # faults go into the thread backend's calls


@pytest.fixture
def arena() -> Iterator[PinnedArena]:
    a = PinnedArena(ArenaConfig(chunk_bytes=4 * MiB, pin="off"))
    yield a
    a.close()


def _config(directory: Path, **kw: object) -> NVMeConfig:
    base = dict(directory=directory, capacity_bytes=MiB, grow_bytes=MiB, block_size=64 << 10)
    base.update(kw)
    return NVMeConfig(**base)  # type: ignore[arg-type]


def _full_tier(directory: Path, arena: PinnedArena) -> tuple[NVMeTier, object, torch.Tensor]:
    """A full tier (CAP bytes: a written MiB and an allocated one): the next allocation grows."""
    tier = NVMeTier(_config(directory, capacity_bytes=CAP), arena=arena)
    data = torch.arange(MiB // 4, dtype=torch.float32)
    h = tier.allocate(data.shape, data.dtype)
    tier.write_async(h, data).wait()  # via a shadow slot: the file's other MiB
    tier.allocate(MiB)
    assert tier.report().reserved_bytes == tier.file.size == CAP
    return tier, h, data


def _read(tier: NVMeTier, h: object, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    tier.read_async(h, out).wait()  # type: ignore[arg-type]
    return out


def _failing_fallocate(monkeypatch: pytest.MonkeyPatch, code: int, partial: bool) -> None:
    """posix_fallocate fails with ``code`` for growth (offset > 0), after allocating half the
    range when ``partial`` (ext4 does that on ENOSPC); preallocation at offset 0 works."""
    real = os.posix_fallocate

    def fake(fd: int, offset: int, length: int) -> None:
        if offset == 0:
            return real(fd, offset, length)
        if partial:
            real(fd, offset, length // 2)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", fake)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_growth_fallocate_error_names_file_and_keeps_the_file(
    tmp_path: Path, arena: PinnedArena, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    tier, h, data = _full_tier(tmp_path, arena)
    with tier:
        _failing_fallocate(monkeypatch, code, partial=True)
        with pytest.raises(OSError) as info:
            tier.allocate(8192)
        e = info.value
        assert e.errno == code and type(e) is OSError
        msg = str(e)
        assert str(tier.file.path) in msg and f"{MiB} bytes at offset {CAP}" in msg, msg
        assert errno.errorcode[code] in msg and "NVMeConfig.grow_bytes" in msg, msg
        assert "8192 bytes" in msg and "capacity_bytes" not in msg, msg
        if code == errno.EFBIG:
            assert "RLIMIT_FSIZE" in msg and "ulimit -f" in msg, msg
        # nothing half-changed: sizes as before (the partial allocation given back), the
        # handle's bytes intact, and the tier grows once the disk allows
        assert tier.file.size == CAP and os.fstat(tier.file.fd).st_size == CAP
        assert tier.report().capacity_bytes == CAP and tier.report().live_handles == 2
        assert torch.equal(_read(tier, h, data), data)
        monkeypatch.undo()
        h2 = tier.allocate(8192)
        assert tier.file.size == CAP + MiB and torch.equal(_read(tier, h, data), data)
        tier.free(h2)


def test_growth_free_space_hint_names_grow_bytes(
    tmp_path: Path, arena: PinnedArena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statvfs check before growing said 'lower NVMeConfig.capacity_bytes', which cannot
    help a file that must grow; the knobs are free space and a smaller grow_bytes."""
    tier, h, data = _full_tier(tmp_path, arena)
    with tier:
        real = os.statvfs(tmp_path)
        full = os.statvfs_result((*real[:4], 16, *real[5:]))  # 16 blocks available
        monkeypatch.setattr(os, "statvfs", lambda _p: full)
        monkeypatch.setattr(os, "fstatvfs", lambda _fd: full)
        with pytest.raises(OSError, match=r"growing .* past 2097152 bytes needs 1048576") as info:
            tier.allocate(8192)
        msg = str(info.value)
        assert info.value.errno == errno.ENOSPC
        assert "grow_bytes" in msg and "8192 bytes" in msg and "capacity_bytes" not in msg, msg
        assert tier.file.size == CAP and torch.equal(_read(tier, h, data), data)


def test_preallocation_fallocate_error_names_file_and_leaves_nothing(
    tmp_path: Path, arena: PinnedArena, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", fake)
    with pytest.raises(OSError, match="preallocating the swap file") as info:
        NVMeTier(_config(tmp_path / "d"), arena=arena)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "d" / "memopt-rank0.swap") in msg and "capacity_bytes" in msg, msg
    assert list((tmp_path / "d").iterdir()) == []


def test_growth_after_the_directory_was_removed(tmp_path: Path, arena: PinnedArena) -> None:
    """A tmp cleaner removed the tier's directory: the open file still works, and growing it
    asked statvfs of the path (FileNotFoundError); now it asks the open file."""
    tier, h, data = _full_tier(tmp_path / "tier", arena)
    with tier:
        shutil.rmtree(tmp_path / "tier")
        more = torch.full((2048,), 7.0)
        h2 = tier.allocate(more.shape, more.dtype)  # grows the file
        tier.write_async(h2, more).wait()
        assert tier.file.size == CAP + MiB
        assert torch.equal(_read(tier, h, data), data) and torch.equal(_read(tier, h2, more), more)
    assert not (tmp_path / "tier").exists()


def _fail_open(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real = os.open

    def fake(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".swap"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize(
    ("code", "kind", "fix"),
    [
        (errno.EROFS, OSError, "read-only"),
        (errno.EACCES, PermissionError, "may not write there"),
    ],
)
def test_unwritable_directory_names_the_setting(
    tmp_path: Path, arena: PinnedArena, monkeypatch: pytest.MonkeyPatch,
    code: int, kind: type[OSError], fix: str,
) -> None:  # fmt: skip
    """A read-only filesystem or a directory this user cannot write (simulated: root ignores
    mode bits): the error keeps its errno and type, and names NVMeConfig.directory and a fix;
    nothing stays claimed, so the same directory works once writable."""
    _fail_open(monkeypatch, code)
    with pytest.raises(kind) as info:
        NVMeTier(_config(tmp_path), arena=arena)
    msg = str(info.value)
    assert info.value.errno == code and type(info.value) is kind
    assert "NVMeConfig.directory" in msg and "OffloadConfig.nvme_path" in msg and fix in msg
    assert str(tmp_path) in msg and errno.errorcode[code] in msg, msg
    monkeypatch.undo()
    with NVMeTier(_config(tmp_path), arena=arena) as tier:
        assert tier.file.path == tmp_path / "memopt-rank0.swap"


@pytest.mark.parametrize("below", [False, True])
def test_file_in_place_of_the_directory(
    tmp_path: Path, arena: PinnedArena, below: bool
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    directory = afile / "sub" if below else afile
    kind = NotADirectoryError if below else FileExistsError
    with pytest.raises(kind, match="a file stands where a directory is needed") as info:
        NVMeTier(_config(directory), arena=arena)
    assert "NVMeConfig.directory" in str(info.value) and str(directory) in str(info.value)
    assert afile.read_text() == "not a directory"


def test_offloaded_optimizer_names_nvme_path(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    model = nn.Linear(8, 8)
    with pytest.raises(FileExistsError, match="OffloadConfig.nvme_path"):
        OffloadedAdamW(model.parameters(), offload=OffloadConfig("nvme", nvme_path=afile))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_step_message_has_one_errno_and_a_fitting_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The step's wrapper read '[Errno 28] [Errno 28] ...' and said 'once the tier has room'
    for an EIO too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    nvme = NVMeConfig(directory=tmp_path, block_size=4096, capacity_bytes=MiB)
    opt = OffloadedAdamW(model.parameters(), lr=1e-2,
                         offload=OffloadConfig("nvme", nvme=nvme, bucket_bytes=8192))  # fmt: skip
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    real, calls = io_backend._pwrite, [0]

    def failing(fd: int, buf: memoryview, off: int) -> int:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(code, os.strerror(code))
        return real(fd, buf, off)

    monkeypatch.setattr(io_backend, "_pwrite", failing)
    model(torch.randn(4, 64)).square().mean().backward()
    with pytest.raises(OSError) as info:
        opt.step()
    monkeypatch.undo()
    opt.close()
    msg = str(info.value)
    assert info.value.errno == code and msg.count("[Errno") == 1, msg
    assert "did not complete" in msg and str(tmp_path) in msg, msg
    assert ("once the tier has room" in msg) == (code == errno.ENOSPC), msg


def _fail_mmap_from(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """Anonymous mappings of ``nbytes`` or more fail with ENOMEM (RLIMIT_AS, overcommit=2)."""
    real = mmap.mmap

    def fake(fileno: int, length: int, *args: object, **kw: object) -> mmap.mmap:
        if fileno == -1 and length >= nbytes:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        return real(fileno, length, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hostmem.mmap, "mmap", fake)


@pytest.mark.parametrize("huge", ["off", "auto"])
def test_arena_chunk_mmap_failure_names_sizes_and_knobs(
    monkeypatch: pytest.MonkeyPatch, huge: str
) -> None:
    arena = PinnedArena(ArenaConfig(chunk_bytes=2 * MiB, pin="off", huge_pages=huge))  # type: ignore[arg-type]
    first = arena.alloc(MiB + 4096)
    before = arena.report()
    _fail_mmap_from(monkeypatch, 2 * MiB)
    with pytest.raises(OSError) as info:
        arena.alloc(MiB)
    msg = str(info.value)
    assert info.value.errno == errno.ENOMEM and type(info.value) is OSError
    assert "pinned arena" in msg and f"request of {MiB} bytes" in msg, msg
    assert "ArenaConfig.chunk_bytes=2097152" in msg and f"{before.capacity_bytes} bytes" in msg
    assert "RLIMIT_AS" in msg and "swap('nvme')" in msg and "arena=" in msg, msg
    assert arena.report() == before and arena.chunk_count() == 1
    monkeypatch.undo()
    arena.free(arena.alloc(MiB))  # the arena works once memory is there
    arena.free(first)
    arena.close()


def test_swapped_forward_arena_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bare 'OSError: [Errno 12] Cannot allocate memory' from a swapped forward."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(3)])
    arena = PinnedArena(ArenaConfig(chunk_bytes=MiB, pin="off"))
    mgr = apply(model, {"0": swap("cpu"), "1": swap("cpu"), "2": keep()}, arena=arena,
                options=ActivationOptions(min_swap_bytes=1024))  # fmt: skip
    model(torch.randn(64, 256)).sum().backward()  # the first chunk
    _fail_mmap_from(monkeypatch, MiB)
    with pytest.raises(OSError, match=r"pinned arena: cannot add a chunk .*chunk_bytes") as info:
        model(torch.randn(2048, 256)).sum().backward()
    assert info.value.errno == errno.ENOMEM
    del info
    monkeypatch.undo()
    mgr.remove()
    arena.close()


def _efbig_child(directory: Path) -> dict[str, list]:
    """In a forked child: RLIMIT_FSIZE 1.5 MiB, then a tier that must preallocate 2 MiB and
    one that must grow past 1 MiB."""
    out: dict[str, list] = {}
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (1536 << 10, hard))
    arena = PinnedArena(ArenaConfig(chunk_bytes=4 * MiB, pin="off"))
    try:
        NVMeTier(_config(directory / "open", capacity_bytes=CAP), arena=arena)
    except OSError as e:
        out["open"] = [e.errno, str(e), os.listdir(directory / "open")]
    with NVMeTier(_config(directory / "grow"), arena=arena) as tier:
        tier.allocate(MiB)
        try:
            tier.allocate(4096)
        except OSError as e:
            out["grow"] = [e.errno, str(e), os.fstat(tier.file.fd).st_size, tier.file.size]
    return out


def _forked(fn: Callable[[], dict[str, list]]) -> dict[str, list]:
    """``fn()`` in a forked child (limits set there stay there), its result as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            signal.alarm(60)  # never hang the suite
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = {"error": [repr(e)]}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data or b'{"error": ["child died"]}')


def test_file_size_limit_is_efbig_naming_ulimit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (``ulimit -f``) below what the file needs, at open and at growth: a real
    EFBIG from posix_fallocate (Python ignores SIGXFSZ), raw before."""
    out = _forked(lambda: _efbig_child(tmp_path))
    assert "error" not in out, out
    code, msg, left = out["open"]
    assert code == errno.EFBIG and "preallocating" in msg and "ulimit -f" in msg, msg
    assert "1572864 bytes" in msg and str(tmp_path / "open") in msg and left == [], out
    code, msg, size, tier_size = out["grow"]
    assert code == errno.EFBIG and "growing" in msg and "RLIMIT_FSIZE" in msg, msg
    assert size == tier_size == MiB, out
