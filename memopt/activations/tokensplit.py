"""Token-wise split (MEMO, action ``"split"``): swap a fraction of the tokens, recompute the rest.

MEMO (arXiv 2407.12117) mixes swapping and recomputation *along the sequence*: for a fraction
``alpha`` (``policy.swap_fraction``) of the tokens the saved activations go to a storage tier
(PCIe traffic that overlaps compute), for the other ``1 - alpha`` they are dropped and
recomputed in the backward (compute that needs no host memory). This is an exact, eager,
generic version of that idea.

**Token-local module** (applied position by position: ``nn.Linear``, norms, activations, an
MLP, a ``Sequential`` of those): its input ``x`` is split along ``policy.seq_dim`` into the
first ``n = round(alpha * L)`` tokens and the rest, and the module runs twice:

- ``x[:n]`` under the ``SwapEngine``'s saved-tensor hooks (``swap.py``): every tensor it saves
  goes to ``policy.tier`` and is prefetched back for the backward;
- ``x[n:]`` under non-reentrant ``torch.utils.checkpoint``: only its input is kept on the device
  (counted in the ledger as ``"device"``); the rest is recomputed in the backward;

and the outputs are concatenated. For ``0 < n < L`` each piece is a fresh copy (``clone``), so
the whole input's storage is not kept alive by a view and a whole-storage swap moves exactly
the ``alpha`` part. Since the module is token-local the result and the input gradient equal
the plain run row for row; weight gradients are summed over two pieces, so they equal the
plain run to float tolerance (summation order), not bitwise.

**Transformer layer** (children ``self_attn`` and ``mlp``, as HF ``LlamaDecoderLayer`` and kin):
attention is not token-local, so the layer is split piece by piece:

- split (as above): every token-local direct child of the layer (``input_layernorm``,
  ``post_attention_layernorm``, ``mlp``) and every ``nn.Linear`` child of ``self_attn``
  (``q/k/v/o_proj``); q, k and v read the same input, which is split once and shared;
- swapped whole: everything else ``self_attn`` saves (rotary products, the attention core:
  softmax / SDPA outputs and its q, k, v inputs), via the same swap hooks;
- anything the layer itself saves outside its children is kept and counted as ``"device"``.

Any other layer or module is refused with a ``ValueError`` naming it (declare a custom
token-local module with ``module._memopt_token_local = True``). Dropout inside a split module
draws its masks per piece, so with dropout active the run is a valid but different draw than
the plain run. Bytes and cost for the planner: ``split_cost``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memopt.activations.hooks import (
    ForwardWrap,
    counting_hooks,
    param_storages,
    refuse_func_transforms,
    wrap_forward,
)
from memopt.activations.install import INSTALLERS, HookPair, InstallContext
from memopt.activations.policy import ActivationPolicy

__all__ = [
    "SplitCost", "SplitInstall", "install_split", "is_token_local", "split_call", "split_cost",
    "split_parts",
]

Fwd = Callable[..., Any]

_TOKEN_LOCAL = (
    nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Dropout, nn.Identity,
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
)
_TOKEN_LOCAL_SUFFIXES = ("MLP", "RMSNorm", "LayerNorm")


def is_token_local(module: nn.Module) -> bool:
    """True for modules applied position by position (see the module docstring)."""
    if getattr(module, "_memopt_token_local", False):
        return True
    if isinstance(module, _TOKEN_LOCAL):
        return True
    if isinstance(module, nn.Sequential):
        return all(is_token_local(c) for c in module)
    return type(module).__name__.endswith(_TOKEN_LOCAL_SUFFIXES)


def _seq_dim(x: torch.Tensor, seq_dim: int, where: str) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(
            f"{where}: seq_dim={seq_dim} is out of range for an input of shape "
            f"{tuple(x.shape)}; set ActivationPolicy.seq_dim to the token dimension"
        )
    return seq_dim % x.dim()


def _pieces(x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    length = x.shape[dim]
    if n <= 0:
        return None, x
    if n >= length:
        return x, None
    return x.narrow(dim, 0, n).clone(), x.narrow(dim, n, length - n).clone()


class _PieceCache:
    """Splits an input once for all the modules reading it (q, k and v in one layer call)."""

    def __init__(self) -> None:
        self._key: tuple[weakref.ref[torch.Tensor], int, int, int] | None = None
        self._value: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def get(self, x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor | None, ...]:
        key = self._key
        if key is not None and key[0]() is x and key[1:] == (x._version, n, dim):
            return self._value
        self._value = _pieces(x, n, dim)
        self._key = (weakref.ref(x), x._version, n, dim)
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, (None, None)


def split_call(
    fn: Callable[..., Any], x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], *,
    alpha: float, seq_dim: int, swap: HookPair, keep: HookPair, cache: _PieceCache | None = None,
    where: str = "split",
) -> torch.Tensor:
    """``fn(x, *args, **kwargs)`` with the first ``round(alpha * L)`` tokens of ``x`` run under
    the ``swap`` hooks and the rest under checkpoint inside the ``keep`` hooks; see module doc."""
    dim = _seq_dim(x, seq_dim, where)
    n = int(round(alpha * x.shape[dim]))
    head, tail = cache.get(x, n, dim) if cache is not None else _pieces(x, n, dim)
    outs: list[torch.Tensor] = []
    for piece, swapped in ((head, True), (tail, False)):
        if piece is None:
            continue
        try:
            if swapped:
                with torch.autograd.graph.saved_tensors_hooks(*swap):
                    out = fn(piece, *args, **kwargs)
            else:
                with torch.autograd.graph.saved_tensors_hooks(*keep):
                    out = checkpoint(fn, piece, *args, use_reentrant=False, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # e.g. seq_dim pointing at the features: a shape error inside
            raise ValueError(
                f"{where}: the module failed on a piece of its input split along "
                f"seq_dim={seq_dim} (input {tuple(x.shape)}, piece {tuple(piece.shape)}): {e}. "
                "Is seq_dim the token dimension? Set ActivationPolicy.seq_dim"
            ) from e
        if not isinstance(out, torch.Tensor) or out.dim() <= dim or (
            out.shape[dim] != piece.shape[dim]
        ):
            raise ValueError(
                f"{where}: the module is not token-local along seq_dim={seq_dim} (input piece "
                f"{tuple(piece.shape)} gave {type(out).__name__} "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}); token split "
                "needs one tensor out with the same tokens as in"
            )
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim)


@dataclass
class _Call:
    """The hooks and shared pieces of one forward call of a split layer."""

    swap: HookPair
    keep: HookPair
    cache: _PieceCache = field(default_factory=_PieceCache)


class _Splitter:
    """Per-block state: the policy, the install context, the call in progress."""

    def __init__(self, policy: ActivationPolicy, ctx: InstallContext) -> None:
        self.policy, self.ctx = policy, ctx
        self.current: _Call | None = None

    def open(self) -> tuple[_Call, Any]:
        ctx = self.ctx
        refuse_func_transforms(ctx.block_name, "split", any_transform=True)
        run = ctx.scheduler.begin(ctx.block_name)
        # the weights as of this call: under FSDP2 the all-gathered parameters are new storages
        # each forward (read at install time they were swapped to the tier as activations)
        params = param_storages(ctx.root)
        swap = ctx.swap.packer(ctx.block_name, self.policy.tier, params, run)
        return _Call(swap, counting_hooks(ctx.ledger, ctx.block_name, params)), run

    def close(self, run: Any, out: Any) -> None:
        self.ctx.swap.reap()
        self.ctx.scheduler.watch_backward(run, out)

    def split(self, original: Callable[..., Any], call: _Call, args: tuple[Any, ...],
              kwargs: dict[str, Any], where: str, shared: bool) -> Any:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{where}: token split needs the tokens as the first positional arg")
        return split_call(
            original, args[0], args[1:], kwargs, alpha=self.policy.swap_fraction,
            seq_dim=self.policy.seq_dim, swap=call.swap, keep=call.keep,
            cache=call.cache if shared else None, where=where,
        )

    def whole_body(self, where: str) -> Callable[..., Any]:
        """Forward body of a block that is itself token-local."""

        def body(original: Fwd, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not torch.is_grad_enabled():
                self.ctx.swap.reap()  # a dropped graph's finished copies (see hooked_block)
                return original(*args, **kwargs)
            call, run = self.open()
            out = self.split(original, call, args, kwargs, where, shared=False)
            self.close(run, out)
            return out

        return body

    def layer_body(self) -> Callable[..., Any]:
        """Forward body of a transformer layer: opens the call its children read."""

        def body(original: Fwd, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not torch.is_grad_enabled():
                self.ctx.swap.reap()  # a dropped graph's finished copies (see hooked_block)
                return original(*args, **kwargs)
            call, run = self.open()
            self.current = call
            try:
                with torch.autograd.graph.saved_tensors_hooks(*call.keep):
                    out = original(*args, **kwargs)
            finally:
                self.current = None
                call.cache.clear()
            self.close(run, out)
            return out

        return body

    def child_body(self, where: str, shared: bool) -> Callable[..., Any]:
        def body(original: Fwd, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            call = self.current
            if call is None or not torch.is_grad_enabled():
                return original(*args, **kwargs)  # called outside the layer: leave it alone
            return self.split(original, call, args, kwargs, where, shared)

        return body

    def core_body(self) -> Callable[..., Any]:
        def body(original: Fwd, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            call = self.current
            if call is None or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(*call.swap):
                return original(*args, **kwargs)

        return body


@dataclass
class SplitInstall:
    """What ``install_split`` installed: ``remove()`` restores every wrapped forward."""

    wraps: list[ForwardWrap]
    mode: str
    split_modules: list[str]

    def remove(self) -> None:
        for w in reversed(self.wraps):
            w.remove()
        self.wraps = []


def split_parts(module: nn.Module, name: str = "block") -> list[nn.Module] | None:
    """The modules a split of ``module`` runs piece by piece (a split keeps ``1 - alpha`` of
    each one's input on the device), or None when ``install_split`` would refuse the block.
    The planner offers and prices split from this."""
    if is_token_local(module):
        return [module]
    try:
        parts, _ = _layer_plan(module, name)
    except ValueError:
        return None
    return [child for _, child in parts]


def _layer_plan(module: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """(split children, attention module) of a transformer layer; ValueError if it is none."""
    children = dict(module.named_children())
    if "self_attn" not in children or "mlp" not in children:
        raise ValueError(
            f"cannot split block {name!r} ({type(module).__name__}): token split needs a "
            "token-local module (Linear, norm, MLP, a Sequential of those) or a transformer "
            "layer with self_attn and mlp children; use 'swap' or 'recompute' for it"
        )
    return _layer_parts(module, name)


def _layer_parts(module: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    attn = module.get_submodule("self_attn")
    locals_: list[tuple[str, nn.Module]] = []
    unknown: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        if child is attn:
            continue
        (locals_ if is_token_local(child) else unknown).append((child_name, child))
    if unknown:
        raise ValueError(
            f"cannot split layer {name!r}: children {[n for n, _ in unknown]} are neither "
            "self_attn nor token-local; use 'swap' or 'recompute' for this block"
        )
    projections = [(f"self_attn.{n}", c) for n, c in attn.named_children()
                   if isinstance(c, nn.Linear)]
    if not projections:
        raise ValueError(f"cannot split layer {name!r}: self_attn has no nn.Linear projections")
    return locals_ + projections, attn


@INSTALLERS.register("split")
def install_split(module: nn.Module, policy: ActivationPolicy, ctx: InstallContext) -> SplitInstall:
    """Install the token split on ``module`` (token-local or a transformer layer)."""
    if policy.action != "split":
        raise ValueError(f"install_split needs action='split', got {policy.action!r}")
    name = ctx.block_name
    splitter = _Splitter(policy, ctx)
    if is_token_local(module):
        wrap = wrap_forward(module, name, splitter.whole_body(name), "split")
        return SplitInstall([wrap], "token-local", [name])
    parts, attn = _layer_plan(module, name)
    wraps = [wrap_forward(module, name, splitter.layer_body(), "split")]
    try:
        wraps.append(wrap_forward(attn, f"{name}.self_attn", splitter.core_body()))
        for sub, child in parts:
            shared = sub.startswith("self_attn.")
            wraps.append(wrap_forward(child, f"{name}.{sub}", splitter.child_body(sub, shared)))
    except BaseException:
        for w in reversed(wraps):
            w.remove()
        raise
    return SplitInstall(wraps, "layer", [sub for sub, _ in parts])


@dataclass(frozen=True)
class SplitCost:
    """Predicted bytes and work of one split block (all per forward/backward step).

    device_bytes: held on the device from forward to backward. host_bytes: held on the tier
    (copied out and back: ``2 * host_bytes`` of transfers). transient_bytes: extra device bytes
    while the backward recomputes (an upper bound: the modules recompute one at a time).
    recompute_fraction: fraction of the token-local forward run again in the backward.
    """

    device_bytes: int
    host_bytes: int
    transient_bytes: int
    recompute_fraction: float

    @property
    def transfer_bytes(self) -> int:
        return 2 * self.host_bytes


def split_cost(
    alpha: float, *, local_saved_bytes: int, local_input_bytes: int, core_saved_bytes: int = 0
) -> SplitCost:
    """Bytes of a split block from its ``keep`` profile.

    local_saved_bytes: what the token-local parts save under ``keep``; local_input_bytes: the
    (distinct) inputs of the split modules (for a LLaMA layer: the layer input, the two norm
    outputs, the attention output and the post-attention residual: 5 x [B, L, H]);
    core_saved_bytes: what the attention core saves (swapped whole). Scales linearly in alpha.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"split_cost: alpha={alpha}; it must lie in [0, 1]")
    rest = 1.0 - alpha
    return SplitCost(
        device_bytes=int(round(rest * local_input_bytes)),
        host_bytes=int(round(alpha * local_saved_bytes)) + core_saved_bytes,
        transient_bytes=int(round(rest * local_saved_bytes)),
        recompute_fraction=rest,
    )
