"""Activation bytes from one forward and backward on the meta device: nothing is allocated.

Meta tensors carry shapes and dtypes but no memory, so the model is run once, on meta copies
of its parameters, under two observers:

- ``torch.autograd.graph.saved_tensors_hooks``: the bytes autograd saves for backward (each
  distinct storage once, parameters and their views excluded): ``saved_bytes``, attributed to
  the repeated blocks (the largest ``nn.ModuleList`` of one class) that saved them;
- a ``TorchDispatchMode`` that adds each op's new output storages to a live set and removes
  them when the storage dies (``weakref.finalize`` on the storage, whose Python object PyTorch
  keeps alive exactly as long as the C++ one): the live bytes at every point of forward and
  backward, split at the peak into activations (born in forward), gradients (storages that
  became a ``param.grad``) and temporaries (the rest); and whether the peak fell at the
  head: in the backward before any repeated block's own (the head and the loss; a block's
  starts with the gradient of its output), ``peak_at_head``.

Attention: on meta, ``scaled_dot_product_attention`` would pick its math path, which saves
the full attention matrix; real CPU and GPU runs pick a fused kernel that saves only q, k, v,
the output and the log-sum-exp. The trace therefore routes meta SDPA calls (no dropout) to the
fused CPU kernel's meta implementation (``fused_attention=True``), whose saved set is that of
the real run (on GPU the flash / memory-efficient kernels save the same tensors). Calls
whose ``attn_mask`` requires grad (T5's learned position bias) stay on the original path:
the fused kernel cannot differentiate the mask, and a real CPU run takes the math path for
them too. ``enable_gqa`` calls are routed too: the fused CPU kernel takes grouped K/V as
they are, as it does in a real run.

``recompute`` wraps every block in non-reentrant ``torch.utils.checkpoint`` for the trace
(removed again afterwards), so its figure is the real recompute schedule: block inputs plus
one block's activations at a time during backward. As ``memopt.activations``' recompute and
HF's gradient checkpointing do, a checkpointed block gets no KV cache (``past_key_values``
and the like set to None, ``use_cache=False``): the backward's replay would append to it a
second time.

Transformers' mask helpers read values (packed-sequence detection, "is this padding mask all
ones"), which meta tensors do not have: ``hf_masks.meta_mask_values`` answers them for the
trace (see there).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memopt._utils.kvcache import is_kv_cache
from memopt.memory.hf_masks import meta_mask_values


@dataclass(frozen=True)
class ActivationTrace:
    """What one traced training step keeps live, in bytes (parameters excluded)."""

    saved_bytes: int  # distinct storages autograd saved (hooks)
    live_after_forward: int  # everything the forward left alive (saved + outputs)
    peak: int  # the most live at once during forward + backward
    peak_activations: int
    peak_gradients: int
    peak_temporaries: int
    gradients: int  # live at the end of backward
    block_saved: list[int] = field(default_factory=list)
    block_input: int = 0
    #: the peak fell at the head (see the module docstring); False when unknown
    peak_at_head: bool = False
    #: the highest point at the head (True) and elsewhere (False): ``peak`` and its split
    #: (``peak_activations``, ...), for costs that depend on the position (stage 3)
    by_position: dict[bool, dict[str, int]] = field(default_factory=dict)


#: memopt.activations.hooks.BLOCK_ATTR (layer 3: restated; tests/memory pin the two equal)
ACTIVATION_BLOCK_ATTR = "_memopt_activation_block"


def managed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules ``memopt.activations`` manages (an installed forward wrapper)."""
    return [n for n, m in model.named_modules() if getattr(m, ACTIVATION_BLOCK_ATTR, None)]


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (no data copied).

    ``memopt.activations``' forward wrappers are left out of the copy: each is a closure over
    the original module's forward, so the copy would run the real weights (the trace runs
    the module's own forward; ``trace_step(recompute=True)`` models recompute)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        )
    out = copy.deepcopy(model, memo)
    for mod in out.modules():
        if getattr(mod, ACTIVATION_BLOCK_ATTR, None) is not None:
            mod.__dict__.pop("forward", None)  # the class's forward again
            delattr(mod, ACTIVATION_BLOCK_ATTR)
    return out


