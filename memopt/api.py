"""The one-call entry points: ``memopt.shard``.

``shard`` builds the typed ``ShardConfig`` (validated before anything else happens) and hands
it to ``memopt.sharding.apply_sharding``, which checks the model, optimizer and process group
before any collective is issued.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.optimizer import OffloadConfig
from memopt.sharding import ShardConfig, ShardedOptimizer, apply_sharding
from memopt.sharding.config import DEFAULT_BUCKET_BYTES, Layout, Stage
from memopt.sharding.deepspeed_config import deepspeed_shard_config
from memopt.sharding.fsdp import FSDPOptions


def shard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: Stage = 2,
    layout: Layout | None = None,
    *,
    process_group: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    master_dtype: torch.dtype | None = None,
    deepspeed_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    fsdp: FSDPOptions | None = None,
    offload: OffloadConfig | str | None = None,
    offload_params: str = "none",
    param_nvme: NVMeConfig | str | os.PathLike[str] | None = None,
    broadcast_buffers: bool = True,
) -> tuple[nn.Module, ShardedOptimizer]:
    """Partition ``optimizer``'s state (stage 1), gradients (2) and parameters (3) over the ranks.

    Call it on every rank after ``torch.distributed.init_process_group`` (or with no process
    group at all: world size 1 runs the plain single-process arithmetic), after building the
    optimizer and before its first step. Returns the model (unchanged object; stage 2 adds
    post-accumulate-grad hooks to its parameters) and a ``ShardedOptimizer`` to use in place
    of ``optimizer`` from now on. ``layout`` defaults to ``"whole_tensor"`` (``"dim0"`` for
    stage 3). Stage 3 shards the model in place with FSDP2's ``fully_shard`` (options:
    ``fsdp=memopt.sharding.FSDPOptions(...)``) and returns an ``FSDPOptimizer``. See
    docs/shard.md.
    ``deepspeed_config`` (a DeepSpeed ``zero_optimization`` block, a whole DeepSpeed config,
    or a path to its JSON) sets stage, bucket size and master dtype instead; see
    ``memopt.sharding.deepspeed_config``.
    ``offload`` (stages 1/2, AdamW): ``"cpu"`` or ``memopt.offload.OffloadConfig(device="cpu" |
    "nvme", nvme_path=...)`` keeps the fp32 master weights and moments of this rank's shard on
    that tier, streamed through a double-buffered pipeline (docs/offload.md); low-rank
    optimizers keep their own state there (docs/offload_optim.md).
    ``offload_params="cpu"`` (stage 3): parameter shards, gradients and optimizer state on the
    CPU, each unit copied to the device just before its all-gather (FSDP2's CPUOffloadPolicy).
    ``offload_params="nvme"`` (stage 3) with ``param_nvme=`` (a directory, or an
    ``NVMeConfig``): each rank's parameter shards live in an NVMe file and are read back just
    before their unit is gathered (prefetched along the recorded unit order) and during its
    optimizer step. At stage 3 ``offload=`` keeps the inner optimizer's state of each unit on
    that tier between steps (any optimizer with per-parameter state). docs/shard.md.
    ``broadcast_buffers`` (default True, as DDP): on 2+ ranks every rank gets rank 0's module
    buffers (BatchNorm statistics...) at the end of each ``step()``; False lets each rank's
    buffers follow its own data.
    """
    if isinstance(offload, str):
        offload = OffloadConfig(device=offload)  # type: ignore[arg-type]
    if isinstance(param_nvme, str | os.PathLike):
        param_nvme = NVMeConfig(directory=param_nvme)
    if deepspeed_config is not None:  # the layout default then follows the config's stage
        config = deepspeed_shard_config(
            deepspeed_config, optimizer, layout=layout, stage=stage,
            bucket_bytes=bucket_bytes, master_dtype=master_dtype,
        )  # fmt: skip
        if offload is not None:
            if config.offload is not None and config.offload != offload:
                raise ValueError(
                    f"memopt.shard: offload={offload!r} contradicts deepspeed_config's "
                    f"offload_optimizer ({config.offload!r}); set it in one place only"
                )
            config = dataclasses.replace(config, offload=offload)
        if offload_params != "none" or param_nvme is not None:
            config = _with_param_offload(config, offload_params, param_nvme)
        config = dataclasses.replace(config, broadcast_buffers=broadcast_buffers)
    else:
        if layout is None:
            layout = "dim0" if stage == 3 else "whole_tensor"
        config = ShardConfig(
            stage=stage,
            layout=layout,
            bucket_bytes=bucket_bytes,
            master_dtype=master_dtype,
            offload=offload,
            offload_params=offload_params,  # type: ignore[arg-type]
            param_nvme=param_nvme,
            broadcast_buffers=broadcast_buffers,
        )
    return apply_sharding(model, optimizer, config, process_group, fsdp)


def _with_param_offload(
    config: ShardConfig, offload_params: str, param_nvme: NVMeConfig | None
) -> ShardConfig:
    """``offload_params`` / ``param_nvme`` arguments on top of a DeepSpeed config's."""
    if offload_params == "none":
        offload_params = config.offload_params
    if config.offload_params not in ("none", offload_params):
        raise ValueError(
            f"memopt.shard: offload_params={offload_params!r} contradicts deepspeed_config's "
            f"offload_param ({config.offload_params!r}); set it in one place only"
        )
    nvme = param_nvme or config.param_nvme
    if param_nvme is not None and config.param_nvme not in (None, param_nvme):
        raise ValueError(
            f"memopt.shard: param_nvme={param_nvme!r} contradicts deepspeed_config's "
            f"offload_param.nvme_path ({config.param_nvme!r}); set it in one place only"
        )
    return dataclasses.replace(config, offload_params=offload_params, param_nvme=nvme)  # type: ignore[arg-type]


__all__ = ["shard"]


# ``memopt.setup``: the whole-config entry point (memopt/config/setup.py builds it).
from memopt.config.setup import Setup, setup  # noqa: E402

__all__ += ["Setup", "setup"]
