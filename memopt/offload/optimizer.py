"""``OffloadedAdamW``: AdamW whose fp32 master weights and moments live on a storage tier.

A ``torch.optim.Optimizer`` (so LR schedulers, ``zero_grad`` and hooks behave as usual) that
only keeps groups and a per-parameter step count; the tensors of its state are on a tier
(``OffloadConfig``: pinned CPU or NVMe), stepped by ``OffloadedAdamState`` (``pipeline``:
groups of ``bucket_bytes`` streamed through three staging buffers, the native CPU AdamW
kernel, the updated master copied back into the parameter, bf16/fp16 included).

The update is torch.optim.AdamW's (``eps_mode="torch"``). A parameter's state is created at
its first step with a gradient: the master is the parameter upcast to fp32, the moments zeros.
``state_dict()`` reads every tensor back from the tier and returns torch AdamW's layout
(``step``, ``exp_avg``, ``exp_avg_sq``) plus ``master`` (fp32); ``load_state_dict`` checks the
whole dict, then replaces the whole state with it (no cast to the parameter's dtype: the
moments stay fp32). A parameter written since its last step or load (a clamp, the model's
weights loaded) has its master rebuilt from it before the update (``adamw_checks``), so the
parameter, as in torch, is what the step starts from. Non-contiguous (channels_last)
parameters are stepped through a contiguous copy, written back.

Lifetime: ``close()`` frees everything; dropped without it, finalizers free the same (the
tier's blocks, the staging ring). Copies and pickles are refused (use ``state_dict``). A new
parameter's state is made all or nothing, before any step counter moves, so a Ctrl-C in a
first step leaves nothing half made.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from memopt._utils.wrapped_optim import (
    closure_loss,
    hooks_paused,
    load_with_hooks,
    state_dict_with_hooks,
)
from memopt.offload.adamw_checks import (
    MASTER,
    check_adam_group,
    checked_load,
    label,
    signature,
)
from memopt.offload.arena import ArenaConfig, PinnedArena, default_arena
from memopt.offload.cpu_adam import selected_isa
from memopt.offload.hybrid_update import HybridUpdate
from memopt.offload.nvme_file import NVMeConfig
from memopt.offload.nvme_tier import NVMeTier
from memopt.offload.pinned_tier import PinnedCPUTier
from memopt.offload.pipeline import AdamHyper, OffloadedAdamState, StepItem
from memopt.offload.tier import StorageTier, once_fixed

__all__ = ["OffloadConfig", "OffloadedAdamW", "check_adam_group"]

OffloadDevice = Literal["cpu", "nvme"]


@dataclass(frozen=True)
class OffloadConfig:
    """Where the optimizer state (fp32 master + moments) lives, and how it is streamed.

    device: "cpu" (the pinned host arena; the update runs in place there) or "nvme" (one
        O_DIRECT file per rank under ``nvme_path``, streamed through the pipeline).
    nvme_path: the directory of the NVMe swap file (required for "nvme").
    pin_memory: pin (page-lock) host memory: the CPU tier's state and the staging buffers.
    bucket_bytes: state bytes per pipeline group (three staging buffers of this size for NVMe).
    nvme: full ``NVMeConfig`` (queue depth, block size, O_DIRECT policy) instead of the
        defaults; its ``directory`` wins over ``nvme_path``.
    min_state_bytes: low-rank optimizers (``StateOffloadedOptimizer``): state tensors smaller
        than this stay in memory (step counters, scales: moving them costs more than they weigh).
    hybrid: update each pipeline group either on the CPU or on the parameters' device, as a
        cost model over rates measured during the run decides (``hybrid_update.py``; Deep
        Optimizer States). Off: every group on the CPU.
    """

    device: OffloadDevice = "cpu"
    nvme_path: str | os.PathLike[str] | None = None
    pin_memory: bool = True
    bucket_bytes: int = 64 << 20
    nvme: NVMeConfig | None = None
    min_state_bytes: int = 4096
    hybrid: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "nvme"):
            raise ValueError(f"OffloadConfig.device must be 'cpu' or 'nvme', got {self.device!r}")
        if self.device == "nvme" and self.nvme_path is None and self.nvme is None:
            raise ValueError(
                "OffloadConfig(device='nvme') needs nvme_path= (a directory on the NVMe disk) "
                "or nvme=NVMeConfig(...)"
            )
        b = self.bucket_bytes
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"OffloadConfig.bucket_bytes must be a positive int, got {b!r}")
        m = self.min_state_bytes
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"OffloadConfig.min_state_bytes must be an int >= 0, got {m!r}")

    def make_tier(self, rank: int | None = None) -> StorageTier:
        """The tier this config names (an NVMe file named for ``rank``)."""
        # the shared arena when pinning (one report sees all host memory), else an unpinned one
        arena = default_arena() if self.pin_memory else PinnedArena(ArenaConfig(pin="off"))
        if self.device == "cpu":
            return PinnedCPUTier(arena)
        cfg = self.nvme or NVMeConfig(directory=self.nvme_path)  # type: ignore[arg-type]
        if rank is not None and cfg.rank is None:
            cfg = dataclasses.replace(cfg, rank=rank)
        return NVMeTier(cfg, arena=arena)


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW (torch's update rule) with its state on a tier; see the module docstring."""

    _closed = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        offload: OffloadConfig | None = None,
        tier: StorageTier | None = None,
        record_events: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_adam_group(defaults, "OffloadedAdamW")
        super().__init__(params, defaults)
        self.offload = offload or OffloadConfig()
        self.tier = tier if tier is not None else self.offload.make_tier()
        self._owns_tier = tier is None
        self._pid = os.getpid()
        self.store = OffloadedAdamState(
            self.tier,
            bucket_bytes=self.offload.bucket_bytes,
            record_events=record_events,
            hybrid=HybridUpdate() if self.offload.hybrid else None,
        )
        #: each stepped parameter's ``signature`` after its last step or load
        self._signatures: dict[Tensor, tuple[int, int]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_adam_group(group, "OffloadedAdamW")
            for p in group["params"]:
                if p.is_complex() or p.dtype == torch.float64:
                    raise TypeError(
                        f"OffloadedAdamW keeps fp32 state and an fp32 master: a {p.dtype} "
                        f"parameter of shape {tuple(p.shape)} would lose "
                        + ("its imaginary part" if p.is_complex() else "precision")
                        + "; use torch.optim.AdamW for it, or cast the model to fp32/bf16/fp16"
                    )
        except Exception:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_open()
        loss = closure_loss(closure)
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        copies: list[tuple[Tensor, Tensor]] = []  # (non-contiguous parameter, its staging copy)
        items = [self._item(g, p, copies) for g, p in work]
        self._check_items(items)  # before any state changes (the step counters)
        # New state first, all of it, before any counter moves: a parameter is fresh until
        # both its state on the tier and its counter exist (an interrupted first step left
        # one without the other, and every later step raised KeyError: 'step')
        fresh = [p for _, p in work if not self._has_state(p)]
        self.store.reserve([p.numel() for p in fresh])  # host tiers: one exact-size piece
        for p in fresh:
            self.store.add(p, p.detach())  # upcast chunk by chunk; all or nothing
            self.state[p] = {"step": 0}
            self._signatures[p] = signature(p)
        # written since the last step or load (a clamp, model.load_state_dict): the pipeline
        # rebuilds their masters from the parameters before the update (adamw_checks)
        stale = {p for _, p in work if self._signatures.get(p) != signature(p)}
        for _, p in work:
            self.state[p]["step"] += 1
        try:
            self.store.step(items, refresh=stale)
        except BaseException as e:
            err = self._step_failed(work, e)
            if err is None:
                raise
            raise err from e
        finally:
            for p, staged in copies:
                p.copy_(staged)
        for _, p in work:
            self._signatures[p] = signature(p)
        return loss

    def _item(self, group: dict[str, Any], p: Tensor, copies: list[tuple[Tensor, Tensor]]
              ) -> StepItem:  # fmt: skip
        """``p``'s step item, its step number one past its counter (not moved yet). A
        non-contiguous parameter (channels_last) is stepped through a contiguous copy, written
        back after the step (``copies``)."""
        st = self.state.get(p, {})
        beta1, beta2 = group["betas"]
        hyper = AdamHyper(
            step=int(st["step"]) + 1 if self._has_state(p) else 1, lr=float(group["lr"]),
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        )  # fmt: skip
        target, grad = p, p.grad
        assert grad is not None  # (only parameters with a gradient are stepped)
        if not p.is_contiguous():
            target = p.detach().contiguous()
            copies.append((p, target))
        if not grad.is_sparse and not grad.is_contiguous():  # (sparse: refused below)
            grad = grad.contiguous()
        return StepItem(p, grad, target, hyper)

    def _check_items(self, items: list[StepItem]) -> None:
        """What would make the pipeline raise, raised before anything changes."""
        for it in items:
            if it.grad.is_sparse:
                raise RuntimeError(
                    f"OffloadedAdamW does not support sparse gradients ({label(it.key)}); "
                    "nothing was updated"
                )
        selected_isa()  # a bad MEMOPT_CPU_ADAM_ISA is a ValueError here, not mid-step
        self.store.check([it for it in items if it.key in self.store])

    def _step_failed(self, work: list[tuple[dict[str, Any], Tensor]], e: BaseException
                     ) -> BaseException | None:  # fmt: skip
        """The error to raise for a failed ``store.step`` (None: ``e`` itself). Failed before
        any update began: the counters go back, nothing changed. Otherwise some parameters
        hold this step's values: the error says so."""
        untouched = self.store.updates_begun == 0
        if untouched:
            for _, p in work:
                self.state[p]["step"] -= 1
        if isinstance(e, OSError):  # ENOSPC / EIO
            where = f" ({e.filename})" if e.filename else ""
            when = once_fixed(e)
            if untouched:
                what = (f"nothing was updated and the step counters are as before: retry the "
                        f"step {when}")  # fmt: skip
            else:
                what = (
                    "some parameters may hold this step's values while their state on the "
                    "tier does not, and the step counters have advanced. Do not retry the "
                    f"step: reload model and optimizer from the last checkpoint {when}"
                )
            # strerror, not str(e): no second "[Errno N]" in the message
            return OSError(e.errno, f"{e.strerror or e}{where}; OffloadedAdamW.step did not "
                           f"complete: {what}")  # fmt: skip
        add_note = getattr(e, "add_note", None)  # Python 3.11+
        if not untouched and add_note is not None:
            add_note(
                "OffloadedAdamW.step stopped part way: some parameters hold this step's values "
                "and the step counters have advanced; reload model and optimizer from the "
                "last checkpoint rather than retrying the step"
            )
        return None

    def _has_state(self, p: Tensor) -> bool:
        return p in self.store and "step" in self.state.get(p, ())

    def state_dict(self) -> dict[str, Any]:
        """torch AdamW's layout, the tensors read back from the tier (plus fp32 ``master``).
        The state-dict hooks run as torch runs them: post-hooks see (and may replace) the
        finished dict, tier tensors included."""
        self._check_open()
        return state_dict_with_hooks(self, self._state_dict)

    def _state_dict(self) -> dict[str, Any]:
        with hooks_paused(self, "state_dict"):  # (run around the whole, above)
            sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, st in list(sd["state"].items()):
            p = params[index]
            if p not in self.store and not st:  # (an empty entry, from reading state[p])
                del sd["state"][index]
                continue
            master, m, v = self.store.read(p)
            # a new dict: torch's state_dict hands out the live per-parameter dicts, and
            # writing into them kept a full fp32 copy of the offloaded state in memory
            sd["state"][index] = {
                **st, "step": torch.tensor(float(self.state[p]["step"])),
                "exp_avg": m.view_as(p), "exp_avg_sq": v.view_as(p), MASTER: master.view_as(p),
            }  # fmt: skip
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hyperparameters into the groups, tensors onto the tier (kept fp32). Like torch's,
        the load replaces the whole state: a parameter without state in ``state_dict`` has
        none afterwards. Everything is checked first: a refused load changes nothing. The
        load pre-hooks run first (what they return is what loads), the post-hooks after."""
        self._check_open()
        load_with_hooks(self, state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        values, entries = checked_load(state_dict, self.param_groups, params)
        for group, new in zip(self.param_groups, values, strict=True):
            group.update(new)
        loaded = {p for p, _ in entries}
        for p in params:
            if p not in loaded:
                if p in self.store:
                    self.store.remove(p)
                self.state.pop(p, None)
                self._signatures.pop(p, None)
        for p, st in entries:
            # no master (torch AdamW's state): the parameter as it is now; a write to it
            # before the next step (the model's weights loaded after) rebuilds it (``step``)
            master = st.get(MASTER, p.detach())
            self.store.add(p, master, st["exp_avg"], st["exp_avg_sq"])
            self.state[p] = {"step": int(float(st["step"]))}
            self._signatures[p] = signature(p)

    def read_state(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(master, exp_avg, exp_avg_sq) of ``p`` read from the tier, shaped like ``p``."""
        self._check_open()
        return tuple(t.view_as(p) for t in self.store.read(p))  # type: ignore[return-value]

    def close(self) -> None:
        """Free the state on the tier (and the tier, if this optimizer made it). The state is
        gone: stepping or reading it afterwards is a RuntimeError; a second close does
        nothing. Dropping the optimizer without close() frees the same (finalizers), except
        the state's room on a tier passed as ``tier=``, which that tier keeps until it is
        closed or dropped. In a process forked from the optimizer's, close() leaves the
        parent's state and files alone."""
        if self._closed:
            return
        self._closed = True
        try:
            if os.getpid() == self._pid:
                self.store.close()
        finally:
            if self._owns_tier:
                self.tier.close()
            self.state.clear()
            self._signatures.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this OffloadedAdamW was closed: close() freed its state on the tier (master "
                "weights and moments); make a new optimizer, or load a checkpoint into one"
            )
        self.tier.check_usable()  # an NVMe tier inherited by fork: before anything changes

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "OffloadedAdamW cannot be copied or pickled: its master weights and moments live "
            "on a storage tier (pinned host memory or an NVMe file), not in the object, so "
            "a copy would have no state. Save opt.state_dict() (torch.save or memopt's "
            "AsyncCheckpointer) and load_state_dict() it into a new OffloadedAdamW"
        )

    def __repr__(self) -> str:
        return f"OffloadedAdamW(device={self.offload.device!r}, tier={type(self.tier).__name__})"
