"""Gradient reduction and parameter gathering over the buckets of ``plan``.

Gradient reduction (``GradReducer``), per optimizer step:

1. each parameter's gradient is copied into its bucket's buffer as soon as it is final (stage
   2: from a post-accumulate-grad hook during backward; stage 1: all at once at the first
   ``finish()``), and ``param.grad`` is freed right away: the data now lives in the bucket;
2. a bucket whose parameters have all arrived is launched, strictly in bucket index order, so
   every rank issues the same sequence of collectives: a row bucket with one
   ``reduce_scatter_tensor`` (each rank receives the sum of its rows), a whole bucket with one
   ``reduce`` per owner span (the owner receives the sum of its tensors). All are async
   (``async_op=True``) and overlap the rest of backward;
3. ``finish()`` packs what never arrived (a parameter unused this step contributes zeros),
   launches the rest, waits, divides by the world size and returns each rank's gradient
   views, keyed by parameter index. A parameter that got no gradient on any rank (one
   all-reduce of a flag per parameter says which) is left out, so the optimizer skips it as
   it would in one process, instead of stepping its moments on a zero gradient. A parameter
   whose gradient ``zero_grad(set_to_none=False)`` zeroed (``zeroed``: it had one since the
   last ``set_to_none=True``) counts as used with a zero gradient, as its zero ``.grad``
   would in one process. Gradients a ``no_sync()`` backward added after this step's
   synchronizing one (parameters already sent) are reduced in a second round (``finish``).

Parameter gathering (``gather_params``), after the step: a row bucket all-gathers every
rank's updated rows (``all_gather_into_tensor``, rank-major, in the parameter dtype), a whole
bucket broadcasts each owner's span; the results are copied into the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from memopt.sharding.comm import Comm
from memopt.sharding.plan import Bucket, ParamPlan


class GradReducer:
    """Per-step state of the bucketed gradient reduction (see the module docstring)."""

    def __init__(
        self,
        comm: Comm,
        buckets: list[Bucket],
        device: torch.device,
        names: dict[int, str] | None = None,
    ) -> None:
        self.comm = comm
        self.names = names or {}
        self.buckets = buckets
        self.device = device
        self.bucket_of = {p.index: b for b in buckets for p in b.plans}
        #: parameters zeroed, not dropped, by zero_grad(set_to_none=False): stepped on zeros
        self.zeroed: set[int] = set()
        #: parameters that had a gradient on some rank at the last finish()
        self.last_grads: set[int] = set()
        self.reset()

    def reset(self) -> None:
        self.bufs: dict[int, Tensor] = {}
        self.outs: dict[int, Tensor] = {}
        self.works: list[Any] = []
        self.packed: set[int] = set()
        self.used: set[int] = set()  # parameters that had a gradient on this rank
        self.arrived = [0] * len(self.buckets)
        self.next_launch = 0
        #: stage 2 after a finished sync: pack but do not send until the ranks agree (regrad)
        self.hold = False
        #: extra values summed over the ranks with the used flags (regrad's in-place check)
        self.extra: Tensor | None = None

    def note_zero_grad(self, set_to_none: bool, holding: set[int]) -> None:
        """``zero_grad``: with ``set_to_none=False`` the parameters that had a gradient (at
        the last ``finish()``, or ``holding`` one now) keep a zero one from here on."""
        if set_to_none:
            self.zeroed.clear()
        else:
            self.zeroed |= self.last_grads | holding
        self.last_grads = set()

    def wait_all(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []

    # -- packing ---------------------------------------------------------------------
    def _buf(self, b: Bucket) -> Tensor:
        buf = self.bufs.get(b.index)
        if buf is None:
            n = b.numel * self.comm.world if b.rows else b.numel
            buf = self.bufs[b.index] = torch.zeros(n, dtype=b.dtype, device=self.device)
        return buf

    def _pack(self, p: ParamPlan) -> None:
        b = self.bucket_of[p.index]
        buf = self._buf(b)
        g = p.param.grad
        if g is not None:
            if b.rows:
                g2 = g.reshape(p.rows, p.cols)
                for r in range(self.comm.world):
                    s, e = p.row_range(r)
                    at = r * b.numel + p.offset
                    buf[at : at + (e - s) * p.cols].view(e - s, p.cols).copy_(g2[s:e])
            else:
                buf[p.offset : p.offset + p.seg_numel].copy_(g.reshape(-1))
            p.param.grad = None  # sent: the bucket holds it now
            self.used.add(p.index)
        self.packed.add(p.index)
        self.arrived[b.index] += 1

    def on_grad(self, p: ParamPlan, label: str) -> None:
        """A parameter's gradient is final for this backward (stage 2 hook)."""
        if p.index in self.packed:
            raise RuntimeError(
                f"memopt.shard (stage 2): the gradient of {label} arrived twice before step(): "
                "either micro-batches were accumulated outside `with sharded_opt.no_sync():` "
                "(let only the last backward synchronize), or a module is used twice under "
                "reentrant activation checkpointing (torch.utils.checkpoint(..., "
                "use_reentrant=True) runs one backward per use; use use_reentrant=False), or a "
                "batch was skipped with model.zero_grad(), which does not drop the gradients "
                "already sent (call sharded_opt.zero_grad() to skip a batch)"
            )
        self._pack(p)
        self._launch_ready()

    # -- launching -------------------------------------------------------------------
    def _launch_ready(self) -> None:
        while not self.hold and self.next_launch < len(self.buckets):
            b = self.buckets[self.next_launch]
            if self.arrived[b.index] < len(b.plans):
                return
            self._launch(b)
            self.next_launch += 1

    def _launch(self, b: Bucket) -> None:
        buf = self._buf(b)
        if b.rows:
            out = buf.new_empty(b.numel)
            what = bucket_label("gradient", b, self.names)
            self.works.append(self.comm.reduce_scatter(out, buf, what=what))
            self.outs[b.index] = out
            del self.bufs[b.index]  # the send buffer is freed once the work completes
            self.works.append(_Keep(buf))
        else:
            what = bucket_label("gradient", b, self.names)
            for owner, s, e in b.owner_spans():
                self.works.append(self.comm.reduce(buf[s:e], owner, what=what))
            self.outs[b.index] = buf

    def finish(self) -> dict[int, Tensor]:
        """Launch what is left, wait, and return this rank's averaged gradient views.

        A backward inside ``no_sync()`` *after* this step's synchronizing one (stage 2) refills
        the ``.grad`` of parameters already sent. Those are reduced in a second round, added to
        the first (stage 1 reduces the sum at once): the ranks agree on it with a flag riding
        on the used-flag all-reduce, so the usual step costs nothing more."""
        late = any(p.param.grad is not None for b in self.buckets for p in b.plans
                   if p.index in self.packed)  # fmt: skip
        grads, again = self._finish_round(late)
        if again:
            extra, last = self.extra, self.last_grads  # (the first round's: gradedit reads it)
            self.reset()
            more, _ = self._finish_round(False)
            for index, g in more.items():
                grads[index] = grads[index].add_(g) if index in grads else g
            self.extra, self.last_grads = extra, last | self.last_grads
        return grads

    def _finish_round(self, late: bool) -> tuple[dict[int, Tensor], bool]:
        for b in self.buckets:
            for p in b.plans:
                if p.index not in self.packed:
                    self._pack(p)
        self._launch_ready()
        assert self.next_launch == len(self.buckets)
        self.wait_all()
        unused, again = self._unused_everywhere(late)
        self.last_grads = {p.index for b in self.buckets for p in b.plans} - unused
        world, me = self.comm.world, self.comm.rank
        grads: dict[int, Tensor] = {}
        for b in self.buckets:
            out = self.outs[b.index]
            for p in b.plans:
                if (p.owner is not None and p.owner != me) or p.index in unused:
                    continue
                s, e = p.row_range(me)
                g = out[p.offset : p.offset + (e - s) * p.cols].div_(world)
                grads[p.index] = g.view(e - s, *p.param.shape[1:]) if p.param.dim() else g.view(())
        self.bufs.clear()
        self.outs.clear()
        return grads, again

    def _unused_everywhere(self, late: bool = False) -> tuple[set[int], bool]:
        """The parameters no rank had a gradient for (one all-reduce of a flag each), and
        whether some rank holds ``late`` gradients (one more flag, see ``finish``)."""
        plans = [p for b in self.buckets for p in b.plans]
        flags = torch.zeros(len(plans) + 1, dtype=torch.float32, device=self.device)
        for i, p in enumerate(plans):
            if p.index in self.used or p.index in self.zeroed:
                flags[i] = 1.0
        flags[-1] = float(late)
        if self.extra is not None:  # (rides on this all-reduce: no collective of its own)
            wide = torch.float32 if self.device.type == "mps" else torch.float64
            flags = torch.cat([flags.to(wide), self.extra.to(flags.device, wide)])
        self.comm.all_reduce_sum(flags, what="the used-gradient flags")
        if self.extra is not None:
            self.extra = flags[len(plans) + 1 :].clone()
            flags = flags[: len(plans) + 1]
        got = flags.tolist()
        return {p.index for p, f in zip(plans, got, strict=False) if f == 0.0}, got[-1] > 0


