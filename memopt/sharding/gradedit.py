"""Stage 1 on more than one rank: gradients edited in place between backward and ``step()``.

``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` there sees each rank's own,
unreduced gradient: it scales every rank by a different factor (its local norm), and the step
then averages those, silently unlike DDP + torch's clip. memopt's
``sharded_opt.clip_grad_norm_`` is the global one. (At stage 2 torch's clip sees no gradient
at all, they were sent during backward, and nothing here can see that call.)

Detection: a post-accumulate-grad hook notes, after each backward, each gradient's tensor,
version counter and first element. At the reduction, a gradient whose version moved was edited
in place; the ratio of its first element now to then is the factor it was scaled by. A tensor
scaled by the same factor on every rank (``p.grad.div_(k)``, a per-layer scale, or a clip
whose factor is 1 everywhere, which then matches DDP) commutes with the average and is right;
factors that differ between ranks raise on every rank. (Only scalings are told apart: an edit
that leaves the first element alone, such as a clamp, passes unseen.) The per-parameter sums
(count, factor, factor squared) ride on the reducer's used-flag all-reduce (``reduce.extra``,
float64), so this adds no collective.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor


def watch(opt: Any) -> list[Any]:
    """The hooks (stage 1, more than one rank; none otherwise)."""
    if opt.config.stage != 1 or opt._plain or opt.comm.world == 1:
        return []
    opt._after_backward = {}
    ref = weakref.ref(opt)
    handles = []
    for p in opt.plans:
        if p.param.requires_grad:
            handles.append(p.param.register_post_accumulate_grad_hook(_hook(ref, p.index)))
    return handles


def _hook(ref: Any, index: int) -> Any:
    def hook(param: Tensor) -> None:
        opt, g = ref(), param.grad
        if opt is not None and g is not None and g.numel():
            first = g.detach().reshape(-1)[:1].clone()
            opt._after_backward[index] = (weakref.ref(g), g._version, first)

    return hook


def _local(opt: Any) -> Tensor | None:
    """[edited] + per parameter (count, factor, factor**2): its in-place scale on this rank
    (1: not edited; count 0: no gradient noted, or a zero first element)."""
    seen = getattr(opt, "_after_backward", None)
    if seen is None:
        return None
    out = torch.zeros(1 + 3 * len(opt.plans), dtype=torch.float64)
    at, olds, news = [], [], []
    for k, p in enumerate(opt.plans):
        g, rec = p.param.grad, seen.get(p.index)
        if g is None or rec is None or rec[0]() is not g:
            continue  # (no backward noted it: a gradient set by hand)
        if g._version == rec[1]:
            out[1 + 3 * k : 4 + 3 * k] = 1.0
        else:
            at.append(k)
            olds.append(rec[2].double())
            news.append(g.detach().reshape(-1)[:1].double())
    if at:  # (one device sync, only when something was edited)
        out[0] = 1.0
        old, new = torch.cat(olds).cpu(), torch.cat(news).cpu()
        for k, o, n in zip(at, old.tolist(), new.tolist(), strict=True):
            if o != 0.0:
                out[1 + 3 * k], out[2 + 3 * k], out[3 + 3 * k] = 1.0, n / o, (n / o) ** 2
    return out


def _uneven(opt: Any, got: Tensor) -> list[str]:
    """The parameters scaled by factors that differ between ranks (sums over the ranks)."""
    bad = []
    rows = got[1:].view(-1, 3).tolist()
    for p, (count, s1, s2) in zip(opt.plans, rows, strict=True):
        if count:
            mean = s1 / count
            spread = max(s2 / count - mean * mean, 0.0) ** 0.5
            if spread > 8 * torch.finfo(p.param.dtype).eps * abs(mean) + 1e-12:
                bad.append(opt.names.get(id(p.param), f"param {p.index}"))
    return bad


def finish(opt: Any) -> dict[int, Tensor]:
    """``reducer.finish()`` with the in-place edit check; raises on every rank together."""
    opt.reducer.extra = _local(opt)
    if getattr(opt, "_after_backward", None) is not None:
        opt._after_backward = {}
    grads: dict[int, Tensor] = opt.reducer.finish()
    got, opt.reducer.extra = opt.reducer.extra, None
    if got is None or got[0].item() == 0.0:
        return grads
    bad = _uneven(opt, got.cpu())
    if bad:
        opt.reducer.reset()
        where = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise RuntimeError(
            "memopt.shard (stage 1): gradients were changed in place between backward and "
            f"step() by a factor that differs between ranks ({where}), e.g. by "
            "torch.nn.utils.clip_grad_norm_(model.parameters(), ...), which sees only this "
            "rank's unreduced gradients and clips by a local norm. Use "
            "sharded_opt.clip_grad_norm_(max_norm) instead: the global norm over every "
            "rank, as DDP + torch's clip. Scaling a gradient by the same factor on every "
            "rank is fine (or scale the loss). Nothing was stepped: call "
            "sharded_opt.zero_grad() and go on"
        )
    return grads
