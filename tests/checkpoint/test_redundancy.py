"""PeerRedundancy on real gloo groups: a wiped rank's snapshot comes back bit for bit from peers.

2 ranks replicate; 3 ranks erasure-code (k=1, m=2 and k=2, m=1). Each rank's snapshot differs
(values, sizes), a "lost" rank is replaced by a fresh ``PeerRedundancy`` holding nothing, and
the rebuilt tensors are compared with torch.equal against the ones that rank protected. Errors
(step mismatch, config mismatch, too many lost ranks) must be raised on every rank, not hang.
"""

from __future__ import annotations

import pytest
import torch

from memopt.checkpoint.redundancy import PeerRedundancy, RedundancyConfig
from tests._harness.dist import run_distributed


def _snapshot(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    n = 200 + 150 * rank  # ranks differ in size: padding is exercised
    return {
        "layer.weight": torch.randn(n, 16, generator=g),
        "layer.bias": torch.randn(n, generator=g).to(torch.bfloat16),
        "opt.step": torch.tensor(step),
        "opt.exp_avg": torch.randn(n, 16, generator=g),
    }


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )


def _raises(fn, match: str) -> bool:
    with pytest.raises(ValueError, match=match):
        fn()
    return True


def _check_rebuild(red: PeerRedundancy, rank: int, lost: list[int], step: int) -> bool:
    got = red.rebuild(lost)
    if rank not in lost:
        return got is None
    assert got is not None
    return (
        got.step == step
        and got.meta == {"rank": rank}
        and _same(got.tensors, _snapshot(rank, step))
    )


def _replicate(rank: int, world: int) -> dict[str, object]:
    cfg = RedundancyConfig(mode="replicate", copies=1)
    red = PeerRedundancy(cfg)
    red.protect(3, _snapshot(rank, 3), {"rank": rank})
    out: dict[str, object] = {"memory": red.memory_bytes(), "step": red.step}
    # A step that differs between ranks is refused everywhere; the old protection stays.
    out["mismatch"] = _raises(lambda: red.protect(4 + rank, _snapshot(rank, 4)), "different steps")
    out["kept"] = red.step == 3
    if rank == 1:
        red = PeerRedundancy(cfg)  # rank 1's host memory is gone: a fresh replacement
    out["rebuilt1"] = _check_rebuild(red, rank, [1], 3)
    red.protect(5, _snapshot(rank, 5), {"rank": rank})
    if rank == 0:
        red = PeerRedundancy(cfg)
    out["rebuilt0"] = _check_rebuild(red, rank, [0], 5)
    out["all_lost"] = _raises(lambda: red.rebuild([0, 1]), "every rank of the group is lost")
    # An already-serialized snapshot (e.g. a staged file image) comes back byte for byte.
    blob = torch.arange(1000 + 7 * rank, dtype=torch.int64).to(torch.uint8)
    red.protect_blob(6, blob)
    got = red.rebuild_blob(1)
    out["blob"] = got is None if rank == 0 else (got[0] == 6 and torch.equal(got[1], blob))
    out["disagree"] = _raises(lambda: red.rebuild([rank]), "disagree on the lost ranks")
    return out


def test_replicate_two_ranks_rebuilds_a_wiped_rank() -> None:
    results = run_distributed(_replicate, world_size=2, timeout_s=90)
    for rank, out in enumerate(results):
        assert all(v is True for k, v in out.items() if k not in ("memory", "step")), (rank, out)
        assert out["step"] == 3
    # Each rank holds exactly its peer's blob (rank 1's snapshot is the larger one).
    assert results[0]["memory"] > results[1]["memory"] > 0


def _erasure(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    cfg = RedundancyConfig(mode="erasure", k=1, m=2)
    red = PeerRedundancy(cfg)
    red.protect(7, _snapshot(rank, 7), {"rank": rank})
    out["memory12"] = red.memory_bytes()
    lost = [0, 2]  # m = 2 ranks lost at once, both replaced by empty instances
    if rank in lost:
        red = PeerRedundancy(cfg)
    out["rebuilt02"] = _check_rebuild(red, rank, lost, 7)

    # k=2, m=1 with own="reference": the caller's tensors serve as this rank's data blocks.
    ref = PeerRedundancy(RedundancyConfig(mode="erasure", k=2, m=1, own="reference"))
    mine = _snapshot(rank, 8)
    ref.protect(8, mine, {"rank": rank})
    out["memory21"] = ref.memory_bytes()
    out["rebuilt1"] = _check_rebuild(ref, rank, [1], 8)
    out["too_many"] = _raises(lambda: ref.rebuild([0, 1]), "rebuilds at most m = 1")
    # The replacement of rank 1 holds no parity (and, by reference, no data) until the next
    # protect: a second loss now is refused, not answered with garbage.
    out["degraded"] = _raises(lambda: ref.rebuild([0]), "more than m = 1 pieces were lost")
    ref.protect(10, mine, {"rank": rank})
    if rank == 1:  # rank 1's tensors change after protect: its data blocks no longer count
        mine["layer.weight"].add_(1.0)
    out["changed"] = _raises(lambda: ref.rebuild([0]), "more than m = 1 pieces were lost")

    odd = RedundancyConfig(mode="erasure", k=2, m=1) if rank == 0 else cfg
    out["config"] = _raises(
        lambda: PeerRedundancy(odd).protect(9, _snapshot(rank, 9)), "different RedundancyConfigs"
    )
    return out


def test_erasure_three_ranks_rebuilds_m_wiped_ranks() -> None:
    results = run_distributed(_erasure, world_size=3, timeout_s=120)
    for rank, out in enumerate(results):
        flags = {k: v for k, v in out.items() if not k.startswith("memory")}
        assert all(v is True for v in flags.values()), (rank, out)
    # k=1, m=2: parity for m=2 stripes of seg = the largest blob, plus the rank's own blob.
    largest = _snapshot_bytes(2, 7)
    assert results[0]["memory12"] == 2 * largest + _snapshot_bytes(0, 7)
    # k=2, m=1, own="reference": one parity segment (half the largest blob), nothing of its own.
    assert results[0]["memory21"] == -(-_snapshot_bytes(2, 8) // 2)


def _snapshot_bytes(rank: int, step: int) -> int:
    from memopt.checkpoint.peer_blob import pack_snapshot

    return pack_snapshot(step, _snapshot(rank, step), {"rank": rank}).numel()


def test_constructor_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        PeerRedundancy(RedundancyConfig())
