"""``EstimateConfig``: what ``memopt.memory.estimate`` needs besides the model, validated on
construction (``optimizer_kwargs`` by ``optkwargs.check_kwargs``; dtypes may be given by name),
so a typo is an error, never ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memopt.memory import optstate

Policy = Literal["keep", "recompute", "swap"]
DEFAULT_BUCKET_BYTES = 25 * 2**20
NVME_STAGING_BYTES = 64 * 2**20
DEVICE_KINDS = ("cpu", "cuda")
#: Chunk size of memopt's shared pinned arena (memopt.offload.default_arena, ArenaConfig's
#: default; layer 2 may not import its sibling: tests/memory pin the two equal).
ARENA_CHUNK_BYTES = 256 * 2**20
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


@dataclass(frozen=True)
class EstimateConfig:
    """What ``estimate`` needs besides the model; validated on construction."""

    optimizer: str = "adamw"
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    target: str | None = "attn|mlp"
    stage: int = 0
    world_size: int = 1
    layout: Literal["whole_tensor", "dim0"] | None = None
    param_dtype: torch.dtype = torch.float32  # or its name: "bfloat16", "bf16", ...
    master_dtype: torch.dtype | None = None
    offload: Literal["cpu", "nvme"] | None = None
    offload_params: Literal["cpu", "nvme"] | None = None
    batch_size: int = 1
    seq_len: int = 512
    activation_policy: Policy = "keep"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    device_kind: Literal["cpu", "cuda"] = "cpu"
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        if self.optimizer not in optstate.RULES:
            raise ValueError(
                f"optimizer={self.optimizer!r} unknown; choose one of {sorted(optstate.RULES)}"
            )
        optstate.check_kwargs(self.optimizer, self.optimizer_kwargs)
        _check_target(self.target)
        for name in ("param_dtype", "master_dtype"):
            value = getattr(self, name)
            if value is not None or name == "param_dtype":
                object.__setattr__(self, name, _dtype(name, value))
        if self.device_kind not in DEVICE_KINDS:
            raise ValueError(
                f"device_kind must be one of {DEVICE_KINDS} ('cpu': no accelerator, the "
                f"device column is host RAM), got {self.device_kind!r}"
            )
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage!r}")
        for name in ("world_size", "batch_size", "seq_len", "bucket_bytes", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.layout not in (None, "whole_tensor", "dim0"):
            raise ValueError(f"layout must be 'whole_tensor' or 'dim0', got {self.layout!r}")
        if self.offload not in (None, "cpu", "nvme"):
            raise ValueError(f"offload must be None, 'cpu' or 'nvme', got {self.offload!r}")
        if self.activation_policy not in ("keep", "recompute", "swap"):
            raise ValueError(
                f"activation_policy must be 'keep', 'recompute' or 'swap', got "
                f"{self.activation_policy!r}"
            )
        if self.offload_params not in (None, "cpu", "nvme"):
            raise ValueError(
                f"offload_params must be None, 'cpu' or 'nvme', got {self.offload_params!r}"
            )
        if self.stage == 3 and self.layout == "whole_tensor":
            raise ValueError("stage 3 row-shards every parameter: layout must be 'dim0' (or "
                             "None), as memopt.shard refuses whole_tensor there")  # fmt: skip
        master, param = self.master_dtype, self.param_dtype
        if master is not None and master.itemsize < param.itemsize:
            raise ValueError(f"master_dtype {master} is narrower than param_dtype {param}; "
                             "memopt.shard refuses such masters")  # fmt: skip
        if master is not None and master != param and master.itemsize == param.itemsize:
            raise ValueError(
                f"master_dtype {master} has the same width as param_dtype {param} in another "
                "format: it would lose precision or range the weights keep, and memopt.shard "
                "refuses it at every stage (a master must be wider than its parameters); use "
                "master_dtype='float32', or None to step the parameters in place"
            )
        if self.offload_params is not None and self.stage != 3:
            raise ValueError(
                f"offload_params={self.offload_params!r} needs stage=3 (parameters are sharded "
                f"there), got stage {self.stage}"
            )

    @property
    def resolved_layout(self) -> str:
        return self.layout or ("dim0" if self.stage == 3 else "whole_tensor")


def _dtype(field_name: str, value: Any) -> torch.dtype:
    """A floating ``torch.dtype``, or its name (``"bfloat16"``, ``"bf16"`` ...) made one."""
    dtype = DTYPE_NAMES.get(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{field_name} must be a floating torch.dtype or one of {sorted(DTYPE_NAMES)}, "
            f"got {value!r}"
        )
    return dtype


def _check_target(target: Any) -> None:
    """``target`` is a regex (``param_groups``' single-string form), ``"all-linear"`` or None."""
    if target is None:
        return
    if not isinstance(target, str) or not target:
        raise ValueError(
            f"target must be a non-empty regex of module names (as param_groups takes), "
            f"'all-linear' or None, got {target!r}"
        )
    try:
        re.compile(target)
    except re.error as e:
        raise ValueError(f"target={target!r} is not a valid regex: {e}") from None
