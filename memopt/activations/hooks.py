"""Shared plumbing of the installers: forward wrapping, parameter identity, counted saves.

``wrap_forward(module, name, body)`` replaces ``module.forward`` by an instance attribute that
calls ``body(original_forward, args, kwargs)``. The module tree, parameter names and state-dict
keys stay as they are (unlike ``checkpoint_wrapper``, which renames FQNs); ``remove()`` deletes
the attribute so the class's ``forward`` is back. Module hooks (forward pre/post hooks of
sharding engines) still run around the wrapper, since ``nn.Module.__call__`` calls them.
The wrapper is excluded from ``torch.compile`` tracing (``torch.compiler.disable``): a managed
block runs eagerly inside a compiled model (a graph break at each managed block), because
saved-tensor hooks and checkpoint contexts that move bytes to a tier are eager mechanisms.

``param_storages(root)`` is the set of storage identities of every parameter and buffer of the
model: a saved tensor in that set is a weight (or a view of one) and is neither swapped nor
counted as an activation; ``is_weight`` also recognises autocast's cast copies of parameters.

``counting_hooks(ledger, block, params)`` is the pack/unpack pair of a ``keep`` block: the
tensor stays where it is, and the packed form carries a ledger token, so the bytes are counted
from the forward until autograd drops the saved tensor after its backward node runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memopt._utils import warn_once
from memopt.activations.ledger import SavedLedger, Token

__all__ = [
    "ForwardWrap",
    "Kept",
    "check_hf_checkpointing",
    "check_version",
    "persistent_buffers",
    "refuse_func_transforms",
    "WeightKeys",
    "counting_hooks",
    "is_plain_tensor",
    "is_weight",
    "param_storages",
    "weight_key",
    "wrap_forward",
]

BLOCK_ATTR = "_memopt_activation_block"
Body = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


class ForwardWrap:
    """An installed forward wrapper; ``remove()`` restores the module's own ``forward``.

    The forward the wrapper calls is looked up at call time (the class's, bound to the module,
    unless the module had an instance ``forward`` of its own when it was wrapped): FSDP2's
    ``fully_shard`` swaps the module's class for a subclass after ``apply`` ran, and a
    forward bound at apply time kept calling the old class's one (Hugging Face checkpoints
    only in the outermost class's ``forward``, so its gradient checkpointing was silently off).
    ``policy`` (``"swap"``, ``"recompute"``...) names the block's policy for the one-time
    warning when Hugging Face gradient checkpointing runs inside it (``None``: no check)."""

    def __init__(
        self, module: nn.Module, name: str, body: Body, policy: str | None = None
    ) -> None:
        if getattr(module, BLOCK_ATTR, None) is not None:
            raise ValueError(
                f"module {name!r} is already managed as block "
                f"{getattr(module, BLOCK_ATTR)!r}; call remove() on that manager first"
            )
        self.module = module
        self._had_instance_forward = "forward" in module.__dict__
        self._saved: Any = module.__dict__.get("forward")
        saved: Any = self._saved
        had_own = self._had_instance_forward

        def original(*args: Any, **kwargs: Any) -> Any:
            if had_own:
                return saved(*args, **kwargs)
            cls = type(module)  # now, not at apply time (see the class docstring)
            fwd: Any = cls.forward
            return fwd.__get__(module, cls)(*args, **kwargs)

        functools.update_wrapper(original, module.forward)

        @functools.wraps(module.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if policy is not None:
                check_hf_checkpointing(module, policy)
            return body(original, args, kwargs)

        module.forward = torch.compiler.disable(forward, recursive=True)
        setattr(module, BLOCK_ATTR, name)
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self._had_instance_forward:
            self.module.forward = self._saved
        else:
            del self.module.forward
        delattr(self.module, BLOCK_ATTR)


def wrap_forward(
    module: nn.Module, name: str, body: Body, policy: str | None = None
) -> ForwardWrap:
    return ForwardWrap(module, name, body, policy)


_HF_STACKING = {  # what was measured on a tiny LLaMA (docs/activations.md)
    "recompute": (
        "both checkpoint the layer; with use_reentrant=False torch nests the two checkpoints "
        "(no extra forward, only overhead), with use_reentrant=True the backward recomputes "
        "the layer twice"
    ),
    "swap": (
        "HF's checkpoint keeps only the layer's inputs (the rest is recomputed), so memopt "
        "swaps just those, not the activations a plan or budget counted"
    ),
    "split": (
        "with use_reentrant=False the split's own hooks take the layer's saves (HF's "
        "checkpoint then recomputes nothing there), with use_reentrant=True HF's checkpoint "
        "wins and the split moves nothing"
    ),
    "sample": (
        "HF's checkpoint keeps only the layer's inputs, so the sampled linear layers save no "
        "memory (and with use_reentrant=False draw their sample twice per step)"
    ),
}


def check_hf_checkpointing(module: nn.Module, policy: str) -> None:
    """Warn once per (layer class, policy) when a managed block runs a training forward with
    Hugging Face gradient checkpointing on (``gradient_checkpointing_enable()``): HF
    checkpoints inside memopt's wrapper, so the two stack (``keep`` just counts what HF
    saves: no warning)."""
    if policy not in _HF_STACKING or getattr(module, "gradient_checkpointing", False) is not True:
        return
    if not module.training or not torch.is_grad_enabled():
        return
    warn_once(
        f"memopt.activations: {type(module).__name__} blocks use policy {policy!r} while "
        "Hugging Face gradient checkpointing is on for them; the two stack: "
        f"{_HF_STACKING[policy]}. Use one of them: turn HF's off (model."
        "gradient_checkpointing_disable(), or activation_checkpointing_disable() in "
        "transformers >= 5) and let memopt's policies manage the layers, or give these blocks "
        "keep() and let HF checkpoint them"
    )


def managed_block(module: nn.Module) -> str | None:
    """The block name a module is managed under, or None."""
    return getattr(module, BLOCK_ATTR, None)


WeightKeys = set[tuple[torch.device, int]]


def weight_key(t: torch.Tensor) -> tuple[torch.device, int]:
    """Identity of ``t``'s storage for the weight test (cheaper than the ledger's string key)."""
    return (t.device, t.untyped_storage().data_ptr())


def param_storages(root: nn.Module) -> WeightKeys:
    """Storage identities of all parameters and buffers of ``root`` (views share them); an
    opaque set for ``is_weight``, ``counting_hooks`` and ``SwapEngine.packer``."""
    return {weight_key(t) for t in (*root.parameters(), *root.buffers()) if is_plain_tensor(t)}


def persistent_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The buffers in ``module``'s state_dict (running statistics; not caches such as rotary
    tables or masks): what a forward that must leave no trace restores."""
    out = []
    for sub in module.modules():
        skip = sub._non_persistent_buffers_set
        out += [b for n, b in sub._buffers.items() if b is not None and n not in skip]
    return out


