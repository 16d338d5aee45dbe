"""Plain AdamW for the parameters that are not projected (norms, biases, embeddings...).

All of them go through torch's fused AdamW kernel (``torch._fused_adamw_``) in one call
per (device, dtype, state dtype, step) bucket, instead of a Python loop of seven
elementwise ops per parameter: on a small model, that loop, not the arithmetic, is most
of the step time.

Both eps placements map onto the one kernel (see ``_functional``). torch's form is the
kernel's; galore-torch's form ``m / (sqrt(v) + eps)`` with step ``lr sqrt(bc2) / bc1``
equals the kernel's ``m / (sqrt(v) / sqrt(bc2) + eps')`` with step ``lr / bc1`` when
``eps' = eps / sqrt(bc2)``. galore-torch decays the weight after the update, so for that
form the kernel runs without decay and the decay follows as one ``_foreach_mul_``.

Devices without the fused kernel, ``correct_bias=False``, and tensors the kernel would
misread (``_fusable``: a non-dense parameter, a gradient or moment in another layout) use the
reference arithmetic in ``_functional``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from memopt._utils.native import mark_written
from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim.kernels import lowbit_adam

FUSED_DEVICES = ("cpu", "cuda")


def adamw_many(
    params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any], eps_mode: F.EpsMode
) -> None:
    """One AdamW step for ``params`` (all with ``.grad``), state in ``states``.

    Plain moments are batched into one fused call per bucket. Quantized moments go one
    parameter at a time, so only one parameter's fp32 working copies exist at once.
    """
    for p, st in zip(params, states, strict=True):  # before anything changes
        why = moments.mismatch(st, tuple(p.shape))
        if why is not None:
            raise ValueError(f"optimizer state does not fit its parameter: {why}")
    buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, (p, st) in enumerate(zip(params, states, strict=True)):
        st["step"] += 1
        t = st["step"] - st.get("moments_since", 0)
        if moments.lowbit_kind(group, p.numel()) is not None:
            if lowbit_adam.adamw_lowbit_step_(p, st, group, eps_mode, t):
                continue
            m, v = moments.load(st, p, group)
            work = {"exp_avg": m, "exp_avg_sq": v}
            _run([p], [work], group, eps_mode, t)
            moments.store(st, m, v, group)
            del m, v, work  # (else alive while the next parameter dequantizes: a 2nd copy)
            continue
        m, _ = moments.load(st, p, group)
        buckets[(p.device, p.dtype, m.dtype, t)].append(i)
    for (_, _, _, t), idx in buckets.items():
        _run([params[i] for i in idx], [states[i] for i in idx], group, eps_mode, t)


def _run(
    params: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    eps_mode: F.EpsMode,
    t: int,
) -> None:
    fused = params[0].device.type in FUSED_DEVICES and group.get("correct_bias", True)
    if fused:
        ok = [_fusable(p, st) for p, st in zip(params, states, strict=True)]
        if all(ok):
            _fused(params, states, group, eps_mode, t)
            return
        fast = [i for i, good in enumerate(ok) if good]
        if fast:
            _fused([params[i] for i in fast], [states[i] for i in fast], group, eps_mode, t)
        odd = [i for i, good in enumerate(ok) if not good]
        params, states = [params[i] for i in odd], [states[i] for i in odd]
    for p, st in zip(params, states, strict=True):
        _reference(p, st, group, eps_mode, t)


def _fusable(p: Tensor, st: dict[str, Any]) -> bool:
    """Whether torch's fused kernel reads ``p``, its gradient and moments right: it walks
    each tensor's storage linearly, as if every one had ``p``'s layout. A strided view
    parameter (``base[:, ::2]``: it would also write the columns between), or a gradient or
    moment laid out otherwise (a hand-set transposed or expanded gradient, state loaded
    from a parameter of another layout) takes the elementwise path instead."""
    assert p.grad is not None
    stride = p.stride()
    return (
        _dense(p)
        and p.grad.stride() == stride
        and st["exp_avg"].stride() == stride
        and st["exp_avg_sq"].stride() == stride
    )


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span exactly once (any dim order): the
    strides of its non-singleton dims, sorted, are running products of their sizes."""
    expected = 1
    dims = [(st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1]
    for stride, size in sorted(dims):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused(
    params: list[Tensor],
    states: list[dict[str, Any]],
    group: dict[str, Any],
    eps_mode: F.EpsMode,
    t: int,
) -> None:
    b1, b2 = group["betas"]
    lr, wd, eps = group["lr"], group.get("weight_decay", 0.0), group["eps"]
    mixed = states[0]["exp_avg"].dtype != params[0].dtype
    weights = [p.float() for p in params] if mixed else list(params)
    grads = [_as(p.grad, w.dtype) for p, w in zip(params, weights, strict=True)]
    kernel_lr, kernel_wd, decay_after = lr, wd, False
    if eps_mode == "galore":
        eps = eps / math.sqrt(1.0 - b2**t)
        kernel_lr, kernel_wd, decay_after = _galore_decay(lr, wd, weights[0])
    # The kernel only reads the step counts: one device tensor (a fill, no host-to-device
    # copy that would synchronise a GPU) serves every parameter of the bucket.
    steps = [torch.full((), float(t), device=params[0].device)] * len(params)
    torch._fused_adamw_(
        weights,
        grads,
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [],
        steps,
        lr=kernel_lr,
        beta1=b1,
        beta2=b2,
        weight_decay=kernel_wd,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    # torch's fused kernel leaves the version counters alone (torch.optim.AdamW(fused=True)
    # too): bump them, so a step between forward and backward is caught like any in-place op
    mark_written(*weights, *(st["exp_avg"] for st in states), *(st["exp_avg_sq"] for st in states))
    if decay_after:
        torch._foreach_mul_(weights, 1.0 - lr * wd)
    if mixed:
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)


def _galore_decay(lr: float, wd: float, w: Tensor) -> tuple[float, float, bool]:
    """(kernel lr, kernel weight decay, decay after the kernel) for galore's form
    ``W <- (1 - lr wd) (W - s d)``. fp32 weights: the kernel without decay, then one multiply
    (galore-torch's arithmetic). bf16 / fp16 weights: that multiply would round back to W
    whenever lr wd is below half an ulp, so the decay goes into the kernel's one rounding
    instead: with lr' = lr (1 - lr wd) and wd' = wd / (1 - lr wd) the kernel's
    ``W (1 - lr' wd') - lr' d'`` is ``(1 - lr wd) W - (1 - lr wd) s d``, the same form."""
    if not wd:
        return lr, 0.0, False
    if not F.is_half(w):
        return lr, 0.0, True
    keep = 1.0 - float(lr) * wd
    if keep <= 0.0:  # (lr wd >= 1: the multiply is exact there, W goes to 0 or flips sign)
        return lr, 0.0, True
    return lr * keep, wd / keep, False


def _as(g: Tensor | None, dtype: torch.dtype) -> Tensor:
    assert g is not None
    return g if g.dtype == dtype else g.to(dtype)


def _reference(
    p: Tensor, st: dict[str, Any], group: dict[str, Any], eps_mode: F.EpsMode, t: int
) -> None:
    assert p.grad is not None
    g = p.grad.to(st["exp_avg"].dtype)
    wd = group["lr"] * group.get("weight_decay", 0.0)
    # low-precision weights: fp32 arithmetic, rounded once (a decay below half an ulp
    # multiplied on its own would round back to W)
    w = p if p.dtype == g.dtype and not (wd and F.is_half(p)) else p.float()
    b1, b2 = group["betas"]
    F.adam_moments_(st["exp_avg"], st["exp_avg_sq"], g, b1, b2)
    d, step_size = F.adam_direction(
        st["exp_avg"],
        st["exp_avg_sq"],
        step=t,
        beta1=b1,
        beta2=b2,
        eps=group["eps"],
        lr=group["lr"],
        eps_mode=eps_mode,
        correct_bias=group.get("correct_bias", True),
    )
    if eps_mode == "torch" and wd:
        w.mul_(1.0 - wd)
    w.add_(d.to(w.dtype), alpha=-step_size)
    if eps_mode == "galore" and wd:
        w.mul_(1.0 - wd)
    if w is not p:
        p.copy_(w)
