"""Gradient bookkeeping of ``ShardedOptimizer`` between steps (stages 1/2).

- ``zero_grad``: with ``set_to_none=False`` a parameter that had a gradient keeps a zero one,
  as in one process, although stages 1/2 freed its ``.grad`` when it was sent (the reducer's
  ``zeroed`` set; see ``reduce``).
- A backward after this step's gradients were synchronized (``clip_grad_norm_`` finishes the
  sync) but before ``step()`` / ``zero_grad()``: the usual "bad batch, ``model.zero_grad()``,
  continue" loop. ``model.zero_grad()`` does not reach the reduced copies the optimizer holds,
  so the next step used that stale gradient (stage 1) or refused the new backward (stage 2).
  Such a backward now starts a new step's reduction (``restart``): the stale copies are
  dropped, as ``sharded_opt.zero_grad()`` would. If a parameter still holds the synchronized
  gradient (nothing zeroed it, so the new backward would add onto it), every rank raises.
  Whether such a backward ran is agreed by all ranks in ``resync`` (one flag all-reduce when
  ``finish_grad_sync`` runs again, i.e. in ``step()`` after a clip): a rank whose backward
  reached no parameter has no local sign of it. At stage 2 the first hook of the new backward
  drops the stale copies and packs without sending (``reducer.hold``) until that agreement.
- Not covered: at stage 2 without a clip, ``model.zero_grad()`` between two backwards looks
  exactly like accumulating outside ``no_sync`` (stage 2 freed every ``.grad``; the module's
  ``zero_grad`` has nothing to clear), so the second backward raises "arrived twice".
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor


def zero_grad(opt: Any, set_to_none: bool) -> None:
    opt._drain()
    reducer = getattr(opt, "reducer", None)  # (stage 3's FSDPOptimizer has none)
    if reducer is not None:
        reducer.note_zero_grad(
            set_to_none, {p.index for p in opt.plans if p.param.grad is not None}
        )
    for p in opt.plans:
        if set_to_none or p.param.grad is None:
            p.param.grad = None
        else:
            p.param.grad.zero_()
    opt._release()


def plain_grads(opt: Any) -> dict[int, Tensor]:
    """World size 1: the gradients where autograd put them; zeros for ``zeroed`` ones."""
    out: dict[int, Tensor] = {}
    zeroed = opt.reducer.zeroed
    for p in opt.plans:
        shape = opt.locals[p.index].shape
        if p.param.grad is not None:
            out[p.index] = p.param.grad.view(shape)
        elif p.index in zeroed and p.param.requires_grad:
            out[p.index] = torch.zeros(shape, dtype=p.param.dtype, device=p.param.device)
    opt.reducer.last_grads = set(out)
    return out


def note_grads(opt: Any) -> None:
    """After a finished sync (and after clipping): the gradient each parameter holds now."""
    opt._noted = {
        p.index: (weakref.ref(g), g._version) for p in opt.plans if (g := p.param.grad) is not None
    }


def _noted(opt: Any, index: int, g: Tensor) -> tuple[bool, bool]:
    """(is it the tensor noted at the sync, was it changed since)."""
    seen = getattr(opt, "_noted", {}).get(index)
    if seen is None or seen[0]() is not g:
        return False, False
    return True, seen[1] != g._version


def new_backward(opt: Any) -> bool:
    """Stage 1 / world size 1, sync already finished: did a backward run since? A fresh
    ``.grad`` says so, or (ranks only) one that grew in place: every rank must agree, and a
    rank stepping only its own parameters in place sees no fresh one. At world size 1 a
    backward onto the clipped gradients adds to them, as in one process: nothing to redo."""
    for p in opt.plans:
        if (g := p.param.grad) is not None:
            same, changed = _noted(opt, p.index, g)
            if not same or (changed and not opt._plain):
                return True
    return False


def _stale(opt: Any) -> list[str]:
    """The parameters whose ``.grad`` is still the synchronized one (a backward adds onto it)."""
    return [
        opt.names.get(id(p.param), f"param {p.index}")
        for p in opt.plans
        if p.param.grad is not None and _noted(opt, p.index, p.param.grad)[0]
    ]


def _drop_stale(opt: Any) -> None:
    """Drop the reduced copies of the finished sync (the parameter itself keeps its grad)."""
    opt.reducer.wait_all()
    params = {p.index: p.param for p in opt.plans}
    for index, local in opt.locals.items():
        if local is not params[index]:  # (the parameter itself: its new gradient stays)
            local.grad = None
    opt.reducer.reset()


def resync(opt: Any) -> bool:
    """Sync already finished (``finish_grad_sync`` again, e.g. ``step()`` after the clip): did a
    backward run since on any rank? Every rank reaches this, so they agree here (one flag
    all-reduce) and restart together: a rank whose new backward touched no parameter sees
    nothing locally, and deciding alone left the others waiting in the restart (a hang)."""
    mine = opt.reducer.hold or new_backward(opt)
    if opt.comm.world > 1:
        again = bool(opt.comm.flagged_ranks(mine, what="the new-backward check"))
    else:
        again = mine
    if again:
        restart(opt)
    return again


def restart(opt: Any) -> None:
    """Drop the finished sync so that the new backward's gradients make a new step (every
    rank, from ``resync``)."""
    held = opt._stale_held if opt.reducer.hold else _stale(opt)
    if opt.comm.world > 1:
        bad = opt.comm.flagged_ranks(bool(held), what="the stale-gradient check")
    else:
        bad = [opt.comm.rank] if held else []
    if bad:
        where = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "") if held else None
        raise RuntimeError(
            "memopt.shard: a backward ran after this step's gradients were synchronized "
            "(clip_grad_norm_ finishes the sync) but before step() or zero_grad(), and "
            f"{where or f'a parameter of rank {bad[0]}'} still holds the synchronized "
            "gradient, so the new one would be added onto it. To skip a batch, call "
            "sharded_opt.zero_grad() (model.zero_grad() does not drop the optimizer's reduced "
            "copies); to accumulate micro-batches, run every backward but the last inside "
            "`with sharded_opt.no_sync():` and clip after the last"
        )
    if opt.reducer.hold:  # (stage 2: dropped in the first hook; the new gradients are packed)
        opt.reducer.hold = False
    else:
        _drop_stale(opt)
    opt.reducer.zeroed.clear()  # (model.zero_grad() dropped them: set_to_none=True)
    opt._synced = False
    opt._noted = {}


def on_grad(opt: Any, plan: Any) -> None:
    """Stage 2 hook body: a gradient is final. After a finished sync the first one starts a
    new step on this rank only: the stale copies are dropped and the new gradients packed but
    not sent (``reducer.hold``) until every rank agrees in ``resync``, so that all issue the
    same collectives even where a rank's backward reaches no parameter."""
    if opt._synced and not opt.reducer.hold:
        opt._stale_held = _stale(opt)
        _drop_stale(opt)
        opt.reducer.hold = True
    opt.reducer.on_grad(plan, opt.names.get(id(plan.param), f"param {plan.index}"))
