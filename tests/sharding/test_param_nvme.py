"""Stage 3 with ``offload_params="nvme"`` (parameter shards in an NVMe file, ``param_swap``)
and ``offload=`` (the inner optimizer's state on a tier, ``memopt.offload.state_store``) train
exactly as
the in-memory stage 3 (same ranks, same arithmetic: bit for bit); the shards really leave
memory between uses, prefetch runs ahead of FSDP2's gathers, state dicts round-trip, and
the configuration errors name their fix."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import torch

import memopt
from memopt.offload import NVMeConfig, OffloadConfig
from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding import _train3 as T3


def _nvme(path: str) -> NVMeConfig:
    return NVMeConfig(directory=path, direct="prefer", capacity_bytes=1 << 20)


def _shard(name: str, path: str | None, params: bool, state: str | None) -> tuple[Any, Any]:
    model = T3.make_model()
    kwargs: dict[str, Any] = {}
    if params:
        kwargs.update(offload_params="nvme", param_nvme=_nvme(f"{path}/p"))
    if state == "cpu":
        kwargs["offload"] = "cpu"
    elif state == "nvme":
        kwargs["offload"] = OffloadConfig(device="nvme", nvme=_nvme(f"{path}/s"))
    return memopt.shard(model, T.make_optimizer(name, model), stage=3, **kwargs)


def _check_evicted(sw: Any) -> list[int]:
    """Units left resident (only those the next forward needs first); every other unit's
    storages hold no bytes, and the tier holds them all."""
    kept = [u.index for u in sw.units if u.resident]
    for u in sw.units:
        sizes = [p.tensor.untyped_storage().nbytes() for p in u.pieces]
        assert u.resident or sizes == [0] * len(sizes), (u.index, sizes)
    assert len(kept) <= sw.lookahead and set(kept) <= sw._window(), (kept, sw._window())
    assert sw.resident_bytes() < sw.nbytes() == sw.tier.report().requested_bytes
    return kept


def _equal_params(model: Any, opt: Any, want: dict[str, torch.Tensor]) -> None:
    with opt.resident_params():
        got = T3.full_params(model)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _parity(rank: int, world: int, name: str, path: str) -> list[dict[str, int]]:
    ref_model, ref_opt = _shard(name, None, False, None)
    ref = T3.train(ref_model, ref_opt, rank, world)
    want = T3.full_params(ref_model)
    stats = []
    # AdamW: shards on NVMe; state on the pinned CPU tier; both on NVMe. GaLore: both.
    configs = (
        [(True, None), (False, "cpu"), (True, "nvme")] if name == "adamw" else [(True, "nvme")]
    )
    for i, (params, state) in enumerate(configs):
        model, opt = _shard(name, f"{path}/r{rank}/{i}", params, state)
        assert T3.train(model, opt, rank, world) == ref, (params, state)
        if state is not None:  # moments on the tier: only small tensors stay resident
            assert opt.state_store.resident_bytes() < 4096 * len(opt.holders)
        if params:
            sw = opt.param_swapper
            kept = _check_evicted(sw)
            _equal_params(model, opt, want)
            assert [u.index for u in sw.units if u.resident] == kept
            stats.append({**vars(sw.stats), "cycle": len(sw._trace)})
        else:
            assert opt.param_swapper is None
            assert torch.equal(T3.full_params(model)["head.weight"], want["head.weight"])
        opt.close()
    return stats


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_nvme_params_and_tier_state_train_bit_exact(tmp_path: Any, name: str) -> None:
    out = run_distributed(_parity, world_size=2, timeout_s=150, args=(name, str(tmp_path)))
    for per_rank in out:
        for s in per_rank:
            # the first cycle (until the first step) reads on demand; after it, every
            # gather found its unit already read ahead (or kept) by the recorded order
            assert s["gather_demand"] == s["cycle"] > 0, s
            assert s["gather_hits"] >= 9 * s["cycle"] and s["prefetched"] > 0, s
            assert s["bytes_written"] > 0 and s["bytes_read"] > 0, s


def _round_trip(rank: int, world: int, path: str) -> None:
    """Model and optimizer state dicts of an NVMe run load into a fresh NVMe run (built
    from a DeepSpeed config) that then trains on exactly as the uninterrupted one."""
    ref_model, ref_opt = _shard("adamw", None, False, None)
    T3.train(ref_model, ref_opt, rank, world)
    model, opt = _shard("adamw", f"{path}/r{rank}/a", True, "nvme")
    T3.train(model, opt, rank, world)
    msd, osd = model.state_dict(), opt.state_dict()
    _check_evicted(opt.param_swapper)  # saving left the shards on the tier
    ref_msd = ref_model.state_dict()
    for key, value in ref_msd.items():
        assert torch.equal(msd[key].to_local(), value.to_local()), key
    for i, st in ref_opt.state_dict()["state"].items():
        for k, v in st.items():
            same = (
                torch.equal(osd["state"][i][k], v)
                if torch.is_tensor(v)
                else v == osd["state"][i][k]
            )
            assert same, (i, k)
    opt.close()
    ds = {"zero_optimization": {"stage": 3, "offload_param": {
        "device": "nvme", "nvme_path": f"{path}/r{rank}/b"}}}  # fmt: skip
    fresh = T3.make_model()
    fresh, fresh_opt = memopt.shard(
        fresh, T.make_optimizer("adamw", fresh), deepspeed_config=ds,
        offload=OffloadConfig(device="nvme", nvme=_nvme(f"{path}/r{rank}/c")),
    )  # fmt: skip
    sw = fresh_opt.param_swapper
    assert sw is not None and sw.tier.config.directory == f"{path}/r{rank}/b/params"
    fresh.load_state_dict(msd)  # hooks: each unit loaded, copied into, written, evicted
    _check_evicted(sw)
    _equal_params(fresh, fresh_opt, {k: v.full_tensor() for k, v in msd.items()})
    with fresh_opt.resident_params():  # state_dict() entries alias the live shards here
        for value in fresh.state_dict().values():
            value.to_local().zero_()
    _equal_params(fresh, fresh_opt, {k: torch.zeros(v.shape) for k, v in msd.items()})
    with fresh_opt.resident_params():  # memopt.checkpoint's restore writes this way
        live = fresh.state_dict()
        for key, value in msd.items():
            live[key].to_local().copy_(value.to_local())
    fresh_opt.load_state_dict(osd)
    _check_evicted(sw)
    assert T3.train(fresh, fresh_opt, rank, world) == T3.train(ref_model, ref_opt, rank, world)
    _equal_params(fresh, fresh_opt, T3.full_params(ref_model))
    with pytest.raises(NotImplementedError, match="assign=True"):
        fresh.load_state_dict(msd, assign=True)


def test_state_dicts_round_trip_and_deepspeed_mapping(tmp_path: Any) -> None:
    run_distributed(_round_trip, world_size=2, timeout_s=150, args=(str(tmp_path),))


def _one_rank_errors(rank: int, world: int, path: str) -> None:
    # one rank: FSDP2 all the same (its one-rank gather reads the shard in wait_for_unshard)
    model, opt = _shard("adamw", f"{path}/ok", True, None)
    assert isinstance(opt, memopt.sharding.FSDPOptimizer) and opt.param_swapper is not None
    ref = T3.make_model()
    assert T3.train(model, opt) == T3.train(ref, T.make_optimizer("adamw", ref))
    _check_evicted(opt.param_swapper)
    opt.close()
    free = os.statvfs(path)
    fake = os.statvfs_result((*free[:4], 0, *free[5:]))  # no block available to us
    real, os.statvfs = os.statvfs, lambda _p: fake  # type: ignore[assignment]
    try:
        model = T3.make_model()
        with pytest.raises(OSError, match="do not fit in .*param_nvme") as info:
            memopt.shard(model, T.make_optimizer("adamw", model), stage=3,
                         offload_params="nvme", param_nvme=f"{path}/full")  # fmt: skip
        assert info.value.errno == errno.ENOSPC
    finally:
        os.statvfs = real  # type: ignore[assignment]


def test_one_rank_and_enospc(tmp_path: Any) -> None:
    run_distributed(_one_rank_errors, world_size=1, timeout_s=60, args=(str(tmp_path),))


def test_config_errors(tmp_path: Any) -> None:
    from memopt.sharding import ShardConfig

    with pytest.raises(ValueError, match="needs param_nvme="):
        ShardConfig(stage=3, layout="dim0", offload_params="nvme")
    with pytest.raises(ValueError, match="pass offload_params='nvme'"):
        ShardConfig(stage=3, layout="dim0", param_nvme=_nvme(str(tmp_path)))
    with pytest.raises(TypeError, match="param_nvme must be a memopt.offload.NVMeConfig"):
        ShardConfig(stage=3, layout="dim0", offload_params="nvme", param_nvme=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="applies to stage 3"):
        ShardConfig(stage=2, offload_params="nvme", param_nvme=_nvme(str(tmp_path)))
    model = T3.make_model()
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=3,
                     offload_params="nvme", param_nvme=str(tmp_path))  # fmt: skip
    cfg = memopt.sharding.deepspeed_config.from_deepspeed(
        {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}
    )
    with pytest.raises(ValueError, match="contradicts deepspeed_config's offload_param"):
        memopt.shard(model, T.make_optimizer("adamw", model), stage=3, offload_params="cpu",
                     deepspeed_config={"stage": 3, "offload_param": {
                         "device": "nvme", "nvme_path": str(tmp_path)}})  # fmt: skip
    assert cfg.param_nvme == NVMeConfig(directory=str(tmp_path))
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
