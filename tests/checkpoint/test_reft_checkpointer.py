"""AsyncCheckpointer(redundancy=...): saves are protected in peers' host memory (REFT), and a
rank that lost its files and its memory gets its snapshot back from peers, bit for bit.

2 gloo ranks, replication, torch AdamW (replicated, rank 0 writes the model): saves return and
publish before the protection (a gated protector; the checkpointer's own records say so), and
a save that finds the protector too far behind is skipped on every rank alike; rank 1 drops
its files and memory, the survivors re-create their checkpointer (``adopt=``), the directory is
moved away, and ``recover`` restores parameters, optimizer state, scheduler, RNG and extras
exactly (training on agrees bit for bit with the run that never failed). A failed protect
leaves the published snapshot loadable, and a failed disk write leaves the protection; when
every rank lost its memory, ``recover`` raises and ``load(from_peers=True)`` falls back to disk.
3 ranks, erasure k=2 m=1, GaLore under ZeRO-2 (each rank owns different optimizer state): one
lost rank is rebuilt exactly; two lost ranks raise ``PeerRecoveryError`` on every rank.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from memopt.checkpoint import checkpointer as ckpt_module
from memopt.checkpoint.checkpointer import AsyncCheckpointer
from memopt.checkpoint.errors import CheckpointError, PeerRecoveryError
from memopt.checkpoint.redundancy_config import RedundancyConfig
from tests._harness.dist import run_distributed
from tests.checkpoint._common import equal, full_params, make_all, train


def _objects(name: str, stage: int, perturb: bool = False) -> tuple[Any, Any, Any]:
    model, opt, sched = make_all(name, stage=stage, layout="whole_tensor" if stage else None)
    if perturb:  # a replacement starts from other values: recovery must overwrite them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    return model, opt, sched


def _state(model: Any, opt: Any, sched: Any) -> dict[str, Any]:
    """Everything a resume must reproduce, cloned."""
    out: dict[str, Any] = {f"param.{k}": v for k, v in full_params(model).items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{idx}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    out["sched"] = sched.state_dict()
    out["rng.torch"] = torch.get_rng_state()
    out["rng.numpy"] = np.random.get_state()[1].copy()
    out["rng.python"] = random.getstate()
    return out


def _diff(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Keys missing or differing in any bit."""
    bad = sorted(set(got) ^ set(want))
    for k in set(got) & set(want):
        a, b = got[k], want[k]
        if isinstance(a, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            same = np.array_equal(a, b)
        else:
            same = a == b
        if not same:
            bad.append(k)
    return bad


def _extra(rank: int, step: int) -> dict[str, Any]:
    return {"loader_pos": 100 * step + rank, "tag": f"r{rank}", "t": torch.arange(3) + rank}


def _same_extra(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return (
        got["loader_pos"] == want["loader_pos"]
        and got["tag"] == want["tag"]
        and torch.equal(got["t"], want["t"])
    )


def _drop_files(directory: str, rank: int) -> None:
    for path in glob.glob(os.path.join(directory, "step_*", f"rank_{rank:05d}.*")):
        os.remove(path)


def _replace(
    ck: AsyncCheckpointer, lost: bool, directory: str, cfg: RedundancyConfig
) -> AsyncCheckpointer:
    """A lost rank closes (memory gone) and starts fresh; survivors adopt their tier."""
    if lost:
        ck.close()
        return AsyncCheckpointer(directory, fsync=False, redundancy=cfg)
    return AsyncCheckpointer(directory, fsync=False, redundancy=cfg, adopt=ck)


def _gated_save(ck: AsyncCheckpointer, model: Any, opt: Any, sched: Any) -> dict[str, Any]:
    """The protector is held at a gate: saves, fences and publication go on without it; a save
    that finds ``max_inflight`` (2) saves queued for peers is skipped by every rank."""
    gate = threading.Event()
    real = ck.peers.red.protect_blob  # type: ignore[union-attr]

    def held(step: int, blob: torch.Tensor) -> None:
        gate.wait(60)
        real(step, blob)

    ck.peers.red.protect_blob = held  # type: ignore[union-attr,method-assign]
    for step in range(4):
        train(model, opt, sched, step, step + 1)  # the optimizer step's fence: the copy only
        ck.save(step + 1, model=model, optimizer=opt, scheduler=sched)
    recs = ck.stats.records[-4:]
    train(model, opt, sched, 4, 5)
    deadline = time.monotonic() + 60
    while not recs[-1].ok and time.monotonic() < deadline:
        time.sleep(0.01)
    out: dict[str, Any] = {
        "published_unprotected": all(r.ok and not r.protected for r in recs) and ck.latest() == 4
    }
    gate.set()
    ck.wait()
    ck.peers.red.protect_blob = real  # type: ignore[union-attr,method-assign]
    first, last = recs[0], recs[-1]
    out["protected_after"] = first.protected and first.protected_s >= first.durable_s
    out["stall_below_durable"] = first.durable_s > first.stall_s
    out["behind_skipped"] = not last.protected and last.protect_note.startswith("skipped")
    out["labels"] = [r.step for r in recs if r.protected]
    out["in_order"] = ck.peers.protected_step == out["labels"][-1]  # type: ignore[union-attr]
    return out


def _two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    d = os.path.join(root, "ckpt")
    cfg = RedundancyConfig(mode="replicate", copies=1)
    model, opt, sched = _objects("torch_adamw", 0)
    ck = AsyncCheckpointer(d, fsync=False, redundancy=cfg)
    out: dict[str, Any] = _gated_save(ck, model, opt, sched)

    # -- rank 1 loses its files and its memory; recovered from rank 0 without the disk ------
    train(model, opt, sched, 2, 3)  # replicated: every rank trains on the whole batch
    ck.save(3, model=model, optimizer=opt, scheduler=sched, extra=_extra(rank, 3))
    want = _state(model, opt, sched)
    ck.wait()
    out["held"] = ck.peers.memory_bytes() > 0  # type: ignore[union-attr]
    train(model, opt, sched, 3, 5)
    after = full_params(model)
    if rank == 1:
        _drop_files(d, 1)
    ck = _replace(ck, rank == 1, d, cfg)
    model, opt, sched = _objects("torch_adamw", 0, perturb=True)
    dist.barrier()
    if rank == 0:
        os.rename(d, d + ".away")  # recovery must not read the directory
    dist.barrier()
    extra = ck.recover(model=model, optimizer=opt, scheduler=sched)
    out["recovered"] = _diff(_state(model, opt, sched), want)
    out["extra"] = _same_extra(extra, _extra(rank, 3))
    dist.barrier()
    if rank == 0:
        os.rename(d + ".away", d)
    dist.barrier()
    train(model, opt, sched, 3, 5)
    out["continued"] = equal(full_params(model), after)

    # -- a failed protect leaves the published snapshot; the tier keeps step 3 -------------
    real = ck.peers.red.protect_blob  # type: ignore[union-attr]

    def boom(step: int, blob: torch.Tensor) -> None:
        raise RuntimeError("injected protect failure")

    ck.peers.red.protect_blob = boom  # type: ignore[union-attr,method-assign]
    ck.save(5, model=model, optimizer=opt, scheduler=sched, extra=_extra(rank, 5))
    want5 = _state(model, opt, sched)
    with pytest.raises(CheckpointError, match="in-memory redundancy.*injected"):
        ck.wait()
    ck.peers.red.protect_blob = real  # type: ignore[union-attr,method-assign]
    rec = ck.stats.last
    assert rec is not None
    out["published5"] = rec.ok and not rec.protected and ck.latest() == 5
    out["still3"] = ck.peers.protected_step == 3  # type: ignore[union-attr]
    train(model, opt, sched, 5, 6)
    with warnings.catch_warnings(record=True) as caught:  # peers hold 3: disk has 5
        warnings.simplefilter("always")
        ck.load(5, model=model, optimizer=opt, scheduler=sched, from_peers=True)
    out["fallback5"] = _diff(_state(model, opt, sched), want5)
    out["warned"] = any("loading step 5 from disk" in str(w.message) for w in caught)

    # -- a failed disk write on rank 1: not published, but protected in memory -------------
    if rank == 1:

        def no_space(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.ENOSPC, "injected: no space left on device")

        ckpt_module.write_file = no_space  # type: ignore[assignment]
    try:
        train(model, opt, sched, 5, 6)
        ck.save(6, model=model, optimizer=opt, scheduler=sched, extra=_extra(rank, 6))
        want6 = _state(model, opt, sched)
        with pytest.raises(CheckpointError, match="checkpoint step 6"):
            ck.wait()
    finally:
        ckpt_module.write_file = real_write_file
    rec = ck.stats.last
    assert rec is not None
    out["protected6"] = rec.protected and not rec.ok and ck.latest() == 5
    train(model, opt, sched, 6, 8)
    ck.recover(model=model, optimizer=opt, scheduler=sched)
    out["recovered6"] = _diff(_state(model, opt, sched), want6)

    # -- every rank lost its memory: a clear error; load(from_peers=True) reads the disk ----
    ck.close()
    ck = AsyncCheckpointer(d, fsync=False, redundancy=cfg)
    with pytest.raises(PeerRecoveryError, match="no rank holds an in-memory snapshot"):
        ck.recover(model=model, optimizer=opt, scheduler=sched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck.load(model=model, optimizer=opt, scheduler=sched, from_peers=True)
    out["disk_fallback"] = _diff(_state(model, opt, sched), want5)
    ck.close()
    return out


real_write_file = ckpt_module.write_file


def test_replicate_two_ranks_recover_a_lost_rank_from_peer_memory(tmp_path) -> None:
    results = run_distributed(_two_ranks, world_size=2, timeout_s=120, args=(str(tmp_path),))
    assert results[0]["labels"] == results[1]["labels"] and results[0]["labels"][0] == 1
    for rank, out in enumerate(results):
        for key in ("recovered", "continued", "fallback5", "recovered6", "disk_fallback"):
            assert out[key] == [], (rank, key, out[key])
        flags = {k: v for k, v in out.items() if isinstance(v, bool)}
        assert all(flags.values()), (rank, flags)


def _three_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    d = os.path.join(root, "ckpt")
    cfg = RedundancyConfig(mode="erasure", k=2, m=1)
    model, opt, sched = _objects("galore", 2)
    ck = AsyncCheckpointer(d, fsync=False, redundancy=cfg)
    train(model, opt, sched, 0, 3, rank, world)
    ck.save(3, model=model, optimizer=opt, scheduler=sched, extra=_extra(rank, 3))
    want = _state(model, opt, sched)
    ck.wait()
    out: dict[str, Any] = {"owns_state": any(k.startswith("opt.") for k in want)}
    train(model, opt, sched, 3, 5, rank, world)
    after = full_params(model)
    if rank == 2:
        _drop_files(d, 2)
    ck = _replace(ck, rank == 2, d, cfg)
    model, opt, sched = _objects("galore", 2, perturb=True)
    extra = ck.recover(model=model, optimizer=opt, scheduler=sched)
    out["recovered"] = _diff(_state(model, opt, sched), want)
    out["extra"] = _same_extra(extra, _extra(rank, 3))
    train(model, opt, sched, 3, 5, rank, world)
    out["continued"] = equal(full_params(model), after)
    # every rank holds step 3 now (the replacement its rebuilt copy): nothing to rebuild
    ck.load(model=model, optimizer=opt, scheduler=sched, from_peers=True)
    out["reloaded"] = _diff(_state(model, opt, sched), want)

    ck.save(5, model=model, optimizer=opt, scheduler=sched)
    ck.wait()
    ck = _replace(ck, rank in (0, 1), d, cfg)  # m = 1: two lost ranks are too many
    with pytest.raises(PeerRecoveryError, match="rebuilds at most m = 1"):
        ck.recover(model=model, optimizer=opt, scheduler=sched)
    out["raised"] = True
    ck.close()
    return out


def test_erasure_three_ranks_recover_one_and_refuse_two(tmp_path) -> None:
    pytest.importorskip("zfec")
    results = run_distributed(_three_ranks, world_size=3, timeout_s=120, args=(str(tmp_path),))
    for rank, out in enumerate(results):
        assert out["recovered"] == out["continued"] == out["reloaded"] == [], (rank, out)
        assert out["extra"] and out["raised"], (rank, out)
    assert sum(out["owns_state"] for out in results) >= 2  # state is spread over the ranks


def test_redundancy_needs_ranks(tmp_path) -> None:
    with pytest.raises(ValueError, match="2\\+ ranks"):
        AsyncCheckpointer(tmp_path, redundancy=RedundancyConfig(mode="replicate"))
    with pytest.raises(TypeError, match="RedundancyConfig"):
        AsyncCheckpointer(tmp_path, redundancy="replicate")  # type: ignore[arg-type]
    ck = AsyncCheckpointer(tmp_path)
    with pytest.raises(ValueError, match="redundancy=RedundancyConfig"):
        ck.recover()
    ck.close()


def test_setup_config_keys_make_the_redundancy_config() -> None:
    from memopt import Config
    from memopt.config.setup import redundancy_config

    def ck(**keys: Any) -> Any:
        return Config.from_dict({"checkpoint": {"directory": "ckpt", **keys}}).checkpoint

    assert redundancy_config(ck(), 2) is None
    assert redundancy_config(ck(redundancy="replicate", copies=2), 3) == RedundancyConfig(
        mode="replicate", copies=2
    )
    assert redundancy_config(ck(redundancy="erasure"), 4) == RedundancyConfig(
        mode="erasure", k=3, m=1
    )
    with pytest.raises(ValueError, match="k \\+ m = 4 ranks, this one has 3"):
        redundancy_config(ck(redundancy="erasure", erasure_k=3), 3)
    with pytest.raises(ValueError, match="checkpoint.copies"):
        ck(copies=0)
