"""Single-process checks of the redundancy tier's pieces: blob format, stripe layout, codec.

The erasure layout is exercised with simulated ranks: the group's blobs are striped and
encoded exactly as ``PeerRedundancy`` does over the network, every set of up to m ranks is
wiped, and each lost blob is rebuilt from the survivors' blocks and compared byte for byte.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from memopt.checkpoint import erasure as ec
from memopt.checkpoint.peer_blob import blob_crc, check_blob, pack_snapshot, unpack_snapshot
from memopt.checkpoint.redundancy_config import RedundancyConfig


def _snapshot(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, 3, generator=g),
        "b16": torch.randn(n, generator=g).to(torch.bfloat16),
        "step": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "strided": torch.arange(12.0).view(3, 4).t(),
    }


def test_blob_round_trip_is_bit_exact() -> None:
    tensors = _snapshot(1, 7)
    meta = {"loader": {"epoch": 2, "offset": 123}, "name": "run", "lr": 0.1}
    blob = pack_snapshot(9, tensors, meta)
    assert torch.equal(blob, pack_snapshot(9, tensors, meta))  # deterministic, gaps included
    step, out, meta2 = unpack_snapshot(blob)
    assert step == 9 and meta2 == meta and list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_blob_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        pack_snapshot(0, {}, {"bad": object()})
    with pytest.raises(TypeError, match=r"tensors\['x'\] must be a torch.Tensor"):
        pack_snapshot(0, {"x": [1, 2]}, {})  # type: ignore[dict-item]
    blob = pack_snapshot(0, {"x": torch.ones(3)}, {})
    bad = blob.clone()
    bad[0] ^= 1
    with pytest.raises(ValueError, match="bad magic"):
        unpack_snapshot(bad)
    with pytest.raises(TypeError, match="1-D uint8 CPU"):
        check_blob(torch.ones(3))


def test_config_is_validated_eagerly() -> None:
    with pytest.raises(ValueError, match="copies >= 1"):
        RedundancyConfig(mode="replicate", copies=0)
    with pytest.raises(ValueError, match="apply only to mode='erasure'"):
        RedundancyConfig(mode="replicate", k=2, m=1)
    with pytest.raises(ValueError, match="k >= 1, m >= 1"):
        RedundancyConfig(mode="erasure", k=2, m=0)
    with pytest.raises(ValueError, match="mode must be"):
        RedundancyConfig(mode="mirror")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="copies must be an int"):
        RedundancyConfig(copies=1.5)  # type: ignore[arg-type]
    cfg = RedundancyConfig(mode="erasure", k=3, m=1)
    assert cfg.group_size_error(4) is None
    assert "k + m = 4" in (cfg.group_size_error(3) or "")
    assert "copies <= 1" in (RedundancyConfig(copies=2).group_size_error(2) or "")


@pytest.mark.parametrize("k,m", [(3, 1), (2, 2), (4, 2)])
def test_layout_puts_each_stripe_on_distinct_ranks(k: int, m: int) -> None:
    world = k + m
    for s in range(world):
        ranks = ec.data_contributors(s, world, m) + ec.parity_holders(s, world, m)
        assert sorted(ranks) == list(range(world))
    for r in range(world):  # every rank feeds k stripes and holds parity for m
        assert len(ec.contributor_stripes(r, world, m)) == k
        assert sum(r in ec.parity_holders(s, world, m) for s in range(world)) == m


def _encode_group(blobs: list[torch.Tensor], k: int, m: int) -> tuple[int, dict]:
    """What each simulated rank holds after protect: parity blocks keyed by (holder, stripe)."""
    world = k + m
    seg = ec.segment_size(max(b.numel() for b in blobs), k)
    parity = {}
    for s in range(world):
        data = [
            ec.segment(blobs[d], ec.contributor_stripes(d, world, m).index(s), seg)
            for d in ec.data_contributors(s, world, m)
        ]
        for j, h in enumerate(ec.parity_holders(s, world, m)):
            parity[(h, s)] = ec.encode_parity(data, m, j)
    return seg, parity


def _rebuild(x: int, n: int, lost: set[int], blobs: list, parity: dict, seg: int, k: int, m: int):
    world = k + m
    alive = [r not in lost for r in range(world)]
    segments = []
    for s in ec.contributor_stripes(x, world, m):
        blocks = {}
        for block, src in ec.choose_blocks(s, world, m, alive, alive):
            if block < k:
                idx = ec.contributor_stripes(src, world, m).index(s)
                blocks[block] = ec.segment(blobs[src], idx, seg)
            else:
                blocks[block] = parity[(src, s)]
        want = ec.data_contributors(s, world, m).index(x)
        segments.append(ec.decode_block(blocks, k, m, want))
    return torch.cat(segments)[:n]  # n: the blob length recorded at protect time


@pytest.mark.parametrize("k,m", [(3, 1), (2, 2), (1, 2)])
def test_any_m_lost_ranks_are_rebuilt_bit_exactly(k: int, m: int) -> None:
    world = k + m
    # Different sizes per rank: padding and short last segments are exercised.
    blobs = [pack_snapshot(5, _snapshot(r, 50 + 37 * r), {"rank": r}) for r in range(world)]
    crcs = [blob_crc(b) for b in blobs]
    seg, parity = _encode_group(blobs, k, m)
    assert sum(p.numel() for p in parity.values()) == m * world * seg  # m / k of the data
    for n_lost in range(1, m + 1):
        for lost in itertools.combinations(range(world), n_lost):
            wiped = [None if r in lost else b for r, b in enumerate(blobs)]
            for x in lost:
                again = _rebuild(x, blobs[x].numel(), set(lost), wiped, parity, seg, k, m)
                assert blob_crc(again) == crcs[x] and torch.equal(again, blobs[x])
                step, tensors, meta = unpack_snapshot(again)
                assert step == 5 and meta == {"rank": x}
                assert torch.equal(tensors["w"], _snapshot(x, 50 + 37 * x)["w"])


def test_more_than_m_lost_is_a_clear_error() -> None:
    k, m = 3, 1
    alive = [False, False, True, True]
    with pytest.raises(ValueError, match="more than m = 1 pieces were lost"):
        for s in range(k + m):
            ec.choose_blocks(s, k + m, m, alive, alive)


def test_decode_checks_its_inputs() -> None:
    block = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exactly k=2 blocks"):
        ec.decode_block({0: block}, 2, 1, 1)
    with pytest.raises(ValueError, match="differ in size"):
        ec.encode_parity([block, block[:4]], 1, 0)
