"""Instrumentation of one training step for ``profile``: hooks, time marks, saved storages.

A ``Recorder`` installs, for one step, forward pre/post hooks on every block (they set the
current block, mark the forward's start and end, and put gradient hooks on the block's input
and output to mark its backward's end and start), forward pre-hooks on the ``nn.Linear``
layers inside blocks (their input storages), and a ``saved_tensors_hooks`` pack/unpack pair
that records each saved storage (parameters and buffers skipped) with the block(s) saving it
and holds it in a ``SavedLedger`` until autograd drops it. ``finish`` turns the marks into
seconds (one device synchronize on CUDA). ``op_step`` adds a ``TorchDispatchMode`` that times
the heavy ops (matmuls, attention) inside each block's forward and records their outputs:
what a selective recompute keeps, and the compute it then does not repeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memopt.activations.ledger import SavedLedger, Token, storage_key

LossFn = Callable[[nn.Module, Any], torch.Tensor]
NONBLOCK = "<non-block>"


class Clock:
    """Time marks: CUDA events (read after one synchronize) or ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b)) / 1e3
        return float(b - a)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    hs = kwargs.get("hidden_states")
    return hs if isinstance(hs, torch.Tensor) else None


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


class _Held:
    """What the pack hook returns: the tensor itself (unchanged memory) and its ledger hold."""

    __slots__ = ("tensor", "token")

    def __init__(self, tensor: torch.Tensor, token: Token) -> None:
        self.tensor, self.token = tensor, token


@dataclass
class Record:
    """Raw figures of one instrumented step."""

    sizes: dict[tuple[str, int], int] = field(default_factory=dict)
    owners: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    linear_inputs: set[tuple[str, int]] = field(default_factory=set)
    in_keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    head_keys: set[tuple[str, int]] = field(default_factory=set)
    linear_calls: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    in_bytes: dict[str, int] = field(default_factory=dict)
    in_ndim: dict[str, int] = field(default_factory=dict)  # rank of the first tensor argument
    all_in_bytes: dict[str, int] = field(default_factory=dict)
    out_bytes: dict[str, int] = field(default_factory=dict)
    # per block: distinct input storages of the modules a split would run piece by piece
    split_inputs: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    # per layer a split runs child by child: storages its attention core saves outside the
    # split projections (a split swaps them whole, not by tokens)
    core_saved: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    secs: dict[str, dict[str, float]] = field(default_factory=dict)
    peak: int = 0
    # per grad-enabled block call, in forward order (a block can run several times a step):
    # its block, the storages it saved first (for its block, as the ledger counts), its first
    # tensor argument (bytes, storage) and its tensor arguments not held by an earlier call
    calls: list[str] = field(default_factory=list)
    call_keys: list[set[tuple[str, int]]] = field(default_factory=list)
    call_in: list[tuple[int, tuple[str, int] | None]] = field(default_factory=list)
    call_args: list[int] = field(default_factory=list)
    nonblock_at: dict[tuple[str, int], int] = field(default_factory=dict)  # calls done at save


