"""Bookkeeping shared by memopt's optimizers; the math lives in ``_functional``.

``MemoptOptimizer`` is a ``torch.optim.Optimizer``: LR schedulers, ``zero_grad``, hooks
and ``state_dict`` behave as users expect. What it adds:

- validated param groups (unknown keys and bad values are errors, see ``_groups``);
- one projector per low-rank group, built from the group's options; its per-parameter
  state (a basis tensor, or a seed) lives in ``optimizer.state``;
- the refresh schedule: a parameter's subspace is recomputed at step 0 and then every
  ``update_proj_gap`` steps. With ``stagger=True`` parameter i refreshes at steps where
  ``step % gap == i * gap // n`` so the SVDs of n parameters spread over the gap
  instead of landing on one step;
- the moments policy on refresh: ``keep`` (GaLore), ``reset`` (FRUGAL: zero moments,
  restart bias correction) or ``rotate`` (express the moments in the new basis);
- tensor-only state: ``state_dict()`` holds tensors and plain numbers, loads with
  ``torch.load(weights_only=True)``, and ``load_state_dict`` keeps each state tensor's
  saved dtype (torch would cast fp32 moments of bf16 parameters to bf16, and integer
  tensors to floats), so a resumed run continues bit for bit (``_persist``: also the
  shape and class checks on load, deepcopy and pickle).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from memopt._utils import warn_once
from memopt._utils.wrapped_optim import closure_loss
from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim import kernels
from memopt.optim._checks import check_grad
from memopt.optim._full_adam import adamw_many
from memopt.optim._groups import (
    check_common,
    check_known_keys,
    check_low_rank,
    check_torch_keys,
)
from memopt.optim._persist import PersistMixin
from memopt.optim._refresh import RefreshMixin
from memopt.optim.projection import Projector, as_matrix, make_projector


class ParamMeta(NamedTuple):
    """Where a parameter sits in the optimizer (stable while the groups are unchanged)."""

    position: int  # 1-based position over all groups: part of the projection seed
    label: str  # its name, for error messages
    low_rank_pos: int | None  # position among low-rank parameters (for staggering)
    n_low_rank: int


class MemoptOptimizer(RefreshMixin, PersistMixin):
    """Base class: group validation, projector management, refresh schedule, resume."""

    #: Options every group of this optimizer accepts (and their defaults).
    base_defaults: ClassVar[dict[str, Any]] = {}
    #: Options that only groups with a ``rank`` (or ``density``) accept.
    low_rank_defaults: ClassVar[dict[str, Any]] = {}
    #: Whether ``load_state_dict`` checks the saved state's shapes against the parameters
    #: (a wrapper that swaps in shards or placeholders turns it off; see WrapperOptimizer).
    check_loaded_shapes: bool = True
    #: Set while a ``step_in_backward`` handle drives this optimizer (memopt.shard refuses it).
    _memopt_in_backward: bool = False
    #: Which group key names the projector kind.
    proj_key: ClassVar[str] = "proj"
    #: Selection modes that this optimizer handles itself instead of a registered projector.
    extra_proj_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, seed: int = 0) -> None:
        self._seed = int(seed)
        self._projectors: dict[tuple[Any, ...], Projector] = {}
        self._prefetched: dict[int, tuple[Tensor, Tensor]] = {}
        super().__init__(params, defaults)

    # -- groups --------------------------------------------------------------------
    def is_low_rank(self, group: dict[str, Any]) -> bool:
        return group.get("rank") is not None or group.get("density") is not None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_known_keys(param_group, self.group_keys(), owner, torch_keys=True)
        check_torch_keys(param_group, owner)  # (accepted, and ignored: as on load)
        named = [("param_names" in g) for g in self.param_groups]
        if named and all(named) and "param_names" not in param_group:
            raise ValueError(
                f"{owner}.add_param_group: the existing groups carry param_names (as "
                "memopt.optim.param_groups builds them) and torch wants every group named or "
                "none; give the new group param_names=[...] too, one per parameter, e.g. "
                "{'params': [p], 'param_names': ['layers.0.mlp.up_proj.weight']}"
            )
        if self.is_low_rank(param_group):
            for key, value in self.low_rank_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_common(group, owner)
            if self.is_low_rank(group):
                check_low_rank(group, owner, self.proj_key, self.extra_proj_names)
                self.projector(group)  # builds it: bad projector options fail here
            self.check_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    @classmethod
    def group_keys(cls) -> set[str]:
        """The param-group options this optimizer takes (AdamW: no rank or density)."""
        low_rank = {"rank", "density"} if cls.low_rank_defaults else set()
        return set(cls.base_defaults) | set(cls.low_rank_defaults) | low_rank

    def check_group(self, group: dict[str, Any]) -> None:
        """Optimizer-specific group checks (override)."""

    def check_loaded_group(self, saved: dict[str, Any], group: dict[str, Any], index: int) -> None:
        """A group of a state dict about to load (from memopt, or from torch.optim.AdamW)
        gets the checks ``add_param_group`` gives; torch's own keys load when they ask for
        nothing memopt does not do (``maximize=True`` or ``amsgrad=True`` would be ignored)."""
        owner = f"{type(self).__name__}.load_state_dict (group {index})"
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        if isinstance(merged.get("lr"), Tensor):  # a tensor lr set on a group loads as saved
            merged["lr"] = float(merged["lr"])
        check_torch_keys(merged, owner, "; nothing was loaded")
        check_known_keys(merged, self.group_keys(), owner, torch_keys=True)
        check_common(merged, owner)
        if self.is_low_rank(merged):
            check_low_rank(merged, owner, self.proj_key, self.extra_proj_names)

    def adopt_loaded(self, group: dict[str, Any], loaded: list[tuple[Tensor, bool]]) -> None:
        """torch.optim's state gets the ``index`` memopt's first step writes (the parameter's
        position), so it is memopt's from here on, saved and loaded as such."""
        meta = self._meta()
        for p, from_torch in loaded:
            if from_torch and id(p) in meta:
                self.state[p].setdefault("index", meta[id(p)][1].position)

    def projector(self, group: dict[str, Any]) -> Projector:
        """The projector for a low-rank group, rebuilt if the group's options changed."""
        key = (
            group[self.proj_key],
            group.get("rank"),
            group.get("density"),
            group["proj_type"],
            tuple(sorted(group.get("proj_options", {}).items())),
            group.get("state_dtype"),
            group.get("matmul_dtype"),
        )
        proj = self._projectors.get(key)
        if proj is None:
            opts = dict(group.get("proj_options", {}))
            if moments.compute_fp32(group):
                opts["basis_dtype"] = torch.float32
            if group.get("matmul_dtype") is not None:
                opts["matmul_dtype"] = group["matmul_dtype"]
            proj = make_projector(
                group[self.proj_key],
                rank=group.get("rank"),
                density=group.get("density"),
                proj_type=group["proj_type"],
                **opts,
            )
            self._projectors[key] = proj
        return proj

    # -- the step ------------------------------------------------------------------
    @torch.compiler.disable  # a compiled training step runs the update eagerly (a graph
    @torch.no_grad()  # break): Dynamo could not trace the bookkeeping and native calls
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        with autocast_off():
            return self._step(loss)

    def _step(self, loss: Any) -> Any:
        meta = self._meta()
        for group in self.param_groups:  # every gradient before any parameter changes
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p.grad, meta[id(p)][1].label)
        self._prefetch_refreshes()
        try:
            for group in self.param_groups:
                plain: dict[F.EpsMode, list[Tensor]] = defaultdict(list)
                low_rank: list[Tensor] = []
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    mode = self.plain_adam_mode(p, group)
                    if mode is None:
                        low_rank.append(p)
                    else:
                        plain[mode].append(p)
                if low_rank:
                    self.low_rank_many(low_rank, group)
                for eps_mode, ps in plain.items():
                    states = [self._init_state(p, group, meta[id(p)][1]) for p in ps]
                    adamw_many(ps, states, group, eps_mode)
        finally:
            self._prefetched.clear()
        return loss

    def low_rank_many(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """The low-rank updates of one group's parameters in ``step()``: one at a time here;
        a subclass may batch the small per-parameter work across them (APOLLO does)."""
        for p in params:
            self.step_one(p)

    @torch.no_grad()
    def step_one(self, p: Tensor) -> None:
        """Update one parameter from its ``.grad`` (used by optimizer-in-backward)."""
        meta = self._meta().get(id(p))
        if meta is None:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is not managed by this "
                f"{type(self).__name__}; pass it in the optimizer's param groups"
            )
        group, m = meta
        assert p.grad is not None
        check_grad(p.grad, m.label)
        with autocast_off():
            self.step_param(p, group, self._init_state(p, group, m), m.label)

    def _init_state(self, p: Tensor, group: dict[str, Any], m: ParamMeta) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["index"] = m.position
            if m.low_rank_pos is not None and group.get("stagger", False):
                state["proj_phase"] = m.low_rank_pos * group["update_proj_gap"] // m.n_low_rank
            if m.low_rank_pos is not None and (
                group.get("moments") == "reset" or group.get(self.proj_key) == "block"
            ):  # (the key from the first step: torch DCP's flattened load keeps only the
                state["moments_since"] = 0  # keys a fresh optimizer's first step writes)
        return state

    def _meta(self) -> dict[int, tuple[dict[str, Any], ParamMeta]]:
        """Per-parameter position and label, rebuilt when the groups change."""
        signature = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if getattr(self, "_meta_sig", None) != signature:
            table: dict[int, tuple[dict[str, Any], ParamMeta]] = {}
            n_low = sum(len(g["params"]) for g in self.param_groups if self.is_low_rank(g))
            index = low_pos = 0
            for gi, group in enumerate(self.param_groups):
                names = group.get("param_names")
                low = self.is_low_rank(group)
                for i, p in enumerate(group["params"]):
                    index += 1
                    label = names[i] if names else f"group {gi} param {i}"
                    table[id(p)] = (group, ParamMeta(index, label, low_pos if low else None, n_low))
                    low_pos += int(low)
            self._meta_table, self._meta_sig = table, signature
        return self._meta_table

    def step_param(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        """One parameter's update: plain AdamW, or the optimizer's low-rank rule."""
        mode = self.plain_adam_mode(p, group)
        if mode is not None:
            self.full_adam(p, group, state, eps_mode=mode)
        else:
            self.low_rank_step(p, group, state, label)

    def low_rank_step(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        raise NotImplementedError

    def projected_gradient(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> tuple[Projector, Tensor, Tensor, bool]:
        """Refresh the subspace if due; return (projector, 2-D grad, projected grad, refreshed)."""
        g = self.grad_matrix(p, group)
        refreshed = self.refresh_if_due(p, state, g, group, label)
        proj = self.projector(group)
        return proj, g, proj.project(state, g), refreshed

    # -- shared pieces for subclasses ----------------------------------------------
    def grad_matrix(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        g = as_matrix(p.grad)  # type: ignore[arg-type]
        return g.float() if moments.compute_fp32(group) else g

    def projects(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether this parameter goes through the group's projector (2-D or more)."""
        if not self.is_low_rank(group):
            return False
        if p.dim() < 2:
            warn_once(
                f"{type(self).__name__}: a {p.dim()}-D parameter (shape {tuple(p.shape)}) is in a "
                "low-rank group; it gets a full-state update (memopt.optim.param_groups puts "
                "such parameters in the full-state group)"
            )
            return False
        return True

    def adam_on(
        self,
        x: Tensor,
        group: dict[str, Any],
        state: dict[str, Any],
        *,
        eps_mode: F.EpsMode,
        lr: float | None = None,
        norms_dim: int | None = None,
    ) -> tuple[Tensor, float, Tensor | None, Tensor | None]:
        """Advance the step and Adam's moments of ``x`` (a projected gradient).

        Returns ``kernels.adam_update``'s (direction, step size, num, den).
        """
        m, v = moments.load(state, x, group)
        state["step"] += 1
        b1, b2 = group["betas"]
        out = kernels.adam_update(
            x,
            m,
            v,
            step=self.bias_step(state),
            beta1=b1,
            beta2=b2,
            eps=group["eps"],
            lr=group["lr"] if lr is None else lr,
            eps_mode=eps_mode,
            correct_bias=group.get("correct_bias", True),
            norms_dim=norms_dim,
        )
        moments.store(state, m, v, group)
        return out

    def bias_step(self, state: dict[str, Any]) -> int:
        """Steps since the moments last started from zero (for bias correction)."""
        return int(state["step"] - state.get("moments_since", 0))

    def full_adam(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], eps_mode: F.EpsMode
    ) -> None:
        """Plain AdamW on the whole parameter (see ``_full_adam``)."""
        adamw_many([p], [state], group, eps_mode)

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> F.EpsMode | None:
        """The eps placement if ``p`` takes the plain AdamW path in ``group``, else None.

        ``step()`` batches those parameters into one fused call per group.
        """
        return None

@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """No autocast inside an optimizer step: under a training loop's ``torch.autocast`` the
    projection GEMMs ran in fp16/bf16 and created fp16 moments for fp32 parameters (GaLore
    moved 9x, FRUGAL 145x too far in 4 fp16 steps). torch's own optimizers are elementwise,
    which autocast leaves alone."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
