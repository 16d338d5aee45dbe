"""Stage 3 on one rank under FSDP2 (``offload_params``): the gathered units are counted.

FSDP2 runs on one rank whenever parameters are offloaded, and its all-gather copies each unit
into unsharded parameters beside the one-rank shards; the plain one-rank stage-3 path (no
``offload_params``) gathers nothing. The estimate used to leave the gathered units out on one
rank: ``memopt report`` (hidden 256, 4 layers, 3 steps, ``--exact-rss``) read 0.912 (cpu) and
0.885 (nvme) of the host peak; 1.025 / 1.011 with them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from memopt.memory import estimate
from memopt.memory.estimate import EstimateConfig, find_units
from tests.memory.conftest import tiny_config

CFG = tiny_config(hidden=128, layers=4, vocab=1000)
KW = {"batch_size": 4, "seq_len": 64}


def _unit_bytes() -> tuple[int, int]:
    """(root unit, one block) bytes in fp32."""
    with torch.device("meta"):
        m = LlamaForCausalLM(CFG)
    block = sum(p.numel() for p in m.model.layers[0].parameters()) * 4
    total = sum(p.numel() for p in m.parameters()) * 4
    return total - len(m.model.layers) * block, block


@pytest.mark.parametrize("where", ["cpu", "nvme"])
def test_one_rank_fsdp2_counts_the_gathered_units(where: str) -> None:
    plain = estimate(CFG, stage=3, **KW)  # one rank, no FSDP2: nothing gathered
    fsdp = estimate(CFG, stage=3, offload_params=where, **KW)
    assert plain.phase == fsdp.phase == "forward/backward"
    root, block = _unit_bytes()
    extra = fsdp.breakdown["device"]["temporaries"] - plain.breakdown["device"]["temporaries"]
    assert extra == root + 2 * block  # the root unit, the block in use and the next
    with torch.device("meta"):
        model = LlamaForCausalLM(CFG)
    assert extra == find_units(model, EstimateConfig(stage=3))


def test_one_rank_gathered_equals_the_multi_rank_rule() -> None:
    """The same units as several ranks gather (``shard_share``'s figure), whatever W."""
    one = estimate(CFG, stage=3, offload_params="cpu", **KW)
    two = estimate(CFG, stage=3, world_size=2, offload_params="cpu", **KW)
    plain = estimate(CFG, stage=3, **KW)
    gathered = one.breakdown["device"]["temporaries"] - plain.breakdown["device"]["temporaries"]
    assert two.breakdown["device"]["temporaries"] - plain.breakdown["device"]["temporaries"] == (
        gathered
    )
