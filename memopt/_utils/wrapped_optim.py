"""``WrapperOptimizer``: a ``torch.optim.Optimizer`` whose groups and state are another's.

memopt wraps optimizers in several places (``ShardedOptimizer`` and ``FSDPOptimizer`` around
the user's optimizer, ``StateOffloadedOptimizer`` around a low-rank one). Each must look like
a ``torch.optim.Optimizer`` to LR schedulers, hooks and checkpointers, yet own no groups or
state of its own: ``param_groups`` and ``state`` are the inner optimizer's, so a scheduler
that changes ``lr`` changes the optimizer that steps. ``Optimizer.__init__`` is not called
(it would build new groups); ``wrap`` sets up what it would have: the defaults, the hook
tables and the patched ``step`` that runs step hooks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["WrapperOptimizer", "closure_loss"]

_HOOK_TABLES = (
    "step_pre", "step_post", "state_dict_pre", "state_dict_post",
    "load_state_dict_pre", "load_state_dict_post",
)  # fmt: skip


class WrapperOptimizer(torch.optim.Optimizer):
    """Base of memopt's optimizer wrappers; call ``self.wrap(inner)`` first in ``__init__``."""

    inner: torch.optim.Optimizer

    def wrap(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        # Marks the inner optimizer as driven by this wrapper, so that APIs that would step it
        # on their own (memopt.optim.step_in_backward) can refuse it by name.
        inner.__dict__["_memopt_wrapped_by"] = type(self).__name__
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
        return self.inner.state


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """``step(closure)``'s convention: re-evaluate the loss with grad enabled, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
