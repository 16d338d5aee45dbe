"""``apply(model, plan)``: install one ``ActivationPolicy`` per named block; one handle to undo it.

Steps, all validated before any module is touched:

1. the plan (a ``Plan`` or a ``{block name: ActivationPolicy}`` mapping) is checked: every name
   must be a submodule of ``model`` (an unknown name is a ``ValueError`` listing close names),
   every value an ``ActivationPolicy``, no block may sit inside another managed block (only the
   innermost saved-tensor hooks apply, so the outer policy would silently not cover it), and
   every action needs a registered installer (``install.INSTALLERS``; the modules that register
   them are imported here, and a missing one is named in the error);
2. one ``SavedLedger``, ``SwapEngine`` (over the shared pinned arena, or the one given) and
   ``PrefetchScheduler`` are shared by all blocks; each block's installer wraps its forward.

The returned ``ActivationManager`` holds the installed hooks: ``remove()`` restores every
forward and frees the swap slots; ``ledger`` is the byte accounting; ``report(plan)`` compares
the planner's predicted peak with the ledger's measured one after a step.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from memopt.activations.hooks import managed_block
from memopt.activations.install import INSTALLERS, ActivationOptions, InstallContext, Installed
from memopt.activations.ledger import SavedLedger
from memopt.activations.policy import ACTIONS, ActivationPolicy, Plan
from memopt.activations.prefetch import PrefetchScheduler
from memopt.activations.swap import SwapEngine
from memopt.offload.arena import PinnedArena, default_arena
from memopt.offload.nvme_file import NVMeConfig

__all__ = ["ActivationManager", "apply"]

# Modules that register installers (``keep``/``swap`` live in ``swap``, imported above).
_INSTALLER_MODULES: dict[str, str] = {
    "recompute": "memopt.activations.recompute",
    "sample": "memopt.activations.sampled",
    "split": "memopt.activations.tokensplit",
}


def _load_installers(actions: set[str]) -> None:
    """Import the modules registering ``actions``; a clear error if one is missing."""
    for action in sorted(actions):
        if action in INSTALLERS:
            continue
        module = _INSTALLER_MODULES.get(action)
        reason = "no module registers it"
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError as err:
                reason = f"{module} could not be imported ({err})"
        if action not in INSTALLERS:
            raise ValueError(
                f"activation action {action!r} has no installer: {reason}; registered: "
                f"{', '.join(INSTALLERS.names())}"
            )


def _nests(outer: str, inner: str) -> bool:
    """Whether module ``inner`` lies strictly inside module ``outer`` (``""``: the root)."""
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def _check_plan(model: nn.Module, policies: Mapping[str, object]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name, policy in policies.items():
        if not isinstance(policy, ActivationPolicy):
            raise TypeError(
                f"policy for block {name!r} is a {type(policy).__name__}; pass an "
                "ActivationPolicy (memopt.activations.policy.swap(), recompute(), ...)"
            )
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"block {name!r} is not a submodule of the model{hint}")
    names = sorted(policies)
    for outer in names:
        for inner in names:
            if _nests(outer, inner):
                raise ValueError(
                    f"block {inner!r} lies inside managed block {outer!r}: only the innermost "
                    "saved-tensor hooks apply; give a policy to one of them only"
                )
    for other, module in modules.items():
        owner = managed_block(module)
        if owner is None:
            continue
        for name in names:
            if _nests(other, name) or _nests(name, other):
                raise ValueError(
                    f"block {name!r} and {other!r} (managed by another apply, as {owner!r}) "
                    "nest; remove() that manager first"
                )
    return {name: modules[name] for name in names}


def _check_nvme_directory(config: NVMeConfig) -> None:
    """Create the NVMe tier's directory and check that a file can be made in it: the tier
    itself opens on the first swapped save, and a bad directory found there surfaced
    mid-forward, inside a saved-tensor hook (on one rank while the others went on)."""
    directory = Path(config.directory)
    setting = f"ActivationOptions.nvme=NVMeConfig(directory={str(directory)!r})"
    fix = (
        "give a writable directory on a local disk (create it, fix its permissions, or mount "
        "it read-write), or swap those blocks with tier='cpu'"
    )
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"{setting}: {directory} exists and is not a directory; {fix}"
        )
    step = "cannot be created"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        step = "does not let a file be created in it"
        fd, probe = tempfile.mkstemp(prefix=".memopt-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(
            err.errno,
            f"{setting}: the NVMe tier directory {step} ({err.strerror or err}); {fix}",
        ) from err


class ActivationManager:
    """The installed policies of one ``apply`` call."""

    def __init__(
        self,
        model: nn.Module,
        policies: dict[str, ActivationPolicy],
        ledger: SavedLedger,
        engine: SwapEngine,
        scheduler: PrefetchScheduler,
    ) -> None:
        self.model = model
        self.policies = policies
        self.ledger = ledger
        self.swap = engine
        self.scheduler = scheduler
        self.installed: dict[str, Installed] = {}
        self._removed = False

    def remove(self) -> None:
        """Restore every block's forward and free all swap slots (idempotent)."""
        if self._removed:
            return
        self._removed = True
        for installed in reversed(list(self.installed.values())):
            installed.remove()
        self.installed.clear()
        self.scheduler.reset()
        self.swap.close()

    def report(self, plan: Plan | None = None) -> str:
        """Measured peak saved bytes per block (device, and host/NVMe for swapped ones) since
        the ledger's last ``reset_peak``, against ``plan``'s predictions when given.

        A block's measured device peak covers the whole step, its own backward included: a
        swap or split block's swapped bytes are fetched back to the device then (and stay
        counted on the tier until autograd frees them), so it is compared with the predicted
        peak (held + what the ledger sees come back), not with the held bytes alone."""
        dev, host = self.ledger.block_peaks("device"), self.ledger.block_peaks("host")
        nvme = self.ledger.block_peaks("nvme")
        decided = {d.name: d for d in plan.decisions} if plan else {}
        mib = 2.0**20
        lines = [
            f"{'block':<28} {'policy':<26} {'pred held':>9} {'pred peak':>9} "
            f"{'device peak':>11} {'host peak':>9} {'nvme peak':>9}   (MiB)"
        ]
        for name, policy in self.policies.items():
            d = decided.get(name)
            held_s = f"{d.held_bytes / mib:9.2f}" if d is not None else f"{'-':>9}"
            peak_s = f"{d.ledger_peak_bytes / mib:9.2f}" if d is not None else f"{'-':>9}"
            lines.append(
                f"{name:<28} {policy.describe():<26} {held_s} {peak_s} "
                f"{dev.get(name, 0) / mib:11.2f} {host.get(name, 0) / mib:9.2f} "
                f"{nvme.get(name, 0) / mib:9.2f}"
            )
        lines += [
            "pred held: device bytes from the block's forward to its backward. pred peak, "
            "device peak: its device bytes at their highest",
            "over the step, its own backward included (a swap/split block then holds its "
            "swapped bytes fetched back; recompute's re-runs are unseen).",
        ]
        measured = self.ledger.peak("device")
        tail = f"measured peak saved on device {measured / mib:.2f} MiB"
        if plan is not None:
            tail += f"; predicted {plan.predicted_peak_bytes / mib:.2f} MiB"
            if plan.predicted_peak_bytes:
                tail += f" (measured/predicted {measured / plan.predicted_peak_bytes:.2f})"
            tail += f"; budget {plan.budget_bytes / mib:.2f} MiB"
        for place in ("host", "nvme"):
            if self.ledger.peak(place):
                tail += f"; {place} peak {self.ledger.peak(place) / mib:.2f} MiB"
        return "\n".join([*lines, tail])

    def __enter__(self) -> ActivationManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply(
    model: nn.Module,
    plan: Plan | Mapping[str, ActivationPolicy],
    *,
    ledger: SavedLedger | None = None,
    arena: PinnedArena | None = None,
    options: ActivationOptions | None = None,
) -> ActivationManager:
    """Install ``plan``'s policy on each named block of ``model``; see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, (Plan, Mapping)):
        raise TypeError(
            f"apply: plan must be a Plan or a mapping of block name -> policy (e.g. "
            f"{{'model.layers.0': recompute()}}), got {type(plan).__name__}"
        )
    policies = plan.policies() if isinstance(plan, Plan) else dict(plan)
    for name, policy in list(policies.items()):  # the string form plan() and configs take
        if isinstance(policy, str) and policy in ACTIONS:
            policies[name] = ActivationPolicy(policy)  # type: ignore[arg-type]
    blocks = _check_plan(model, policies)
    _load_installers({p.action for p in policies.values()})
    options = options or ActivationOptions()
    if any(p.tier == "nvme" and p.action in ("swap", "split") for p in policies.values()):
        if options.nvme is None:
            raise ValueError(
                "a policy uses tier='nvme' but options.nvme is None; pass "
                "options=ActivationOptions(nvme=NVMeConfig(directory=...))"
            )
        _check_nvme_directory(options.nvme)
    ledger = ledger or SavedLedger()
    engine = SwapEngine(ledger, arena or default_arena(), options.nvme, options.min_swap_bytes)
    scheduler = PrefetchScheduler(options.prefetch_depth)
    manager = ActivationManager(model, dict(policies), ledger, engine, scheduler)
    try:
        for name, module in blocks.items():
            policy = policies[name]
            ctx = InstallContext(ledger, name, model, engine, scheduler, options)
            manager.installed[name] = INSTALLERS.get(policy.action)(module, policy, ctx)
    except BaseException:
        manager.remove()
        raise
    return manager
