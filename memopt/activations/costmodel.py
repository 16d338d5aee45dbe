"""Cost model of one block under one policy: bytes held, transient bytes, extra step time.

For a profiled block with saved bytes ``S``, input bytes ``I`` (``A``: all its tensor
arguments, rotary tables included, which a checkpoint keeps), forward time ``f`` and the
compute that can hide its copies (``Window``), each policy becomes an ``Option``:

    policy     held (fwd->bwd)    transient (own bwd)  prefetch (next bwd)  overhead
    keep       S                  0                    0                    0
    recompute  A (checkpoint in)  S - I (re-run saves) 0                    f
    selective  A + K              S - I - Ks           0                    f (1 - fK)
    swap       s (small saves)    S - s (fetched back) S - s                copy(S - s) not hidden
    split(a)   (1-a) P            S - I                a (S - C) + C        (1-a) f + copy(that)
    sample(r)  S - L + sum_l s_l  0                    0                    0

(``R = S - I`` when the block saves its own input, else ``S``; written ``S - I`` above.
``s``: the saved storages below ``min_swap_bytes`` (norm statistics, attention logsumexp),
which a swap leaves on the device.
``P``: the distinct inputs of the modules a split runs piece by piece, of which it keeps the
recomputed tokens' share: 5 x [B, L, H] for a LLaMA layer. ``C``: what a split layer's
attention core saves outside its projections (rotary products, the attention kernel's
inputs and outputs), which the split swaps whole, not by tokens. Blocks split refuses get no split
option.)
Selective recompute keeps the outputs of the block's heavy ops (matmuls, attention: ``K``
bytes, ``Ks`` of them saved for backward anyway, a share ``fK`` of the forward time) and
re-runs only the rest. ``L`` is the bytes of the block's linear-layer inputs and ``s_l``
what each sampled linear keeps (``sampled.sampled_saved_bytes``). *prefetch* is what comes
back to the device while the block *after* this one runs its backward (the explicit prefetch
of the swap manager).

Copies: ``copy(B) = B / d2h`` in the forward and ``B / h2d`` before the backward. On CUDA
they run on a side stream beside compute, so only what exceeds the window is paid: the
device-to-host copy hides behind the next block's forward (the head's, for the last block)
and the prefetch behind the next block's backward (the head's backward for the last block).
On a CPU "device" a swap is a memcpy on the same cores: nothing overlaps, the whole copy is
paid (and it frees no physical memory; the ledger still counts device bytes).

Copy-out sources that outlive the forward (*unreaped*): a swapped storage's device bytes are
dropped only when a poll finds its copy out done. CPU-tier copies on a CPU device are
synchronous (dropped at once: 0); on CUDA, and for the NVMe tier, they finish in the
background and the next managed forward's polls drop them. The last block has no next
forward: up to all it swapped stays on the device through the head's forward and loss, and on
CUDA (CPU tier) until its backward has already fetched those bytes back (its prefetch does not
poll first; an NVMe read waits for the write and drops the source before reading). The
solver adds ``unreaped`` to the end-of-forward event and ``unreaped_at_fetch`` to the last
block's backward; other blocks' are gone by then.

What a ``SavedLedger`` sees: a recompute re-materialises its activations inside
``torch.utils.checkpoint``'s own saved-tensor hooks, out of the ledger's sight, so the
ledger-visible transient of recompute is 0 (of split: the swapped part only). ``transient``
is the physical one; the planner's budget constraint uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memopt.activations.policy import Action, ActivationPolicy, Tier
from memopt.activations.profile import BlockProfile, Profile
from memopt.activations.sampled import sampled_saved_bytes

__all__ = ["Option", "Window", "block_options", "option_for", "windows"]

SPLIT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Option:
    """One policy for one block with its predicted bytes and cost (see module doc)."""

    policy: ActivationPolicy
    held: int
    transient: int
    prefetch: int
    overhead_s: float
    seen_transient: int | None = None  # the part of ``transient`` a SavedLedger sees
    unreaped: int = 0  # copy-out sources that may stay on the device after the forward
    unreaped_at_fetch: int = 0  # ... and are still there when its backward fetches back

    @property
    def ledger_transient(self) -> int:
        return self.transient if self.seen_transient is None else self.seen_transient


@dataclass(frozen=True)
class Window:
    """Compute that can hide a block's copies: the next block's forward and backward."""

    forward_s: float
    backward_s: float


def windows(prof: Profile) -> list[Window]:
    """Each block's overlap window (zero on a device whose copies do not overlap)."""
    if not prof.copy_overlaps_compute:
        return [Window(0.0, 0.0) for _ in prof.blocks]
    nxt = [Window(b.forward_s, b.backward_s) for b in prof.blocks[1:]]
    return [*nxt, Window(prof.head_forward_s, prof.head_backward_s)]


def _rest(b: BlockProfile) -> int:
    """Bytes a recompute re-materialises beyond the input it keeps."""
    return max(b.saved_bytes - b.input_bytes, 0) if b.input_saved else b.saved_bytes


