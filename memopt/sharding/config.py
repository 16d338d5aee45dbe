"""``ShardConfig``: the typed, eagerly validated options of ``memopt.shard``.

A frozen dataclass with ``Literal`` choices. ``ShardConfig(...)`` raises on a bad value before
any memory moves or any collective is issued, naming the value and the fix. Stage 3 (on FSDP2)
row-shards every parameter, so it takes ``layout="dim0"`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.optimizer import OffloadConfig

Stage = Literal[1, 2, 3]
Layout = Literal["whole_tensor", "dim0"]
ParamOffload = Literal["none", "cpu", "nvme"]
STAGES: tuple[int, ...] = (1, 2, 3)
LAYOUTS: tuple[str, ...] = ("whole_tensor", "dim0")
#: Default gradient / parameter bucket size (DDP's default, 25 MiB).
DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class ShardConfig:
    """How ``memopt.shard`` partitions a model's training state over a process group.

    - ``stage``: 1 partitions optimizer state; 2 also gradients (reduced during backward from
      post-accumulate-grad hooks); 3 also parameters (FSDP2's ``fully_shard``; ``dim0`` only).
    - ``layout``: ``whole_tensor`` (each parameter owned by one rank) or ``dim0`` (row shards;
      parameters whose update needs the whole matrix are owned whole, see docs/shard.md).
    - ``bucket_bytes``: gradient-reduction and parameter-gather bucket size.
    - ``master_dtype``: keep the optimizer's copy of each owned shard in this dtype (e.g.
      ``torch.float32`` for a bf16 model); ``None`` steps the parameters' own dtype in place.
    - ``offload``: keep the optimizer's state (AdamW: fp32 master weights and moments; the
      low-rank optimizers: their own state) on a tier (``OffloadConfig``: pinned CPU or NVMe),
      see docs/offload_optim.md. At stage 3 the inner optimizer's state tensors of each FSDP
      unit are kept there between steps and streamed unit by unit (``param_swap``).
    - ``offload_params``: stage 3 only: ``"cpu"`` keeps each rank's parameter shards, their
      gradients and so the optimizer state and step on the CPU (FSDP2's ``CPUOffloadPolicy``:
      each unit is copied to the device just before its all-gather, the next unit's copy
      overlapping the current compute); ``"nvme"`` keeps each rank's parameter shards in an
      NVMe file (``param_nvme``) and brings a unit's shards back just before FSDP2 gathers
      it and during its optimizer step, reading ahead along the recorded unit order
      (``param_swap``); ``"none"`` keeps them on the device.
    - ``param_nvme``: the ``NVMeConfig`` (or its directory) of ``offload_params="nvme"``.
    - ``broadcast_buffers``: on 2+ ranks, give every rank rank 0's module buffers (BatchNorm
      statistics, counters) at the end of each ``step()``, as DDP's ``broadcast_buffers=True``
      does at the next forward (``memopt.sharding.buffers``); ``False`` lets each
      rank's buffers follow its own data (a checkpoint then keeps rank 0's only).
    """

    stage: Stage = 2
    layout: Layout = "whole_tensor"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    master_dtype: torch.dtype | None = None
    offload: OffloadConfig | None = None
    offload_params: ParamOffload = "none"
    param_nvme: NVMeConfig | None = None
    broadcast_buffers: bool = True

    def __post_init__(self) -> None:
        stage = self.stage
        if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
            raise ValueError(f"memopt.shard: stage must be 1, 2 or 3, got {self.stage!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"memopt.shard: unknown layout {self.layout!r}; choose one of: {', '.join(LAYOUTS)}"
            )
        if self.stage == 3 and self.layout != "dim0":
            raise ValueError(
                f"memopt.shard: stage 3 row-shards every parameter (FSDP2's Shard(0)), so it "
                f"takes layout='dim0', got {self.layout!r}; use layout='dim0' (memopt.shard's "
                "default for stage 3) or stage 1/2 for whole_tensor"
            )
        b = self.bucket_bytes
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"memopt.shard: bucket_bytes must be a positive integer, got {b!r}")
        m = self.master_dtype
        if m is not None and (not isinstance(m, torch.dtype) or not m.is_floating_point):
            raise TypeError(
                f"memopt.shard: master_dtype must be None or a floating torch.dtype such as "
                f"torch.float32, got {m!r}"
            )
        if self.offload is not None and not isinstance(self.offload, OffloadConfig):
            raise TypeError(
                f"memopt.shard: offload must be None, 'cpu' or a memopt.offload.OffloadConfig, "
                f"got {self.offload!r}"
            )
        if self.offload_params not in ("none", "cpu", "nvme"):
            raise ValueError(
                f"memopt.shard: offload_params must be 'none', 'cpu' or 'nvme', got "
                f"{self.offload_params!r}"
            )
        self._check_param_nvme()
        if not isinstance(self.broadcast_buffers, bool):
            raise TypeError(
                f"memopt.shard: broadcast_buffers must be True or False, got "
                f"{self.broadcast_buffers!r}"
            )
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError(
                f"memopt.shard: offload_params={self.offload_params!r} applies to stage 3 "
                f"(parameters are sharded there), got stage {self.stage}; for stages 1/2 "
                "offload the optimizer state with offload='cpu' or 'nvme'"
            )

    def _check_param_nvme(self) -> None:
        nvme = self.param_nvme
        if self.offload_params == "nvme" and nvme is None:
            raise ValueError(
                "memopt.shard: offload_params='nvme' needs param_nvme= (a directory on the NVMe "
                "disk, or a memopt.offload.NVMeConfig(directory=...))"
            )
        if nvme is not None and not isinstance(nvme, NVMeConfig):
            raise TypeError(
                f"memopt.shard: param_nvme must be a memopt.offload.NVMeConfig (memopt.shard also "
                f"takes a directory string), got {type(nvme).__name__}"
            )
        if nvme is not None and self.offload_params != "nvme":
            raise ValueError(
                f"memopt.shard: param_nvme is set but offload_params={self.offload_params!r}; "
                "pass offload_params='nvme' (or drop param_nvme)"
            )
