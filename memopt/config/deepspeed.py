"""``Config.from_deepspeed``: the blocks of a DeepSpeed JSON config memopt understands.

- ``zero_optimization``: through ``memopt.sharding.deepspeed_config.read_deepspeed`` (the
  same mapping ``memopt.shard(deepspeed_config=...)`` uses: stage, bucket size in bytes,
  ``offload_optimizer`` cpu/nvme with its ``nvme_path``, ``offload_param`` cpu; unknown keys
  raise, keys without effect warn). Stage 0 is plain data parallelism (``sharding.stage: 0``).
- ``optimizer``: ``type`` Adam/AdamW (any case) -> ``optimizer.name: adamw`` with ``lr``,
  ``betas``, ``eps``, ``weight_decay`` from ``params``; any other type raises ``ValueError``
  (configure GaLore/APOLLO/FRUGAL in memopt's own ``optimizer`` section).
- ``scheduler``: ``WarmupLR``/``WarmupDecayLR``/``WarmupCosineLR`` -> ``warmup_steps`` from
  ``warmup_num_steps`` (cosine decay after it).
- ``bf16.enabled`` -> ``model.dtype: bf16`` with fp32 master weights; ``fp16.enabled`` raises
  (memopt has no loss scaler: use bf16).
- ``train_micro_batch_size_per_gpu`` -> ``train.batch_size``; ``gradient_accumulation_steps`` ->
  ``train.grad_accum``; ``gradient_clipping`` -> ``optimizer.max_grad_norm`` (0: off).

Values of ``"auto"`` (the HF integration's placeholder) keep ``base``'s value. Other top-level
keys (``aio``, ``wall_clock_breakdown``, ...) are reported in a single warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from memopt.config.config import Config
from memopt.sharding.deepspeed_config import read_deepspeed

_READ = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16",
         "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
         "train_batch_size")  # fmt: skip
_ADAM = ("adam", "adamw")
_SCHEDULERS = ("warmuplr", "warmupdecaylr", "warmupcosinelr")


def _load(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, (str, os.PathLike)):
        with open(cfg) as f:
            cfg = json.load(f)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"Config.from_deepspeed: pass a dict or a JSON path, got {type(cfg)}")
    return dict(cfg)


def _set(out: dict[str, Any], section: str, key: str, value: Any) -> None:
    if value is not None and value != "auto":
        out.setdefault(section, {})[key] = value


def _sharding(ds: dict[str, Any], out: dict[str, Any]) -> None:
    zero = ds.get("zero_optimization")
    if zero is None:
        return
    if isinstance(zero, Mapping) and zero.get("stage") == 0:
        _set(out, "sharding", "stage", 0)
        return
    sub: dict[str, Any] = {k: ds[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds}
    z = read_deepspeed(sub)
    sh = out.setdefault("sharding", {})
    sh["stage"] = z.stage
    if z.bucket_bytes is not None:
        sh["bucket_bytes"] = z.bucket_bytes
    if z.offload_param.device != "none":
        sh["offload_params"] = z.offload_param.device
    off = z.offload_optimizer
    # ZeRO-3 with both on the CPU: offload_params: cpu already keeps the state there
    both_cpu = z.stage == 3 and off.device == z.offload_param.device == "cpu"
    if off.device != "none" and not both_cpu:
        sh["offload"] = off.device
    blocks = (off, z.offload_param)
    paths = {str(b.nvme_path) for b in blocks if b.device == "nvme" and b.nvme_path is not None}
    if len(paths) > 1:
        raise ValueError(f"DeepSpeed offload_optimizer and offload_param name different "
                         f"nvme_path values {sorted(paths)}; memopt keeps both tiers' swap "
                         "files under one sharding.nvme_path: give them the same directory")
    if paths:
        sh["nvme_path"] = paths.pop()


def _optimizer(ds: dict[str, Any], out: dict[str, Any]) -> None:
    block = ds.get("optimizer")
    if block is None:
        return
    kind = str(block.get("type", "")).lower()
    if kind not in _ADAM:
        raise ValueError(f"DeepSpeed optimizer type {block.get('type')!r}: memopt maps Adam/AdamW "
                         "only; set optimizer.name (galore, apollo_mini, frugal, ...) in memopt")
    _set(out, "optimizer", "name", "adamw")
    params = block.get("params", {})
    for key in ("lr", "betas", "eps", "weight_decay"):
        _set(out, "optimizer", key, params.get(key))


def _rest(ds: dict[str, Any], out: dict[str, Any]) -> None:
    sched = ds.get("scheduler")
    if sched is not None:
        kind = str(sched.get("type", "")).lower()
        if kind not in _SCHEDULERS:
            raise ValueError(f"DeepSpeed scheduler {sched.get('type')!r}: memopt maps "
                             "WarmupLR, WarmupDecayLR and WarmupCosineLR")
        _set(out, "optimizer", "warmup_steps", sched.get("params", {}).get("warmup_num_steps"))
    if isinstance(ds.get("fp16"), Mapping) and ds["fp16"].get("enabled") is True:
        raise ValueError("DeepSpeed fp16: memopt has no loss scaler; use bf16 (bf16.enabled)")
    if isinstance(ds.get("bf16"), Mapping) and ds["bf16"].get("enabled") is True:
        _set(out, "model", "dtype", "bf16")
        _set(out, "sharding", "master_dtype", "fp32")
    _set(out, "train", "batch_size", ds.get("train_micro_batch_size_per_gpu"))
    _set(out, "train", "grad_accum", ds.get("gradient_accumulation_steps"))
    clip = ds.get("gradient_clipping")
    if clip is not None and clip != "auto":
        _set(out, "optimizer", "max_grad_norm", clip if clip > 0 else "null")


def config_from_deepspeed(cfg: Mapping[str, Any] | str | os.PathLike[str], base: Config) -> Config:
    """``base`` updated with the DeepSpeed config's blocks (see the module docstring)."""
    ds = _load(cfg)
    ignored = sorted(k for k in ds if k not in _READ)
    if ignored:
        warnings.warn(f"Config.from_deepspeed: ignored DeepSpeed keys {ignored}", stacklevel=3)
    out: dict[str, Any] = {}
    _sharding(ds, out)
    _optimizer(ds, out)
    _rest(ds, out)
    data = base.to_dict()
    for section, values in out.items():
        for key, value in values.items():
            data[section][key] = None if value == "null" else value
    return Config.from_dict(data)
