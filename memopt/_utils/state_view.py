"""``StateView``: what a memopt optimizer wrapper returns as ``state``.

The wrapper (``wrapped_optim.WrapperOptimizer``) owns no state: the inner optimizer keeps it,
keyed by the tensors in its groups, which under ``memopt.shard`` are this rank's shards, fp32
master copies or stage-3 holders, not the model's parameters. Code written for
``torch.optim`` indexes ``opt.state[p]`` with the model's parameters (monitoring that logs
``exp_avg_sq`` norms, helpers that move state between devices). Handing out the inner
``defaultdict`` made such a read insert an empty entry under a tensor that is in no group, and
the next ``state_dict()`` failed with torch's bare ``KeyError: <id>``.

The view keeps every key the inner state has and asks the wrapper (``state_key``) what any
other key means: a model parameter becomes the tensor the inner optimizer steps for it (its
state, created empty on first access as torch's ``defaultdict`` does, for a tensor that *is*
in a group); one this rank does not step reads as an empty, read-only ``NoStateHere`` whose
write raises, naming where its state is; anything else is a ``KeyError`` saying what it is.
Iteration, ``len``, ``items()`` are the inner state's own keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any, NoReturn

from torch import Tensor

__all__ = ["NoStateHere", "StateView", "unknown_key"]

_MISSING = object()


class NoStateHere(dict[Any, Any]):
    """An empty state dict for a parameter another rank steps; writing into it raises."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{self.reason}; nothing was written")

    __setitem__ = update = setdefault = __ior__ = _refuse


class StateView(MutableMapping[Any, Any]):
    """The inner optimizer's state, indexable by the model's parameters (module docstring)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    @property
    def _state(self) -> Any:
        return self._owner.inner.state

    def _target(self, key: Any) -> Tensor | str:
        if key in self._state:
            return key
        return self._owner.state_key(key)

    def __getitem__(self, key: Any) -> Any:
        target = self._target(key)
        if isinstance(target, str):
            return NoStateHere(target)
        return self._state[target]  # (a tensor of a group: created empty if new, as torch)

    def __setitem__(self, key: Any, value: Any) -> None:
        target = self._target(key)
        if isinstance(target, str):
            raise TypeError(f"{target}; nothing was written")
        self._state[target] = value

    def __delitem__(self, key: Any) -> None:
        target = self._target(key)
        if isinstance(target, str):
            raise KeyError(target)
        del self._state[target]

    def __contains__(self, key: object) -> bool:
        try:
            target = self._target(key)
        except (KeyError, TypeError):
            return False
        return not isinstance(target, str) and target in self._state

    def __iter__(self) -> Iterator[Any]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            target = self._target(key)
        except KeyError:
            return default
        if isinstance(target, str) or target not in self._state:
            return default
        return self._state[target]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        target = self._target(key)
        if isinstance(target, str):
            raise TypeError(f"{target}; nothing was written")
        return self._state.setdefault(target, default)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        try:
            target = self._target(key)
        except KeyError:
            if default is _MISSING:
                raise
            return default
        if isinstance(target, str) or target not in self._state:
            if default is _MISSING:
                raise KeyError(target if isinstance(target, str) else unknown_key(self._owner, key))
            return default
        return self._state.pop(target)

    def clear(self) -> None:
        self._state.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._state)!r})"


def unknown_key(owner: Any, key: Any) -> str:
    """The message for a state key that is nothing of ``owner``'s."""
    if isinstance(key, Tensor):
        what = f"a tensor of shape {tuple(key.shape)} ({key.dtype})"
    else:
        what = f"{type(key).__name__} {str(key)[:60]!r}"
    return (
        f"{type(owner).__name__}.state: {what} is not a parameter this optimizer steps (nor a "
        "model parameter it translates); index the state with the model's parameters "
        "(opt.state[p] for p in model.parameters()) or with the tensors in opt.param_groups"
    )