def is_plain_tensor(t: torch.Tensor) -> bool:
    """A dense strided tensor with real storage (not a subclass, meta, sparse, ...)."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.device.type != "meta"
    )


def is_weight(t: torch.Tensor, params: WeightKeys) -> bool:
    """A parameter/buffer (or view of one), or an autocast copy of a parameter (or a view of
    such a copy): the ``ToCopyBackward0`` node right above the parameter's ``AccumulateGrad``.
    Autocast keeps its weight casts alive for the whole region, so swapping them frees
    nothing and moves every weight across the bus each step."""
    if weight_key(t) in params:
        return True
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return False
    var = getattr(fn.next_functions[0][0], "variable", None)
    return isinstance(var, torch.Tensor) and weight_key(var) in params


def refuse_func_transforms(block: str, policy: str, *, any_transform: bool) -> None:
    """Raise a clear ``NotImplementedError`` when a managed block's forward runs under a
    ``torch.func`` transform it cannot serve (one C call when there is none).

    ``torch.func.grad``/``vjp``/``jacrev``/``hessian`` (functorch's *grad* transform) do not
    support saved-tensor hooks, which every policy but ``sample`` is built on; ``vmap`` and
    ``jvp`` hand the block wrapped tensors without a storage, which a checkpoint's ledger
    holds cannot read (``any_transform``: refuse those too). Without this the error was
    "Cannot access storage of TensorWrapper", naming neither memopt nor the transform."""
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)  # (private API)
    stack = get_stack() if get_stack is not None else None
    if not stack:
        return
    kinds = sorted({str(i.key()).rsplit(".", 1)[-1].lower() for i in stack})
    if not any_transform and "grad" not in kinds:
        return
    raise NotImplementedError(
        f"memopt.activations: block {block!r} ({policy}) ran inside a torch.func transform "
        f"({', '.join(kinds)}; grad covers torch.func.grad/vjp/jacrev/hessian), which its "
        "saved-tensor hooks and byte accounting cannot serve (functorch's wrapped tensors have "
        "no storage). remove() the manager (or leave its `with` block) "
        "around torch.func code, or differentiate with torch.autograd.grad / .backward()"
    )


def check_version(t: torch.Tensor, saved: int, what: str) -> None:
    """autograd's check on a saved tensor, which its saved-tensor hooks turn off: raise if
    ``t`` was modified in place since it was saved at version ``saved``."""
    if t._version != saved:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: a {tuple(t.shape)} {t.dtype} tensor saved ({what}) at version "
            f"{saved} is now at version {t._version}; clone it before modifying it in place"
        )


class Kept:
    """A saved tensor left in place, with the ledger hold that counts it (None: a weight).

    ``get()`` returns it after autograd's in-place check (saved-tensor hooks disable autograd's
    own, so without this an in-place change would give a silently wrong gradient)."""

    __slots__ = ("tensor", "token", "version", "where")

    def __init__(self, tensor: torch.Tensor, token: Token | None, where: str = "") -> None:
        # A non-leaf is held detached (same storage and version counter): an output its own
        # node saves (tanh, softmax...) held with its grad_fn made a node -> Kept -> tensor ->
        # node cycle through C++ that gc cannot see, so a graph dropped without backward
        # (an exception, a skipped batch) leaked with every activation behind it. (Autograd
        # re-attaches the history on unpack: create_graph still works.)
        self.tensor = tensor.detach() if tensor.grad_fn is not None else tensor
        self.token = token
        self.version = tensor._version
        self.where = where

    def get(self) -> torch.Tensor:
        check_version(self.tensor, self.version, f"kept by memopt, {self.where or 'a block'}")
        return self.tensor


def counting_hooks(
    ledger: SavedLedger, block: str, params: WeightKeys
) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """pack/unpack for ``keep``: nothing moves; non-weight saves are counted as ``device``."""

    where = f"block {block!r}"

    def pack(t: torch.Tensor) -> Kept:
        if not is_plain_tensor(t) or is_weight(t, params):
            return Kept(t, None, where)
        return Kept(t, ledger.hold(t, place="device", block=block), where)

    def unpack(packed: Kept) -> torch.Tensor:
        return packed.get()

    return pack, unpack
