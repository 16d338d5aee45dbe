"""``WrapperOptimizer``: a ``torch.optim.Optimizer`` whose groups and state are another's.

memopt wraps optimizers in several places (``ShardedOptimizer`` and ``FSDPOptimizer`` around
the user's optimizer, ``StateOffloadedOptimizer`` around a low-rank one). Each must look like
a ``torch.optim.Optimizer`` to LR schedulers, hooks and checkpointers, yet own no groups or
state of its own: ``param_groups`` are the inner optimizer's, so a scheduler that changes
``lr`` changes the optimizer that steps, and ``state`` is a view of the inner optimizer's
(``state_view``: a model parameter is translated to the tensor the inner optimizer steps for
it, and reading never inserts a key that is in no group). ``Optimizer.__init__`` is not
called (it would build new groups); ``wrap`` sets up what it would have: the defaults, the
hook tables and the patched ``step`` that runs step hooks. ``state_dict`` and
``load_state_dict`` run the wrapper's own state-dict hooks around the subclass's
``_state_dict`` / ``_load_state_dict``, in torch's order (``state_dict_with_hooks``,
``load_with_hooks``: also used by optimizers that build their state dict themselves).

Marks (``mark`` / ``marked``): which memopt API drives an optimizer (a wrapper, the
optimizer-in-backward hooks), kept beside it in a weak table rather than in its ``__dict__``,
so a ``copy.deepcopy`` or pickle of the optimizer, which has no wrapper or hooks, carries
none.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from memopt._utils.state_view import StateView, unknown_key

__all__ = [
    "IN_BACKWARD",
    "WRAPPED_BY",
    "WrapperOptimizer",
    "closure_loss",
    "hooks_paused",
    "load_with_hooks",
    "mark",
    "marked",
    "run_step_hooks",
    "state_dict_with_hooks",
]

_HOOK_TABLES = (
    "step_pre", "step_post", "state_dict_pre", "state_dict_post",
    "load_state_dict_pre", "load_state_dict_post",
)  # fmt: skip

#: mark names: the wrapper class that steps an optimizer; the optimizer-in-backward hooks
WRAPPED_BY, IN_BACKWARD = "wrapped_by", "in_backward"
_MARKS: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def mark(optimizer: Any, name: str, value: str | None) -> None:
    """Note (``value``) or clear (None) that ``name`` drives ``optimizer``; not copied with it."""
    marks = _MARKS.setdefault(optimizer, {})
    if value is None:
        marks.pop(name, None)
    else:
        marks[name] = value


def marked(optimizer: Any, name: str) -> str | None:
    """The value ``mark`` noted for ``optimizer`` under ``name``, None if none."""
    try:
        return _MARKS.get(optimizer, {}).get(name)
    except TypeError:  # (not weakly referenceable: never marked)
        return None


class WrapperOptimizer(torch.optim.Optimizer):
    """Base of memopt's optimizer wrappers; call ``self.wrap(inner)`` first in ``__init__``."""

    inner: torch.optim.Optimizer

    def wrap(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        # Marks the inner optimizer as driven by this wrapper, so that APIs that would step it
        # on their own (memopt.optim.step_in_backward) can refuse it by name.
        mark(inner, WRAPPED_BY, type(self).__name__)
        # The wrapper hands the inner optimizer shards, placeholders or tier-resident state,
        # so shapes checked at load time against its parameters would be the wrong ones; the
        # check before each step (against the tensors it then updates) stays.
        if hasattr(inner, "check_loaded_shapes"):
            inner.check_loaded_shapes = False
        self.defaults = inner.defaults
        for name in _HOOK_TABLES:
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return StateView(self)

    def state_key(self, key: Any) -> Tensor | str:
        """The tensor of the inner optimizer's groups whose state ``state[key]`` means, or a
        string saying why this process holds none for ``key``; a ``KeyError`` for a key that
        is nothing of this optimizer. Here: ``key`` itself, if it is in a group."""
        if isinstance(key, Tensor):
            for group in self.inner.param_groups:
                if any(p is key for p in group["params"]):
                    return key
        raise KeyError(unknown_key(self, key))

    def state_dict(self) -> dict[str, Any]:
        return state_dict_with_hooks(self, self._state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_with_hooks(self, state_dict, self._load_state_dict)

    def _state_dict(self) -> dict[str, Any]:
        """The state dict itself (the hooks run around it)."""
        return self.inner.state_dict()

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The load itself (the hooks run around it)."""
        self.inner.load_state_dict(state_dict)


def state_dict_with_hooks(
    optimizer: torch.optim.Optimizer, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``build()`` between ``optimizer``'s state-dict hooks, as ``Optimizer.state_dict`` runs
    them: pre-hooks ``hook(opt)`` first, post-hooks ``hook(opt, sd)`` on the finished dict,
    each free to return a replacement."""
    for pre in list(optimizer._optimizer_state_dict_pre_hooks.values()):
        pre(optimizer)
    state_dict = build()
    for post in list(optimizer._optimizer_state_dict_post_hooks.values()):
        result = post(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_with_hooks(
    optimizer: torch.optim.Optimizer, state_dict: Any, load: Callable[[Any], None]
) -> None:
    """``load(state_dict)`` between ``optimizer``'s load hooks, as
    ``Optimizer.load_state_dict`` runs them: on a shallow copy of the dict, pre-hooks
    ``hook(opt, sd)`` first (a returned dict is what loads), post-hooks ``hook(opt)`` once
    the whole load is done (not after a load that raised)."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()  # (torch's: a hook editing it leaves the caller's alone)
    for pre in list(optimizer._optimizer_load_state_dict_pre_hooks.values()):
        result = pre(optimizer, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for post in list(optimizer._optimizer_load_state_dict_post_hooks.values()):
        post(optimizer)


@contextmanager
def hooks_paused(
    optimizer: torch.optim.Optimizer, kind: Literal["state_dict", "step"]
) -> Iterator[None]:
    """Inside: torch's own ``Optimizer.state_dict`` (``kind="state_dict"``) or ``step``
    (``"step"``; the global hooks still run) on ``optimizer`` runs none of its own hooks of
    that kind: the caller runs them once around the whole (``state_dict_with_hooks``; a
    stage-3 step that steps the inner optimizer once per FSDP2 unit)."""
    names = [f"_optimizer_{kind}_pre_hooks", f"_optimizer_{kind}_post_hooks"]
    saved = [getattr(optimizer, n) for n in names]
    for n, table in zip(names, saved, strict=True):
        setattr(optimizer, n, type(table)())
    try:
        yield
    finally:
        for n, table in zip(names, saved, strict=True):
            setattr(optimizer, n, table)


def run_step_hooks(optimizer: torch.optim.Optimizer, when: Literal["pre", "post"]) -> None:
    """``optimizer``'s own step hooks (not the global ones), as its ``step()`` would run them,
    for an optimizer whose update another one runs in its place (``memopt.shard``'s
    ``offload=``), so that what hooked it (an ``AsyncCheckpointer``'s fence) still fires."""
    table = optimizer._optimizer_step_pre_hooks if when == "pre" else (
        optimizer._optimizer_step_post_hooks
    )  # fmt: skip
    for hook in list(table.values()):
        hook(optimizer, (), {})


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """``step(closure)``'s convention: re-evaluate the loss with grad enabled, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
