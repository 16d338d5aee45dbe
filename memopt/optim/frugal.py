"""FRUGAL: a state-full subspace and a state-free rest (Zmushko et al., arXiv 2411.07837).

For each projected parameter with gradient G and an orthonormal projector P:

    W <- (1 - lr wd) W                         # decoupled decay first, as the reference
    g_in  = project(G)                          # the state-full part (Adam, torch eps)
    g_out = G - project_back(g_in)              # the residual
    W <- W - lr_p * project_back(Adam(g_in)) - lr_p * inactive_lr_scale * rule(g_out)

with ``lr_p = lr * proj_params_lr_scale`` and ``rule`` = sign (signSGD, the default),
identity (SGD) or zero (``none``). On each refresh the moments are zeroed and bias
correction restarts (``moments="reset"``, as the reference).

Projectors: ``svd``, ``orthogonal`` (FRUGAL's "random"), ``columns`` (FRUGAL's
"randperm"; column or row selection), ``coordinate`` (random entries) and ``block``:
whole tensors in rotation. In block mode a ``density`` share of the group's tensors is
active at a time and gets full Adam state; the rest get the state-free rule and hold no
state at all, so memory follows the density. ``block_order`` is random (a seeded
permutation per pass, so each tensor is active once per pass), ascending, descending or
mirror (pairs from both ends: first and last together, then second and second-to-last,
...); the schedule is a function of the group's step count (the most steps any of its
tensors has taken: a tensor that misses steps keeps its slot) and the optimizer seed, so it
resumes exactly and is the same on every rank.

Groups with ``state_free=True`` (embeddings, norms, the output head, if asked) get the
state-free rule on the whole gradient; groups with neither ``density`` nor ``rank``
get plain AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim._base import MemoptOptimizer
from memopt.optim.projection import Projector, mix_seed, writable_matrix

FRUGAL_BASE: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "state_dtype": None,
    "state_free": False,
    "inactive_update_rule": "sign_sgd",
    "inactive_lr_scale": 1.0,
}

FRUGAL_LOW_RANK: dict[str, Any] = {
    "update_proj_gap": 200,
    "proj": "svd",
    "proj_type": "std",
    "proj_options": {},
    "proj_params_lr_scale": 1.0,
    "moments": "reset",
    "stagger": False,
    "block_order": "descending",
    "matmul_dtype": None,
}

RULES = ("sign_sgd", "sgd", "none")
ORDERS = ("random", "ascending", "descending", "mirror")


class FrugalAdamW(MemoptOptimizer):
    """FRUGAL with Adam as the state-full optimizer."""

    base_defaults = FRUGAL_BASE
    low_rank_defaults = FRUGAL_LOW_RANK
    extra_proj_names = ("block",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        state_dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            state_dtype=state_dtype,
            inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale,
            state_free=False,
        )
        self._init_caches()
        super().__init__(params, defaults, seed=seed)

    def _init_caches(self) -> None:
        self._active_cache: dict[tuple[int, int, int], set[int]] = {}
        self._block_clock: dict[int, int] = {}  # block groups' step counts, during step()

    def _step(self, loss: Any) -> Any:
        # Block mode's schedule follows the group's step count (the most steps any of its
        # tensors has taken), not each tensor's own: a tensor without a gradient on some step
        # (unused that step, or unfrozen later) keeps its slot in the rotation, so exactly a
        # density share holds state. (step_one outside step(), optimizer-in-backward, has no
        # group step to read: there each tensor counts its own steps.)
        self._block_clock = {
            id(g): max((self.state[p].get("step", 0) for p in g["params"] if p in self.state),
                       default=0)
            for g in self.param_groups
            if g.get(self.proj_key) == "block" and self.is_low_rank(g)
        }  # fmt: skip
        try:
            return super()._step(loss)
        finally:
            self._block_clock = {}

    def projector(self, group: dict[str, Any]) -> Projector:
        if group[self.proj_key] == "block":
            return None  # type: ignore[return-value]  # block mode selects whole tensors
        return super().projector(group)

    def check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if group["inactive_update_rule"] not in RULES:
            raise ValueError(f"{name}: inactive_update_rule must be one of {RULES}")
        if not self.is_low_rank(group):
            return
        if group["block_order"] not in ORDERS:
            raise ValueError(f"{name}: block_order must be one of {ORDERS}")
        proj = self.projector(group)
        if proj is not None and not proj.orthonormal:
            raise ValueError(
                f"{name}: FRUGAL splits G into a projected part and its residual, which needs "
                f"an orthonormal projector; {group['proj']!r} is not. Use 'orthogonal' "
                "(FRUGAL's 'random'), 'svd', 'columns' or 'coordinate'"
            )
        if group["moments"] == "rotate" and group["proj"] == "block":
            raise ValueError(f"{name}: block mode has no basis to rotate; use moments='reset'")
        if group.get("density") is None and group["proj"] in ("block", "coordinate"):
            raise ValueError(f"{name}: proj={group['proj']!r} needs density=..., not rank")

    def active_blocks(self, group: dict[str, Any], cycle: int) -> set[int]:
        """Ids of the group's tensors that hold Adam state during refresh cycle ``cycle``.

        A pure function of (group, cycle, seed), so every rank, and a resumed run, agrees
        without any stored schedule; cached for the cycle.
        """
        key = (id(group), cycle, len(group["params"]))
        cached = self._active_cache.get(key)
        if cached is not None:
            return cached
        params = group["params"]
        active = {id(params[j]) for j in self._block_indices(group, cycle)}
        self._active_cache = {key: active}  # only the current cycle is worth keeping
        return active

    def _block_indices(self, group: dict[str, Any], cycle: int) -> set[int]:
        n = len(group["params"])
        k = round(n * group["density"])
        if k == 0:
            return set()
        order = group["block_order"]
        if order == "random":
            windows_per_pass = max(1, -(-n // k))
            perm_seed = mix_seed(self._seed, 0xB10C, cycle // windows_per_pass)
            seq = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
            start = (cycle % windows_per_pass) * k
        else:
            seq = list(range(n))
            if order == "descending":
                seq.reverse()
            elif order == "mirror":  # from both ends at once: 0, n-1, 1, n-2, ... (the
                # reference's pairs: the first and last tensors are active together)
                seq = [seq[j // 2] if j % 2 == 0 else seq[n - 1 - j // 2] for j in range(n)]
            start = cycle * k
        return {seq[(start + j) % len(seq)] for j in range(k)}

    def adopt_loaded(self, group: dict[str, Any], loaded: list[tuple[Tensor, bool]]) -> None:
        """After a load: state-free parameters keep their step count and nothing else (a
        torch.optim.AdamW checkpoint's moments would never be read, yet saved and counted
        forever). In block mode torch's moments of a tensor active in the window the next
        step runs in continue as its Adam moments (the count is torch's, so is the bias
        correction); an inactive tensor drops them, as the schedule would."""
        if group["state_free"]:
            for p, _ in loaded:
                moments.drop(self.state[p])
        elif self.is_low_rank(group) and group["proj"] == "block":
            clock = max((self.state[p].get("step", 0) for p in group["params"] if p in self.state),
                        default=0)  # fmt: skip
            window = clock // group["update_proj_gap"]
            active = self.active_blocks(group, window)
            for p, from_torch in loaded:
                st = self.state[p]
                if not from_torch:
                    continue  # (memopt's own: its window and moments are consistent)
                if id(p) in active and moments.present(st):
                    st["active_window"] = window
                else:
                    moments.drop(st)
                    st.pop("active_window", None)
        super().adopt_loaded(group, loaded)

    def expected_moment_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...] | None:
        if group["state_free"]:
            return None
        if self.is_low_rank(group) and group["proj"] == "block":
            return tuple(p.shape)  # whole tensors, while active
        return super().expected_moment_shape(p, group)

    def keeps_projector_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        return not group["state_free"] and super().keeps_projector_state(p, group)

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> F.EpsMode | None:
        if group["state_free"]:
            return None
        if not self.is_low_rank(group) or (p.dim() < 2 and group["proj"] != "block"):
            return "torch"
        return None

    def step_param(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        if group["state_free"]:
            state["step"] += 1
            self.state_free(p, p.grad, group, group["lr"])  # type: ignore[arg-type]
        elif not self.is_low_rank(group) or p.dim() < 2 and group["proj"] != "block":
            self.full_adam(p, group, state, eps_mode="torch")
        elif group["proj"] == "block":
            self.block_step(p, group, state)
        else:
            self.subspace_step(p, group, state, label)

    def state_free(self, p: Tensor, g: Tensor, group: dict[str, Any], lr: float) -> None:
        rule = group["inactive_update_rule"]
        lr_in = lr * group["inactive_lr_scale"]
        wd = group["lr"] * group["weight_decay"]
        # bf16 / fp16: decay and step summed in fp32, rounded once (see _functional.fp32_work)
        with F.fp32_work(p, fold=bool(wd) and rule != "none") as w:
            if wd:
                w.mul_(1.0 - wd)
            if rule == "sign_sgd":
                w.add_(torch.sign(g).to(w.dtype), alpha=-lr_in)
            elif rule == "sgd":
                w.add_(g.to(w.dtype), alpha=-lr_in)

    def block_step(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        window = self._block_clock.get(id(group), state["step"]) // group["update_proj_gap"]
        if id(p) not in self.active_blocks(group, window):
            moments.drop(state)  # an inactive tensor holds no optimizer state
            state.pop("active_window", None)
            state["step"] += 1
            self.state_free(p, p.grad, group, group["lr"] * group["proj_params_lr_scale"])  # type: ignore[arg-type]
            return
        if state.get("active_window") != window:  # newly active: fresh moments
            moments.drop(state)
            state["active_window"] = window
            state["moments_since"] = state["step"]
        # decay by lr * wd as every other FRUGAL tensor (and the reference) does; the Adam
        # step alone takes the scaled lr (decoupled decay inside it would scale too)
        wd = group["lr"] * group["weight_decay"]
        lr_p = group["lr"] * group["proj_params_lr_scale"]
        if wd and lr_p and F.is_half(p):
            # bf16 / fp16: the decay inside the Adam step's one rounding (multiplied on its
            # own it would round back to W), as a weight decay of wd / lr_p at lr_p
            scaled = dict(group, lr=lr_p, weight_decay=wd / lr_p)
        else:
            if wd:
                p.mul_(1.0 - wd)
            scaled = dict(group, lr=lr_p, weight_decay=0.0)
        self.full_adam(p, scaled, state, eps_mode="torch")

    def subspace_step(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        wd = group["lr"] * group["weight_decay"]
        g = self.grad_matrix(p, group)
        self.refresh_if_due(p, state, g, group, label)
        proj = self.projector(group)
        low = proj.project(state, g)
        lr_p = group["lr"] * group["proj_params_lr_scale"]
        rule = group["inactive_update_rule"]
        direction, step_size, _, _ = self.adam_on(low, group, state, eps_mode="torch", lr=lr_p)
        # (a subspace that is the whole space leaves a residual of round-off, which sign_sgd
        # would turn into a full step of +-lr on every entry)
        rest = rule != "none" and not _whole_space(state)
        # bf16 / fp16 with more than one term: decay and both parts summed in fp32 and W
        # rounded once (a decay below half an ulp multiplied on its own rounds back to W)
        with writable_matrix(p) as w, F.fp32_work(w, fold=bool(wd) or rest) as work:
            if wd:
                work.mul_(1.0 - wd)
            if rest:
                residual = g.clone()
                proj.apply_update(state, low, residual, alpha=-1.0)
                out = residual.sign_() if rule == "sign_sgd" else residual  # our own copy
                work.add_(out.to(work.dtype), alpha=-lr_p * group["inactive_lr_scale"])
            proj.apply_update(state, direction, work, alpha=-step_size)


def _whole_space(state: dict[str, Any]) -> bool:
    """Whether the dense basis is square (orthonormal: P P^T = I), so the subspace is the whole
    matrix and nothing is left for the state-free rule. Index projectors leave an exact zero
    residual there by themselves."""
    p = state.get("proj_P", state.get("cache_P"))
    q = state.get("proj_Q", state.get("cache_Q"))
    return all(b is None or b.shape[0] == b.shape[1] for b in (p, q)) and p is not None


__all__ = ["FrugalAdamW"]
