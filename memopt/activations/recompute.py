"""Recompute: activation checkpointing per block, full or selective per op, in eager mode.

Full: the block's forward runs under ``torch.utils.checkpoint.checkpoint(forward, *args,
use_reentrant=False, preserve_rng_state=True, **kwargs)``: only the block's inputs stay alive;
its first backward use re-runs the forward (with the CPU and device RNG states of the original
forward restored, so dropout draws the same mask) and stops as soon as the needed tensors exist.
Positional and keyword arguments both pass through (an HF ``LlamaDecoderLayer`` takes
``hidden_states`` plus ``attention_mask=``/``position_embeddings=`` keywords).

Selective (``keep_ops``): ``create_selective_checkpoint_contexts`` with a policy that answers
``MUST_SAVE`` for the listed ops (``"aten.mm"``: every overload; ``"aten.mm.default"``: that
one) and ``PREFER_RECOMPUTE`` for the rest. In eager mode the save policy is honoured by
caching the listed ops' outputs in the forward and serving them from the cache in the
recompute, so those ops (typically the matmuls and attention) are not run twice. The policy is
asked once per op, in the forward, and sees the op's output: the ledger hold is taken there.
Both SAC modes are Python dispatch modes: every op of the block pays a Python call, which
small CPU ops feel (tiny LLaMA on CPU: selective slower than full recompute) and large GPU
ops amortize. The cache is handed out once: a second backward through a selective block
(``retain_graph=True`` reuse, a ``create_graph=True`` gradient backwarded again) raises a
``RuntimeError`` naming the block and the fix (``_SelectiveRecompute``).

A KV cache passed to the block (``past_key_values=``, HF's default ``use_cache=True`` in a
training forward; by keyword or positionally, as GPT-2 passes it, or any ``transformers``
``Cache``) is dropped with a one-time warning, as HF's own checkpointing does: the replay would
append to it a second time. ``use_cache`` is set to False.

The replay starts from the block's persistent buffers as the forward saw them and leaves them
as the forward left them (``_ReplayKeepsBuffers``).

Accounting: the block's tensor inputs (held by the checkpoint) and the cached outputs of kept
ops are counted in the ledger under ``"device"`` from the forward until the block's backward
starts (when the recompute consumes the cache). With ``ActivationOptions.count_recomputed_ops``
a dispatch mode under the cache counts every op the backward re-runs (``stats.recomputed``);
cached ops never reach it, which is how a test can see that kept ops were not recomputed.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from memopt._utils import warn_once
from memopt._utils.kvcache import is_kv_cache
from memopt.activations.hooks import (
    ForwardWrap,
    is_plain_tensor,
    is_weight,
    param_storages,
    persistent_buffers,
    refuse_func_transforms,
    wrap_forward,
)
from memopt.activations.install import INSTALLERS, InstallContext
from memopt.activations.ledger import Token
from memopt.activations.policy import ActivationPolicy

__all__ = ["RecomputeStats", "install_recompute", "resolve_ops"]


@dataclass
class RecomputeStats:
    """What a recomputed block did: forward calls, and ops re-run in backward (if counted)."""

    calls: int = 0
    recomputed: Counter[str] = field(default_factory=Counter)


def resolve_ops(names: Sequence[str]) -> tuple[frozenset[Any], frozenset[Any]]:
    """``"aten.mm"`` / ``"aten.mm.default"`` -> (op packets, op overloads); unknown: ValueError."""
    packets, overloads = set(), set()
    for name in names:
        parts = name.split(".")
        if len(parts) not in (2, 3):
            raise ValueError(
                f"keep_ops entry {name!r}: write an op as 'namespace.op' or "
                "'namespace.op.overload', e.g. 'aten.mm' or 'aten.addmm.default'"
            )
        try:
            packet = getattr(getattr(torch.ops, parts[0]), parts[1])
            op = getattr(packet, parts[2]) if len(parts) == 3 else None
        except (AttributeError, RuntimeError):
            raise ValueError(
                f"keep_ops entry {name!r} is not a known operator (torch.ops.{name} not found)"
            ) from None
        if op is None:
            packets.add(packet)
        else:
            overloads.add(op)
    return frozenset(packets), frozenset(overloads)


class _CountOps(TorchDispatchMode):
    """Below the SAC cache in the recompute: every op that reaches it was re-run."""

    def __init__(self, counter: Counter[str]) -> None:
        super().__init__()
        self._counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._counter[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


_SAC_TWICE = ("Trying to backward an extra time. You are only allowed to backward once on any "
              "region computed under selective activation checkpoint.")


class _SelectiveRecompute:
    """The recompute context of a selective block: enters ``cms`` in order (the last entered
    mode is the first to see an op), on every replay (a second backward replays again). It
    turns torch's bare error for a second backward through the block (``retain_graph=True``
    reuse, a ``create_graph=True`` gradient backwarded again) into one that names the block,
    its policy and the fix; other errors pass through unchanged."""

    def __init__(self, block: str, policy: str, *cms: Any) -> None:
        self.block, self.policy, self.cms = block, policy, cms
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for cm in self.cms:
                stack.enter_context(cm)
            self._stacks.append(stack.pop_all())

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if self._stacks.pop().__exit__(kind, err, tb):
            return True
        if isinstance(err, RuntimeError) and str(err) == _SAC_TWICE:
            raise RuntimeError(
                f"block {self.block!r} ({self.policy}): a selectively recomputed block can be "
                "backwarded only once (torch's selective activation checkpoint hands the kept "
                "op outputs to the first backward); a second backward through it "
                "(backward(retain_graph=True) then another backward, or a create_graph=True "
                "gradient backwarded again) is not supported. Use full recompute for this "
                f"block (overrides={{{self.block!r}: 'recompute'}}, or recompute() without "
                "keep_ops), or plan(..., selective=False)"
            ) from err
        return False


class _Block:
    """One recomputed block: builds the checkpoint contexts and the ledger holds per call."""

    def __init__(self, policy: ActivationPolicy, ctx: InstallContext, module: nn.Module) -> None:
        self.ctx = ctx
        self.module = module
        self.name = ctx.block_name
        self.packets, self.overloads = resolve_ops(policy.keep_ops)
        self.selective = bool(policy.keep_ops)
        self.policy_text = policy.describe()
        self.stats = RecomputeStats()
        self.names: tuple[str, ...] | None = None  # the forward's positional parameters

    def keeps(self, op: Any) -> bool:
        return op in self.overloads or getattr(op, "overloadpacket", None) in self.packets

    def context_fn(self, hold: Callable[[torch.Tensor], None]) -> Callable[[], tuple[Any, Any]]:
        counting = self.ctx.options.count_recomputed_ops
        if not self.selective:
            if not counting:
                return lambda: (contextlib.nullcontext(), contextlib.nullcontext())
            return lambda: (contextlib.nullcontext(), _CountOps(self.stats.recomputed))

        def policy(sac_ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            if not self.keeps(op):
                return CheckpointPolicy.PREFER_RECOMPUTE
            # called once per op in the forward, with the output the cache will keep
            for t in tree_flatten(getattr(sac_ctx, "op_output", None))[0]:
                if isinstance(t, torch.Tensor):
                    hold(t)
            return CheckpointPolicy.MUST_SAVE

        def make() -> tuple[Any, Any]:
            fwd, rec = create_selective_checkpoint_contexts(policy)
            cms = (_CountOps(self.stats.recomputed), rec) if counting else (rec,)
            return fwd, _SelectiveRecompute(self.name, self.policy_text, *cms)

        return make

    def __call__(self, original: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]):
        if not torch.is_grad_enabled():
            return original(*args, **kw)
        refuse_func_transforms(self.name, "recompute", any_transform=True)
        self.stats.calls += 1
        if self.names is None:
            self.names = _positional_names(original)
        args, kw = _drop_kv_cache(args, kw, self.names, self.name)
        ledger, params = self.ctx.ledger, param_storages(self.ctx.root)
        tokens: list[Token] = []

        def hold(t: torch.Tensor) -> None:
            if is_plain_tensor(t) and not is_weight(t, params):
                tokens.append(ledger.hold(t, place="device", block=self.name))

        for t in tree_flatten((args, kw))[0]:
            if isinstance(t, torch.Tensor):
                hold(t)
        run = self.ctx.scheduler.begin(self.name)
        out = checkpoint(
            _ReplayKeepsBuffers(original, self.module),
            *args,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=self.context_fn(hold),
            **kw,
        )
        self.ctx.scheduler.watch_backward(run, out, extra=lambda: _release(tokens))
        return out


class _ReplayKeepsBuffers:
    """The block's forward for ``checkpoint``: the first call is the forward; later calls are
    the backward's replay, which must see the block's state as the forward saw it and must
    not update it again. Concerned: the block's persistent buffers (its state_dict's: running
    statistics, spectral_norm's ``u``/``v``; not caches such as rotary tables or masks).

    - Not again: they are copied before a replay and put back after it (a BatchNorm in train
      mode would count the batch twice, as under plain ``torch.utils.checkpoint``). BatchNorm's
      kernel updates its running mean and variance without bumping their version counters, so
      this copy is of every persistent buffer, which are small next to the activations.
    - As the forward saw it: the forward copies them first and keeps the copies of those whose
      version it bumped (spectral_norm's power iteration writes ``u`` and ``v`` with ``out=``
      and then reads them); the replay starts from those. Without this it would run a second
      power iteration and recompute different activations. (A buffer changed without a version
      bump, BatchNorm's statistics, is not read by the train-mode forward that changes it.)"""

    def __init__(self, original: Callable[..., Any], module: nn.Module) -> None:
        self.original, self.module = original, module
        self.replay = False
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []  # changed: pre-forward value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.replay:  # the forward
            self.replay = True
            with _disable_current_modes(), torch.no_grad():  # (not the block's ops: no SAC)
                before = [(b, b._version, b.clone()) for b in persistent_buffers(self.module)]
            out = self.original(*args, **kwargs)
            self.before = [(b, value) for b, version, value in before if b._version != version]
            return out
        with _disable_current_modes(), torch.no_grad():
            saved = [(b, b.clone()) for b in persistent_buffers(self.module)]
            for b, value in self.before:
                b.copy_(value)
        try:
            return self.original(*args, **kwargs)
        finally:
            with _disable_current_modes(), torch.no_grad():
                for b, value in saved:
                    b.copy_(value)


def _positional_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of ``fn``'s positional parameters in order (empty if it has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in itertools.takewhile(lambda p: p.kind in kinds, params))


def _drop_kv_cache(
    args: tuple[Any, ...], kw: dict[str, Any], names: tuple[str, ...], block: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A KV cache passed to a recomputed block would be appended to twice (forward and replay):
    drop it, as HF's own gradient checkpointing does (a training step does not need it). It
    may come as a keyword or positionally (GPT-2 passes ``block(hidden, past_key_values,
    mask, ...)``): ``names`` are the forward's positional parameter names."""
    pos = [names[i] if i < len(names) else f"argument {i}" for i in range(len(args))]
    at = [i for i, a in enumerate(args) if is_kv_cache(pos[i], a)]
    keys = [k for k, v in kw.items() if is_kv_cache(k, v)]
    use_cache = pos.index("use_cache") if "use_cache" in pos else None
    if not at and not keys and not kw.get("use_cache") and not (
            use_cache is not None and args[use_cache]):
        return args, kw
    if at or keys:
        warn_once(
            f"recomputed block {block!r}: {', '.join([pos[i] for i in at] + keys)} set to None "
            "(a KV cache would be updated again by the backward's replay); pass "
            "use_cache=False to silence this"
        )
    new_args = [None if i in at else a for i, a in enumerate(args)]
    if use_cache is not None:
        new_args[use_cache] = False
    kw = {**kw, **{k: None for k in keys}}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return tuple(new_args), kw


def _release(tokens: list[Token]) -> None:
    for tok in tokens:
        tok.release()
    tokens.clear()


class RecomputeInstalled:
    """The installed checkpoint wrapper of one block, with its ``stats``."""

    def __init__(self, wrap: ForwardWrap, stats: RecomputeStats) -> None:
        self._wrap, self.stats = wrap, stats

    def remove(self) -> None:
        self._wrap.remove()


@INSTALLERS.register("recompute")
def install_recompute(
    module: nn.Module, policy: ActivationPolicy, ctx: InstallContext
) -> RecomputeInstalled:
    """``recompute``: checkpoint the block (selectively when ``policy.keep_ops`` is set)."""
    block = _Block(policy, ctx, module)
    wrap = wrap_forward(module, ctx.block_name, block, "recompute")
    return RecomputeInstalled(wrap, block.stats)
