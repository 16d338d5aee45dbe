"""Stage 3 with ``offload_params="nvme"``: one failed read or write of the parameter tier no
longer wedges the ``ParamSwapper`` (one rank, FSDP2's path).

Before, a failed read or write stayed queued on its unit (``u.reads`` / ``u.writes``), so every
later load, eviction and ``close()`` raised the same error again, and the step's message said
to build the model again with ``memopt.shard``. And a state write failing in the step before
the unit's shards were written back left them in memory as if clean: the next eviction dropped
the only copy of that step's update (the tier's older one was read back).

Now (``param_swap_units``): a failed read leaves the unit on the tier and a later load reads
it again; a failed or refused write keeps the shards in memory (dirty) until a later eviction
writes them; each failure is raised once, naming the unit, the file and the fix; ``close()``
after a failed write neither raises it nor keeps the file. After the cause is gone, training
goes on exactly (bit for bit) as a run without the failure.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import torch

import memopt
from memopt.offload import NVMeConfig, OffloadConfig
from memopt.offload.tier import IOFuture
from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding import _train3 as T3


def _build(path: str, state: bool) -> tuple[Any, Any]:
    model = T3.make_model()
    nvme = NVMeConfig(directory=path, direct="prefer", capacity_bytes=1 << 20)
    kwargs: dict[str, Any] = {"offload_params": "nvme", "param_nvme": nvme}
    if state:  # the optimizer state on the pinned CPU tier too
        kwargs["offload"] = OffloadConfig(device="cpu", min_state_bytes=64)
    return memopt.shard(model, T.make_optimizer("adamw", model), stage=3, **kwargs)


def _backward(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()


def _step(model: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _backward(model, batch)
    opt.step()
    opt.zero_grad()


def _params(opt: Any, model: Any) -> dict[str, torch.Tensor]:
    with opt.resident_params(write_back=False):
        return T3.full_params(model)


def _clean(path: str, state: bool, steps: int) -> dict[str, torch.Tensor]:
    model, opt = _build(path, state)
    for batch in T.batches()[:steps]:
        _step(model, opt, batch)
    out = _params(opt, model)
    opt.close()
    return out


def _break(tier: Any, op: str, keys: set[int], how: str) -> None:
    """``op`` ("read_async" / "write_async") of the handles ``keys`` fails: ``refuse`` raises
    ENOSPC at once (a full tier file), ``eio`` returns a future that fails with EIO (a disk
    error; the tier's content is left alone). ``del tier.<op>`` repairs it."""
    real = getattr(type(tier), op).__get__(tier)

    def broken(handle: Any, tensor: torch.Tensor) -> IOFuture:
        if handle.key not in keys:
            return real(handle, tensor)
        if how == "refuse":
            raise OSError(errno.ENOSPC, f"injected: no room for handle {handle.key}")
        return IOFuture.completed(OSError(errno.EIO, "injected EIO"), f"test {op}")

    setattr(tier, op, broken)


def _keys(sw: Any, index: int) -> set[int]:
    return {p.handle.key for p in sw.units[index].pieces}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(got[k], v) for k, v in want.items())