def _kept_args(b: BlockProfile) -> int:
    """What a checkpoint keeps: every tensor argument (at least the block's input)."""
    return max(b.args_bytes, b.input_bytes)


def _moving(policy: ActivationPolicy, moved: int, held: int, transient: int, cost: float,
            prof: Profile, seen: int | None = None) -> Option:
    """A swap's or split's option, with the copy-out sources it can leave behind (module doc:
    *unreaped*): on CUDA and for the NVMe tier copies finish in the background."""
    background = prof.copy_overlaps_compute or policy.tier == "nvme"
    refetched = prof.copy_overlaps_compute and policy.tier != "nvme"
    return Option(policy, held, transient, moved, cost, seen_transient=seen,
                  unreaped=moved if background else 0,
                  unreaped_at_fetch=moved if refetched else 0)


def _copy_cost(nbytes: int, prof: Profile, win: Window) -> float:
    out_s = nbytes / prof.d2h_bytes_per_s
    back_s = nbytes / prof.h2d_bytes_per_s
    return max(0.0, out_s - win.forward_s) + max(0.0, back_s - win.backward_s)


_BY_SIZE = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def _sampled_held(b: BlockProfile, ratio: float) -> int:
    kept = sum(sampled_saved_bytes(in_f, rows, ratio, _BY_SIZE.get(size, torch.float32))
               for in_f, rows, size in b.linears)
    return max(b.saved_bytes - b.linear_input_bytes, 0) + kept


def _selective(policy: ActivationPolicy, b: BlockProfile) -> Option:
    if set(policy.keep_ops) != set(b.keep_ops):
        raise ValueError(
            f"block {b.name}: the profile measured keep_ops={b.keep_ops} (its heavy ops); the "
            f"planner cannot price keep_ops={policy.keep_ops}")
    held = _kept_args(b) + b.kept_out_bytes
    rest = max(_rest(b) - b.kept_saved_bytes, 0)
    cost = b.forward_s * (1.0 - b.kept_fraction)
    return Option(policy, held, rest, 0, cost, seen_transient=0)


def option_for(policy: ActivationPolicy, b: BlockProfile, prof: Profile, win: Window) -> Option:
    """The ``Option`` of ``policy`` on block ``b``."""
    rest = _rest(b)
    if policy.action == "keep":
        return Option(policy, b.saved_bytes, 0, 0, 0.0)
    if policy.action == "recompute":
        if policy.keep_ops:
            return _selective(policy, b)
        return Option(policy, _kept_args(b), rest, 0, b.forward_s, seen_transient=0)
    if policy.action == "swap":
        small = min(b.small_saved_bytes, b.saved_bytes)
        moved = b.saved_bytes - small
        return _moving(policy, moved, small, moved, _copy_cost(moved, prof, win), prof)
    if policy.action == "split":
        if b.split_input_bytes is None:
            raise ValueError(
                f"block {b.name}: token split cannot run on it (not token-local, and not a "
                "transformer layer with self_attn and mlp children; or its input has no token "
                "dimension at seq_dim 1, such as a 2-D [N, features] input); use swap or "
                "recompute"
            )
        a = policy.swap_fraction
        # the attention core goes to the tier whole; of the token-local saves the swapped
        # tokens' share, the block's input included (its swapped piece is a fresh copy)
        core = min(b.split_core_bytes, b.saved_bytes)
        moved = int(a * (b.saved_bytes - core + b.split_shared_bytes)) + core
        cost = (1.0 - a) * b.forward_s + _copy_cost(moved, prof, win)
        held = round((1.0 - a) * b.split_input_bytes)  # the recomputed tokens' inputs
        return _moving(policy, moved, held, max(rest, moved), cost, prof, seen=moved)
    return Option(policy, _sampled_held(b, policy.sample_ratio), 0, 0, 0.0)


def block_options(
    b: BlockProfile, prof: Profile, win: Window, actions: tuple[Action, ...], *,
    tier: Tier = "cpu", sample_ratio: float = 0.3, selective: bool = True,
) -> list[Option]:
    """Every candidate policy of ``actions`` for block ``b`` (``selective=False``: no
    ``keep_ops`` recompute, only full recompute)."""
    policies: list[ActivationPolicy] = []
    for action in actions:
        if action == "split":
            if b.split_input_bytes is not None:  # (blocks split refuses get no split option)
                policies += [ActivationPolicy("split", tier=tier, swap_fraction=a)
                             for a in SPLIT_FRACTIONS]
        elif action == "sample":
            if b.linears:
                policies.append(ActivationPolicy("sample", sample_ratio=sample_ratio))
        elif action == "swap":
            policies.append(ActivationPolicy("swap", tier=tier))
        elif action == "recompute":
            policies.append(ActivationPolicy("recompute"))
            if b.keep_ops and selective:
                policies.append(ActivationPolicy("recompute", keep_ops=b.keep_ops))
        else:
            policies.append(ActivationPolicy(action))
    return [option_for(p, b, prof, win) for p in policies]
