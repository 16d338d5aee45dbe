"""NUMA / CXL tier: node discovery, mbind placement verified in numa_maps and move_pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from memopt.offload.numa import (
    Placement,
    apply_placement,
    numa_maps_entry,
    numa_nodes,
    page_nodes,
    weighted_interleave_supported,
)
from memopt.offload.numa_tier import NumaTier, PlacementPolicy

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/numa_maps").exists(), reason="kernel without NUMA support (no numa_maps)"
)


def test_nodes_discovered() -> None:
    nodes = numa_nodes()
    assert nodes and nodes[0].id == 0 and nodes[0].mem_total_bytes > 0


def test_fake_sysfs_tree(tmp_path: Path) -> None:
    (tmp_path / "online").write_text("0-1\n")
    for nid, cpus in ((0, "0-3,6"), (1, "")):
        d = tmp_path / f"node{nid}"
        d.mkdir()
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {nid} MemTotal:       1024 kB\n")
    nodes = numa_nodes(tmp_path)
    assert nodes[0].cpus == (0, 1, 2, 3, 6) and not nodes[0].cpu_less
    assert nodes[1].cpu_less and nodes[1].mem_total_bytes == 1 << 20


def test_missing_node_lists_the_real_ones() -> None:
    have = [n.id for n in numa_nodes()]
    with pytest.raises(
        ValueError, match=r"\[63\] do not exist.*online nodes are " + re.escape(str(have))
    ):
        Placement("bind", (63,))
    with pytest.raises(ValueError, match="do not exist"):
        NumaTier(63)
    with pytest.raises(ValueError, match="do not exist"):
        PlacementPolicy(local_node=0, far_nodes=(63,))
    for bad in ("0", 0.0, None, True):  # at construction, not at the first allocate
        with pytest.raises(TypeError, match="NUMA node id"):
            NumaTier(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "dtype"), [((256, 1024), torch.float32), ((999,), torch.bfloat16)]
)
def test_tier_on_node0_round_trip_and_placement(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    with NumaTier(0) as tier:
        src = torch.randn(shape).to(dtype)
        h = tier.allocate(shape, dtype)
        tier.write_async(h, src).wait()
        out = torch.empty(shape, dtype=dtype)
        tier.read_async(h, out).wait()
        assert torch.equal(out, src)
        view = tier.view(h)
        entry = numa_maps_entry(view.data_ptr())
        assert entry["policy"] == "bind:0", entry
        assert int(entry.get("N0", 0)) > 0 and not any(k[1:].isdigit() and k != "N0" for k in entry)
        assert set(page_nodes(view.data_ptr(), h.nbytes)) == {0}


def test_move_existing_pages_and_interleave() -> None:
    import mmap

    buf = mmap.mmap(-1, 16 * 4096)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    t.fill_(1)  # touched: pages exist before the policy, so they are moved
    apply_placement(t.data_ptr(), 16 * 4096, Placement("interleave", (0,)), move=True)
    assert numa_maps_entry(t.data_ptr())["policy"].startswith("interleave")
    assert set(page_nodes(t.data_ptr(), 16 * 4096)) == {0}
    with pytest.raises(ValueError, match="page-aligned"):
        apply_placement(t.data_ptr() + 1, 4096, Placement("bind", (0,)))


@pytest.mark.skipif(not weighted_interleave_supported(), reason="Linux < 6.9")
def test_weighted_interleave_on_node0() -> None:
    with NumaTier(Placement("weighted_interleave", (0,))) as tier:
        h = tier.allocate((4096,), torch.float32)
        tier.write_async(h, torch.ones(4096)).wait()
        entry = numa_maps_entry(tier.view(h).data_ptr())
        assert entry["policy"].startswith("weighted interleave"), entry


def test_policy_latency_critical_local_rest_far() -> None:
    pol = PlacementPolicy.from_system()
    assert pol.placement("optimizer_state") == Placement("bind", (pol.local_node,))
    streamed = pol.placement("activations")
    assert set(streamed.nodes) == set(pol.far_nodes)
    if not any(n.cpu_less for n in numa_nodes()):
        assert pol.far_nodes == (pol.local_node,)  # no CXL node here: everything stays local
