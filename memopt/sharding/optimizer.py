"""``ShardedOptimizer``: ZeRO stage 1/2 around any optimizer, memopt's low-rank ones included.

The wrapped optimizer (the *inner* one) keeps its class, its math and its param groups; only
the tensors in its groups change. Position i of every group still holds parameter i, so a
memopt optimizer's global parameter index (a seed input of its random projections) and its
refresh schedule are those of the single-process run. The tensor at that position is:

- a row shard (``dim0``): a view of the parameter's rows on this rank (or an fp32 copy with
  ``master_dtype``);
- an owned whole parameter: the parameter itself (or its master copy);
- a parameter owned by another rank: the parameter itself, whose ``.grad`` stays ``None``, so
  the inner optimizer skips it and never allocates its state.

One step: ``finish_grad_sync()`` (wait for the bucketed reductions, see ``reduce``; stage 1
launches them here, stage 2 launched them from backward hooks) gives each local tensor its
averaged gradient; the inner optimizer steps; ``gather_params`` writes every rank's update
into the model's parameters. ``param_groups`` are the inner optimizer's, so LR schedulers
work; ``state`` is a view of the inner optimizer's that also takes the model's parameters
(``wrapper_api.state_key``); ``state_dict`` is this rank's shard, with the wrapper's own
state-dict hooks run around it (``WrapperOptimizer``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from memopt._utils.wrapped_optim import WrapperOptimizer, closure_loss
from memopt.sharding import (
    gradedit,
    guards,
    master_state,
    offload_step,
    regrad,
    rowproj,
    wrapper_api,
)
from memopt.sharding.comm import Comm, world1_collectives
from memopt.sharding.config import ShardConfig
from memopt.sharding.plan import ParamPlan, balance, make_buckets, make_plans
from memopt.sharding.reduce import GradReducer, gather_params


class ShardedOptimizer(WrapperOptimizer):
    """ZeRO-1/2 over a process group; build it with ``memopt.shard``."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: ShardConfig, comm: Comm
    ) -> None:
        # Not Optimizer.__init__: groups and state are the inner optimizer's (WrapperOptimizer).
        self.wrap(optimizer)
        self.config, self.comm = config, comm
        groups = optimizer.param_groups
        self.plans = make_plans(
            [list(g["params"]) for g in groups],
            comm.world,
            config.layout,
            lambda gi, p: rowproj.row_reason(optimizer, groups[gi], p),
            lambda gi, p: rowproj.state_weight(optimizer, groups[gi], p),
        )
        self.buckets = make_buckets(self.plans, config.bucket_bytes)
        self.device = self.plans[0].param.device
        self.names = {id(p): n for n, p in model.named_parameters()}
        order = {id(p): i for i, p in enumerate(model.parameters())}
        #: plan indices in the model's parameter order (the order clip_grad_norm_ sums in)
        self.model_order = sorted(
            range(len(self.plans)), key=lambda i: order[id(self.plans[i].param)]
        )
        self._build_locals()
        self.reducer = GradReducer(comm, self.buckets, self.device, self.names)
        self._sync = True
        self._synced = False
        # World size 1: no buckets, no hooks; the gradients are used where autograd put them,
        # so the inner optimizer computes the plain path's exact bits.
        forced = comm.group is not None and world1_collectives()  # comm.world1_collectives
        self._plain = comm.world == 1 and not forced
        self._hooks = [] if config.stage == 1 or self._plain else self._register_hooks()
        if self._hooks:  # gradients reduced in backward: activations.profile refuses it
            model.__dict__["_memopt_sharded_stage"] = config.stage
        self._hooks += gradedit.watch(self)  # (stage 1: torch's clip_grad_norm_ misuse)

    # -- construction ----------------------------------------------------------------
    def _build_locals(self) -> None:
        me, master = self.comm.rank, self.config.master_dtype
        self.locals: dict[int, Tensor] = {}
        self.in_place: set[int] = set()
        # index -> (the parameter, the rows of it its master copies)
        self._master_of: dict[int, tuple[Tensor, Tensor]] = {}
        position = {p.index: p for p in self.plans}
        index = 0
        for group in self.inner.param_groups:
            params = group["params"]
            for i in range(len(params)):
                p = position[index]
                index += 1
                s, e = p.row_range(me)
                if p.owner is not None and p.owner != me:
                    continue  # another rank's: stays in the group, never gets a gradient
                if p.owner is None:
                    view = p.param.data.view(p.rows, p.cols)[s:e].view(e - s, *p.param.shape[1:])
                else:
                    view = p.param
                if master is not None and master != p.param.dtype:
                    if torch.finfo(master).bits < torch.finfo(p.param.dtype).bits:
                        raise ValueError(
                            f"memopt.shard: master_dtype={master} is narrower than the "
                            f"parameter {self.names.get(id(p.param), p.index)!r} "
                            f"({p.param.dtype}): every update would round the weights to "
                            f"{master}; master weights are for low-precision parameters "
                            "(use master_dtype=None here)"
                        )
                    local = view.detach().to(master, copy=True)
                    self._master_of[p.index] = (p.param, view)
                else:
                    local = view
                    self.in_place.add(p.index)
                self.locals[p.index] = params[i] = local
        self._install_row_projectors()
        self._note_param_versions()

    # -- master weights and parameters changed from outside ----------------------------
    def _note_param_versions(self) -> None:
        """Remember the parameters' version counters once they hold the masters' values."""
        self._versions = {i: param._version for i, (param, _) in self._master_of.items()}

    def _refresh_masters(self) -> None:
        """A parameter written since the last step (``model.load_state_dict``, a checkpoint
        restore, a manual edit) makes its master copy stale: without this the next step
        wrote "old master + update" over the restored weights. ``master_state.refresh``
        rebuilds it (or keeps one just loaded that the weights equal, rounded); the versions
        are noted again after the step's gather (``step``)."""
        master_state.refresh(self)

    def _install_row_projectors(self) -> None:
        """Row-sharded low-rank parameters: row-aware projector and SVD owners by cost."""
        inner: Any = self.inner
        rows = []
        for p in self.plans:
            group = self.inner.param_groups[p.group]
            if p.owner is None and hasattr(inner, "is_low_rank") and p.param.dim() >= 2:
                if (
                    inner.is_low_rank(group)
                    and group.get(getattr(inner, "proj_key", "")) in (rowproj.ROW_PROJECTORS)
                    and not group.get("state_free")
                ):
                    rows.append(p)
        if not rows or self.comm.world == 1:  # one rank holds every row: the plain projector
            return
        rowproj.install(inner, self.comm)
        load = [0] * self.comm.world
        for p in sorted(rows, key=lambda p: (-p.rows * p.cols * min(p.rows, p.cols), p.index)):
            r = min(range(self.comm.world), key=lambda k: (load[k], k))
            load[r] += p.rows * p.cols * min(p.rows, p.cols)
            info = rowproj.RowInfo((p.rows, p.cols), p.chunk, r)
            self.inner.state[self.locals[p.index]][rowproj.SHARD_KEY] = info
        self._row_infos = {
            p.index: self.inner.state[self.locals[p.index]][rowproj.SHARD_KEY] for p in rows
        }

    def _register_hooks(self) -> list[Any]:
        handles = []
        for p in self.plans:
            if p.param.requires_grad:
                handles.append(p.param.register_post_accumulate_grad_hook(self._hook(p)))
        return handles

    def _hook(self, plan: ParamPlan) -> Callable[[Tensor], None]:
        # Weakly: the parameter owns its hooks on the C++ side, which the cycle collector
        # cannot see, so a strong reference here kept the optimizer, its state and the model
        # alive forever once dropped (13 MiB per trial of a hyperparameter search).
        ref = weakref.ref(self)

        def hook(_: Tensor) -> None:
            me = ref()
            if me is not None and me._sync:
                regrad.on_grad(me, plan)

        return hook

    # -- torch.optim.Optimizer surface -------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler reads this: True hands its step to ``step()``, which refuses
        it (``guards``); False (the plain path, parameters stepped in place) keeps GradScaler's
        own unscale/skip, correct there."""
        return not (self._plain and all(self.locals.get(p.index) is p.param for p in self.plans))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        guards.refuse_grad_scaler(self, self.config, self.comm.world)
        loss = closure_loss(closure)
        self.finish_grad_sync()
        if self._master_of:
            self._refresh_masters()
        self._agree_on_nonfinite_refresh()
        offload_step.step_inner(self)  # (offload=: the ranks agree before the gather)
        if not (self._plain and len(self.in_place) == len(self.locals)):
            # (world size 1 with every local the parameter itself: nothing to gather; packing
            # the buckets would only copy every parameter once more)
            gather_params(self.comm, self.buckets, self.locals, self.in_place, self.names)
        if self._master_of:
            self._note_param_versions()
        self._release()
        self._sync_buffers()
        return loss

    def _sync_buffers(self) -> None:  # every rank gets rank 0's module buffers (``buffers``)
        if (sync := self.__dict__.get("buffer_sync")) is not None:
            sync()

    def _agree_on_nonfinite_refresh(self) -> None:
        """A projection refresh from a non-finite gradient raises FloatingPointError on the
        rank owning that tensor, before any update; the other ranks must refuse the same
        step (one flag all-reduce), or they wait for that rank's gather until the timeout."""
        check = getattr(self.inner, "nonfinite_refresh", None)
        is_low_rank = getattr(self.inner, "is_low_rank", None)
        if check is None or is_low_rank is None or self.comm.world == 1:
            return
        if not any(is_low_rank(g) for g in self.inner.param_groups):  # (the same on every rank)
            return
        label = check()
        bad = self.comm.flagged_ranks(label is not None, what="the non-finite refresh check")
        if bad:
            where = f"{label} (on this rank)" if label is not None else f"a tensor of rank {bad[0]}"
            raise FloatingPointError(
                f"memopt.shard: the gradient of {where} has non-finite values at a projection "
                "refresh; every rank skips this step, nothing was updated. Catch this error, "
                "zero_grad() and go on with the next batch, or remove the cause (a lower "
                "learning rate, clip_grad_norm_, bf16 instead of fp16)"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        regrad.zero_grad(self, set_to_none)

    def _drain(self) -> None:
        """Let gradient communication still in flight finish before gradients are dropped."""
        self.reducer.wait_all()

    def _release(self) -> None:
        for local in self.locals.values():
            local.grad = None
        self.reducer.reset()
        self._synced = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            "memopt.shard: parameter groups are planned (owners, buckets, shards) when the "
            "optimizer is sharded; add_param_group afterwards would leave the new parameters "
            "unreduced, so ranks would drift apart. Put every group in the optimizer before "
            "memopt.shard (frozen layers too: they get no gradient until unfrozen)"
        )

    def state_key(self, key: Any) -> Tensor | str:
        """``state[key]`` for a model parameter: this rank's tensor of it (``wrapper_api``)."""
        return wrapper_api.state_key(self, key)

    def _state_dict(self) -> dict[str, Any]:
        wrapper_api.drop_stray_state(self.inner)  # (an empty entry from a read: torch's KeyError)
        sd = master_state.add_masters(self, self.inner.state_dict())  # fp32 masters: "master"
        sd["sharding"] = self._meta()
        return sd

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        guards.check_sharded_state_dict(state_dict, self._meta())
        state_dict, masters = master_state.split_masters(self, state_dict)
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "sharding"})
        master_state.load_masters(self, masters)
        for index, info in getattr(self, "_row_infos", {}).items():
            self.inner.state[self.locals[index]][rowproj.SHARD_KEY] = info

    def checkpoint_layout(self) -> dict[str, Any]:
        """Plain data for checkpoints (``memopt.checkpoint`` reshards with it): per parameter
        (position ``index`` over the inner groups) its name, global shape, owner (``None``:
        row-sharded over every rank) and the rows ``[start, end)`` of dim 0 this rank holds,
        ``held`` when this rank steps it, ``master`` when it takes an fp32 master; plus the
        ``state_dict`` sharding tag."""
        return wrapper_api.checkpoint_layout(self)

    def _meta(self) -> dict[str, Any]:
        c = self.config
        return {
            "world_size": self.comm.world,
            "rank": self.comm.rank,
            "layout": c.layout,
            "stage": c.stage,
        }

    # -- what ZeRO adds ------------------------------------------------------------------
    def finish_grad_sync(self) -> None:
        """Reduce the gradients (once per step) and hand each local tensor its share."""
        if self._synced and not regrad.resync(self):  # (True: a backward since, a new step)
            return
        grads = gradedit.finish(self) if not self._plain else regrad.plain_grads(self)
        frozen = {p.index for p in self.plans if not p.param.requires_grad}
        for index, local in self.locals.items():
            if index not in grads:  # no gradient on any rank: skipped, as in one process
                local.grad = None
        for index, g in grads.items():
            local = self.locals[index]
            if index in frozen:  # (packed as zeros like an unused parameter: it must not move)
                local.grad = None
                continue
            if g is not local.grad:
                local.grad = g if g.dtype == local.dtype else g.to(local.dtype)
        self._synced = True
        regrad.note_grads(self)

    def resident_params(self, write_back: bool = True) -> Any:
        """A no-op here (stages 1/2 keep every parameter in memory): stage-3 NVMe code runs."""
        return nullcontext()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally; the first one outside synchronizes."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Global 2-norm over every rank's shards (one all-reduce); scales them in place."""
        if float(norm_type) != 2.0:
            raise NotImplementedError("memopt.shard: clip_grad_norm_ supports norm_type=2.0")
        self.finish_grad_sync()
        held = [self.locals[i] for i in self.model_order if i in self.locals]
        grads = [t.grad for t in held if t.grad is not None]
        # torch.nn.utils.clip_grad_norm_'s arithmetic (a norm of per-tensor norms), so that
        # world size 1 gives its exact bits; ranks combine their partial norms as squares.
        if grads:  # (offload= with masters steps bf16 shards: their norms in the master dtype)
            wide = self.config.master_dtype
            narrow = wide is not None and any(g.dtype.itemsize < wide.itemsize for g in grads)
            norms = torch._foreach_norm(grads, 2.0, dtype=wide if narrow else None)
            total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.comm.world > 1:
            total = self.comm.all_reduce_sum(total.pow(2), what="clip_grad_norm_").sqrt()
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef)
        regrad.note_grads(self)
        return total

    def balance(self) -> dict[str, object]:
        """Elements each rank holds and the slack over an even split (see ``plan.balance``)."""
        out = balance(self.plans, self.comm.world)
        out["whole"] = {
            self.names.get(id(p.param), str(p.index)): (p.owner, p.why_whole)
            for p in self.plans
            if p.owner is not None
        }
        return out

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def close(self) -> None:
        """Remove the gradient hooks and free the inner optimizer's tiers (an offloaded
        optimizer's NVMe file, its pinned buffers); the optimizer is not usable afterwards."""
        self.remove_hooks()
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it holds this rank's shards, "
            "gradient hooks on the model's parameters and a process group, which a copy "
            "would not have. Save sharded_opt.state_dict() (or use memopt's AsyncCheckpointer) "
            "and load it into a new memopt.shard(...) optimizer"
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ShardedOptimizer(stage={c.stage}, layout={c.layout!r}, world={self.comm.world}, "
            f"inner={type(self.inner).__name__})"
        )
