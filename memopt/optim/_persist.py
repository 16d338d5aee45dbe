"""What a memopt optimizer keeps across processes: ``state_dict`` / ``load_state_dict``
(tensor-only state; shapes, dtypes and the optimizer class checked before anything loads;
float state cast to the dtype this optimizer builds it in) and ``copy.deepcopy`` / pickle
(memopt's own settings travel, caches do not).

``load_state_dict`` takes memopt's own state dicts and torch.optim.Adam/AdamW's, also with
the fp32 ``master`` that memopt's ``OffloadedAdamW`` (``memopt.offload``: ``offload=`` at
stages 1/2, DeepSpeed's ``offload_optimizer``) writes beside torch's layout. No memopt
optimizer reads a master from its state: it steps the tensor it holds (the parameter, or
the copy ``memopt.shard(master_dtype=...)`` rebuilds from the loaded weights), so a
``master`` of the parameter's shape is checked and dropped. Another implementation's
(galore-torch, apollo-torch, bitsandbytes) is refused before anything loads: its projector
objects or low-rank moments cannot continue in memopt's subspace, and torch's load would
take them without a word (the next step then failed, KeyError 'index').

torch's load hooks run as with torch: the pre-hooks before memopt reads the dict, the
post-hooks after memopt's whole load. A loaded ``step`` becomes memopt's int (``_loaded``),
and ``adopt_loaded`` lets an optimizer settle what its rules keep (FRUGAL: nothing but the
count for state-free parameters, torch's moments only for block-mode tensors active next).

``PersistMixin`` sits between ``MemoptOptimizer``'s bookkeeping and ``torch.optim.Optimizer``;
it expects ``projector()``, ``is_low_rank()``, ``plain_adam_mode()`` and
``check_loaded_shapes`` from the optimizer it is mixed into.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from memopt.offload.adamw_checks import MASTER  # (OffloadedAdamW's fp32 masters)
from memopt.optim import _functional as F
from memopt.optim import _moments as moments
from memopt.optim._loaded import (
    START_FRESH,
    foreign_keys,
    held_objects,
    master_problem,
    step_count,
    without_placeholders,
)
from memopt.optim._refresh import CACHE_PREFIX
from memopt.optim.projection import Projector

#: Float state loaded as saved: step counters (torch's are float tensors) and the absmax
#: scales of quantized moments (fp32 whatever the parameter).
KEEP_DTYPE = frozenset({"step", "exp_avg_absmax", "exp_avg_sq_absmax"})


class PersistMixin(torch.optim.Optimizer):
    """state_dict / load_state_dict / copy / pickle of a memopt optimizer."""

    check_loaded_shapes: bool

    def projector(self, group: dict[str, Any]) -> Projector:
        raise NotImplementedError

    def is_low_rank(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def plain_adam_mode(self, p: Tensor, group: dict[str, Any]) -> Any:
        raise NotImplementedError

    def check_loaded_group(self, saved: dict[str, Any], group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    # -- copy / pickle ---------------------------------------------------------------
    #: Per-process caches, rebuilt on demand (not copied or pickled).
    _CACHES: ClassVar[frozenset[str]] = frozenset(
        {"_projectors", "_prefetched", "_meta_table", "_meta_sig", "_active_cache"}
    )

    def __getstate__(self) -> dict[str, Any]:
        """torch keeps defaults, state and param_groups; memopt's own settings (the seed,
        APOLLO's options, flags) travel too, so ``copy.deepcopy`` and pickle give an
        optimizer that steps like the original. Hooks and caches do not (as in torch)."""
        state = super().__getstate__()
        for k, v in self.__dict__.items():
            if k in state or k in self._CACHES or k.startswith("_optimizer_"):
                continue
            if callable(v) or k == "_memopt_row_projectors":  # a wrapper's method overrides
                continue
            state[k] = v
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_projectors", {})
        self.__dict__.setdefault("_prefetched", {})
        self._init_caches()

    def _init_caches(self) -> None:
        """Subclasses with caches of their own set them here (also after unpickling)."""

    # -- state_dict ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {
            k: {n: v for n, v in st.items() if not n.startswith(CACHE_PREFIX)}
            for k, st in sd["state"].items()
        }
        sd["memopt_optimizer"] = type(self).__name__  # checked on load
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's hooks run as torch runs them, around the whole load: the pre-hooks first
        # (what they return is what loads: memopt reads the dict before torch's load does),
        # the post-hooks last, so what they change in the loaded state stays changed.
        pre = self._optimizer_load_state_dict_pre_hooks
        post = self._optimizer_load_state_dict_post_hooks
        for hook in pre.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = self._checked_for_load(state_dict)
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        before = [dict(g) for g in self.param_groups]
        self._optimizer_load_state_dict_pre_hooks = type(pre)()  # (already run)
        self._optimizer_load_state_dict_post_hooks = type(post)()  # (run below)
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for group, old in zip(self.param_groups, before, strict=True):
            for key, value in old.items():  # memopt's options a torch checkpoint lacks
                group.setdefault(key, value)  # (state_dtype, correct_bias...) stay as built
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            loaded: list[tuple[Tensor, bool]] = []
            for pid, p in zip(saved["params"], group["params"], strict=True):
                if pid in saved_state:
                    self._settle_state(p, group, str(pid), saved_state[pid])
                    loaded.append((p, "index" not in saved_state[pid]))
            if loaded:
                self.adopt_loaded(group, loaded)
        for post_hook in post.values():
            post_hook(self)

    def _checked_for_load(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` as it will load (without OffloadedAdamW's masters), once every
        check passed; raises, with nothing changed, when it cannot load here."""
        sharding = state_dict.get("sharding")
        if isinstance(sharding, dict) and int(sharding.get("world_size", 1)) > 1:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state dict is one rank's shard "
                f"(memopt.shard, {sharding}): it holds the state of that rank's parameters "
                "only, and the others would restart from zero. Load it into the same sharded "
                "optimizer, or reshard a memopt.checkpoint snapshot "
                "(AsyncCheckpointer.load); nothing was loaded"
            )
        saved_by = state_dict.get("memopt_optimizer")
        if saved_by is not None and saved_by != type(self).__name__:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state dict was saved by "
                f"{saved_by}; its state and group options do not carry over to "
                f"{type(self).__name__}. Load it into a {saved_by}; nothing was loaded"
            )
        saved_groups = state_dict["param_groups"]
        saved_state = without_placeholders(state_dict["state"])
        if len(saved_groups) == len(self.param_groups):  # (else torch's own error)
            for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
                self.check_loaded_group(saved, group, i)  # before anything changes
        self._check_foreign_state(saved_groups, saved_state)
        saved_state = self._drop_masters(saved_groups, saved_state)
        if self.check_loaded_shapes:
            self._check_loaded_shapes(saved_groups, saved_state)
        for label, p, merged, st in self._saved_states(saved_groups, saved_state):
            if "step" in st and step_count(st["step"]) is None:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state of {label} holds "
                    f"step={st['step']!r}, which is not a step count (a whole number >= 0, "
                    "as torch's float tensor or memopt's int); the state dict was edited or "
                    "is not an optimizer's. Fix or drop that entry; nothing was loaded"
                )
            for k, v in st.items():  # refuse a key of unknown dtype before anything loads
                self.load_dtype(label, p, merged, k, v)
        return {**state_dict, "state": saved_state}

    def _settle_state(self, p: Tensor, group: dict[str, Any], label: str, saved: Any) -> None:
        """``p``'s state as memopt steps it, after torch's load put ``saved`` there: each
        tensor in the dtype this optimizer builds it in, the step count an int, torch's
        fp32 moments quantized in an int8 group, a seeded projector's cache rebuilt."""
        st = self.state[p]
        for k, v in saved.items():
            if k == "step":
                st[k] = step_count(v)  # (torch's float tensor: the block schedule indexes
            elif isinstance(v, Tensor):  # with it, the fused buckets hash it by identity)
                want = self.load_dtype(label, p, group, k, v)  # (a no-op cast when the
                st[k] = v.to(device=p.device, dtype=want)  # setup is the same)
        moments.adopt_plain(st, group)  # torch's fp32 moments in an int8 group
        proj = self.projector(group) if self.is_low_rank(group) else None
        if proj is not None:  # (the state says whether it was projected: a stage-3
            proj.rebuild(st, p)  # holder between steps is a 1-D placeholder)

    def adopt_loaded(self, group: dict[str, Any], loaded: list[tuple[Tensor, bool]]) -> None:
        """After a load, settle what ``group``'s parameters hold: ``loaded`` lists each
        parameter with saved state and whether that state came from torch.optim (no
        ``index``). Subclasses whose rules keep less state drop the rest here (FRUGAL)."""

    def load_dtype(
        self, label: str, p: Tensor, group: dict[str, Any], key: str, value: Any
    ) -> torch.dtype | None:
        """The dtype a loaded state tensor takes: the one this optimizer builds ``key`` in for
        ``p`` in ``group``, as torch's own load casts state to the parameter's dtype (None:
        as saved). A state dict saved under another precision setup (bf16 parameters with
        fp32 masters or ``state_dtype="float32"``, loaded into plain bf16, or the reverse)
        then steps here; fp32 -> bf16 rounds to bf16, bf16 -> fp32 is exact."""
        if not isinstance(value, Tensor) or not value.is_floating_point() or key in KEEP_DTYPE:
            return None
        compute = moments.build_dtype(p.dtype, group)
        want = _built_dtype(key, compute)
        if want is None and self.is_low_rank(group):  # (a stage-3 holder may be 1-D)
            proj = self.projector(group)  # a projector's float state is its basis, kept in
            if proj is not None and key in proj.state_keys():  # basis_dtype, else in the
                want = proj.options.get("basis_dtype") or compute  # dtype it projects
        if want is None and value.dtype != compute:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved state of {label} holds "
                f"{key!r} in {value.dtype}, and this optimizer computes that parameter in "
                f"{compute}; it does not know which dtype {key!r} takes here. Load it into an "
                "optimizer set up as when it was saved (same parameter dtype, state_dtype and "
                "master_dtype); nothing was loaded"
            )
        return want

    def expected_moment_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...] | None:
        """Shape of Adam's moments for ``p`` in ``group`` (None: this parameter keeps none)."""
        if self.plain_adam_mode(p, group) is not None or p.dim() < 2 or not self.is_low_rank(group):
            return tuple(p.shape)
        return tuple(self.projector(group).low_shape(matrix_shape(p)))

    def keeps_projector_state(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p``'s state in ``group`` holds projector state beside its moments."""
        return (
            self.is_low_rank(group)
            and p.dim() >= 2
            and self.plain_adam_mode(p, group) is None
            and self.projector(group) is not None
        )

    def _saved_states(
        self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]
    ) -> Iterator[tuple[str, Tensor, dict[str, Any], dict[str, Any]]]:
        """(label, parameter, group with the saved options, saved state) of every parameter
        with saved state; nothing when the layout differs (torch's load raises for that)."""
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            return
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            names = group.get("param_names")
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                st = saved_state.get(pid)
                if st:
                    yield (names[i] if names else f"group {gi} param {i}"), p, merged, st

    def _check_foreign_state(
        self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]
    ) -> None:
        """Refuse state that neither memopt nor torch.optim.Adam/AdamW wrote (galore-torch,
        apollo-torch, bitsandbytes...): torch's load takes any object, and the next step
        read keys that are not there. Pickled objects first: they name the source best."""
        saved = list(self._saved_states(saved_groups, saved_state))
        whys = [(label, held_objects(st)) for label, _, _, st in saved]
        whys += [(label, foreign_keys(st, self.keeps_projector_state(p, group)))
                 for label, p, group, st in saved]  # fmt: skip
        for label, why in whys:
            if why is not None:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state of {label} {why}. "
                    + START_FRESH
                )

    def _drop_masters(
        self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]
    ) -> dict[Any, Any]:
        """``saved_state`` without the ``master`` of an ``OffloadedAdamW`` state dict (a new
        dict; the caller's is left as it is), once each master is checked to be a float tensor
        of its moments' (and, where shapes are checked, its parameter's) shape. The weights
        come from the model's own state: with fp32 parameters the master is their value."""
        if not any(isinstance(st, dict) and MASTER in st for st in saved_state.values()):
            return saved_state
        for label, p, _, st in self._saved_states(saved_groups, saved_state):
            why = master_problem(st, tuple(p.shape) if self.check_loaded_shapes else None)
            if why is not None:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state of {label} "
                    f"(shape {tuple(p.shape)} here) holds {MASTER!r}, the fp32 master weights "
                    f"memopt's offloaded AdamW saves, but {why}: the state dict was edited or "
                    "is from another model. Load the snapshot it came from, or start the "
                    "optimizer fresh from the model weights; nothing was loaded"
                )
        return {
            pid: {k: v for k, v in st.items() if k != MASTER} if isinstance(st, dict) else st
            for pid, st in saved_state.items()
        }

    def _check_loaded_shapes(
        self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]
    ) -> None:
        """Refuse a state dict whose tensors cannot belong to these parameters (the model
        changed shape, or the groups are in another order): torch would load it and the
        next step would read moments of the wrong size."""
        for label, p, merged, st in self._saved_states(saved_groups, saved_state):
            why = None
            shape = self.expected_moment_shape(p, merged)
            if shape is not None:
                why = moments.mismatch(st, shape)
            if why is None and self.is_low_rank(merged) and p.dim() >= 2:
                proj = self.projector(merged)
                why = None if proj is None else proj.check_state(st, matrix_shape(p))
            if why is not None:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state of {label} "
                    f"(shape {tuple(p.shape)} here) does not fit: {why}. The checkpoint is "
                    "from a model whose shapes differ, or its parameters were passed in "
                    "another order; nothing was loaded"
                )


def _built_dtype(key: str, compute: torch.dtype) -> torch.dtype | None:
    """The dtype memopt's optimizers build float state ``key`` in when they compute in
    ``compute`` (None: not one of these keys; a projector's own keys are its to say)."""
    if key in ("exp_avg", "exp_avg_sq"):
        return compute
    if key in ("nat_hist", "nat_gram", "nl_prev"):  # Natural GaLore's history and Gram
        return F.woodbury_dtype(compute)  # matrix, APOLLO's last norm: at least fp32
    return None


def matrix_shape(p: Tensor) -> tuple[int, int]:
    """(m, n) of a parameter of 2 or more dims seen as a matrix (``as_matrix``)."""
    return int(p.shape[0]), int(math.prod(p.shape[1:]))
