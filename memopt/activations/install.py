"""The installer interface: how one block's ``ActivationPolicy`` becomes hooks on the module.

``apply`` (``apply.py``) resolves each block name to a submodule and calls the installer
registered for the policy's action::

    installer(module, policy, ctx) -> Installed      # Installed.remove() undoes it

``INSTALLERS`` maps action names (``"keep"``, ``"swap"``, ``"recompute"``, ``"split"``,
``"sample"``) to installers; a module registers its own with
``@INSTALLERS.register("swap")``. The ``InstallContext`` hands an installer everything shared
by the blocks of one ``apply`` call:

- ``ledger``: the ``SavedLedger`` every saved tensor is counted in (place ``"device"`` while on
  the compute device, ``"host"``/``"nvme"`` once swapped out);
- ``swap``: the ``SwapEngine`` (``swap.py``): ``engine.packer(block, tier, root)`` gives the
  saved-tensor pack/unpack pair that swaps whole storages to a tier (pinned arena or NVMe),
  with generation checks, dedup and side-stream copies; ``engine.store(...)`` is the lower
  level for code that swaps only part of a tensor (MEMO's token split);
- ``scheduler``: the ``PrefetchScheduler`` (``prefetch.py``): ``begin(block)`` opens a *run*
  (one forward call of one block) that records what it swapped; ``watch_backward(run,
  output)`` makes the start of that run's backward prefetch the previous runs;
- ``root``: the model ``apply`` was called on (parameters and buffers anywhere in it are never
  swapped or counted as activations);
- ``options``: ``ActivationOptions`` (thresholds, prefetch depth, NVMe config).

``wrap_forward`` (``hooks.py``) is the common way to install: it replaces the module's
``forward`` by a wrapper (the state-dict keys and the module tree stay unchanged) and restores
it on ``remove()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from memopt._utils.registry import Registry
from memopt.activations.ledger import SavedLedger
from memopt.activations.policy import ActivationPolicy

if TYPE_CHECKING:
    from memopt.activations.prefetch import PrefetchScheduler, Run
    from memopt.activations.swap import SwapEngine
    from memopt.offload.nvme_file import NVMeConfig

__all__ = [
    "INSTALLERS",
    "ActivationOptions",
    "InstallContext",
    "Installed",
    "Installer",
    "hooked_block",
]


class Installed(Protocol):
    """What an installer returns: ``remove()`` restores the module exactly as it was."""

    def remove(self) -> None: ...


@dataclass(frozen=True)
class ActivationOptions:
    """Knobs shared by all managed blocks of one ``apply`` call.

    min_swap_bytes: saved storages smaller than this stay on the device (counted, not swapped):
      a copy has a fixed cost that a few KiB do not repay.
    prefetch_depth: when block i's backward starts, the swapped activations of the ``depth``
      blocks run before it start coming back.
    nvme: where ``tier="nvme"`` policies store bytes (required when one is used).
    count_recomputed_ops: count the aten ops each recomputed block re-runs in its backward
      (a dispatch mode; costs Python time per op, so off by default).
    """

    min_swap_bytes: int = 4096
    prefetch_depth: int = 1
    nvme: NVMeConfig | None = None
    count_recomputed_ops: bool = False

    def __post_init__(self) -> None:
        for name in ("min_swap_bytes", "prefetch_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ActivationOptions.{name}={value!r}; it must be an int")
        if self.min_swap_bytes < 0:
            raise ValueError(
                f"ActivationOptions.min_swap_bytes={self.min_swap_bytes}; it must be >= 0"
            )
        if self.prefetch_depth < 0:
            raise ValueError(
                f"ActivationOptions.prefetch_depth={self.prefetch_depth}; it must be >= 0"
            )


@dataclass
class InstallContext:
    """What the blocks of one ``apply`` call share (see the module docstring)."""

    ledger: SavedLedger
    block_name: str
    root: nn.Module
    swap: SwapEngine
    scheduler: PrefetchScheduler
    options: ActivationOptions


HookPair = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]
Installer = Callable[[nn.Module, ActivationPolicy, InstallContext], Installed]
INSTALLERS: Registry[Installer] = Registry("activation action")


def hooked_block(
    module: nn.Module,
    ctx: InstallContext,
    make_hooks: Callable[[Run], HookPair],
    policy: str | None = None,
) -> Installed:
    """Install a block whose forward runs under the saved-tensor hooks ``make_hooks(run)``.

    Each forward call with grad enabled opens a prefetch run, runs the original forward under
    the hooks, and watches the output's gradient to prefetch earlier runs; without grad the
    original forward runs untouched (after polling finished swap copies, so the sources and
    slots of a graph dropped without a backward do not wait for the next training forward).
    ``policy`` names the block's policy for ``check_hf_checkpointing`` (None: keep).
    """
    from memopt.activations.hooks import refuse_func_transforms, wrap_forward

    def body(original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not torch.is_grad_enabled():
            ctx.swap.reap()
            return original(*args, **kwargs)
        refuse_func_transforms(ctx.block_name, "saved-tensor hooks", any_transform=False)
        run = ctx.scheduler.begin(ctx.block_name)
        pack, unpack = make_hooks(run)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = original(*args, **kwargs)
        ctx.swap.reap()
        ctx.scheduler.watch_backward(run, out)
        return out

    return wrap_forward(module, ctx.block_name, body, policy)
