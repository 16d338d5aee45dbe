"""``memopt.shard(..., offload=...)`` and DeepSpeed ``offload_optimizer``: ZeRO 1/2 with the
AdamW state on the CPU or NVMe tier equals the single-process run (world 1 here, 2 gloo ranks
in one spawned group), bf16 parameters get their fp32 masters' rounding, and the unsupported
combinations (stage 3, SGD, amsgrad, parameter offload) raise first. Low-rank optimizers keep
their own state on the tier (``StateOffloadedOptimizer``) and equal the single-process run too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import memopt
from memopt.offload import NVMeTier, PinnedCPUTier
from memopt.offload.optimizer import OffloadConfig, OffloadedAdamW
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.sharding.deepspeed_config import read_deepspeed
from tests._harness.dist import run_distributed
from tests.sharding import _train as T

ATOL = 1e-5  # the sharding tests' tolerance: reference is memopt AdamW (torch's kernel)


def _assert_matches_reference(
    model: torch.nn.Module, losses: list[float], tag: str, name: str = "adamw"
) -> None:
    ref_losses, ref_model, _ = T.reference(name)
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        err = (a - b).abs().max().item()
        assert err <= ATOL, f"{tag}: {name} differs from single-process by {err:.3g}"
    worst = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    assert worst <= ATOL, f"{tag}: losses differ by {worst:.3g}"


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_shard_world1_offload_equals_plain(tmp_path: Path, device: str) -> None:
    model = T.make_model()
    offload = "cpu" if device == "cpu" else OffloadConfig("nvme", nvme_path=tmp_path)
    model, sharded = memopt.shard(model, T.make_optimizer("adamw", model), stage=2, offload=offload)
    assert isinstance(sharded.inner, OffloadedAdamW)
    assert isinstance(sharded.inner.tier, NVMeTier if device == "nvme" else PinnedCPUTier)
    _assert_matches_reference(model, T.train(model, sharded), f"world1/{device}")
    sd = sharded.state_dict()
    assert sd["sharding"]["world_size"] == 1 and sd["state"][0]["master"].dtype == torch.float32
    sharded.load_state_dict(sd)
    sharded.inner.close()


def test_deepspeed_offload_optimizer_maps(tmp_path: Path) -> None:
    ds = {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path),
                                            "pin_memory": False, "buffer_count": 4}}  # fmt: skip
    cfg = read_deepspeed(ds).shard_config()
    assert cfg.offload == OffloadConfig("nvme", str(tmp_path), pin_memory=False)
    assert read_deepspeed({"stage": 1, "cpu_offload": True}).shard_config().offload.device == "cpu"
    assert read_deepspeed({"stage": 2}).shard_config().offload is None
    model = T.make_model()
    model, sharded = memopt.shard(
        model, T.make_optimizer("adamw", model), deepspeed_config={"zero_optimization": ds}
    )
    assert isinstance(sharded.inner.tier, NVMeTier)
    assert sharded.inner.tier.file.path.parent == tmp_path
    sharded.inner.close()
    with pytest.raises(ValueError, match='needs "nvme_path"'):
        read_deepspeed({"stage": 2, "offload_optimizer": {"device": "nvme"}})
    with pytest.raises(NotImplementedError, match="ratio"):
        read_deepspeed({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}})
    z3n = read_deepspeed({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}})
    assert z3n.shard_config().offload_params == "nvme"
    assert str(z3n.shard_config().param_nvme.directory) == "/x"
    both = read_deepspeed({"stage": 3, "offload_param": {"device": "cpu"},
                           "offload_optimizer": {"device": "cpu"}}).shard_config()  # fmt: skip
    assert both.offload_params == "cpu" and both.offload is None  # FSDP2 CPU offload: both
    with pytest.raises(ValueError, match="applies to stage 3"):
        read_deepspeed({"stage": 2, "offload_param": {"device": "cpu"}}).shard_config()
    z3s = read_deepspeed({"stage": 3, "offload_optimizer": {"device": "cpu"}}).shard_config()
    assert z3s.offload_params == "none" and z3s.offload.device == "cpu"  # per-unit state tier
    with pytest.raises(ValueError, match="contradicts deepspeed_config"):
        memopt.shard(model, T.make_optimizer("adamw", model), offload="cpu",
                     deepspeed_config={"zero_optimization": ds})  # fmt: skip


def test_unsupported_combinations_raise_before_anything() -> None:
    model = T.make_model()
    with pytest.raises(NotImplementedError, match="AdamW.*got SGD"):
        memopt.shard(model, torch.optim.SGD(model.parameters(), lr=0.1), offload="cpu")
    with pytest.raises(NotImplementedError, match="amsgrad"):
        memopt.shard(model, torch.optim.AdamW(model.parameters(), amsgrad=True), offload="cpu")
    with pytest.raises(NotImplementedError, match="L2 in the gradient"):
        opt = torch.optim.Adam(model.parameters(), weight_decay=0.1)
        memopt.shard(model, opt, offload="cpu")
    with pytest.raises(ValueError, match="master_dtype"):
        memopt.shard(model, T.make_optimizer("adamw", model), offload="cpu",
                     master_dtype=torch.float64)  # fmt: skip
    with pytest.raises(TypeError, match="offload must be"):
        memopt.sharding.ShardConfig(offload={"device": "cpu"})  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())


def test_hybrid_with_low_rank_optimizer_raises() -> None:
    """``hybrid`` schedules the AdamW pipeline; with a low-rank optimizer it is an error that
    names the optimizer and the fix, never a silent no-op."""
    model = T.make_model()
    opt = T.make_optimizer("galore", model)
    with pytest.raises(ValueError, match=rf"hybrid=True.*{type(opt).__name__}.*hybrid=False"):
        memopt.shard(model, opt, stage=2, offload=OffloadConfig("cpu", hybrid=True))
    with pytest.raises(ValueError, match="hybrid_update: false"):
        memopt.shard(model, T.make_optimizer("apollo", model), stage=1,
                     offload=OffloadConfig("cpu", hybrid=True))  # fmt: skip
    with pytest.raises(ValueError, match="AdamW has quantized moments"):
        memopt.shard(model, T.make_optimizer("adamw-int8", model), stage=1,
                     offload=OffloadConfig("cpu", hybrid=True))  # fmt: skip
    # refused before anything is installed: no gradient hooks left on the model
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("name", ["galore", "apollo", "frugal", "adamw-int8"])
def test_low_rank_state_offload_world1(tmp_path: Path, name: str) -> None:
    """adamw-int8: memopt's AdamW with quantized moments takes this path too (the test
    model's tensors are under the 4096-element floor of quantization: see the next test)."""
    model = T.make_model()
    device = "nvme" if name == "galore" else "cpu"  # the test model's tensors are small:
    offload = OffloadConfig(device, nvme_path=tmp_path, min_state_bytes=0)  # move all of them
    model, sharded = memopt.shard(model, T.make_optimizer(name, model), stage=2, offload=offload)
    assert isinstance(sharded.inner, StateOffloadedOptimizer)
    losses = T.train(model, sharded)
    _assert_matches_reference(model, losses, f"world1/{name}", name)
    big = [t for st in sharded.inner.state.values() for t in st.values()
           if isinstance(t, torch.Tensor) and t.numel() > 0]  # fmt: skip
    assert not big, "large state tensors stayed resident between steps"
    assert sharded.inner.tier.report().requested_bytes > 0
    sd = sharded.state_dict()  # fetched back: the inner optimizer's own layout
    assert any(t.numel() > 0 for st in sd["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))  # fmt: skip
    sharded.load_state_dict(sd)
    sharded.inner.close()


def test_quantized_adamw_state_stays_quantized_on_the_tier(tmp_path: Path) -> None:
    """AdamW(state_dtype="int8") offloaded keeps int8 codes on the tier and steps exactly like
    the plain optimizer. Until 2026-11-24 the fp32 AdamW pipeline took it: fp32 moments (4x
    the bytes asked for) and a different update (1.4e-3 off after 5 steps here)."""

    def build():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
        return m, memopt.optim.AdamW(m.parameters(), lr=1e-2, state_dtype="int8")

    ref, ref_opt = build()
    model, opt = build()
    model, sharded = memopt.shard(model, opt, stage=2, offload=OffloadConfig("nvme", tmp_path))
    assert isinstance(sharded.inner, StateOffloadedOptimizer)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(8, 64, generator=g), torch.randn(8, 5, generator=g)
        for m, o in ((ref, ref_opt), (model, sharded)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    state = sharded.inner.state_dict()["state"]
    codes = [st["exp_avg_q"] for st in state.values() if "exp_avg_q" in st]
    assert len(codes) == 1 and codes[0].dtype == torch.uint8 and codes[0].numel() == 64 * 64
    sharded.inner.close()


def _low_rank(rank: int, world: int, root: str) -> dict[str, float]:
    out = {}
    for name, layout, device in (("galore", "whole_tensor", "nvme"), ("apollo", "dim0", "cpu")):
        offload = OffloadConfig(device, nvme_path=Path(root) / f"{name}-{layout}",
                                min_state_bytes=0)  # fmt: skip
        model = T.make_model()
        model, sharded = memopt.shard(model, T.make_optimizer(name, model), 2, layout,
                                      bucket_bytes=512, offload=offload)  # fmt: skip
        _assert_matches_reference(model, T.train(model, sharded, rank, world), name, name)
        out[f"{name}/{layout}/{device}"] = sharded.inner.tier.report().requested_bytes
        sharded.remove_hooks()
        sharded.inner.close()
    return out


def _ranks(rank: int, world: int, root: str) -> dict[str, float]:
    out = _low_rank(rank, world, root)
    for stage, layout, device in ((1, "dim0", "nvme"), (2, "whole_tensor", "nvme"),
                                  (2, "dim0", "cpu")):  # fmt: skip
        tag = f"stage{stage}/{layout}/{device}"
        offload = OffloadConfig(device, nvme_path=Path(root) / tag.replace("/", "-"),
                                bucket_bytes=4096)  # fmt: skip
        model = T.make_model()
        model, sharded = memopt.shard(model, T.make_optimizer("adamw", model), stage, layout,
                                      bucket_bytes=512, offload=offload)  # fmt: skip
        losses = T.train(model, sharded, rank, world)
        _assert_matches_reference(model, losses, tag)
        if device == "nvme":
            assert sharded.inner.tier.file.path.name == f"memopt-rank{rank}.swap"
        out[tag] = sharded.inner.store.nbytes()
        sharded.remove_hooks()
        sharded.inner.close()
    # bf16 parameters, fp32 masters on the tier: the model holds the masters rounded
    ref = T.make_model(torch.bfloat16)
    solo = [torch.distributed.new_group([r]) for r in range(world)]
    ref, ref_sharded = memopt.shard(
        ref,
        T.make_optimizer("adamw", ref),
        2,
        "dim0",
        process_group=solo[rank],
        master_dtype=torch.float32,
    )
    T.train(ref, ref_sharded)  # fmt: skip
    model = T.make_model(torch.bfloat16)
    model, sharded = memopt.shard(model, T.make_optimizer("adamw", model), 2, "dim0",
                                  offload=OffloadConfig("cpu"))  # fmt: skip
    T.train(model, sharded, rank, world)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    sharded.inner.close()
    return out


def test_two_ranks_offload_equals_single_process() -> None:
    with tempfile.TemporaryDirectory() as root:  # O_DIRECT there, as for tmp_path in test_nvme
        per_rank = run_distributed(_ranks, world_size=2, timeout_s=120, args=(root,))
    for tag in per_rank[0]:
        sizes = [r[tag] for r in per_rank]
        assert all(sizes), f"{tag}: a rank holds no offloaded state {sizes}"
