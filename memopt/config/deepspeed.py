"""``Config.from_deepspeed``: the blocks of a DeepSpeed JSON config memopt understands.

- ``zero_optimization``: through ``memopt.sharding.deepspeed_config.read_deepspeed`` (the
  same mapping ``memopt.shard(deepspeed_config=...)`` uses: stage, bucket size in bytes,
  ``offload_optimizer`` cpu/nvme and ``offload_param`` cpu/nvme, with their ``nvme_path``
  (one directory for both); unknown keys raise, keys without effect warn). Stage 0 is plain
  data parallelism (``sharding.stage: 0``).
- ``optimizer``: ``type`` Adam/AdamW (any case) -> ``optimizer.name: adamw`` with ``lr``,
  ``betas``, ``eps``, ``weight_decay`` from ``params``; any other type raises ``ValueError``
  (configure GaLore/APOLLO/FRUGAL in memopt's own ``optimizer`` section). ``adam_w_mode:
  false`` (DeepSpeed's L2-regularised Adam) with a non-zero ``weight_decay`` raises (memopt's
  decay is decoupled); other ``params`` (``torch_adam``, ``amsgrad``, ...) are warned about.
- ``scheduler`` (``warmup_num_steps`` -> ``optimizer.warmup_steps``; memopt's warm-up is
  linear from about 0):
  ``WarmupLR`` (constant after warm-up) -> ``schedule: constant``, ``warmup_max_lr`` ->
  ``optimizer.lr``;
  ``WarmupDecayLR`` (linear decay to 0 at ``total_num_steps``) -> ``schedule: cosine`` with
  ``min_lr_ratio: 0`` (a cosine, not a linear, decay: warned), ``total_num_steps`` ->
  ``train.steps`` (memopt's decay spans the run), ``warmup_max_lr`` -> ``optimizer.lr``;
  ``WarmupCosineLR`` -> ``schedule: cosine``, ``cos_min_ratio`` -> ``min_lr_ratio``,
  ``total_num_steps`` -> ``train.steps``.
  What has no counterpart is warned about, not dropped silently: a non-zero
  ``warmup_min_lr``/``warmup_min_ratio`` (memopt warms up from about 0), a ``warmup_type``
  other than ``linear``, other params.
- ``bf16.enabled`` -> ``model.dtype: bf16`` with fp32 master weights
  (``sharding.master_dtype: fp32``; without a ZeRO stage that runs as stage 1, which on one
  rank is the plain update on the fp32 copies, as DeepSpeed's bf16 optimizer). ``fp16.enabled``
  raises here: this config builds the training run, and memopt has no loss scaler, so an
  fp16 model would train without one (use bf16). ``memopt.shard(deepspeed_config=...)``
  accepts it because there the model, its dtype and the loss are the caller's: it only reads
  fp32 master weights from it.
- ``train_micro_batch_size_per_gpu`` -> ``train.batch_size``; ``gradient_accumulation_steps`` ->
  ``train.grad_accum``; ``gradient_clipping`` -> ``optimizer.max_grad_norm`` (0: off).
  ``train_batch_size`` (the global batch) is not carried over (memopt's global batch is
  ``batch_size * grad_accum * ranks``): a warning says so.

Values of ``"auto"`` (the HF integration's placeholder) keep ``base``'s value. Other top-level
keys (``aio``, ``wall_clock_breakdown``, ...) are reported in a single warning. A block of the
wrong shape (``"bf16": true`` instead of ``{"enabled": true}``, a list for ``optimizer``,
``"params": null``, a string ``gradient_clipping``) is a ``ValueError`` naming the key.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from memopt._utils.jsonfile import json_mapping
from memopt.config.config import Config
from memopt.sharding.deepspeed_config import read_deepspeed

_READ = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16",
         "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
         "train_batch_size")  # fmt: skip
_ADAM = ("adam", "adamw")
_SCHEDULERS = ("warmuplr", "warmupdecaylr", "warmupcosinelr")


def _load(cfg: Any) -> dict[str, Any]:
    return json_mapping(cfg, "Config.from_deepspeed")


def _block(ds: Mapping[str, Any], key: str, where: str = "") -> dict[str, Any] | None:
    """``ds[key]`` as a dict (None when absent, or null at the top level); anything else but a
    mapping is a ValueError naming the key."""
    value = ds.get(key)
    if value is None and (key not in ds or not where):
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"Config.from_deepspeed: DeepSpeed key '{where}{key}' must be a JSON "
                         f"object (mapping), got {value!r}")
    return dict(value)


def _enabled(ds: Mapping[str, Any], key: str) -> bool:
    """Whether the ``bf16`` / ``fp16`` block is enabled (``"auto"``: left to ``base``)."""
    block = _block(ds, key)
    if block is None:
        return False
    flag = block.get("enabled", False)
    if flag not in (True, False, "auto"):
        raise ValueError(f"Config.from_deepspeed: DeepSpeed key '{key}.enabled' must be true, "
                         f"false or \"auto\", got {flag!r}")
    return flag is True


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
    block = _block(ds, "optimizer")
    if block is None:
        return
    kind = str(block.get("type", "")).lower()
    if kind not in _ADAM:
        raise ValueError(f"DeepSpeed optimizer type {block.get('type')!r}: memopt maps Adam/AdamW "
                         "only; set optimizer.name (galore, apollo_mini, frugal, ...) in memopt")
    _set(out, "optimizer", "name", "adamw")
    params = _block(block, "params", "optimizer.") or {}
    for key in ("lr", "betas", "eps", "weight_decay"):
        _set(out, "optimizer", key, params.pop(key, None))
    wd = out.get("optimizer", {}).get("weight_decay", 0)
    if params.pop("adam_w_mode", True) is False and wd not in (0, 0.0):
        raise ValueError(f"DeepSpeed optimizer.params.adam_w_mode: false is Adam with L2 "
                         f"regularisation (weight_decay {wd} added to the gradient); memopt's "
                         "AdamW decays decoupled: drop adam_w_mode or set weight_decay to 0")
    if params:
        _warn(f"optimizer {block.get('type')}: ignored params {sorted(params)} (memopt's AdamW "
              "takes lr, betas, eps and weight_decay)")


def _warn(message: str) -> None:
    warnings.warn(f"Config.from_deepspeed: {message}", stacklevel=4)


def _scheduler(ds: dict[str, Any], out: dict[str, Any]) -> None:
    sched = _block(ds, "scheduler")
    if sched is None:
        return
    name = sched.get("type")
    kind = str(name or "").lower()
    if kind not in _SCHEDULERS:
        raise ValueError(f"DeepSpeed scheduler {name!r}: memopt maps "
                         "WarmupLR, WarmupDecayLR and WarmupCosineLR")
    params = _block(sched, "params", "scheduler.") or {}
    _set(out, "optimizer", "warmup_steps", params.pop("warmup_num_steps", None))
    if kind == "warmuplr":
        _set(out, "optimizer", "schedule", "constant")
    else:
        _set(out, "optimizer", "schedule", "cosine")
        _set(out, "train", "steps", params.pop("total_num_steps", None))
    if kind == "warmupdecaylr":
        _set(out, "optimizer", "min_lr_ratio", 0.0)
        _warn(f"scheduler {name}: its linear decay to 0 becomes memopt's cosine decay to 0 "
              "(optimizer.schedule: cosine, min_lr_ratio: 0) over train.steps")
    if kind == "warmupcosinelr":
        _set(out, "optimizer", "min_lr_ratio", params.pop("cos_min_ratio", None))
    else:
        _set(out, "optimizer", "lr", params.pop("warmup_max_lr", None))
    low = params.pop("warmup_min_lr" if kind != "warmupcosinelr" else "warmup_min_ratio", None)
    if low not in (None, "auto", 0, 0.0):
        _warn(f"scheduler {name}: warm-up start {low} not carried over (memopt's warm-up "
              "rises linearly from about 0 to optimizer.lr)")
    wtype = params.pop("warmup_type", None)
    if wtype is None and kind != "warmupcosinelr":
        wtype = "log"  # DeepSpeed's default for WarmupLR / WarmupDecayLR
    if wtype not in (None, "linear") and out.get("optimizer", {}).get("warmup_steps", 1) != 0:
        _warn(f"scheduler {name}: warmup_type {wtype!r} becomes memopt's linear warm-up")
    if params:
        _warn(f"scheduler {name}: ignored params {sorted(params)}")


def _rest(ds: dict[str, Any], out: dict[str, Any]) -> None:
    _scheduler(ds, out)
    if _enabled(ds, "fp16"):
        raise ValueError("DeepSpeed fp16: memopt has no loss scaler; use bf16 (bf16.enabled)")
    if _enabled(ds, "bf16"):
        _set(out, "model", "dtype", "bf16")
        _set(out, "sharding", "master_dtype", "fp32")
    _set(out, "train", "batch_size", ds.get("train_micro_batch_size_per_gpu"))
    _set(out, "train", "grad_accum", ds.get("gradient_accumulation_steps"))
    if ds.get("train_batch_size") not in (None, "auto"):
        _warn(f"train_batch_size {ds['train_batch_size']} not carried over: memopt's global "
              "batch is train.batch_size (per rank) * train.grad_accum * ranks")
    clip = ds.get("gradient_clipping")
    if clip is not None and clip != "auto":
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise ValueError(f"Config.from_deepspeed: DeepSpeed key 'gradient_clipping' must be "
                             f"a number >= 0 (0: off) or \"auto\", got {clip!r}")
        _set(out, "optimizer", "max_grad_norm", clip if clip > 0 else "null")


def config_from_deepspeed(cfg: Mapping[str, Any] | str | os.PathLike[str], base: Config) -> Config:
    """``base`` updated with the DeepSpeed config's blocks (see the module docstring)."""
    ds = _load(cfg)
    ignored = sorted(k for k in ds if k not in _READ)
    if ignored:
        warnings.warn(f"Config.from_deepspeed: ignored DeepSpeed keys {ignored}", stacklevel=3)
    out: dict[str, Any] = {}
    _enabled(ds, "bf16")  # a malformed bf16/fp16 block is named before read_deepspeed sees it
    _enabled(ds, "fp16")
    _sharding(ds, out)
    _optimizer(ds, out)
    _rest(ds, out)
    data = base.to_dict()
    for section, values in out.items():
        for key, value in values.items():
            data[section][key] = None if value == "null" else value
    return Config.from_dict(data)
