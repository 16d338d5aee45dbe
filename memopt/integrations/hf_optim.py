"""Build a memopt optimizer from Hugging Face ``TrainingArguments`` without dropping any of them.

HF's own low-rank path (``optim="galore_adamw"``, ``apollo_adamw``) builds its own two groups
``[non-targets, targets + optim_args]`` and passes only ``lr`` (transformers
``trainer_optimizer.py``, ``_setup_low_rank_optimizer``): ``weight_decay`` is dropped for
GaLore and APOLLO, and ``adam_beta1/2`` / ``adam_epsilon`` for GaLore. Here every group gets
them explicitly:

- groups come from ``memopt.optim.param_groups`` (low-rank targets, decayed 2-D
  non-targets, and a no-decay group for 1-D parameters: biases and norm scales), or for
  ``name="adamw"`` from the same 2-D / 1-D split without a low-rank group;
- each group gets ``lr = args.learning_rate``, ``betas = (args.adam_beta1, args.adam_beta2)``,
  ``eps = args.adam_epsilon`` and ``weight_decay = args.weight_decay`` (0 for the no-decay
  group), unless the caller set that key in ``group_overrides``.

Without ``rank`` (FRUGAL: ``density``) the low-rank group takes ``memopt.Config``'s defaults
(``memopt.config.build.default_rank``: 128, APOLLO-Mini 1; density 0.25).

The LR scheduler stays HF's (``create_scheduler`` wraps whatever optimizer this returns), so
warmup and decay apply to every group. ``args`` is duck-typed: any object with those fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memopt import optim as mo

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": mo.AdamW,
    "galore": mo.GaLoreAdamW,
    "apollo": mo.ApolloAdamW,
    "apollo_mini": mo.ApolloMini,
    "frugal": mo.FrugalAdamW,
    "natural_galore": mo.NaturalGaLoreAdamW,
}
ARG_FIELDS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def _check_args(args: Any) -> None:
    missing = [f for f in ARG_FIELDS if not hasattr(args, f)]
    if missing:
        raise TypeError(
            f"create_optimizer: args lacks {missing}; pass transformers.TrainingArguments "
            "(or an object with learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon)"
        )


def _full_state_groups(model: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: 2-D+ parameters decay; 1-D ones (biases, norm scales) do not."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = []
    for items, decays in ((decay, True), (no_decay, False)):
        if items:
            groups.append(
                {
                    "params": [p for _, p in items],
                    "param_names": [n for n, _ in items],
                    "weight_decay": None if decays else 0.0,
                }
            )
    return groups


def _with_defaults(name: str, low_rank: dict[str, Any]) -> dict[str, Any]:
    """``rank`` (or FRUGAL's ``density``) when not given: the ``memopt.Config`` defaults
    (``memopt.config.build.default_rank``: 128, APOLLO-Mini 1; density 0.25), so
    ``MemoptTrainer()`` with its default ``"galore"`` and no options builds an optimizer."""
    from memopt.config.build import default_rank
    from memopt.config.sections import OptimizerConfig

    out = dict(low_rank)
    if name == "frugal":
        if out.get("density") is None and out.get("rank") is None:
            out["density"] = OptimizerConfig().density
    elif out.get("rank") is None:
        out["rank"] = default_rank(name)
    return out


def hf_param_groups(
    model: nn.Module,
    args: Any,
    name: str = "galore",
    *,
    target: str | Sequence[str] = "attn|mlp",
    exclude: str | Sequence[str] | None = None,
    group_overrides: dict[str, Any] | None = None,
    **low_rank: Any,
) -> list[dict[str, Any]]:
    """The param groups ``create_optimizer`` builds, with the TrainingArguments filled in."""
    _check_args(args)
    if name not in OPTIMIZERS:
        raise ValueError(
            f"create_optimizer: unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}"
        )
    if name == "adamw":
        if low_rank:
            raise ValueError(
                f"create_optimizer: name='adamw' takes no low-rank options, got {sorted(low_rank)}"
            )
        groups = _full_state_groups(model)
    else:
        low_rank = _with_defaults(name, low_rank)
        groups = mo.param_groups(
            model, target, exclude=exclude, weight_decay=1.0, **low_rank
        )  # 1.0 marks the decayed groups; the real value is set below
    wd = float(args.weight_decay)
    base = {
        "lr": float(args.learning_rate),
        "betas": (float(args.adam_beta1), float(args.adam_beta2)),
        "eps": float(args.adam_epsilon),
    }
    overrides = dict(group_overrides or {})
    for g in groups:
        decays = g.get("weight_decay") != 0.0
        g.update(base)
        g["weight_decay"] = wd if decays else 0.0
        g.update(overrides)
    return groups


def deepspeed_refusal(who: str) -> str:
    """Why a memopt optimizer cannot run under HF's DeepSpeed integration, and the way out."""
    return (
        f"{who} with DeepSpeed enabled (TrainingArguments(deepspeed=...) or accelerate's "
        "DeepSpeed plugin): DeepSpeed's ZeRO replaces each parameter group by one flat 1-D "
        "buffer, so memopt's optimizer would run as full-state Adam on it (no low-rank "
        "projection, no memory saving, a different update), and when the DeepSpeed config "
        "has an \"optimizer\" block HF builds DeepSpeed's optimizer and memopt's is never "
        "created. Drop deepspeed= from the TrainingArguments and let memopt shard: "
        "MemoptTrainer(..., memopt_shard={'deepspeed_config': 'ds_config.json'}, with "
        "save_only_model=True) reads its zero_optimization block, or MemoptTrainer.from_config("
        "memopt.Config.from_deepspeed('ds_config.json', base=...)) reads the whole file "
        "(docs/migrating.md, 'From DeepSpeed ZeRO')"
    )


def create_optimizer(
    model: nn.Module,
    args: Any,
    name: str = "galore",
    *,
    target: str | Sequence[str] = "attn|mlp",
    exclude: str | Sequence[str] | None = None,
    group_overrides: dict[str, Any] | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    **low_rank: Any,
) -> torch.optim.Optimizer:
    """A memopt optimizer for ``model`` honouring ``args`` (``transformers.TrainingArguments``).

    ``name``: one of ``OPTIMIZERS`` (``"galore"``, ``"apollo"``, ``"apollo_mini"``,
    ``"frugal"``, ``"natural_galore"``, ``"adamw"``). ``low_rank`` options (``rank=128``,
    ``update_proj_gap=200``, ``scale=0.25``, ``density=0.25`` for FRUGAL, ...) go into the
    low-rank group; ``target``/``exclude`` select its matrices (see ``memopt.optim.param_groups``).
    ``group_overrides`` set a key in every group after the TrainingArguments (e.g. a different
    ``eps``); ``optimizer_kwargs`` go to the optimizer's constructor (``state_dtype="int8"``).
    Hand the result to ``Trainer(optimizers=(opt, None))`` (HF then builds its scheduler on it),
    or use ``MemoptTrainer``, which calls this from ``Trainer.create_optimizer``. ``args`` with
    ``deepspeed`` set is refused (``ValueError``): DeepSpeed's ZeRO would flatten the parameters
    under the optimizer; shard with memopt instead (docs/migrating.md).
    """
    if getattr(args, "deepspeed", None):
        raise ValueError(deepspeed_refusal(f"create_optimizer(model, args, {name!r})"))
    groups = hf_param_groups(
        model, args, name, target=target, exclude=exclude, group_overrides=group_overrides,
        **low_rank,
    )  # fmt: skip
    cls: Any = OPTIMIZERS[name]
    return cls(groups, lr=float(args.learning_rate), **dict(optimizer_kwargs or {}))


__all__ = ["OPTIMIZERS", "create_optimizer", "deepspeed_refusal", "hf_param_groups"]