class _Keep:
    """Holds a send buffer alive until the collectives before it have been waited on."""

    def __init__(self, t: Tensor) -> None:
        self.t: Tensor | None = t

    def wait(self) -> bool:
        self.t = None
        return True


def gather_params(
    comm: Comm,
    buckets: list[Bucket],
    locals_: dict[int, Tensor],
    in_place: set[int],
    names: dict[int, str] | None = None,
) -> None:
    """Copy every rank's updated part into the model's parameters (see the docstring).

    ``locals_`` maps parameter index to this rank's updated tensor; indices in ``in_place``
    are views of the parameter itself (nothing to copy back on this rank).
    """
    world, me = comm.world, comm.rank
    pending: list[tuple[Bucket, Tensor, list[Any]]] = []
    for b in buckets:
        device = b.plans[0].param.device
        if b.rows:
            send = torch.empty(b.numel, dtype=b.dtype, device=device)
            for p in b.plans:
                n = p.local_numel(me)
                send[p.offset : p.offset + n].copy_(locals_[p.index].reshape(-1))
            recv = torch.empty(b.numel * world, dtype=b.dtype, device=device)
            what = bucket_label("parameter", b, names or {})
            pending.append((b, recv, [comm.all_gather(recv, send, what=what)]))
        else:
            buf = torch.empty(b.numel, dtype=b.dtype, device=device)
            for p in b.plans:
                if p.owner == me:
                    buf[p.offset : p.offset + p.seg_numel].copy_(locals_[p.index].reshape(-1))
            what = bucket_label("parameter", b, names or {})
            works = [comm.broadcast(buf[s:e], o, what=what) for o, s, e in b.owner_spans()]
            pending.append((b, buf, works))
    for b, data, works in pending:
        for w in works:
            w.wait()
        for p in b.plans:
            _unpack(p, b, data, me, world, p.index in in_place)


def bucket_label(kind: str, b: Bucket, names: dict[int, str]) -> Callable[[], str]:
    """A lazy label for debug mode: which bucket and which parameters (by model name)."""

    def label() -> str:
        got = [names.get(id(p.param), f"param #{p.index}") for p in b.plans]
        more = f", ... ({len(got)} in all)" if len(got) > 4 else ""
        layout = "row" if b.rows else "whole-tensor"
        return f"{kind} {layout} bucket {b.index} [{', '.join(got[:4])}{more}]"

    return label


def _unpack(p: ParamPlan, b: Bucket, data: Tensor, me: int, world: int, in_place: bool) -> None:
    with torch.no_grad():
        if not b.rows:
            if not (p.owner == me and in_place):
                p.param.view(-1).copy_(data[p.offset : p.offset + p.seg_numel])
            return
        full = p.param.view(p.rows, p.cols)
        for r in range(world):
            if r == me and in_place:
                continue
            s, e = p.row_range(r)
            at = r * b.numel + p.offset
            full[s:e].copy_(data[at : at + (e - s) * p.cols].view(e - s, p.cols))
