"""Stage 3: gradients FSDP2 still holds unreduced when the step (or ``zero_grad``) comes.

Inside ``no_sync()`` (FSDP2's ``set_requires_gradient_sync(False)``) each unit keeps its
*unsharded* gradient (``FSDPParam.unsharded_accumulated_grad`` or the unsharded parameter's
``.grad``) and reduce-scatters it only in the next synchronizing backward. Two loops left such
gradients behind with nothing reading them:

- the last backward before ``step()`` ran inside ``no_sync()`` (an uneven last window of an
  epoch, ``quiet = (i + 1) % N != 0``), or a ``no_sync()`` backward came after the step's
  synchronizing one: the step saw no (or only part of the) gradient, and the rest was added
  into the next step's;
- a batch skipped with ``zero_grad()`` mid-window: the kept gradients leaked into the next
  window, since ``zero_grad`` cleared only the sharded ``.grad``.

Stages 1/2 reduce whatever the parameters hold at ``step()`` and drop it in ``zero_grad()``;
this gives stage 3 the same behaviour. ``PendingGrads`` wraps each unit's ``post_backward``
(per instance, on top of ``UnusedGrads``) to note which units last ran a backward without
synchronizing. ``reduce`` (from ``step()`` and ``clip_grad_norm_``): when some unit did, the
ranks agree on the parameters holding unreduced gradients on any rank (one all-reduce of a flag per
parameter; none at all after a synchronizing backward), a parameter holding one on other
ranks only gets zeros here (in the dtype it accumulates in), and every rank runs those units'
own ``post_backward`` with ``reduce_grads`` on, which reduce-scatters them onto the sharded
gradients (adding to a gradient already there), as the synchronizing backward would have. A
parameter no rank holds one for is left alone (its sharded gradient unchanged).
``drop`` (from ``zero_grad()``) discards them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memopt.sharding.fsdp2_internals import check_fsdp2_internals, fsdp_groups

__all__ = ["PENDING_NEEDS", "PendingGrads"]

#: the FSDP2 internals used here (see ``fsdp2_internals``)
PENDING_NEEDS = (
    ("post_backward", "finalize_backward"),
    ("reduce_grads", "fsdp_params", "comm_ctx", "_training_state"),
    ("unsharded_accumulated_grad",),
)


def _zero_fill(fp: Any) -> None:
    """A zero gradient where ``fp`` would hold an unreduced one (a reduce dtype wider than the
    parameter's: ``unsharded_accumulated_grad``), so a unit reduces one dtype."""
    param = fp._unsharded_param
    wide = getattr(fp, "reduce_dtype", None)  # (set at FSDP2's lazy init)
    if wide is not None and wide != param.dtype:
        fp.unsharded_accumulated_grad = torch.zeros(param.shape, dtype=wide, device=param.device)
    else:
        param.grad = torch.zeros_like(param)


def _has_pending(fp: Any) -> bool:
    if getattr(fp, "unsharded_accumulated_grad", None) is not None:
        return True
    param = getattr(fp, "_unsharded_param", None)
    return param is not None and param.grad is not None


class PendingGrads:
    """Notes no_sync backwards per FSDP2 unit; reduces or drops what they left (see above)."""

    def __init__(self, model: nn.Module, comm: Any) -> None:
        self.comm = comm
        self.groups = fsdp_groups(model)
        check_fsdp2_internals(
            self.groups, "memopt.shard(stage=3) gradient accumulation", PENDING_NEEDS,
            "stage 1 or 2",
        )  # fmt: skip
        #: per unit: its last backward ran without synchronizing
        self.quiet = [False] * len(self.groups)
        for k, group in enumerate(self.groups):
            self._wrap(k, group)

    def _wrap(self, k: int, group: Any) -> None:
        post_backward = group.post_backward

        def hook(*args: Any) -> Any:
            self.quiet[k] = not group.reduce_grads
            return post_backward(*args)

        group.post_backward = hook

    def _params(self) -> list[Any]:
        return [fp for g in self.groups for fp in g.fsdp_params]

    def reduce(self) -> bool:
        """Reduce-scatter the gradients a ``no_sync()`` backward left (every rank together);
        True when there were some. Costs nothing unless some unit's last backward was a
        ``no_sync()`` one (the same on every rank: ranks run the same loop)."""
        if not any(self.quiet):
            return False
        self.quiet = [False] * len(self.groups)
        params = self._params()
        mine = [_has_pending(fp) for fp in params]
        if self.comm.world > 1:  # which parameters hold one on some rank (one all-reduce)
            flags = torch.tensor(mine, dtype=torch.float32, device=self.comm.device())
            self.comm.all_reduce_sum(flags, what="the stage-3 pending-gradient flags")
            anywhere = [f > 0 for f in flags.tolist()]
        else:
            anywhere = mine
        if not any(anywhere):
            return False
        for fp, here, there in zip(params, mine, anywhere, strict=True):
            if there and not here:  # zeros here, so every rank reduces the same tensors
                _zero_fill(fp)
        pending = {id(fp) for fp, there in zip(params, anywhere, strict=True) if there}
        done = [g for g in self.groups if any(id(fp) in pending for fp in g.fsdp_params)]
        self._reduce_units(done)
        return True

    def _reduce_units(self, done: list[Any]) -> None:
        """FSDP2's own ``post_backward`` (the class's: no zero-filling wrapper, done above in
        the dtype each parameter accumulates in) with ``reduce_grads`` on, per unit in
        backward order, then what FSDP2's end-of-backward callback does for them."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        for group in reversed(done):
            old = group.reduce_grads
            group.reduce_grads = True
            try:
                type(group).post_backward(group)
            finally:
                group.reduce_grads = old
                group._training_state = TrainingState.IDLE
        for group in done:
            group.finalize_backward()  # (waits for the reduce-scatters' events)
        states = done[0].comm_ctx.reduce_scatter_states
        for state in states:
            if state.event is not None:
                torch.accelerator.current_stream().wait_event(state.event)
        states.clear()

    def drop(self) -> None:
        """Discard the unreduced gradients (``zero_grad()``: a skipped batch)."""
        self.quiet = [False] * len(self.groups)
        for group in self.groups:
            for fp in group.fsdp_params:
                fp.unsharded_accumulated_grad = None
                param = getattr(fp, "_unsharded_param", None)
                if param is not None:
                    param.grad = None
