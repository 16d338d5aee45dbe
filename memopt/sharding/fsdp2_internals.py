"""The private FSDP2 internals that stage-3 NVMe offload (``ParamSwapper``) and the unit-by-unit
step rely on, reached in one place and checked before use.

``fully_shard`` exposes no public way to free a unit's sharded storage between uses, nor a
hook before its all-gather, so memopt uses these (as in torch 2.6 through 2.13):

- ``FSDPModule._get_fsdp_state()._fsdp_param_groups``: the units (``FSDPParamGroup``);
- per unit, the methods ``unshard(async_op)``, ``wait_for_unshard()`` and ``lazy_init()``
  (wrapped per instance) and the attributes ``_all_gather_result``, ``is_unsharded`` and
  ``fsdp_params``;
- per parameter (``FSDPParam``), ``sharded_param`` (a ``DTensor`` with ``_local_tensor``) and
  ``_sharded_param_data`` (the padded flat shard).

Stage 3 on more than one rank also wraps each unit's ``post_backward`` (``UnusedGrads``:
a parameter with a gradient on some ranks only), using ``reduce_grads`` and ``fsdp_params``
per unit and, per parameter, ``unsharded_param`` (``_unsharded_param``),
``unsharded_accumulated_grad`` and ``sharded_param``, and each unit's ``pre_backward``
(``unit_calls.UnitCalls``: ranks that ran different units raise).

``check_fsdp2_internals`` raises ``NotImplementedError`` naming what is missing and the
installed torch version, instead of failing later inside a hook with an ``AttributeError``
from FSDP2's own code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.sharding.unit_calls import UnitCalls, unit_modules

__all__ = [
    "UNUSED_NEEDS", "UnusedGrads", "check_fsdp2_internals", "fsdp_groups",
    "handle_unused_grads", "unit_index",
]  # fmt: skip

#: (unit methods, unit attributes, parameter attributes) that a feature uses
Needs = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
#: the NVMe parameter swapper's (``param_swap``)
SWAP_NEEDS: Needs = (
    ("unshard", "wait_for_unshard", "lazy_init"),
    ("_all_gather_result", "is_unsharded", "fsdp_params"),
    ("sharded_param", "_sharded_param_data"),
)
#: ``UnusedGrads``'
UNUSED_NEEDS: Needs = (
    ("post_backward", "pre_backward"),
    ("reduce_grads", "fsdp_params"),
    ("sharded_param", "unsharded_accumulated_grad"),
)


def fsdp_groups(model: nn.Module) -> list[Any]:
    """Every ``FSDPParamGroup`` under ``model``, in ``model.modules()`` order (the same order
    on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    groups: list[Any] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            if id(group) not in seen:
                seen.add(id(group))
                groups.append(group)
    return groups


def unit_index(model: nn.Module) -> dict[int, int]:
    """``id(sharded parameter) -> index of its unit in fsdp_groups(model)``."""
    return {
        id(fp.sharded_param): i for i, g in enumerate(fsdp_groups(model)) for fp in g.fsdp_params
    }


def _missing(groups: list[Any], needs: Needs) -> list[str]:
    methods, attrs, param_attrs = needs
    out: list[str] = []
    for g in groups:
        kind = type(g).__name__
        out += [f"{kind}.{m}()" for m in methods if not callable(getattr(g, m, None))]
        out += [f"{kind}.{a}" for a in attrs if not hasattr(g, a)]
        for fp in getattr(g, "fsdp_params", None) or []:
            out += [f"{type(fp).__name__}.{a}" for a in param_attrs if not hasattr(fp, a)]
            local = getattr(getattr(fp, "sharded_param", None), "_local_tensor", None)
            if hasattr(fp, "sharded_param") and local is None:
                out.append(f"{type(fp).__name__}.sharded_param._local_tensor")
    return sorted(set(out))


def check_fsdp2_internals(
    groups: list[Any], what: str, needs: Needs = SWAP_NEEDS, instead: str = "stage 3 without it"
) -> None:
    """Raise ``NotImplementedError`` when ``groups`` is empty or lacks an internal of ``needs``
    (default: the swapper's; see the module docstring); ``what`` names the feature and
    ``instead`` what to use without it."""
    if not groups:
        raise NotImplementedError(
            f"{what}: found no FSDP2 units (torch {torch.__version__} may keep them elsewhere, "
            f"or the model was not wrapped with fully_shard); use {instead}"
        )
    missing = _missing(groups, needs)
    if missing:
        raise NotImplementedError(
            f"{what} relies on FSDP2 internals that torch {torch.__version__} does not have: "
            f"{', '.join(missing)}. It is tested with torch 2.13; install that version or use "
            f"{instead}"
        )


# -- parameters with a gradient on some ranks only ----------------------------------------
class UnusedGrads:
    """Makes FSDP2's gradient reduce-scatter agree across ranks when a trainable parameter got
    a gradient on some ranks only (an auxiliary head, an MoE expert, a branch some samples
    take), as stages 1/2 do.

    FSDP2 reduce-scatters only the parameters that have a gradient, so such a parameter made
    the ranks issue different collectives (gloo aborts, NCCL hangs or mixes bytes). Each unit's
    ``post_backward`` is wrapped (per instance): in a synchronizing backward every trainable
    parameter without a gradient on this rank gets a zero one first, so every rank reduces the
    same set and the average over ranks is the single-process one over the global batch. At
    the end of that backward (an autograd final callback) one all-reduce of a used flag per
    parameter finds those no rank used: their sharded gradient goes back to None (unless it
    held one from an earlier synchronizing backward), so the optimizer skips them and they do
    not move, as in one process.
    """

    def __init__(self, groups: list[Any], comm: Any) -> None:
        self.comm = comm
        self.params = [fp for g in groups for fp in g.fsdp_params]
        self.index = {id(fp): i for i, fp in enumerate(self.params)}
        self.used: torch.Tensor | None = None  # flags of the synchronizing backward running
        self.zeroed: list[Any] = []  # params given a zero gradient with no sharded one yet
        self.task = -1  # that backward's autograd graph task (-1: none)
        for group in groups:
            self._wrap(group)

    def _wrap(self, group: Any) -> None:
        post_backward = group.post_backward

        def hook(*args: Any) -> Any:
            pending = self._before_reduce(group)
            out = post_backward(*args)
            if pending:  # not inside a backward: no final callback, settle now
                self.finish()
            return out

        group.post_backward = hook

    def _before_reduce(self, group: Any) -> bool:
        """Zero gradients for this unit's unused trainable parameters; True when the caller
        must call ``finish`` itself (called outside a backward: no final callback to queue)."""
        if not group.reduce_grads:  # no_sync: FSDP2 accumulates locally, nothing to match
            return False
        task = torch._C._current_graph_task_id()
        pending = task == -1
        if self.used is None or task != self.task:  # (a backward that raised left its state)
            self.used, self.zeroed, self.task = torch.zeros(len(self.params)), [], task
            if not pending:
                torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        # After a no_sync backward FSDP2 holds the unit's gradients accumulated in its wider
        # reduce dtype; the unit reduces one dtype, so a parameter's gradient joins them there
        wide = any(getattr(fp, "unsharded_accumulated_grad", None) is not None
                   for fp in group.fsdp_params)  # fmt: skip
        for fp in group.fsdp_params:
            if not hasattr(fp, "_unsharded_param") or not fp.unsharded_param.requires_grad:
                continue
            param = fp.unsharded_param
            if fp.unsharded_accumulated_grad is not None or param.grad is not None:
                self.used[self.index[id(fp)]] = 1.0
                if wide and fp.unsharded_accumulated_grad is None:  # used in this one only
                    fp.unsharded_accumulated_grad = param.grad.to(fp.reduce_dtype)
                    param.grad = None
            else:
                if wide:
                    fp.unsharded_accumulated_grad = torch.zeros(
                        param.shape, dtype=fp.reduce_dtype, device=param.device
                    )
                else:
                    param.grad = torch.zeros_like(param)
                if fp.sharded_param.grad is None:
                    self.zeroed.append(fp)
        return pending

    def finish(self) -> None:
        """One all-reduce of the used flags; parameters no rank used lose their zero
        gradient again."""
        used, zeroed = self.used, self.zeroed
        self.used, self.zeroed, self.task = None, [], -1
        if used is None:
            return
        flags = self.comm.all_reduce_sum(
            used.to(self.comm.device()), what="the stage-3 used-gradient flags"
        ).tolist()
        for fp in zeroed:
            if flags[self.index[id(fp)]] == 0.0:
                fp.sharded_param.grad = None


def handle_unused_grads(model: nn.Module, comm: Any) -> UnusedGrads | None:
    """Install ``UnusedGrads`` on ``model``'s FSDP2 units (world size > 1 only: one rank
    cannot disagree with itself, and FSDP2 skips a parameter without a gradient)."""
    if comm.world <= 1:
        return None
    groups = fsdp_groups(model)
    check_fsdp2_internals(
        groups, "memopt.shard(stage=3) on several ranks", UNUSED_NEEDS, "stage 1 or 2"
    )
    UnitCalls(unit_modules(model, groups), groups, comm, always=comm.debug)
    return UnusedGrads(groups, comm)
