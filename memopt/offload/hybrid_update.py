"""The hybrid update wired into the offload pipeline: each group on the CPU or on the device.

``OffloadedAdamState`` hands every group of the step to ``HybridUpdate``, which asks its
``HybridScheduler`` (``hybrid.py``: the cost model over measured rates) where that group runs:

- ``"cpu"``: the pipeline's own path (gradients to the host, the native ``cpu_adamw_step_`` on
  the staging views, the updated master copied into the parameter); the pipeline times it and
  reports ``cpu`` (parameters/s) and, for a parameter on an accelerator, the gradient copy
  (``d2h``) here;
- ``"device"``: ``device_step`` below copies the group's fp32 master and moments from the host
  views to the parameters' device (``h2d``), runs torch's fused AdamW kernel there
  (``torch._fused_adamw_``, the same arithmetic as ``eps_mode="torch"``), copies master and
  moments back into the views (``d2h``: the pipeline then writes them to the tier as usual),
  and writes the master into the parameter on the device.

The device path runs synchronously: its copies and kernel finish before the next group
starts, so the CPU and the device do not work at once, and the scheduler is told so
(``overlap=False``: a step costs the sum of the loads, and every group goes to the path that
is cheaper per parameter). Overlapping them (device groups on a side stream while the CPU
updates the next group, their write-back deferred by one group) is the next step; it needs a
GPU to test. Each phase is timed (synchronizing the device first, so the time is the copy's or
kernel's, not the launch's) and observed by the scheduler, so the next step's placement follows the
rates of this machine and run; a new set of group sizes (a parameter gained or lost its
gradient) starts a new scheduler. With parameters on the CPU, "device" is the CPU too: the
choice is then between the native kernel and torch's fused one, measured the same way (this
is how the wiring is tested without a GPU). Groups whose ``eps_mode`` is not torch's always run
on the CPU path (the fused kernel has only torch's epsilon placement).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from memopt.offload.hybrid import ByteCosts, HybridPlan, HybridScheduler, Rates, Where

__all__ = ["HybridUpdate"]

# one group's work: (views, grads, params) per hyperparameter batch, all in fp32 views
Triple = tuple[Tensor, Tensor, Tensor]


class HybridUpdate:
    """Chooses CPU or device per pipeline group, runs the device path, feeds the timings."""

    def __init__(self, prior: Rates | None = None, hysteresis: float = 0.05) -> None:
        self.prior, self.hysteresis = prior, hysteresis
        self.scheduler: HybridScheduler | None = None
        self.plan: HybridPlan | None = None
        self.placements: list[tuple[Where, ...]] = []  # one per step (for reports and tests)

    def begin_step(self, sizes: Sequence[int], costs: ByteCosts) -> None:
        """Plan this step's placement for groups of ``sizes`` parameters."""
        sizes = [max(1, int(n)) for n in sizes]
        if not sizes:
            self.plan = None
            return
        if self.scheduler is None or self.scheduler.sizes != sizes:
            rates = self.scheduler.rates if self.scheduler is not None else self.prior
            self.scheduler = HybridScheduler(
                sizes, costs=costs, prior=rates, hysteresis=self.hysteresis, overlap=False
            )
        self.plan = self.scheduler.plan()
        self.placements.append(self.plan.placement)

    def where(self, i: int) -> Where:
        return "cpu" if self.plan is None else self.plan.placement[i]

    def observe(self, resource: str, amount: float, seconds: float) -> None:
        if self.scheduler is not None:
            self.scheduler.observe(resource, amount, seconds)  # type: ignore[arg-type]

    def device_step(self, hyper: object, triples: list[Triple], device: torch.device) -> None:
        """One hyperparameter batch of a group, updated on ``device`` (see module docstring)."""
        n = sum(g.numel() for _, g, _ in triples)
        t0 = _now(device)
        ms, ems, vs = [], [], []
        for view, g, _ in triples:
            k = g.numel()
            ms.append(view[:k].to(device, non_blocking=True))
            ems.append(view[k : 2 * k].to(device, non_blocking=True))
            vs.append(view[2 * k : 3 * k].to(device, non_blocking=True))
        grads = [g.to(device, torch.float32, non_blocking=True) for _, g, _ in triples]
        t1 = _now(device)
        self.observe("h2d", 12 * n, t1 - t0)
        step = torch.tensor(float(hyper.step), device=device)  # type: ignore[attr-defined]
        torch._fused_adamw_(
            ms, grads, ems, vs, [], [step] * len(ms), lr=hyper.lr,  # type: ignore[attr-defined]
            beta1=hyper.beta1, beta2=hyper.beta2,  # type: ignore[attr-defined]
            weight_decay=hyper.weight_decay, eps=hyper.eps,  # type: ignore[attr-defined]
            amsgrad=False, maximize=False,
        )  # fmt: skip
        for (_, _, param), master in zip(triples, ms, strict=True):
            param.copy_(master)
        t2 = _now(device)
        self.observe("device", n, t2 - t1)
        for (view, g, _), m, em, v in zip(triples, ms, ems, vs, strict=True):
            k = g.numel()
            view[:k].copy_(m, non_blocking=True)
            view[k : 2 * k].copy_(em, non_blocking=True)
            view[2 * k : 3 * k].copy_(v, non_blocking=True)
        self.observe("d2h", 12 * n, _now(device) - t2)


def _now(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
