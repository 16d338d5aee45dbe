"""Read a DeepSpeed config's ``zero_optimization`` block into memopt's ``ShardConfig``.

``from_deepspeed(cfg)`` takes the block itself, or a whole DeepSpeed config holding it (a dict
or a path to a JSON file), and returns a ``ShardConfig``; ``read_deepspeed`` returns the full
translation (``DeepSpeedZero``: stage, bucket bytes, master dtype, the offload settings, and the
keys that were ignored). ``memopt.shard(model, opt, deepspeed_config=cfg)`` uses it. A whole
config without a ``zero_optimization`` block (DeepSpeed then runs stage 0) is an error that
says so. ``memopt.shard`` also warns, once, about what DeepSpeed's engine would have done in
training and memopt leaves to the caller: clipping at 1.0 when the config has no
``gradient_clipping`` (or only the block was given), and fp16 loss scaling (memopt has none).
The key tables are in ``memopt.sharding.deepspeed_keys``.

Every key DeepSpeed 0.19 accepts in the block is known here, in one of four kinds:

- *mapped*: ``stage`` (1, 2, 3; 0 is an error, plain data parallelism is DDP, except for
  ``read_deepspeed(allow_stage0=True)``, which validates the block and refuses offloading),
  ``reduce_bucket_size`` / ``allgather_bucket_size`` -> ``bucket_bytes`` (DeepSpeed counts
  *elements*; memopt counts bytes: elements x the gradient element size, 2 when the whole
  config enables ``bf16`` or ``fp16``, else the model's parameter dtype). memopt reduces and
  gathers over the same buckets, so ``reduce_bucket_size`` wins when both are given.
  ``bf16``/``fp16`` ``enabled`` -> ``master_dtype=torch.float32`` (DeepSpeed keeps fp32 master
  partitions). ``offload_optimizer`` / ``offload_param`` (and the deprecated ``cpu_offload*``
  spellings) -> ``Offload`` settings; ``offload_optimizer`` with device ``cpu``/``nvme`` ->
  ``ShardConfig.offload`` (an ``OffloadConfig``: ``nvme_path``, ``pin_memory``; stages 1/2);
  ``offload_param`` with device ``cpu`` -> ``ShardConfig.offload_params="cpu"`` (stage 3,
  FSDP2's CPU offload; with ``offload_optimizer`` on the CPU too, that one setting covers
  both); ``offload_param`` on ``nvme`` -> ``offload_params="nvme"`` with
  ``param_nvme=NVMeConfig(directory=nvme_path)`` (stage 3; ``nvme_path`` required).
- *matched*: a behavior memopt always has (``contiguous_gradients``, ``reduce_scatter``,
  ``overlap_comm`` for stages 2 and 3, ...): the value that asks for it is accepted silently;
  the other value warns, since memopt cannot switch the behavior off.
- *ignored*: tuning knobs with no memopt counterpart (``stage3_prefetch_bucket_size``: FSDP2
  prefetches one group ahead with no byte budget; ``sub_group_size``: memopt steps per
  parameter; ...): a ``DeepSpeedConfigWarning`` when the value is neither DeepSpeed's default
  nor ``"auto"`` (stage-3 knobs only under stage 3, where DeepSpeed reads them).
- anything else: ``ValueError`` listing the supported keys.

Each warning names the key and why, and is issued once per process (per key and reason).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from memopt._utils.jsonfile import json_mapping
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.optimizer import OffloadConfig
from memopt.sharding.config import DEFAULT_BUCKET_BYTES, ShardConfig
from memopt.sharding.deepspeed_keys import (
    DEFAULT_CLIP,
    IGNORED,
    MATCHED,
    OFFLOAD_ISSUE,
    OFFLOAD_KEYS,
    OFFLOAD_TUNING,
    READ_TOP,
    STAGE3,
    SUPPORTED_KEYS,
    TOP_LEVEL,
)

_warned: set[str] = set()


class DeepSpeedConfigWarning(UserWarning):
    """A DeepSpeed config key that has no effect in memopt (issued once per key and reason)."""


@dataclass(frozen=True)
class Offload:
    """One DeepSpeed offload block and where it puts things: ``offload_optimizer`` cpu/nvme
    builds ``ShardConfig.offload`` (optimizer state on that tier, any stage); ``offload_param``
    cpu/nvme builds ``ShardConfig.offload_params`` (stage 3; nvme with ``param_nvme`` from
    ``nvme_path``). A ``ratio`` below 1 (partial offload) raises."""

    device: Literal["none", "cpu", "nvme"] = "none"
    pin_memory: bool = True
    nvme_path: str | None = None
    ratio: float = 1.0  # offload_optimizer only: the fraction stepped on the offload device


@dataclass(frozen=True)
class DeepSpeedZero:
    """What a ``zero_optimization`` block (and its config's bf16/fp16) translates to."""

    stage: int
    bucket_bytes: int | None  # None: the block sets no bucket size (memopt's default applies)
    master_dtype: torch.dtype | None
    offload_optimizer: Offload
    offload_param: Offload
    ignored: tuple[str, ...]  # keys that warned: they have no effect in memopt

    def shard_config(self, layout: str | None = None) -> ShardConfig:
        """The ``ShardConfig`` (layout: memopt's default for the stage unless given)."""
        if layout is None:
            layout = "dim0" if self.stage == 3 else "whole_tensor"
        kwargs: dict[str, Any] = {"stage": self.stage, "layout": layout}
        if self.bucket_bytes is not None:
            kwargs["bucket_bytes"] = self.bucket_bytes
        off = self.offload_optimizer
        if self.offload_param.device != "none":
            kwargs["offload_params"] = self.offload_param.device
        if self.offload_param.device == "nvme":
            kwargs["param_nvme"] = NVMeConfig(directory=str(self.offload_param.nvme_path))
        # ZeRO-3 with both offloads on the CPU: FSDP2's CPU offload keeps the optimizer state
        # (and step) on the CPU with the parameter shards, which is what both keys ask for
        both_cpu = self.stage == 3 and off.device == "cpu" and self.offload_param.device == "cpu"
        if off.device != "none" and not both_cpu:
            kwargs["offload"] = OffloadConfig(off.device, off.nvme_path, off.pin_memory)
        return ShardConfig(master_dtype=self.master_dtype, **kwargs)


def from_deepspeed(
    cfg: Mapping[str, Any] | str | os.PathLike[str],
    *,
    param_dtype: torch.dtype = torch.float32,
    layout: str | None = None,
) -> ShardConfig:
    """``ShardConfig`` from a DeepSpeed ``zero_optimization`` block or whole config."""
    return read_deepspeed(cfg, param_dtype=param_dtype).shard_config(layout)


def read_deepspeed(
    cfg: Mapping[str, Any] | str | os.PathLike[str],
    *,
    param_dtype: torch.dtype = torch.float32,
    allow_stage0: bool = False,
) -> DeepSpeedZero:
    """Translate a DeepSpeed config (see the module docstring); raise or warn on the rest.
    ``allow_stage0``: stage 0 (plain data parallelism) is validated like the other stages and
    returned, with no offload (``Config.from_deepspeed``); otherwise it is an error."""
    block, half = _split(_load(cfg))
    unknown = sorted(k for k in block if k not in SUPPORTED_KEYS)
    if unknown:
        raise ValueError(
            f"DeepSpeed config: unknown zero_optimization key(s) {unknown}; supported: "
            f"{', '.join(SUPPORTED_KEYS)}"
        )
    stage = _stage(block, allow_stage0)
    ignored = _check_matched(block, stage) + _check_ignored(block, stage)
    elem = 2 if half else torch.empty((), dtype=param_dtype).element_size()
    bucket = _bucket_bytes(block, elem)
    off_opt, off_param = _offloads(block)
    offloaded = [k for k, o in (("offload_optimizer", off_opt), ("offload_param", off_param))
                 if o.device != "none"]  # fmt: skip
    if stage == 0 and offloaded:
        raise ValueError(
            f"DeepSpeed config: zero_optimization.{offloaded[0]} at stage 0: DeepSpeed offloads "
            "only inside its ZeRO optimizers (stages 1-3), so this run had no offload it could "
            "honour; set stage 1 or 2 (optimizer state) or 3 (parameters), or drop the block"
        )
    return DeepSpeedZero(
        stage=stage,
        bucket_bytes=bucket,
        master_dtype=torch.float32 if half else None,
        offload_optimizer=off_opt,
        offload_param=off_param,
        ignored=tuple(ignored + _ignored_buckets(block)),
    )


def _load(cfg: Any) -> dict[str, Any]:
    return json_mapping(cfg, "memopt.shard: deepspeed_config")


def _split(cfg: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The zero block, and whether the whole config enables bf16/fp16."""
    if "zero_optimization" not in cfg:
        top = sorted(k for k in cfg if k in TOP_LEVEL)
        if top and "stage" not in cfg:
            raise ValueError(
                f"DeepSpeed config: this is a whole DeepSpeed config (top-level keys {top}) "
                "without a zero_optimization block, which DeepSpeed runs without ZeRO (stage 0, "
                "plain data parallelism: torch's DistributedDataParallel); add "
                '"zero_optimization": {"stage": 1, 2 or 3} to shard with memopt'
            )
        return cfg, False
    block = cfg["zero_optimization"]
    if not isinstance(block, Mapping):
        raise TypeError(f"DeepSpeed config: zero_optimization must be a dict, got {block!r}")
    half = any(isinstance(cfg.get(k), Mapping) and cfg[k].get("enabled") is True
               for k in ("bf16", "fp16", "bfloat16"))  # (bfloat16: bf16's legacy name)
    rest = sorted(k for k in cfg if k not in READ_TOP)
    if rest:
        _warn(
            "<top level>",
            f"memopt.shard reads only zero_optimization (and bf16/fp16 for the element size "
            f"and master dtype) from a DeepSpeed config; ignored: {', '.join(rest)} (pass your "
            "optimizer and scheduler yourself; clip with sharded_opt.clip_grad_norm_)",
        )
    return dict(block), half


def _stage(block: dict[str, Any], allow_stage0: bool = False) -> int:
    stage = block.get("stage")
    if stage is None:
        raise ValueError("DeepSpeed config: the zero_optimization block has no 'stage'; set 1, "
                         "2 or 3")  # fmt: skip
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 1, 2 or 3, got "
                         f"{stage!r}")  # fmt: skip
    if stage == 0 and not allow_stage0:
        raise ValueError("DeepSpeed config: ZeRO stage 0 is plain data parallelism; use "
                         "torch.nn.parallel.DistributedDataParallel, or stage 1, 2 or 3")
    return int(stage)


def _check_matched(block: dict[str, Any], stage: int) -> list[str]:
    hits = []
    matched = dict(MATCHED)
    matched["overlap_comm"] = (
        (False, "memopt stage 1 reduces every gradient at step(); stage 2 overlaps backward")
        if stage == 1
        else (True, "memopt always overlaps the gradient reduction with backward")
    )
    for key, (want, why) in matched.items():
        value = block.get(key, want)
        if value is None or value == "auto":
            continue
        if not isinstance(value, bool):
            raise TypeError(
                f"DeepSpeed config: zero_optimization.{key} must be true/false: {value!r}"
            )
        if value != want:
            _warn(key, f"zero_optimization.{key}={value!r} has no effect in memopt: {why}")
            hits.append(key)
    return hits


def _check_ignored(block: dict[str, Any], stage: int) -> list[str]:
    hits = []
    table = {**IGNORED, **(STAGE3 if stage == 3 else {})}
    for key, (default, why) in table.items():
        if key not in block:
            continue
        value = block[key]
        if value == "auto" or value == default or (default is None and not value):
            continue
        _warn(key, f"zero_optimization.{key}={value!r} has no effect in memopt: {why}")
        hits.append(key)
    return hits


def _count(block: dict[str, Any], key: str) -> int | None:
    value = block.get(key)
    if value is None or value == "auto":
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)
    if not ok or value <= 0:
        raise ValueError(
            f"DeepSpeed config: zero_optimization.{key} must be a positive element count "
            f'(e.g. 5e8) or "auto", got {value!r}'
        )
    return int(value)


def _bucket_bytes(block: dict[str, Any], elem: int) -> int | None:
    """Elements (DeepSpeed) -> bytes (memopt): one bucket size serves reduce and gather."""
    reduce_n, gather_n = _count(block, "reduce_bucket_size"), _count(block, "allgather_bucket_size")
    n = reduce_n if reduce_n is not None else gather_n
    return None if n is None else n * elem


def _ignored_buckets(block: dict[str, Any]) -> list[str]:
    reduce_n, gather_n = _count(block, "reduce_bucket_size"), _count(block, "allgather_bucket_size")
    if reduce_n is None or gather_n is None or reduce_n == gather_n:
        return []
    _warn(
        "allgather_bucket_size",
        f"zero_optimization.allgather_bucket_size={gather_n} has no effect in memopt: parameters "
        f"are gathered over the gradient buckets, sized by reduce_bucket_size={reduce_n}",
    )
    return ["allgather_bucket_size"]


def _offloads(block: dict[str, Any]) -> tuple[Offload, Offload]:
    pin = block.get("cpu_offload_use_pin_memory")
    legacy = {"offload_optimizer": block.get("cpu_offload"),
              "offload_param": block.get("cpu_offload_param")}  # fmt: skip
    out = []
    for key in ("offload_optimizer", "offload_param"):
        sub = block.get(key) or {}
        if not isinstance(sub, Mapping):
            raise TypeError(
                f"DeepSpeed config: zero_optimization.{key} must be a dict, got {sub!r}"
            )
        bad = sorted(k for k in sub if k not in OFFLOAD_KEYS[key])
        if bad:
            raise ValueError(
                f"DeepSpeed config: unknown key(s) {bad} in zero_optimization.{key}; supported: "
                f"{', '.join(OFFLOAD_KEYS[key])}"
            )
        device = sub.get("device") or ("cpu" if legacy[key] else "none")
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(
                f"DeepSpeed config: zero_optimization.{key}.device must be none, cpu or nvme, "
                f"got {device!r}"
            )
        for knob in sorted(k for k in sub if k in OFFLOAD_TUNING[key]):
            _warn(f"{key}.{knob}", f"zero_optimization.{key}.{knob} has no effect in memopt "
                  "(its offload pipeline and buffers are sized from the tensors)")  # fmt: skip
        pin_memory = sub.get("pin_memory", True if pin is None else pin)
        if not isinstance(pin_memory, bool):
            raise ValueError(
                f"DeepSpeed config: zero_optimization.{key}.pin_memory must be true or false, got "
                f"{pin_memory!r}"
            )
        path = sub.get("nvme_path")
        ratio = sub.get("ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise ValueError(f"DeepSpeed config: zero_optimization.{key}.ratio must be a number "
                             f"(memopt offloads all of the state: 1.0), got {ratio!r}")
        out.append(Offload(device, pin_memory, None if path is None else str(path),  # type: ignore[arg-type]
                           float(ratio)))  # fmt: skip
    if out[0].device == "nvme" and not out[0].nvme_path:
        raise ValueError('DeepSpeed config: offload_optimizer.device "nvme" needs "nvme_path"')
    if out[0].device != "none" and out[0].ratio != 1.0:
        raise NotImplementedError(
            f"DeepSpeed config: offload_optimizer.ratio={out[0].ratio} (partial offload) is not "
            "implemented; memopt offloads all of a rank's optimizer state (ratio 1.0)"
        )
    if out[1].device == "nvme" and not out[1].nvme_path:
        raise ValueError('DeepSpeed config: offload_param.device "nvme" needs "nvme_path"')
    if block.get("zenflow"):
        raise NotImplementedError(
            f"DeepSpeed config: zero_optimization.zenflow (ZenFlow offload) is not implemented: "
            f"{OFFLOAD_ISSUE}"
        )
    return out[0], out[1]


def _warn(key: str, message: str) -> None:
    """Warn once per process for each key and reason (a repeated config stays quiet)."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(f"DeepSpeed config: {message}", DeepSpeedConfigWarning, stacklevel=4)


def deepspeed_shard_config(
    cfg: Mapping[str, Any] | str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    *,
    layout: str | None,
    stage: int,
    bucket_bytes: int,
    master_dtype: torch.dtype | None,
) -> ShardConfig:
    """``memopt.shard``'s path: the DeepSpeed config decides stage, bucket bytes and master
    dtype; arguments the caller changed from their defaults must not contradict it. Element
    counts convert to bytes with the optimizer's first parameter's dtype (or 2 under bf16/fp16).
    """
    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float32
    raw = _load(cfg)
    config = read_deepspeed(raw, param_dtype=dtype).shard_config(layout)
    _training_notes(raw)
    given = {"stage": stage, "bucket_bytes": bucket_bytes, "master_dtype": master_dtype}
    defaults = {"stage": 2, "bucket_bytes": DEFAULT_BUCKET_BYTES, "master_dtype": None}
    clash = {k: v for k, v in given.items() if v != defaults[k] and getattr(config, k) != v}
    if clash:
        theirs = {k: getattr(config, k) for k in clash}
        raise ValueError(
            f"memopt.shard: argument(s) {clash} contradict deepspeed_config (which gives "
            f"{theirs}); set them in one place only"
        )
    return config


def _training_notes(cfg: dict[str, Any]) -> None:
    """What DeepSpeed's engine does in training that ``memopt.shard`` leaves to the caller,
    said once: its default clip, and fp16 loss scaling (memopt has no loss scaler)."""
    whole = "zero_optimization" in cfg
    clip = f"sharded_opt.clip_grad_norm_({DEFAULT_CLIP}) before each step()"
    if not whole:
        _warn("gradient_clipping", (
            f"memopt.shard never clips gradients, and DeepSpeed clips at {DEFAULT_CLIP} unless "
            "the whole config sets gradient_clipping (only the zero_optimization block was "
            f"given): where it has no gradient_clipping, call {clip} to match"))  # fmt: skip
    elif "gradient_clipping" not in cfg:
        _warn("gradient_clipping", (
            f"this config has no gradient_clipping, so DeepSpeed clips the gradient norm at "
            f"{DEFAULT_CLIP} (its default); memopt.shard never clips: call {clip} to match, "
            'or set "gradient_clipping": 0 if the run should not clip'))  # fmt: skip
    fp16 = cfg.get("fp16")
    if whole and isinstance(fp16, Mapping) and fp16.get("enabled") is True:
        keys = "".join(f"; {k}" for k in sorted(fp16) if k != "enabled")
        _warn("fp16", (
            "fp16 is enabled, but memopt has no loss scaler: DeepSpeed's loss scaling (dynamic "
            f"from 2**16 by default{keys}) is not applied, and the sharded optimizer refuses "
            "torch.amp.GradScaler (its per-rank skip would desync the ranks), so fp16 "
            "gradients can underflow or overflow unnoticed; train in bf16 (bf16.enabled) "
            "instead"))  # fmt: skip
