"""Where stage-3 bytes live when parameter shards or optimizer state leave the device.

Stage 3 (FSDP2) keeps, per rank, a 1/W row shard of every parameter, its gradient and its
optimizer state. Two options move them (``memopt.shard(..., stage=3, offload_params=...,
offload=...)``), and this module rewrites the estimate's resident figures to match:

- ``offload_params="cpu"`` (FSDP2's ``CPUOffloadPolicy``): parameter shards, their gradients
  and the optimizer state (which follows the parameters) live in host memory (pinned when a
  GPU is present, pageable otherwise); the device keeps the gathered units, the activations
  and the backward's temporaries; the step runs on the host. On a CPU run nothing moves
  (the device is host memory).
- ``offload_params="nvme"`` (``ParamSwapper``): the shards live in the NVMe file (the disk
  column); in memory are only the unit in use and the one read ahead (at most the two
  largest units' shards), plus the tier's bounce arena of one largest unit in host memory.
- ``offload`` at stage 3 (``StateStore``): each unit's optimizer state (and fp32 master
  copy) lives on the tier (pinned host or disk) between steps; during the unit-by-unit step
  two units' state is in memory (the one stepping and the one read ahead).
  With ``offload="cpu"`` the state's bytes are counted on the pinned tier and the two units
  in memory beside them (copies made for the step).

The largest unit is the largest of the repeated blocks and the root unit (every parameter
outside them: embeddings, head, final norm), split over W ranks.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnitSizes", "place_stage3"]


class UnitSizes:
    """The FSDP units (the blocks and the root unit) as fractions of all parameters:
    ``largest`` and ``two`` (the two largest together: the unit in use and the one read
    ahead are never the same unit)."""

    def __init__(self, block_numels: list[int], total_numel: int) -> None:
        sizes = sorted([total_numel - sum(block_numels), *block_numels], reverse=True)
        self.largest = sizes[0] / max(1, total_numel)
        self.two = sum(sizes[:2]) / max(1, total_numel)


def place_stage3(
    cfg: Any,
    tiers: dict[str, dict[str, int]],
    base: dict[str, int],
    held: dict[str, int],
    grads: int,
    units: UnitSizes,
) -> tuple[dict[str, int], int, dict[str, int]]:
    """Move stage-3 bytes to their tiers (``tiers`` is updated in place).

    ``base``: what stays resident on the device between steps (parameters, buffers);
    ``held``: optimizer state and master weights; ``grads``: this rank's gradient shards.
    Returns the new ``base`` (with the state that stays resident merged in), the gradient
    bytes that stay on the device, and the state brought in only for the optimizer step
    (two units' worth when ``offload`` keeps it on a tier; nothing otherwise).
    """
    host = "pinned_host" if cfg.device_kind != "cpu" else "pageable_host"
    base = dict(base)
    held = dict(held)
    step_only = dict.fromkeys(held, 0)
    if cfg.offload is not None:  # the tier holds it all; two units' worth during the step
        where = "disk" if cfg.offload == "nvme" else "pinned_host"
        for k, v in held.items():
            tiers[where][k] += v
        step_only = {k: int(v * units.two) for k, v in held.items()}
        held = dict.fromkeys(held, 0)
    if cfg.offload_params == "cpu" and cfg.device_kind == "cpu":
        pass  # a CPU run: the "device" is host RAM already, FSDP2's CPU offload moves nothing
    elif cfg.offload_params == "cpu":  # shards, gradients and the step on the host
        tiers[host]["parameters"] += base["parameters"]
        tiers[host]["gradients"] += grads
        for k, v in held.items():
            tiers[host][k] += v + step_only[k]
        base["parameters"], grads = 0, 0
        held, step_only = dict.fromkeys(held, 0), dict.fromkeys(held, 0)
    elif cfg.offload_params == "nvme":
        shards = base["parameters"]
        tiers["disk"]["parameters"] += shards
        base["parameters"] = int(shards * units.two)  # the unit in use and the one read ahead
        tiers[host]["temporaries"] += int(shards * units.largest)  # the tier's bounce arena
    base.update(held)
    return base, grads, step_only
