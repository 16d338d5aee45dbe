"""Plan and install memopt's activation policies under a byte budget, for the integrations.

``apply_budget(model, sample_batch, budget)`` runs ``memopt.activations.plan`` (a profile pass
of a few forward/backward steps on ``sample_batch``, then the cheapest per-block keep /
recompute / swap / split choice that fits ``budget``) and ``memopt.activations.apply``. The
profile pass runs under ``torch.random.fork_rng`` and restores the parameters' gradients, so
the training run that follows sees the same random stream and gradients as without it.
``first_batch`` builds the sample from a DataLoader's dataset and ``collate_fn`` without
iterating the loader (which would advance its sampler's random state).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt._utils import get_logger
from memopt.activations import ActivationManager, ActivationOptions, apply, plan

log = get_logger("memopt.integrations")


def first_batch(loader: Any, batch_size: int, device: torch.device) -> Any:
    """The first ``batch_size`` samples of ``loader.dataset`` collated, on ``device``."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if dataset is None or collate is None:
        raise TypeError(
            "activation budget: cannot build a sample batch from this dataloader; call "
            "memopt.integrations.apply_budget(model, batch, budget) yourself"
        )
    batch = collate([dataset[i] for i in range(min(batch_size, len(dataset)))])
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def apply_budget(
    model: nn.Module,
    sample_batch: Any,
    budget: int | str,
    *,
    options: ActivationOptions | None = None,
    **plan_options: Any,
) -> ActivationManager:
    """Plan under ``budget`` (bytes, ``"6GiB"`` or ``"50%"`` of the unmanaged peak) and apply.

    ``plan_options`` go to ``memopt.activations.plan`` (``actions``, ``tier``, ``loss_fn``,
    ``blocks``, ``overrides``); ``options`` (``ActivationOptions``: ``nvme=NVMeConfig(...)``,
    which ``tier="nvme"`` needs, ``min_swap_bytes``, ...) go to ``memopt.activations.apply``.
    Returns the ``ActivationManager`` (``.remove()`` undoes it).
    """
    if options is not None and not isinstance(options, ActivationOptions):
        raise TypeError(
            f"activation options=: pass a memopt.activations.ActivationOptions, got "
            f"{type(options).__name__}"
        )
    if plan_options.get("tier") == "nvme" and (options is None or options.nvme is None):
        raise ValueError(
            "activation budget with tier='nvme': pass options=ActivationOptions(nvme="
            "NVMeConfig(directory=...)) (MemoptCallback: activation_options={'options': ...}; "
            "Config: activations.nvme_path) so swapped activations have a file to go to"
        )
    if options is not None:  # the plan prices swap with the threshold it is applied with
        plan_options.setdefault("min_swap_bytes", options.min_swap_bytes)
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        chosen = plan(model, sample_batch, budget, **plan_options)
    log.info("memopt: activation plan under %s:\n%s", budget, chosen.table())
    return apply(model, chosen, options=options)


__all__ = ["apply_budget", "first_batch"]
