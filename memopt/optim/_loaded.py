"""What a state dict about to load may hold, per parameter: whose state it is (memopt's,
torch.optim.Adam/AdamW's, or another implementation's, refused), whether an fp32 ``master``
in it fits, and its step count (torch keeps ``step`` as a float 0-d tensor; memopt's
optimizers count in Python ints, and a loaded count becomes one, so every schedule and
bucket reads a plain number). Pure functions over the saved state; ``_persist`` raises.
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import Tensor

from memopt.offload.adamw_checks import MASTER  # (OffloadedAdamW's fp32 masters)
from memopt.optim._refresh import CACHE_PREFIX

#: What torch.optim.Adam / AdamW keep per parameter (amsgrad's ``max_exp_avg_sq`` is refused
#: with its group). memopt's first step of a parameter writes ``index`` next to ``step``, so
#: a state without ``index`` came from elsewhere.
TORCH_ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
START_FRESH = (
    "memopt's state dicts are tensor-only and hold the basis or seed memopt computed, so "
    "another implementation's moments cannot continue here. Load the model weights and "
    "start the memopt optimizer fresh from them; nothing was loaded"
)
def held_objects(state: dict[str, Any]) -> str | None:
    """Why a saved per-parameter ``state`` holding Python objects (not tensors, numbers or
    strings) is not memopt's (what follows "the saved state of X"), or None."""
    objects = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not _plain(v)]
    if not objects:
        return None
    return (
        f"holds Python objects, not tensors ({', '.join(objects)}): this looks like a "
        "galore-torch or apollo-torch optimizer state dict, which pickles its projector into "
        "the per-parameter state"
    )


def foreign_keys(state: dict[str, Any], projected: bool) -> str | None:
    """Why a saved per-parameter ``state`` was written neither by memopt nor by
    torch.optim.Adam/AdamW, or cannot continue here, or None. ``projected``: the parameter
    takes a low-rank path here, so its moments need memopt's projector state."""
    if "index" in state:
        return None  # memopt's own
    extra = sorted(set(state) - TORCH_ADAM_KEYS - {MASTER})  # (OffloadedAdamW's master)
    if extra:
        return (
            f"holds {extra}, which neither memopt nor torch.optim.Adam/AdamW writes: this "
            "looks like another implementation's state dict (galore-torch, apollo-torch, "
            "bitsandbytes' 8-bit optimizers)"
        )
    if not projected:
        return None  # torch.optim.AdamW's: loads
    m = state.get("exp_avg")
    shape = f" of shape {tuple(m.shape)}" if isinstance(m, Tensor) else ""
    return (
        f"holds Adam moments{shape} without memopt's "
        "projector state ('index', 'proj_count', the basis or seed) for a low-rank "
        "parameter: this looks like a galore-torch or apollo-torch state dict with the "
        "projector left out, or a torch.optim one"
    )


def master_problem(state: dict[str, Any], shape: tuple[int, ...] | None) -> str | None:
    """Why the ``master`` in a saved per-parameter ``state`` cannot be its parameter's fp32
    master weights (it must be a float tensor of the moments' shape and, given ``shape``, of
    that one), or None."""
    master = state.get(MASTER)
    if master is None:
        return None
    if not isinstance(master, Tensor) or not master.is_floating_point():
        what = master.dtype if isinstance(master, Tensor) else type(master).__name__
        return f"it is a {what}, not a float tensor"
    got = tuple(master.shape)
    m = state.get("exp_avg")
    if isinstance(m, Tensor) and tuple(m.shape) != got:
        return f"it has shape {got} and exp_avg {tuple(m.shape)}"
    if shape is not None and got != shape:
        return f"it has shape {got}"
    return None


def _plain(value: Any) -> bool:
    """A tensor, a number, a string, None, or a list/tuple/dict of those."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    return False


def step_count(value: Any) -> int | None:
    """A saved ``step`` as memopt's int (torch's float 0-d tensor, a float or an int holding
    a whole number >= 0), or None when it is not a step count."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        count = int(value)
        return count if count >= 0 else None
    value = float(value)
    return int(value) if value.is_integer() and value >= 0 else None


def without_placeholders(saved_state: dict[Any, Any]) -> dict[Any, Any]:
    """``saved_state`` without what no optimizer saved: ``cache_*`` entries (memopt
    regenerates them; its ``state_dict()`` leaves them out) and empty dicts, which torch
    DCP's ``set_optimizer_state_dict(flatten_optimizer_state_dict=True)`` puts under each
    key the live optimizer holds and the checkpoint lacks. A new dict where anything goes
    (the caller's is left as it is)."""

    def dropped(key: Any, value: Any) -> bool:
        return (isinstance(key, str) and key.startswith(CACHE_PREFIX)) or (
            isinstance(value, dict) and not value
        )

    if not any(
        isinstance(st, dict) and any(dropped(k, v) for k, v in st.items())
        for st in saved_state.values()
    ):
        return saved_state
    return {
        pid: {k: v for k, v in st.items() if not dropped(k, v)} if isinstance(st, dict) else st
        for pid, st in saved_state.items()
    }