class Recorder:
    """Hooks for one instrumented step: current block, saved storages, time marks."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[tuple[str, nn.Module]],
        clock: Clock,
        split_parts: dict[str, list[nn.Module]] | None = None,
    ):
        self.blocks, self.clock = blocks, clock
        self.split_parts = split_parts or {}
        self.skip = {t.untyped_storage().data_ptr() for t in model.parameters()}
        self.skip |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        self.ledger = SavedLedger()
        self.rec = Record()
        self.current: str | None = None
        self.call: int | None = None  # index into rec.calls of the running call
        self.seen: dict[str, set[tuple[str, int]]] = {}  # per block: storages counted so far
        self.marks: dict[tuple[str, str], Any] = {}
        self.handles: list[Any] = []
        self.in_part = 0  # depth inside split parts
        self.in_core = 0  # depth inside a split layer's self_attn

    def install(self) -> None:
        for name, block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(
                self._pre(name), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(name)))
            for sub in block.modules():
                if isinstance(sub, nn.Linear):
                    self.handles.append(sub.register_forward_pre_hook(self._linear_pre))
            parts = self.split_parts.get(name, ())
            for part in parts:
                self.handles.append(part.register_forward_pre_hook(
                    self._split_pre(name), with_kwargs=True))  # fmt: skip
                self.handles.append(part.register_forward_hook(self._leave("in_part")))
            attn = getattr(block, "self_attn", None)
            if parts and parts[0] is not block and isinstance(attn, nn.Module):
                self.handles.append(attn.register_forward_pre_hook(self._enter("in_core")))
                self.handles.append(attn.register_forward_hook(self._leave("in_core")))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _mark(self, kind: str, name: str) -> None:
        self.marks[(kind, name)] = self.clock.mark()

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.current = name
            x = first_tensor(args, kwargs)
            self._begin_call(name, x, args, kwargs)
            self.rec.in_bytes[name] = _nbytes(x)
            self.rec.in_ndim[name] = x.dim() if x is not None else 0
            self.rec.all_in_bytes[name] = self._inputs_bytes(args, kwargs)
            if x is not None:
                self.rec.in_keys[name] = storage_key(x)
            if x is not None and x.requires_grad and torch.is_grad_enabled():
                x.register_hook(lambda _g: self._mark("bwd_end", name))
            self._mark("fwd_start", name)
        return hook

    def _args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[tuple[str, int], int]:
        leaves, _ = tree_flatten((args, kwargs))
        return {storage_key(t): t.untyped_storage().nbytes() for t in leaves
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip}

    def _inputs_bytes(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Distinct storages of every tensor argument (what a checkpoint keeps alive)."""
        return sum(self._args(args, kwargs).values())

    def _begin_call(self, name: str, x: torch.Tensor | None, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        """Open one call's record (grad-enabled calls only: the others save nothing)."""
        self.call = None
        if not torch.is_grad_enabled():
            return
        self.call = len(self.rec.calls)
        held = self.seen.setdefault(f"args:{name}", set())
        new = {k: n for k, n in self._args(args, kwargs).items() if k not in held}
        held.update(new)
        self.rec.calls.append(name)
        self.rec.call_keys.append(set())
        self.rec.call_in.append((_nbytes(x), storage_key(x) if x is not None else None))
        self.rec.call_args.append(sum(new.values()))

    def _post(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            self._mark("fwd_end", name)
            self.current, self.call = None, None
            y = out[0] if isinstance(out, (tuple, list)) else out
            y = y if isinstance(y, torch.Tensor) else None
            self.rec.out_bytes[name] = _nbytes(y)
            if y is not None and y.requires_grad:
                y.register_hook(lambda _g: self._mark("bwd_start", name))
        return hook

    def _enter(self, attr: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            setattr(self, attr, getattr(self, attr) + 1)
        return hook

    def _leave(self, attr: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            setattr(self, attr, max(getattr(self, attr) - 1, 0))
        return hook

    def _split_pre(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.in_part += 1
            x = first_tensor(args, kwargs)
            if x is not None and self.current == name and torch.is_grad_enabled():
                self.rec.split_inputs.setdefault(name, {})[storage_key(x)] = x.nbytes
        return hook

    def _linear_pre(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and self.current is not None:
            x = args[0]
            self.rec.linear_inputs.add(storage_key(x))
            in_f = x.shape[-1] if x.dim() else 1
            call = (int(in_f), x.numel() // max(int(in_f), 1), x.element_size())
            self.rec.linear_calls.setdefault(self.current, []).append(call)

    def pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self.skip:
            return t
        key = storage_key(t)
        self.rec.sizes[key] = t.untyped_storage().nbytes()
        self.rec.owners.setdefault(key, set()).add(self.current or NONBLOCK)
        if self.current is None:
            self.rec.nonblock_at.setdefault(key, len(self.rec.calls))
        elif self.call is not None:
            first = self.seen.setdefault(self.current, set())
            if key not in first:
                first.add(key)
                self.rec.call_keys[self.call].add(key)
        if self.current is not None and self.in_core and not self.in_part:
            self.rec.core_saved.setdefault(self.current, set()).add(key)
        # keyed by block as the managers' ledger is (a storage two blocks save counts twice)
        return _Held(t, self.ledger.hold(t, block=self.current or NONBLOCK))

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def finish(self) -> Record:
        self.clock.sync()
        m, sec = self.marks, self.clock.seconds
        secs: dict[str, dict[str, float]] = {"fwd": {}, "bwd": {}}
        for name, _ in self.blocks:
            if ("fwd_start", name) in m and ("fwd_end", name) in m:
                secs["fwd"][name] = sec(m[("fwd_start", name)], m[("fwd_end", name)])
            if ("bwd_start", name) in m and ("bwd_end", name) in m:
                secs["bwd"][name] = sec(m[("bwd_start", name)], m[("bwd_end", name)])
        last = self.blocks[-1][0]
        s0, f1, s1 = m[("step", "start")], m[("step", "fwd_end")], m[("step", "end")]
        secs["step"] = {"step": sec(s0, s1)}
        secs["head"] = {
            "fwd": sec(m[("fwd_end", last)], f1) if ("fwd_end", last) in m else 0.0,
            "bwd": sec(f1, m[("bwd_start", last)]) if ("bwd_start", last) in m else 0.0,
        }
        self.rec.secs = secs
        self.rec.peak = self.ledger.peak()
        # head/loss saves: made outside every block after the step's last block call
        n = len(self.rec.calls)
        self.rec.head_keys = {k for k, at in self.rec.nonblock_at.items() if n and at == n}
        return self.rec


def instrumented_step(
    model: nn.Module, batch: Any, loss_fn: LossFn, blocks: list[tuple[str, nn.Module]],
    clock: Clock, split_parts: dict[str, list[nn.Module]] | None = None,
) -> Record:
    rec = Recorder(model, blocks, clock, split_parts)
    rec.install()
    try:
        clock.sync()
        rec._mark("step", "start")
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
            loss = loss_fn(model, batch)
        rec._mark("step", "fwd_end")
        loss.backward()
        rec._mark("step", "end")
        del loss
    finally:
        rec.remove()
    return rec.finish()


# Ops a selective recompute keeps (their outputs are cached, not recomputed): the matmuls and
# the attention kernels, which hold most of a transformer block's compute.
HEAVY_OPS = frozenset({
    "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
})


@dataclass
class OpRecord:
    """Per block: heavy ops seen, their output storages and bytes, their forward time."""

    ops: dict[str, set[str]] = field(default_factory=dict)
    outputs: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    out_bytes: dict[str, int] = field(default_factory=dict)  # per call: all stay cached
    seconds: dict[str, float] = field(default_factory=dict)


class _OpMode(TorchDispatchMode):
    """Times the heavy ops run inside a block's forward and records their output storages."""

    def __init__(self, rec: Recorder, out: OpRecord) -> None:
        super().__init__()
        self.rec, self.out = rec, out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, block = str(func.overloadpacket), self.rec.current
        if block is None or name not in HEAVY_OPS:
            return func(*args, **(kwargs or {}))
        self.rec.clock.sync()
        t0 = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        self.rec.clock.sync()
        self.out.seconds[block] = self.out.seconds.get(block, 0.0) + time.perf_counter() - t0
        self.out.ops.setdefault(block, set()).add(name)
        outs = self.out.outputs.setdefault(block, {})
        fresh = {storage_key(t): t.untyped_storage().nbytes()
                 for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)}
        outs.update(fresh)  # a freed output's address may be reused: bytes are summed per call
        self.out.out_bytes[block] = self.out.out_bytes.get(block, 0) + sum(fresh.values())
        return result


def op_step(model: nn.Module, batch: Any, loss_fn: LossFn,
            blocks: list[tuple[str, nn.Module]], clock: Clock) -> tuple[Record, OpRecord]:
    """One step with the heavy ops of each block timed and their outputs recorded."""
    rec, ops = Recorder(model, blocks, clock), OpRecord()
    rec.install()
    try:
        rec._mark("step", "start")
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack), _OpMode(rec, ops):
            loss = loss_fn(model, batch)
        rec._mark("step", "fwd_end")
        loss.backward()
        rec._mark("step", "end")
        del loss
    finally:
        rec.remove()
    return rec.finish(), ops