def _read_fails(path: str, want: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The first unit's read fails in the step: nothing stepped, retry works."""
    data, out = T.batches()[:4], {}
    model, opt = _build(path, False)
    sw = opt.param_swapper
    _step(model, opt, data[0])
    _backward(model, data[1])
    _break(sw.tier, "read_async", _keys(sw, 0), "eio")
    with pytest.raises(OSError) as info:
        opt.step()
    out["step"] = (info.value.errno, str(info.value))
    u = sw.units[0]
    out["left"] = (
        u.resident,
        len(u.reads),
        sum(p.tensor.untyped_storage().nbytes() for p in u.pieces),
    )
    with pytest.raises(OSError) as info:  # the whole model: the same read fails, nothing pinned
        with opt.resident_params():
            pass
    out["resident"] = (type(info.value).__name__, str(info.value))
    out["pins"] = [v.pins for v in sw.units]
    del sw.tier.read_async  # fixed: the step is retried, training goes on
    opt.step()
    opt.zero_grad()
    for batch in data[2:]:
        _step(model, opt, batch)
    out["same"] = _same(_params(opt, model), want)
    opt.close()
    return out


def _last_write_fails(path: str, want: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The last unit's write fails in the step: the update is complete, training goes on."""
    data, out = T.batches()[:4], {}
    model, opt = _build(path, False)
    sw = opt.param_swapper
    _step(model, opt, data[0])
    _break(sw.tier, "write_async", _keys(sw, 2), "eio")
    _backward(model, data[1])
    with pytest.raises(OSError) as info:
        opt.step()
    opt.zero_grad()
    out["step"] = (info.value.errno, str(info.value))
    u = sw.units[2]
    out["left"] = (u.resident, getattr(u, "dirty", None), len(u.writes))
    del sw.tier.write_async  # fixed: the next eviction writes the kept shards
    for batch in data[2:]:
        _step(model, opt, batch)
    out["same"] = _same(_params(opt, model), want)
    out["dirty"] = [getattr(v, "dirty", None) for v in sw.units]
    opt.close()
    return out


def _refused_mid_step(path: str, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]):
    """The first unit's write is refused (ENOSPC): 1 of 3 units stepped, its new values kept;
    close() with the tier still full neither raises nor leaves the file."""
    data, out = T.batches()[:2], {}
    model, opt = _build(path, False)
    sw = opt.param_swapper
    _step(model, opt, data[0])
    _break(sw.tier, "write_async", _keys(sw, 0), "refuse")
    _backward(model, data[1])
    with pytest.raises(OSError) as info:
        opt.step()
    opt.zero_grad()
    out["step"] = (info.value.errno, str(info.value))
    with pytest.raises(OSError) as info:  # leaving writes root back: refused again
        with opt.resident_params():
            pass
    out["resident"] = (type(info.value).__name__, info.value.errno, str(info.value))
    out["units"] = [(v.pins, v.resident, getattr(v, "dirty", None)) for v in sw.units]
    file = sw.tier.file.path
    try:
        opt.close()
    except OSError as e:  # old code: the failed write again (and the file stayed)
        out["close"] = str(e)
    out["file_left"] = os.path.exists(file)
    got = T3.full_params(model)  # closed: every shard in memory
    root = {k for k in got if not k.startswith("blocks.")}
    out["root_stepped"] = _same(got, {k: after[k] for k in root})
    out["rest_not"] = _same(got, {k: v for k, v in before.items() if k not in root})
    return out


def _state_write_fails(path: str, want: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The last unit's state write is refused before its shards are written back: those
    shards stay in memory (dirty) until an eviction writes them, so nothing is lost."""
    data, out = T.batches()[:4], {}
    model, opt = _build(path, True)
    sw, store = opt.param_swapper, opt.state_store
    _step(model, opt, data[0])
    held = opt._held(opt._units[2][1])
    keys = {h.key for (pid, _), h in store._handles.items() if pid in {id(x) for x in held}}
    _break(store.tier, "write_async", keys, "refuse")
    _backward(model, data[1])
    with pytest.raises(OSError) as info:
        opt.step()
    opt.zero_grad()
    out["step"] = (info.value.errno, str(info.value))
    out["left"] = (sw.units[2].resident, getattr(sw.units[2], "dirty", None))
    del store.tier.write_async
    for batch in data[2:]:
        _step(model, opt, batch)
    out["same"] = _same(_params(opt, model), want)
    opt.close()
    return out


def _guarded(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the test of that case
        return {"error": f"{type(e).__name__}: {e}"}


def _all(rank: int, world: int, path: str) -> dict[str, Any]:
    clean = {n: _clean(f"{path}/clean{n}", False, n) for n in (1, 2, 4)}
    return {
        "read": _guarded(_read_fails, f"{path}/read", clean[4]),
        "last": _guarded(_last_write_fails, f"{path}/last", clean[4]),
        "mid": _guarded(_refused_mid_step, f"{path}/mid", clean[1], clean[2]),
        "state": _guarded(_state_write_fails, f"{path}/state", _clean(f"{path}/cs", True, 4)),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = str(tmp_path_factory.mktemp("swap"))
    return run_distributed(_all, world_size=1, timeout_s=120, args=(path,))[0]


def test_failed_read_leaves_the_unit_on_the_tier_and_the_step_retries(results: Any) -> None:
    out = results["read"]
    assert "error" not in out, out["error"]
    code, msg = out["step"]
    assert code == errno.EIO, msg
    assert "(stage 3, parameter read of root failed)" in msg, msg
    assert "no unit was stepped and nothing changed" in msg and "can be retried" in msg, msg
    assert out["left"] == (False, 0, 0), out["left"]  # on the tier, nothing queued
    kind, msg = out["resident"]
    assert kind == "ShardIOError" and "read of the parameter shards of FSDP2 unit 'root'" in msg, (
        msg
    )
    assert "next use of the unit reads them again" in msg and "param_nvme" in msg, msg
    assert out["pins"] == [0, 0, 0], "a failed resident_params() left units pinned"
    assert out["same"], "after the retried step, training differs from a run without failure"


def test_failed_write_keeps_the_shards_and_training_goes_on(results: Any) -> None:
    out = results["last"]
    assert "error" not in out, out["error"]
    code, msg = out["step"]
    assert code == errno.EIO, msg
    assert "(stage 3, parameter write of blocks.1 failed)" in msg, msg
    assert "every unit (3) was stepped" in msg and "kept in memory" in msg, msg
    assert "memopt.shard) before" not in msg, msg  # no rebuild needed any more
    assert out["left"] == (True, True, 0), out["left"]  # in memory, dirty, nothing queued
    assert out["same"], "training after a failed parameter write differs from a clean run"
    assert out["dirty"] == [False, False, False], "the kept shards were never written"


def test_refused_write_mid_step_loses_nothing_and_close_cleans_up(results: Any) -> None:
    out = results["mid"]
    assert "error" not in out, out["error"]
    code, msg = out["step"]
    assert code == errno.ENOSPC, msg
    assert "did not complete: 1 of 3 FSDP2 units were stepped (root)" in msg, msg
    assert "Parameter shards whose write failed were kept in memory" in msg, msg
    assert "Do not retry the step" in msg and "once the tier has room" in msg, msg
    assert "memopt.shard) before" not in msg, msg
    kind, code, msg = out["resident"]
    assert kind == "ShardIOError" and code == errno.ENOSPC, msg
    assert (
        "write of the parameter shards of FSDP2 unit 'root'" in msg and "nothing is lost" in msg
    ), msg
    assert "free space on that disk, or point param_nvme at a larger one" in msg, msg
    # root stays in memory (its write is refused); the others were written and evicted
    assert out["units"] == [(0, True, True), (0, False, False), (0, False, False)], out
    assert "close" not in out, out["close"]
    assert not out["file_left"], "close() left the parameter tier's file behind"
    assert out["root_stepped"], "the stepped unit whose write failed lost its update"
    assert out["rest_not"], "units the step did not reach changed"


def test_state_write_failure_does_not_drop_unwritten_shards(results: Any) -> None:
    out = results["state"]
    assert "error" not in out, out["error"]
    code, msg = out["step"]
    assert code == errno.ENOSPC, msg
    assert "(stage 3, state write failed)" in msg and "every unit (3) was stepped" in msg, msg
    assert "parameter shards not yet written to their tier" in msg, msg
    assert out["left"] == (True, True), out["left"]
    assert out["same"], "the step's update of the unit not yet written back was lost"
