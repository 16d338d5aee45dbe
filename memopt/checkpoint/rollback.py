"""The optimizer's part of a multi-rank load: loaded on every rank, or on none.

The optimizer's own ``load_state_dict`` is the one check ``restore_all`` cannot run apart
from loading (memopt's and torch's refuse inside it, before they change anything: foreign
state, group sizes, dtypes, an ``OffloadedAdamW``'s shapes). Under a process group its
outcome can differ between ranks: each rank checks the state of the parameters it holds.
So, with a group, each rank keeps a copy of its optimizer's state dict, loads, and the ranks
``agree``. If any rank refused, the ranks that loaded load their copy back (and drop the
group options the snapshot's groups brought, which a load keeps); then every rank raises.
The copy references the tensors held in the optimizer's ``state`` (a load replaces them, it
never writes into them) and clones the rest: ``memopt.shard``'s fp32 masters (a load writes
them in place), state read back from a tier (``OffloadedAdamW``, state offload). Nothing is
copied for an optimizer without state yet (a fresh process resuming). Without a group the
optimizer loads as before.

State derived from the parameters is not in a state dict: an ``OffloadedAdamW``'s record of
which parameters were written since their last step, ``memopt.shard``'s fp32 masters of
parameters without state, and its note of which masters were loaded. After loading the copy
back, each parameter's version counter is moved (``increment_version``: no value changes),
which those optimizers read as "written from outside": at their next step they compare each
master with its parameter and rebuild it from the weights where they differ, as they would
have done without the load. One case stays inexact: a parameter that has no optimizer state on
this rank, whose snapshot master rounded to the parameter's dtype equals its current
weights, keeps the snapshot's master bits (a bf16 ulp's worth below the weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memopt.checkpoint.agreement import agree
from memopt.checkpoint.derived import takes_masters
from memopt.checkpoint.layout import optimizer_layout, plain_params

__all__ = ["load_optimizer"]


def load_optimizer(
    opt: torch.optim.Optimizer,
    sd: dict[str, Any],
    model: nn.Module | None,
    group: Any,
    what: str,
) -> None:
    """``opt.load_state_dict(sd)`` on every rank of ``group``, or on none (see the module
    docstring); ``what`` names the load in the errors."""
    if group is None:
        opt.load_state_dict(sd)
        return
    backup = opt.state_dict()
    backup = _own_copy(backup, _live_state(opt))
    error: BaseException | None = None
    try:
        opt.load_state_dict(sd)
    except BaseException as e:  # (memopt's and torch's loads refuse before changing anything)
        error = e
    try:
        agree(group, error, what, "nothing was loaded on any rank (the ranks that had loaded "
              "the optimizer's state put their own back)")  # fmt: skip
    except BaseException:
        if error is None:
            _put_back(opt, backup, model, what)
        raise


def _put_back(opt: torch.optim.Optimizer, backup: dict[str, Any], model: Any, what: str) -> None:
    try:
        opt.load_state_dict(backup)
    except BaseException as e:
        raise RuntimeError(
            f"{what}: another rank refused the snapshot, and this rank's optimizer, which had "
            f"loaded it, could not take its own state back ({type(e).__name__}: {e}); its "
            "state is the snapshot's while the model's weights are not. Load a snapshot on "
            "every rank before training on"
        ) from e
    # a load keeps group options that the loaded groups lack (memopt's own, when a torch
    # state dict loads) and adds the loaded ones: drop what the snapshot's groups brought
    for g, saved in zip(opt.param_groups, backup["param_groups"], strict=True):
        for key in [k for k in g if k not in saved]:
            del g[key]
    _mark_written(opt, model)


@torch.no_grad()
def _mark_written(opt: torch.optim.Optimizer, model: nn.Module | None) -> None:
    """Move the version counter of each parameter whose optimizer derives state from it (an
    ``OffloadedAdamW``, masters of ``memopt.shard(master_dtype=...)``), so it re-derives that
    state from the weights where they differ (see the module docstring)."""
    masters = takes_masters(opt)
    if not masters:
        try:
            params, _ = optimizer_layout(opt, model, 0, 1)
        except Exception:  # (the layout was read before the load: not expected here)
            params = []
        masters = any(p.master for p in params)
    if not masters:
        return
    seen: set[int] = set()
    tensors = list(plain_params(opt)) + (list(model.parameters()) if model is not None else [])
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            torch.autograd.graph.increment_version(t)


def _live_state(opt: torch.optim.Optimizer) -> set[int]:
    """Ids of the tensors in ``opt.state`` (the inner optimizer's, behind memopt's wrappers)
    now: a load replaces these with new tensors and never writes into them (torch's and
    memopt's loads build new per-parameter dicts), so a copy of the state dict may keep them
    by reference. Anything else in the state dict is cloned: ``memopt.shard``'s masters
    (written in place by a load), state read back from a tier."""
    try:
        held = list(opt.state.values())
    except Exception:  # (a wrapper's state that cannot be listed: clone everything)
        return set()
    return {
        id(t) for st in held if isinstance(st, dict) for t in st.values() if isinstance(t, Tensor)
    }


def _own_copy(x: Any, keep: set[int]) -> Any:
    """``x`` with every dict, list and tuple rebuilt and every tensor cloned, except those
    whose id is in ``keep``."""
    if isinstance(x, Tensor):
        return x if id(x) in keep else x.detach().clone()
    if isinstance(x, dict):
        return {k: _own_copy(v, keep) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_own_copy(v, keep) for v in x)
    return x