def meta_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with every tensor on the meta device (shape and dtype kept, no data)."""
    if not isinstance(inputs, dict):
        raise TypeError(f"memopt.memory.estimate: inputs must be a dict of the forward's "
                        f"keyword arguments, got {type(inputs).__name__}")  # fmt: skip
    return {k: v.to("meta") if isinstance(v, Tensor) else v for k, v in inputs.items()}


def check_causal_lm(model: nn.Module) -> None:
    """Without ``inputs=`` the trace calls ``model(input_ids=..., labels=...)``: refuse a
    module whose forward takes neither by name (nor ``**kwargs``), saying what to pass."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: let the forward decide
        return
    if "input_ids" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    raise ValueError(
        f"memopt.memory.estimate: {type(model).__name__}.forward takes no input_ids, so the "
        "default causal-LM batch (input_ids and labels) does not fit it; pass inputs={...} "
        "with the forward's keyword tensors (any device: they are moved to meta)"
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the largest ``nn.ModuleList`` whose children share one class."""
    best: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best):
            kinds = {type(c) for c in mod}
            if len(kinds) == 1:
                best = list(mod)
    return best


class _Live(TorchDispatchMode):
    """Live storage bytes by category, with the split at the peak."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.live, self.kind = skip, {}, {}  # type: ignore[var-annotated]
        self.cur = {"act": 0, "grad": 0, "tmp": 0}
        self.peak, self.at_peak = 0, dict(self.cur)
        self.phase = "act"
        self.block_bwd, self.peak_at_head = False, False  # a block's backward has begun
        self.sides: dict[bool, tuple[int, dict[str, int]]] = {}  # the peak at / off the head

    def add(self, t: Tensor, kind: str | None = None) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.skip or key in self.live:
            return
        self.live[key] = n = int(st.nbytes())
        self.kind[key] = kind or self.phase
        self.cur[self.kind[key]] += n
        weakref.finalize(st, self._free, key)
        total, head = sum(self.cur.values()), self.phase == "tmp" and not self.block_bwd
        if total > self.sides.get(head, (-1,))[0]:
            self.sides[head] = (total, dict(self.cur))
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.cur)
            self.peak_at_head = head

    def regrade(self, t: Tensor, kind: str) -> None:
        key = t.untyped_storage()._cdata
        if key in self.live and self.kind[key] != kind:
            self.cur[self.kind[key]] -= self.live[key]
            self.kind[key] = kind
            self.cur[kind] += self.live[key]

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        self.cur[self.kind.pop(key, "tmp")] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.add(t)
        return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route meta ``F.scaled_dot_product_attention`` calls to the fused kernel (see above)."""
    orig = F.scaled_dot_product_attention

    def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> Tensor:  # fmt: skip
        mask_grad = attn_mask is not None and attn_mask.requires_grad
        if q.device.type == "meta" and dropout_p == 0.0 and not mask_grad:
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                # as SDPA does before its fused kernels (convert_boolean_attn_mask): a new
                # additive mask in q's dtype, per call, which the kernel saves
                zero = torch.scalar_tensor(0.0, dtype=q.dtype, device=attn_mask.device)
                attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), zero)
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale
            )
            return out[0]
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)  # fmt: skip

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def _no_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A checkpointed block's keywords without a KV cache (as memopt's recompute passes them)."""
    kwargs = {k: None if is_kv_cache(k, v) else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@contextlib.contextmanager
def _checkpointed(blocks: list[nn.Module]) -> Iterator[None]:
    """Every block under non-reentrant checkpoint, without a KV cache, for the ``with``."""
    from torch.utils.checkpoint import checkpoint

    def wrap(fwd: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            return checkpoint(
                fwd, *args, use_reentrant=False, preserve_rng_state=False, **_no_cache(kwargs)
            )

        return run

    before = [b.__dict__.get("forward") for b in blocks]  # an instance forward (hooks) or None
    for b in blocks:
        b.forward = wrap(b.forward)
    try:
        yield
    finally:
        for b, fwd in zip(blocks, before, strict=True):
            if fwd is None:
                del b.forward  # the class's forward again
            else:
                b.forward = fwd


def _loss(out: Any) -> Tensor:
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    t = out if isinstance(out, Tensor) else tree_flatten(out)[0][0]
    return t.float().sum()


def trace_step(
    model: nn.Module,
    inputs: dict[str, Tensor],
    recompute: bool = False,
    attention: bool = True,
    accumulate: bool = False,
) -> ActivationTrace:
    """Run forward + backward of the meta ``model`` on meta ``inputs`` and measure (see above).

    ``attention=False`` leaves SDPA on its meta (math) path. ``accumulate``: a later
    micro-batch of gradient accumulation: every parameter already has its gradient (not
    counted here: the caller holds them), which the backward adds into.
    """
    step = TracedStep(model, accumulate)

    def pack(t: Tensor) -> Tensor:
        step.note_saved(t)
        return t

    attn = fused_attention() if attention else contextlib.nullcontext()
    ckpt = _checkpointed(step.blocks) if recompute else contextlib.nullcontext()
    step.run(inputs, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), attn, ckpt)
    return ActivationTrace(**step.fields())


class TracedStep:
    """The bookkeeping one traced step shares with ``swaptrace``: the storages not counted
    (parameters, their gradients, buffers), the distinct saved storages and their bytes per
    block, the current block and the bytes of its first input, and the run itself."""

    def __init__(self, model: nn.Module, accumulate: bool) -> None:
        self.model = model
        self.params = list(model.parameters())
        if accumulate:
            for p in self.params:
                if p.requires_grad:
                    p.grad = torch.empty_like(p)
        skip = {p.untyped_storage()._cdata for p in self.params}
        skip |= {p.grad.untyped_storage()._cdata for p in self.params if p.grad is not None}
        skip |= {b.untyped_storage()._cdata for b in model.buffers()}
        self.skip = skip
        self.blocks = find_blocks(model)
        self.saved: dict[int, int] = {}
        self.per_block = [0] * len(self.blocks)
        self.block, self.input = -1, 0
        self.live = _Live(skip)
        self.after_forward = 0

    def note_saved(self, t: Tensor) -> int:
        """Count a tensor autograd saves (once per storage); its storage's bytes, or 0 when
        it is not counted (a parameter's, or one seen before)."""
        key = t.untyped_storage()._cdata
        if key in self.skip or key in self.saved:
            return 0
        self.saved[key] = nbytes = int(t.untyped_storage().nbytes())
        self.live.add(t, "act")
        if self.block >= 0:
            self.per_block[self.block] += nbytes
        return nbytes

    def enter(self, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.block = i
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, Tensor):
            self.input = first.numel() * first.element_size()

    def leave(self, output: Any) -> None:
        self.block = -1
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
        if tensors and tensors[0].requires_grad:  # its gradient starts the block's backward
            tensors[0].register_hook(lambda grad: setattr(self.live, "block_bwd", True))

    def run(self, inputs: dict[str, Tensor], hooks: Any, *contexts: Any) -> None:
        """Forward + backward under ``contexts``, then the meta masks, the live count and the
        saved-tensor ``hooks`` (innermost), with the blocks' ``enter``/``leave`` and the
        gradients' regrading hooked in."""
        live = self.live
        handles = [
            b.register_forward_pre_hook(
                functools.partial(lambda i, m, a, k: self.enter(i, a, k), i), with_kwargs=True
            )
            for i, b in enumerate(self.blocks)
        ]
        handles += [
            b.register_forward_hook(lambda m, a, k, out: self.leave(out), with_kwargs=True)
            for b in self.blocks
        ]
        handles += [  # frozen parameters get no gradient (and take no hook)
            p.register_post_accumulate_grad_hook(lambda p: live.regrade(p.grad, "grad"))
            for p in self.params
            if p.requires_grad
        ]
        try:
            with contextlib.ExitStack() as stack:
                for c in (*contexts, meta_mask_values(), live, hooks):
                    stack.enter_context(c)
                for t in inputs.values():
                    live.add(t, "act")
                loss = _loss(self.model(**inputs))
                self.after_forward = sum(live.cur.values())
                live.phase = "tmp"
                loss.backward()
                del loss
        finally:
            for h in handles:
                h.remove()

    def fields(self) -> dict[str, Any]:
        """``ActivationTrace``'s fields, measured."""
        live = self.live
        return {
            "saved_bytes": sum(self.saved.values()),
            "live_after_forward": self.after_forward,
            "peak": live.peak,
            "peak_activations": live.at_peak["act"],
            "peak_gradients": live.at_peak["grad"],
            "peak_temporaries": live.at_peak["tmp"],
            "gradients": live.cur["grad"],
            "block_saved": self.per_block,
            "block_input": self.input,
            "peak_at_head": live.peak_at_head,
            "by_position": {
                k: {
                    "peak": n,
                    "peak_activations": at["act"],
                    "peak_gradients": at["grad"],
                    "peak_temporaries": at["tmp"],
                }
                for k, (n, at) in live.sides.items()
            },  # fmt: skip
        }


def causal_lm_inputs(batch_size: int, seq_len: int, vocab: int | None = None) -> dict[str, Tensor]:
    """Meta ``input_ids`` and ``labels`` for a causal language model."""
    ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": torch.empty_like(ids)}
