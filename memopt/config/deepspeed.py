"""``Config.from_deepspeed``: the blocks of a DeepSpeed JSON config memopt understands.

- ``zero_optimization``: through ``memopt.sharding.deepspeed_config.read_deepspeed`` (the
  same mapping ``memopt.shard(deepspeed_config=...)`` uses: stage, bucket size in bytes,
  ``offload_optimizer`` cpu/nvme and ``offload_param`` cpu/nvme, with their ``nvme_path``
  (one directory for both); unknown keys raise, keys without effect warn). Stage 0 is plain
  data parallelism (``sharding.stage: 0``); its block is validated the same way, and an
  offload block there raises (DeepSpeed offloads only inside ZeRO). No block: ``base``'s.
  ``offload_optimizer.pin_memory: false`` has no config key: warned (memopt pins).
- ``optimizer``: ``type`` Adam/AdamW (any case) -> ``optimizer.name: adamw`` with ``lr``,
  ``betas``, ``eps``, ``weight_decay`` from ``params`` (a ``base`` with another optimizer,
  GaLore say, is warned about: drop the block or set ``optimizer.name`` after loading); any
  other type raises ``ValueError``. A param the block leaves out is DeepSpeed's optimizer
  default (lr 1e-3 unless the scheduler gives the peak, betas (0.9, 0.999), eps 1e-8,
  weight_decay 0; with ``torch_adam: true`` torch's AdamW decays 0.01), warned where ``base``
  differs. ``type: Adam`` with ``adam_w_mode: false`` (L2-regularised Adam) and a non-zero
  ``weight_decay`` raises (memopt's decay is decoupled; ``type: AdamW`` is decoupled in
  DeepSpeed whatever ``adam_w_mode`` says). Other ``params`` (``amsgrad``, ...) are warned
  about. memopt decays matrices only, DeepSpeed every parameter it was given.
- ``scheduler``: a key the block leaves out takes DeepSpeed 0.19's default
  (``deepspeed/runtime/lr_schedules.py``): ``warmup_num_steps`` 1000, ``warmup_type`` log,
  ``cos_min_ratio`` 1e-4, WarmupDecayLR's ``warmup_max_lr`` 1e-3 (WarmupLR's: the
  optimizer's lr). ``warmup_num_steps`` -> ``optimizer.warmup_steps``; memopt's warm-up is
  linear from about 0, so a log warm-up (the default of all three) is warned about.
  ``WarmupLR`` (constant after warm-up) -> ``schedule: constant``, ``warmup_max_lr`` ->
  ``optimizer.lr``;
  ``WarmupDecayLR`` (linear decay to 0 at ``total_num_steps``) -> ``schedule: cosine`` with
  ``min_lr_ratio: 0`` (a cosine, not a linear, decay: warned), ``total_num_steps`` ->
  ``train.steps`` (memopt's decay spans the run), ``warmup_max_lr`` -> ``optimizer.lr``
  (absent: 1e-3, warned when the optimizer's lr differs);
  ``WarmupCosineLR`` -> ``schedule: cosine``, ``cos_min_ratio`` -> ``min_lr_ratio``,
  ``total_num_steps`` -> ``train.steps``.
  What has no counterpart is warned about, not dropped silently: a non-zero
  ``warmup_min_lr``/``warmup_min_ratio`` (memopt warms up from about 0), a ``warmup_type``
  other than ``linear``, other params. An ``optimizer`` block without a ``scheduler``:
  DeepSpeed keeps the optimizer's lr, so ``schedule: constant``, ``warmup_steps: 0`` (warned
  when ``base`` differs); with neither block ``base``'s schedule stays.
- ``bf16.enabled`` (or the legacy ``bfloat16`` key) -> ``model.dtype: bf16`` with fp32
  master weights (``sharding.master_dtype: fp32``; without a ZeRO stage that runs as stage
  1, which on one rank is the plain update on the fp32 copies, as DeepSpeed's bf16
  optimizer). ``fp16.enabled``
  raises here: this config builds the training run, and memopt has no loss scaler, so an
  fp16 model would train without one (use bf16). ``memopt.shard(deepspeed_config=...)``
  accepts it because there the model, its dtype and the loss are the caller's: it reads
  fp32 master weights from it and warns that the loss scaling is not applied.
- ``train_micro_batch_size_per_gpu`` -> ``train.batch_size``; ``gradient_accumulation_steps`` ->
  ``train.grad_accum``; ``gradient_clipping`` -> ``optimizer.max_grad_norm`` (0: off; absent:
  DeepSpeed's default 1.0, warned when ``base`` differs).
  ``train_batch_size`` (the global batch) is not carried over (memopt's global batch is
  ``batch_size * grad_accum * ranks``): a warning says so.

Values of ``"auto"`` (the HF integration's placeholder) keep ``base``'s value. Other top-level
keys (``aio``, ``wall_clock_breakdown``, ...) are reported in a single warning. A block of the
wrong shape (``"bf16": true`` instead of ``{"enabled": true}``, a list for ``optimizer``,
``"params": null``, a string ``gradient_clipping``) is a ``ValueError`` naming the key.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from memopt._utils.jsonfile import json_mapping
from memopt.config.build import default_eps
from memopt.config.config import Config
from memopt.sharding.deepspeed_config import read_deepspeed
from memopt.sharding.deepspeed_keys import DEFAULT_CLIP

_READ = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16",
         "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
         "train_batch_size")  # fmt: skip
_ADAM = ("adam", "adamw")
#: DeepSpeed 0.19's Adam defaults (ops/adam FusedAdam and DeepSpeedCPUAdam, torch.optim.Adam)
_ADAM_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                  "weight_decay": 0.0}  # fmt: skip
_TORCH_ADAMW_DECAY = 0.01  # torch.optim.AdamW's default weight_decay
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # warnings skip memopt/config
_SCHEDULERS = ("warmuplr", "warmupdecaylr", "warmupcosinelr")
#: DeepSpeed 0.19's defaults for scheduler params a config leaves out (runtime/lr_schedules.py)
_DS_WARMUP_STEPS, _DS_WARMUP_TYPE, _DS_COS_MIN_RATIO, _DS_DECAY_MAX_LR = 1000, "log", 1e-4, 1e-3


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
    if ds.get("zero_optimization") is None:
        return
    sub: dict[str, Any] = {k: ds[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds}
    z = read_deepspeed(sub, allow_stage0=True)  # stage 0 is validated too (unknown keys raise)
    sh = out.setdefault("sharding", {})
    sh["stage"] = z.stage
    if z.stage == 0:
        return
    if z.bucket_bytes is not None:
        sh["bucket_bytes"] = z.bucket_bytes
    if z.offload_param.device != "none":
        sh["offload_params"] = z.offload_param.device
    off = z.offload_optimizer
    # ZeRO-3 with both on the CPU: offload_params: cpu already keeps the state there
    both_cpu = z.stage == 3 and off.device == z.offload_param.device == "cpu"
    if off.device != "none" and not both_cpu:
        sh["offload"] = off.device
    if off.device != "none" and not off.pin_memory:
        _warn("zero_optimization.offload_optimizer.pin_memory: false is not carried over: "
              "memopt's config has no such key and pins the offloaded state in host memory; "
              "where the host limits locked memory (ulimit -l, containers) call memopt.shard("
              "deepspeed_config=...) in your own loop, which honours it at stages 1/2")
    blocks = (off, z.offload_param)
    paths = {str(b.nvme_path) for b in blocks if b.device == "nvme" and b.nvme_path is not None}
    if len(paths) > 1:
        raise ValueError(f"DeepSpeed offload_optimizer and offload_param name different "
                         f"nvme_path values {sorted(paths)}; memopt keeps both tiers' swap "
                         "files under one sharding.nvme_path: give them the same directory")
    if paths:
        sh["nvme_path"] = paths.pop()


def _optimizer(ds: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    block = _block(ds, "optimizer")
    if block is None:
        return
    kind = str(block.get("type", "")).lower()
    if kind not in _ADAM:
        raise ValueError(f"DeepSpeed optimizer type {block.get('type')!r}: memopt maps Adam/AdamW "
                         "only; set optimizer.name (galore, apollo_mini, frugal, ...) in memopt")
    name = block.get("type")
    if base.optimizer.name != "adamw":
        _warn(f"optimizer {name}: optimizer.name: adamw replaces base's "
              f"{base.optimizer.name!r} (full-state Adam moments for every parameter); to keep "
              f"{base.optimizer.name}, drop the optimizer block from the DeepSpeed config, or set "
              f"it after loading: cfg.replace(['optimizer.name={base.optimizer.name}'])")
    _set(out, "optimizer", "name", "adamw")
    params = _block(block, "params", "optimizer.") or {}
    # DeepSpeed: type AdamW is decoupled whatever adam_w_mode says; Adam follows adam_w_mode
    adam_w = params.pop("adam_w_mode", True) is not False or kind == "adamw"
    torch_adam = params.pop("torch_adam", None) is True  # torch.optim.AdamW / Adam: same update
    given = {key: params.pop(key) for key in _ADAM_DEFAULTS if key in params}
    for key, value in given.items():
        _set(out, "optimizer", key, value)
    _adam_defaults(ds, out, base, given, torch_adam and adam_w)
    wd = _value(out, base, "optimizer", "weight_decay")
    if not adam_w and wd not in (0, 0.0):
        raise ValueError(f"DeepSpeed optimizer.params.adam_w_mode: false is Adam with L2 "
                         f"regularisation (weight_decay {wd} added to the gradient); memopt's "
                         "AdamW decays decoupled: drop adam_w_mode or set weight_decay to 0")
    if params:
        _warn(f"optimizer {name}: ignored params {sorted(params)} (memopt's AdamW "
              "takes lr, betas, eps and weight_decay)")


def _adam_defaults(ds: dict[str, Any], out: dict[str, Any], base: Config,
                   given: dict[str, Any], torch_adamw: bool) -> None:
    """Params the optimizer block leaves out run at DeepSpeed's optimizer's defaults (FusedAdam /
    DeepSpeedCPUAdam; ``torch_adam``: torch's, whose AdamW decays 0.01): taken, warned where
    ``base`` differs. lr only when no scheduler block sets it (WarmupLR's warmup_max_lr,
    WarmupDecayLR's peak)."""
    defaults = dict(_ADAM_DEFAULTS, weight_decay=_TORCH_ADAMW_DECAY if torch_adamw else 0.0)
    if _sched_sets_lr(ds):
        defaults.pop("lr")
    changed = []
    for key, value in defaults.items():
        if key in given:
            continue
        had = getattr(base.optimizer, key)
        if key == "eps" and had is None:  # null: the (AdamW) optimizer's own default
            had = default_eps("adamw")
        if tuple(had) != value if key == "betas" else had != value:
            out.setdefault("optimizer", {})[key] = list(value) if key == "betas" else value
            changed.append(f"{key}: {value} (base had {_fmt(had)})")
    if torch_adamw and "weight_decay" not in given:
        _warn(f"optimizer {ds['optimizer'].get('type')}: torch_adam without weight_decay is "
              f"torch.optim.AdamW's default weight_decay {_TORCH_ADAMW_DECAY} in DeepSpeed: "
              f"optimizer.weight_decay: {_TORCH_ADAMW_DECAY} (memopt decays matrices only)")
        changed = [c for c in changed if not c.startswith("weight_decay")]
    if changed:
        _warn(f"optimizer {ds['optimizer'].get('type')}: params the block leaves out run at "
              f"DeepSpeed's optimizer defaults, not base's: optimizer.{', '.join(changed)}; "
              "give them in the block (or \"auto\": base's) to keep base's values")


def _fmt(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _sched_sets_lr(ds: dict[str, Any]) -> bool:
    """Whether the scheduler block gives the peak lr itself (so the optimizer's is unused)."""
    sched = ds.get("scheduler")
    if not isinstance(sched, Mapping):
        return False
    kind = str(sched.get("type") or "").lower()
    params = sched.get("params")
    has_max = isinstance(params, Mapping) and "warmup_max_lr" in params
    return kind == "warmupdecaylr" or (kind == "warmuplr" and has_max)


def _warn(message: str) -> None:
    """Warn at the first frame outside ``memopt/config`` (the caller of Config.from_deepspeed)."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_HERE):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"Config.from_deepspeed: {message}", stacklevel=level)


def _scheduler(ds: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    sched = _block(ds, "scheduler")
    if sched is None:
        _no_scheduler(ds, out, base)
        return
    name = sched.get("type")
    kind = str(name or "").lower()
    if kind not in _SCHEDULERS:
        raise ValueError(f"DeepSpeed scheduler {name!r}: memopt maps "
                         "WarmupLR, WarmupDecayLR and WarmupCosineLR")
    params = _block(sched, "params", "scheduler.") or {}
    _set(out, "optimizer", "warmup_steps", params.pop("warmup_num_steps", _DS_WARMUP_STEPS))
    if kind == "warmuplr":  # constant after warm-up; no warmup_max_lr: the optimizer's lr
        _set(out, "optimizer", "schedule", "constant")
        _set(out, "optimizer", "lr", params.pop("warmup_max_lr", None))
    else:
        _set(out, "optimizer", "schedule", "cosine")
        _total_steps(name, params, out, base)
    if kind == "warmupdecaylr":
        _set(out, "optimizer", "min_lr_ratio", 0.0)
        _warn(f"scheduler {name}: its linear decay to 0 becomes memopt's cosine decay to 0 "
              "(optimizer.schedule: cosine, min_lr_ratio: 0) over train.steps")
        _decay_peak(name, params, out, base)
    if kind == "warmupcosinelr":
        _set(out, "optimizer", "min_lr_ratio", params.pop("cos_min_ratio", _DS_COS_MIN_RATIO))
    low = params.pop("warmup_min_lr" if kind != "warmupcosinelr" else "warmup_min_ratio", None)
    if low not in (None, "auto", 0, 0.0):
        _warn(f"scheduler {name}: warm-up start {low} not carried over (memopt's warm-up "
              "rises linearly from about 0 to optimizer.lr)")
    wtype = params.pop("warmup_type", _DS_WARMUP_TYPE)
    if wtype != "linear" and _value(out, base, "optimizer", "warmup_steps") != 0:
        _warn(f"scheduler {name}: warmup_type {wtype!r}"
              f"{' (DeepSpeed default)' if wtype == _DS_WARMUP_TYPE else ''} becomes memopt's "
              "linear warm-up (memopt has no log warm-up); the lr after warm-up is the same")
    if params:
        _warn(f"scheduler {name}: ignored params {sorted(params)}")


def _value(out: dict[str, Any], base: Config, section: str, key: str) -> Any:
    """The value ``section.key`` will have: the DeepSpeed config's, else ``base``'s."""
    return out.get(section, {}).get(key, getattr(getattr(base, section), key))


def _total_steps(name: Any, params: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    total = params.pop("total_num_steps", None)
    if total is None:  # a required argument in DeepSpeed: its run would not have started
        _warn(f"scheduler {name}: no total_num_steps (DeepSpeed requires it); the decay spans "
              f"train.steps {base.train.steps} from base")
    _set(out, "train", "steps", total)


def _decay_peak(name: Any, params: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    """WarmupDecayLR peaks at ``warmup_max_lr``, DeepSpeed's default 1e-3 when absent (it does
    not read the optimizer's lr then)."""
    peak = params.pop("warmup_max_lr", None)
    if peak is None:
        peak, lr = _DS_DECAY_MAX_LR, _value(out, base, "optimizer", "lr")
        if lr != peak:
            _warn(f"scheduler {name}: no warmup_max_lr, so DeepSpeed peaks at its default "
                  f"{peak}, not at the optimizer's lr {lr}: optimizer.lr: {peak}")
    _set(out, "optimizer", "lr", peak)


def _no_scheduler(ds: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    """An ``optimizer`` block without a ``scheduler``: DeepSpeed keeps the optimizer's lr for
    the whole run. (Without either, the schedule came from the caller's code: base's stays.)"""
    if _block(ds, "optimizer") is None:
        return
    had = (base.optimizer.schedule, base.optimizer.warmup_steps)
    out.setdefault("optimizer", {}).update(schedule="constant", warmup_steps=0)
    if had != ("constant", 0):
        _warn(f"an optimizer block without a scheduler trains at a constant lr in DeepSpeed: "
              f"optimizer.schedule: constant, warmup_steps: 0 (base had {had[0]}, {had[1]}); "
              "under the Hugging Face Trainer its own scheduler runs instead: set "
              "optimizer.schedule / warmup_steps after loading (cfg.replace([...]))")


def _rest(ds: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    _scheduler(ds, out, base)
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
    _clip(ds, out, base)


def _clip(ds: dict[str, Any], out: dict[str, Any], base: Config) -> None:
    """``gradient_clipping`` -> ``max_grad_norm``; absent: DeepSpeed's default clip, 1.0."""
    if "gradient_clipping" not in ds:
        if base.optimizer.max_grad_norm != DEFAULT_CLIP:
            _warn(f"no gradient_clipping: DeepSpeed clips at its default {DEFAULT_CLIP}, so "
                  f"optimizer.max_grad_norm: {DEFAULT_CLIP} (base had "
                  f"{base.optimizer.max_grad_norm})")
        _set(out, "optimizer", "max_grad_norm", DEFAULT_CLIP)
        return
    clip = ds["gradient_clipping"]
    if clip is not None and clip != "auto":
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise ValueError(f"Config.from_deepspeed: DeepSpeed key 'gradient_clipping' must be "
                             f"a number >= 0 (0: off) or \"auto\", got {clip!r}")
        _set(out, "optimizer", "max_grad_norm", clip if clip > 0 else "null")


def _legacy_bf16(ds: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed reads the legacy top-level ``bfloat16`` block as ``bf16`` when ``bf16`` is
    absent (runtime/precision_config.py): the same here; both with different values raise."""
    if "bfloat16" not in ds:
        return ds
    _enabled(ds, "bfloat16")  # a malformed block is named by its own key
    ds = dict(ds)
    old = ds.pop("bfloat16")
    if ds.get("bf16") is not None and ds["bf16"] != old:  # (DeepSpeed: a null bf16 is absent)
        raise ValueError(f"Config.from_deepspeed: DeepSpeed keys 'bf16' ({ds['bf16']!r}) and its "
                         f"legacy name 'bfloat16' ({old!r}) disagree; DeepSpeed would read 'bf16' "
                         "only: keep one of them")
    if ds.get("bf16") is None:
        ds["bf16"] = old
    return ds


def config_from_deepspeed(cfg: Mapping[str, Any] | str | os.PathLike[str], base: Config) -> Config:
    """``base`` updated with the DeepSpeed config's blocks (see the module docstring)."""
    ds = _legacy_bf16(_load(cfg))
    ignored = sorted(k for k in ds if k not in _READ)
    if ignored:
        _warn(f"ignored DeepSpeed keys {ignored}")
    out: dict[str, Any] = {}
    _enabled(ds, "bf16")  # a malformed bf16/fp16 block is named before read_deepspeed sees it
    _enabled(ds, "fp16")
    _sharding(ds, out)
    _optimizer(ds, out, base)
    _rest(ds, out, base)
    data = base.to_dict()
    for section, values in out.items():
        for key, value in values.items():
            data[section][key] = None if value == "null" else value
    return Config.from_dict(data)
