"""``FSDPOptimizer``: memopt's optimizers on FSDP2's DTensor row shards (ZeRO stage 3).

FSDP2 (see ``fsdp``) leaves every parameter as a ``DTensor`` row shard with a ``DTensor``
gradient, already averaged over the ranks. The inner optimizer keeps its class, math and
param groups; position i of every group still holds parameter i (so seeds from the global
parameter index and refresh schedules are the single-process ones). The tensor at a position
is a *holder*: a plain tensor that, for each step, is re-pointed (``holder.data = ...``) at

- the local row shard (``DTensor.to_local()``, a view of FSDP2's sharded storage, so the
  update lands in place) and its local gradient, for parameters whose update is
  row-separable (``rowproj.row_reason``: elementwise updates and right-sided GaLore/FRUGAL
  projections). Gradient-based projector refreshes go through ``rowproj``'s
  ``RowShardProjector``: one owner rank per matrix (spread by SVD cost) gathers the full
  gradient, computes the basis, and broadcasts it; seeded projectors are regenerated from
  the full shape and global index on every rank. Identical to stages 1/2 ``dim0``;
- the full parameter and gradient, on one *owner* rank only, for parameters whose update is
  not row-separable (left-sided projections, APOLLO's low-rank matrices, Natural GaLore,
  fewer rows than ranks, unknown optimizers): ``Comm.gather`` of the padded row shards
  (parameter and gradient in one message) to the owner, which steps the whole matrix exactly
  as a single process would and keeps its state; then ``Comm.broadcast`` of the updated
  matrix, each rank copying back its rows. Owners are balanced greedily on estimated state
  size (``plan.make_plans``). Correct, not fast: one gather and one broadcast per such matrix
  per step, issued in plan order on every rank.

Tiers (``param_swap``, ``memopt.offload.state_store``): with ``offload_params="nvme"`` (a
``ParamSwapper``) or ``offload=`` (a ``StateStore``) the step streams FSDP2 units in a fixed
order (the same on every rank, so owner collectives keep their order): prefetch unit k+1's
shards and state, load unit k's, bind only unit k's gradients (the inner optimizer skips
parameters without a gradient, so per-parameter step counts are unchanged), step, write the
updated shards and state back; unit k's storage is freed once its write lands, while unit k+1
steps. A tier I/O error in that loop is raised (an ``OSError``, same errno) once the I/O in
flight has settled, saying which units were stepped and whether the step may be retried
(``unit_errors``); a failed state write keeps that state in memory (``StateStore``).

Clipping uses ``torch.nn.utils.get_total_norm`` on the DTensor gradients (``full_tensor()``
of the norm: one all-reduce) and ``clip_grads_with_norm_``. ``no_sync()`` maps to FSDP2's
``set_requires_gradient_sync(False)``; unsharded gradients a ``no_sync()`` backward left for
no synchronizing one to reduce are reduce-scattered at ``step()`` / ``clip_grad_norm_`` and
dropped by ``zero_grad()`` (``pending_grads``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

import torch
from torch import Tensor, nn

from memopt._utils.wrapped_optim import closure_loss, hooks_paused, run_step_hooks
from memopt.offload.state_store import StateStore
from memopt.offload.tier import StorageTier
from memopt.sharding import guards, rowproj
from memopt.sharding.comm import Comm
from memopt.sharding.config import ShardConfig
from memopt.sharding.fsdp2_internals import unit_index
from memopt.sharding.optimizer import ShardedOptimizer
from memopt.sharding.param_swap import ParamSwapper
from memopt.sharding.pending_grads import PendingGrads
from memopt.sharding.plan import ParamPlan, chunk_rows, make_plans
from memopt.sharding.unit_errors import UnitProgress, unit_names


class FSDPOptimizer(ShardedOptimizer):
    """ZeRO-3 on FSDP2; build it with ``memopt.shard(..., stage=3)``.

    Same surface as ``ShardedOptimizer`` (``no_sync``, ``clip_grad_norm_``, ``balance``,
    ``state_dict``); ``locals`` maps a plan index to the holder this rank steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: ShardConfig,
        comm: Comm,
        params: Sequence[Sequence[Tensor]],
        swapper: ParamSwapper | None = None,
        state_tier: StorageTier | None = None,
    ) -> None:
        # ``params``: the sharded (DTensor) parameters in the inner optimizer's group order;
        # ``state_tier``: ``offload=``'s tier, already open (None: made here), owned.
        # Not ShardedOptimizer.__init__ (no buckets, no hooks: FSDP2 communicates).
        self.wrap(optimizer)
        self.config, self.comm, self.model = config, comm, model
        model.__dict__["_memopt_sharded_stage"] = config.stage  # activations.profile refuses 2-3
        groups = optimizer.param_groups
        self.plans = make_plans(
            [list(g) for g in params],
            comm.world,
            "dim0",
            lambda gi, p: rowproj.row_reason(optimizer, groups[gi], p),
            lambda gi, p: rowproj.state_weight(optimizer, groups[gi], p),
        )
        self.buckets = []
        self.names = {id(p): n for n, p in model.named_parameters()}
        self._plain = False
        self._hooks: list[Any] = []
        self.locals: dict[int, Tensor] = {}
        self.holders: dict[int, Tensor] = {}
        index = 0
        for group in groups:
            for i in range(len(group["params"])):
                p = self.plans[index]
                local = _local(p.param).detach()
                if p.owner is not None:  # full size on the owner (bound per step)
                    local = local.new_empty(0)
                self.holders[index] = group["params"][i] = local
                if p.owner is None or p.owner == comm.rank:
                    self.locals[index] = local
                index += 1
        self._install_row_projectors()
        #: unreduced gradients a no_sync() backward left (reduced at step, dropped at zero_grad)
        self._pending = PendingGrads(model, comm)
        #: the NVMe parameter swapper (``offload_params="nvme"``), else None
        self.param_swapper = swapper
        #: the inner optimizer's state on a tier (``offload=``), else None
        self.state_store: StateStore | None = None
        if config.offload is not None:
            tier = state_tier if state_tier is not None else config.offload.make_tier(comm.rank)
            self.state_store = StateStore(self.inner, tier, config.offload.min_state_bytes)
        streamed = swapper is not None or self.state_store is not None
        self._units = self._unit_plans() if streamed else []

    def _unit_plans(self) -> list[tuple[int, list[ParamPlan]]]:
        """The plans of each FSDP2 unit, units in ``fsdp_groups`` order (``unit_index``),
        plans in plan order."""
        unit_of = unit_index(self.model)
        by_unit: dict[int, list[ParamPlan]] = {}
        for p in self.plans:
            assert id(p.param) in unit_of, "every stage-3 parameter belongs to an FSDP2 unit"
            by_unit.setdefault(unit_of[id(p.param)], []).append(p)
        return sorted(by_unit.items())

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        guards.refuse_grad_scaler(self, self.config, self.comm.world)  # (every rank: FSDP2)
        loss = closure_loss(closure)
        self._pending.reduce()  # (the last backward ran inside no_sync(): pending_grads)
        if self._units:  # (the inner step runs once per unit: its own hooks once per step)
            run_step_hooks(self.inner, "pre")
            with hooks_paused(self.inner, "step"):
                self._step_units()
            run_step_hooks(self.inner, "post")
        else:
            whole = self._bind(self.plans)
            self.inner.step()
            self._scatter_back(whole)
            self._release()
        self._sync_buffers()
        return loss

    def _step_units(self) -> None:
        """One unit at a time (see the module docstring); a tier's ``OSError`` is raised
        again, once the I/O in flight settled, saying what the step did (``unit_errors``)."""
        progress = UnitProgress(len(self._units), self.param_swapper is not None)
        try:
            self._stream_units(progress)
        except OSError as err:
            for tier in (self.state_store, self.param_swapper):
                if tier is not None:  # nothing left in flight; failed state writes put back
                    with suppress(OSError):
                        tier.drain()
            self._release()
            names = [[self.names.get(id(p.param), "") for p in plans] for _, plans in self._units]
            raise progress.error(err, unit_names(names)) from err
        except BaseException:  # (an error of the inner step, a Ctrl-C): I/O settled, step over
            for tier in (self.state_store, self.param_swapper):
                if tier is not None:  # (else the swapper stayed in step mode: each later
                    with suppress(OSError):  # eviction wrote its unit back synchronously)
                        tier.drain()
            raise

    def _stream_units(self, progress: UnitProgress) -> None:
        sw, st, units = self.param_swapper, self.state_store, self._units
        if sw is not None:
            sw.begin_step()
        written: list[int] = []
        for k, (unit, plans) in enumerate(units):
            if k + 1 < len(units):
                progress.io = "parameter read"
                if sw is not None:
                    sw.prefetch(units[k + 1][0])
                progress.io = "state read"
                if st is not None:
                    st.prefetch(self._held(units[k + 1][1]))
            progress.io = "parameter read"
            if sw is not None:
                sw.load(unit)
            progress.io = "state read"
            if st is not None:
                st.fetch(self._held(plans))
            whole = self._bind(plans)
            self.inner.step()
            progress.stepped = k + 1
            self._scatter_back(whole)
            for h in self._held(plans):
                h.grad = None
            progress.io = "state write"
            if st is not None:
                st.send(self._held(plans))
            progress.io = "parameter write"
            if sw is not None:
                sw.write_back(unit, evict=False)
                written.append(unit)
                if len(written) > 1:  # unit k-1's write had unit k's step to land
                    sw.release(written.pop(0))
        progress.io = "parameter write"
        if sw is not None:
            for unit in written:
                sw.release(unit)
            sw.drain()
        progress.io, progress.tail = "state write", True
        if st is not None:
            st.drain()
        self._release()

    def _held(self, plans: list[ParamPlan]) -> list[Tensor]:
        return [self.holders[p.index] for p in plans]

    def _bind(self, plans: list[ParamPlan]) -> list[ParamPlan]:
        """Point the holders of ``plans`` at this step's tensors; gather whole matrices to
        their owners."""
        whole = []
        for p in plans:
            h, grad = self.holders[p.index], p.param.grad
            if p.owner is None:
                h.data = _local(p.param)
                h.grad = None if grad is None else _like(_local(grad), h)
            elif grad is not None:  # the same on every rank: FSDP2 reduced it
                whole.append(p)
                self._gather_to_owner(p, h, grad)
        return whole

    def _gather_to_owner(self, p: ParamPlan, h: Tensor, grad: Any) -> None:
        chunk = -(-p.rows // self.comm.world)
        local_p, local_g = _local(p.param), _local(grad)
        n = local_p.shape[0]
        pad = local_p.new_zeros(2, chunk, p.cols)
        pad[0, :n].copy_(local_p.reshape(n, p.cols))
        pad[1, :n].copy_(local_g.reshape(n, p.cols).to(pad.dtype))
        parts = self.comm.gather(pad, p.owner)  # type: ignore[arg-type]
        if parts is not None:
            full = torch.cat(parts, dim=1)[:, : p.rows]
            h.data = full[0].reshape(p.param.shape).clone()
            h.grad = full[1].reshape(p.param.shape).to(h.dtype).clone()

    def _scatter_back(self, whole: list[ParamPlan]) -> None:
        for p in whole:
            h = self.holders[p.index]
            local = _local(p.param)
            full = h.data if p.owner == self.comm.rank else local.new_empty(p.param.shape)
            self.comm.broadcast(full, p.owner).wait()  # type: ignore[arg-type]
            s, e = chunk_rows(p.rows, -(-p.rows // self.comm.world), self.comm.rank)
            if e > s:
                local.copy_(full.reshape(p.rows, p.cols)[s:e].reshape(local.shape))
            if p.owner == self.comm.rank:  # drop the full copies until the next step
                h.grad = None
                h.data = h.data.new_empty(0)

    def _drain(self) -> None:
        """Nothing in flight: FSDP2 finishes its reduce-scatters inside the backward."""

    def _release(self) -> None:
        for h in self.holders.values():
            h.grad = None

    def finish_grad_sync(self) -> None:
        """FSDP2 reduce-scatters during the synchronizing backward; what a ``no_sync()``
        backward after it left is reduce-scattered here (``pending_grads``)."""
        self._pending.reduce()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending.drop()  # (kept by no_sync(): FSDP2's own zero_grad keeps them)
        super().zero_grad(set_to_none)

    # -- tiers: state dicts (the hooks run around these: WrapperOptimizer), residency --------
    def _state_dict(self) -> dict[str, Any]:
        if self.state_store is None:
            return super()._state_dict()
        self.state_store.fetch_all()
        try:
            sd = super()._state_dict()
            # own per-parameter dicts: send_all() swaps the inner state's tensors for
            # placeholders, and torch's state_dict shares those dicts
            sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
            return sd
        finally:
            self.state_store.send_all()

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        guards.check_sharded_state_dict(state_dict, self._meta())  # before any tier I/O
        if self.state_store is not None:
            self.state_store.fetch_all()
        try:
            super()._load_state_dict(state_dict)
        finally:
            if self.state_store is not None:
                self.state_store.send_all()

    def resident_params(self, write_back: bool = True) -> Any:
        """A context in which every parameter shard is in memory (reading or editing the
        model's parameters directly under ``offload_params="nvme"``; a no-op otherwise)."""
        if self.param_swapper is None:
            return nullcontext()
        return self.param_swapper.resident(write_back)

    def close(self) -> None:
        """Bring shards and state back into memory and free their tiers."""
        if self.state_store is not None:
            self.state_store.close()
            self.state_store = None
        if self.param_swapper is not None:
            self.param_swapper.close()
            self.param_swapper = None
        self._units = []

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate unsharded gradients locally (FSDP2's
        ``set_requires_gradient_sync(False)``); the first one outside reduce-scatters."""
        model: Any = self.model
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Global norm over the DTensor gradients (``full_tensor`` of the norm); scales them."""
        from torch.distributed.tensor import DTensor

        self._pending.reduce()
        params = [p.param for p in sorted(self.plans, key=lambda p: p.index)]
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def __repr__(self) -> str:
        return f"FSDPOptimizer(stage=3, world={self.comm.world}, inner={type(self.inner).__name__})"


def _local(t: Any) -> Tensor:
    """A DTensor's local shard (``to_local()``: a view of FSDP2's sharded storage)."""
    return t.to_local()


def _like(g: Tensor, h: Tensor) -> Tensor:
    return g if g.dtype == h.dtype else g.to(h.dtype)
