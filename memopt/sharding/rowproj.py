"""Low-rank optimizers on row shards: which updates are row-separable, and the projector.

``row_reason(opt, group, p)`` decides whether ``dim0`` may row-shard a parameter: "" if its
update is row-separable, else why it must be owned whole. Row-separable are elementwise
updates (AdamW; any memopt optimizer's full-state, 1-D, FRUGAL state-free and block-mode
parameters; torch's elementwise optimizers) and the *right-sided* dense projections of GaLore
and FRUGAL: with G = [G_0; G_1; ...] (row shards) and a basis P of G's columns (r x n),
R_i = G_i P^T, the moments of R_i, and the update W_i -= f(R_i) P all stay on rank i. A
left-sided or two-sided projection mixes rows (R = P^T G sums over them), APOLLO's norm-growth
limiter and tensor-wise scale need whole-matrix norms, and Natural GaLore's Fisher solve needs
the whole projected gradient: those parameters are owned whole.

``RowShardProjector`` wraps a group's projector so that row-sharded parameters see the full
matrix's geometry (memopt.sharding never imports memopt.optim: it works through the
optimizer's ``projector(group)`` method and the projector's own methods):

- a seeded projector (``random``, ``orthogonal``) is regenerated from the full shape and the
  seed, which mixes the optimizer seed with the *global* parameter index and the refresh
  count: identical on every rank, no communication;
- a gradient-based one (``svd``, ``rsvd``, ``gram``, ``subspace``) is computed by one owner
  per parameter (owners spread over ranks by SVD cost, so no rank repeats another's SVD):
  the owner gathers the row shards, runs the projector's own ``update`` on the full gradient
  (the single-process computation), and broadcasts the r x n basis with a finite flag.

Parameters owned whole go straight to the wrapped projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memopt.sharding.comm import Comm

#: Per-parameter state key holding the ``RowInfo`` (a ``cache_`` key: left out of state_dict).
SHARD_KEY = "cache_shard"
ROW_PROJECTORS = frozenset({"svd", "rsvd", "gram", "subspace", "random", "orthogonal"})
ROW_LOW_RANK = frozenset({"GaLoreAdamW", "FrugalAdamW"})
ELEMENTWISE_TORCH = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta"}
)


@dataclass(frozen=True)
class RowInfo:
    full_shape: tuple[int, int]  # the parameter as rows x cols
    chunk: int  # rows per rank (the padded shard height)
    svd_owner: int  # the rank that computes this parameter's basis


def row_reason(opt: torch.optim.Optimizer, group: dict[str, Any], p: Tensor) -> str:
    """ "" if ``dim0`` may row-shard ``p``, else the reason it is owned whole."""
    cls = type(opt).__name__
    if not hasattr(opt, "is_low_rank"):  # not a memopt optimizer
        if cls in ELEMENTWISE_TORCH and type(opt).__module__.startswith("torch.optim"):
            return ""
        return f"{cls} is not known to update elementwise"
    if not opt.is_low_rank(group) or p.dim() < 2 or group.get("state_free"):
        return ""
    name = group.get(opt.proj_key)  # type: ignore[attr-defined]
    if name == "block":
        return ""
    if cls not in ROW_LOW_RANK:
        return f"{cls}'s low-rank update needs the whole matrix"
    if name not in ROW_PROJECTORS:
        return f"projector {name!r} indexes the whole matrix"
    shape = (int(p.shape[0]), p.numel() // int(p.shape[0]))
    side = opt.projector(group).side(shape)  # type: ignore[attr-defined]
    if side != "right":
        return f"a {side}-sided projection of a {shape[0]}x{shape[1]} matrix mixes rows"
    return ""


def state_weight(opt: torch.optim.Optimizer, group: dict[str, Any], p: Tensor) -> int:
    """Estimated optimizer-state size of ``p`` in units of its elements (AdamW: numel).

    Owners are balanced on it: a low-rank matrix holds moments of its projected shape plus a
    basis, far less than its numel, so balancing by numel would overload the rank that owns
    the full-state tensors.
    """
    n = p.numel()
    if not hasattr(opt, "is_low_rank") or not opt.is_low_rank(group) or p.dim() < 2:
        return n
    proj = opt.projector(group)  # type: ignore[attr-defined]
    if proj is None or group.get("state_free"):
        return n
    shape = (int(p.shape[0]), n // int(p.shape[0]))
    low = 1
    for d in proj.low_shape(shape):
        low *= int(d)
    r = proj.rank_for(shape)
    side = shape[1] if proj.side(shape) == "right" else shape[0]
    return max(1, low + r * side // 2)


class RowShardProjector:
    """A projector that handles row shards (see the module docstring); else delegates."""

    batchable = False  # refreshes of row shards are not stacked by the optimizer

    def __init__(self, base: Any, comm: Comm) -> None:
        self.base = base
        self.comm = comm
        self.name = base.name
        self.orthonormal = base.orthonormal
        self.uses_gradient = False  # the finite check runs on the full gradient, below
        self.refresh_reads_gradient = base.uses_gradient  # (what nonfinite_refresh asks)
        self.rank = base.rank
        self.density = base.density
        self.proj_type = base.proj_type
        self.options = base.options

    def update(self, state: dict[str, Any], grad: Tensor, seed: int) -> None:
        info: RowInfo | None = state.get(SHARD_KEY)
        if info is None:
            _check_finite(self.base, grad)
            self.base.update(state, grad, seed)
        elif not self.base.uses_gradient:  # seeded: only the full shape matters
            self.base.update(state, grad.new_zeros(()).expand(info.full_shape), seed)
        else:
            self._owner_update(state, grad, seed, info)

    def _owner_update(self, state: dict[str, Any], grad: Tensor, seed: int, info: RowInfo) -> None:
        m, n = info.full_shape
        padded = grad.new_zeros(info.chunk, n)
        padded[: grad.shape[0]].copy_(grad.reshape(-1, n))
        what = f"the {self.name!r} basis of a {m}x{n} row-sharded matrix"
        parts = self.comm.gather(padded, info.svd_owner, what=what)
        # [non-finite flag, the basis' rows]: a factorization gives at most min(m, n) vectors
        # (rank 40 of a 32x48 matrix: 32, as the projector's rank_for says); the other ranks
        # size their copy from the row count the owner really computed
        head = torch.zeros(2, device=grad.device)
        if parts is not None:
            full = torch.cat(parts)[:m]
            if self.base.uses_gradient and not bool(torch.isfinite(full).all()):
                head[0] = 1.0
            else:
                self.base.update(state, full, seed)
                head[1] = state["proj_P"].shape[0]
        self.comm.broadcast(head, info.svd_owner, what=what).wait()
        if bool(head[0].item()):
            raise FloatingPointError(
                f"memopt.shard: a {m}x{n} gradient has non-finite values; a {self.name!r} "
                "projector cannot be computed from it (every rank raises this). Catch it, "
                "zero_grad() and go on with the next batch, or remove the cause (clip/fix the "
                "loss, bf16 instead of fp16)."
            )
        dtype = self.options.get("basis_dtype") or grad.dtype
        basis = torch.empty(int(head[1].item()), n, dtype=dtype, device=grad.device)
        if parts is not None:
            basis.copy_(state["proj_P"])
        self.comm.broadcast(basis, info.svd_owner, what=what).wait()
        state["proj_P"] = basis
        state["proj_right"] = True

    def project(self, state: dict[str, Any], grad: Tensor) -> Tensor:
        if SHARD_KEY not in state:
            return self.base.project(state, grad)
        p, _ = self.base.basis(state)
        return grad @ p.T  # right-sided, by construction

    # -- everything below reads the side from state, never from a shape: delegate ----
    def project_back(self, state: dict[str, Any], low: Tensor) -> Tensor:
        return self.base.project_back(state, low)

    def apply_update(
        self, state: dict[str, Any], low: Tensor, out: Tensor, *, alpha: float, beta: float = 1.0
    ) -> None:
        self.base.apply_update(state, low, out, alpha=alpha, beta=beta)

    def change_of_basis(self, old: dict[str, Any], new: dict[str, Any]) -> list[Tensor]:
        return self.base.change_of_basis(old, new)

    def state_keys(self) -> tuple[str, ...]:
        return self.base.state_keys()

    def rebuild(self, state: dict[str, Any], like: Tensor) -> None:
        self.base.rebuild(state, like)

    def check_state(self, state: dict[str, Any], shape: tuple[int, int]) -> str | None:
        return None  # a row shard's state is checked against its full matrix by the wrapper

    def side(self, shape: tuple[int, int]) -> str:
        return self.base.side(shape)

    def rank_for(self, shape: tuple[int, int]) -> int:
        return self.base.rank_for(shape)

    def low_shape(self, shape: tuple[int, int]) -> Any:
        return self.base.low_shape(shape)

    def __repr__(self) -> str:
        return f"RowShardProjector({self.base!r})"


def _check_finite(base: Any, grad: Tensor) -> None:
    if base.uses_gradient and not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(
            f"a gradient has non-finite values; a {base.name!r} projector cannot be computed "
            "from it. Catch this error, zero_grad() and go on with the next batch, or remove "
            "the cause (clip/fix the loss, bf16 instead of fp16)."
        )


def install(opt: Any, comm: Comm) -> None:
    """Make ``opt.projector(group)`` return row-aware wrappers (an instance attribute)."""
    if getattr(opt, "_memopt_row_projectors", False):
        return
    original = opt.projector
    wrappers: dict[int, RowShardProjector] = {}

    def projector(group: dict[str, Any]) -> Any:
        base = original(group)
        if base is None:
            return None
        w = wrappers.get(id(base))
        if w is None:
            w = wrappers[id(base)] = RowShardProjector(base, comm)
        return w

    opt.projector = projector
    opt._memopt_row_projectors = True
