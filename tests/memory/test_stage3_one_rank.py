"""Stage 3 on one rank under FSDP2 (``offload_params``): the gathered units are counted.

FSDP2 runs on one rank whenever parameters are offloaded, and its all-gather copies each unit
into unsharded parameters beside the one-rank shards; the plain one-rank stage-3 path (no
``offload_params``) gathers nothing. The estimate used to leave the gathered units out on one
rank: ``memopt report`` (hidden 256, 4 layers, 3 steps, ``--exact-rss``) read 0.912 (cpu) and
0.885 (nvme) of the host peak; 1.025 / 1.011 with them. Which units, by the peak's
position: ``test_stage3_head``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from memopt.memory import estimate
from memopt.memory.estimate import EstimateConfig, find_units
from memopt.memory.trace import causal_lm_inputs, meta_copy, trace_step
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
    """The larger of the two moments (``test_stage3_head``): the head's (root alone on one
    rank) and the rest's (root + the block in use + the next)."""
    plain = estimate(CFG, stage=3, **KW)  # one rank, no FSDP2: nothing gathered
    fsdp = estimate(CFG, stage=3, offload_params=where, **KW)
    assert plain.phase == fsdp.phase == "forward/backward"
    root, block = _unit_bytes()
    with torch.device("meta"):
        model = LlamaForCausalLM(CFG)
    trace = trace_step(meta_copy(model), causal_lm_inputs(KW["batch_size"], KW["seq_len"]))
    at = {head: m["peak"] + root + (0 if head else 2 * block)
          for head, m in trace.by_position.items()}  # fmt: skip
    extra = fsdp.device_peak - plain.device_peak
    if where == "nvme":  # the resident shards: two blocks instead of all the parameters
        extra -= fsdp.breakdown["device"]["parameters"] - plain.breakdown["device"]["parameters"]
    assert extra == max(at.values()) - trace.peak
    assert find_units(model, EstimateConfig(stage=3)) == root + 2 * block
    assert find_units(model, EstimateConfig(stage=3), at_head=True) == root


def test_one_rank_gathered_equals_the_multi_rank_rule_away_from_the_head() -> None:
    """The same units as several ranks gather (``shard_share``'s figure) away from the head;
    at the head several ranks keep the two-block bound (``find_units``), one rank the root."""
    with torch.device("meta"):
        model = LlamaForCausalLM(CFG)
    _, block = _unit_bytes()
    one, two = EstimateConfig(stage=3), EstimateConfig(stage=3, world_size=2)
    assert find_units(model, one) == find_units(model, two)
    assert find_units(model, two, at_head=True) == find_units(model, one, at_head=True) + 2 * block
