"""Sampled linear layers (WTA-CRS, action ``"sample"``): exact forward, sampled weight gradient.

``y = x W^T + b`` is computed exactly. For the backward the layer saves, instead of the whole
input ``x`` (``[N, in]`` once flattened, N = batch * tokens), only ``k = ceil(ratio * N)`` rows
chosen by winner-take-all column-row sampling (``_crs.py``: the estimator, its unbiasedness
and variance argument), plus their indices (int64) and weights (float32). In the backward:

- ``grad_x = g W``: exact (needs no ``x``);
- ``grad_b = sum_i g_i``: exact;
- ``grad_W = sum_j w_j g_{idx_j}^T x_{idx_j}``: an unbiased estimate of ``g^T x``.

Row importance follows the paper: ``p_i ~ ||x_i|| * ||g_i||`` with ``||g_i||`` from the previous
backward of the same layer when N matches (a per-layer ``SampleState`` keeps it), else
``p_i ~ ||x_i||``. Each layer owns a seeded ``torch.Generator`` per device, so a run is
reproducible. The sample has a fixed size k, so the layer can sit inside a checkpointed region
(the recompute draws a new, equally unbiased sample of the same shape).

Saved bytes per layer (``sampled_saved_bytes``): ``k * in * itemsize + 12 k`` against
``N * in * itemsize`` for ``nn.Linear`` (the weight is a parameter and saved in both cases);
when ``k >= N`` the input is saved whole. Extra compute: row norms of x (``N * in``), a top-k
and a multinomial over N in the forward, a gather of k rows of g in the backward; the
weight-gradient GEMM shrinks from ``N * in * out`` to ``k * in * out`` multiply-adds.

Opt in per module: ``SampledLinear`` (an ``nn.Linear`` drop-in) or ``install_sampled(block,
policy)``, which patches the ``forward`` of every ``nn.Linear`` inside ``block`` (parameters,
names and ``state_dict`` unchanged) and returns a handle whose ``remove()`` restores them.
Sampling runs only in training mode with grad enabled; otherwise the plain linear runs.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memopt.activations._crs import crs_weight_grad, row_importance, sample_budget, wta_sample
from memopt.activations.hooks import counting_hooks, param_storages
from memopt.activations.install import INSTALLERS, InstallContext, Installed, hooked_block
from memopt.activations.policy import ActivationPolicy

__all__ = [
    "SampleState",
    "SampledInstall",
    "SampledLinear",
    "install_sampled",
    "sampled_linear",
    "sampled_saved_bytes",
]


@dataclass
class SampleState:
    """Per-layer sampling state: ratio, seed, generators, the previous ``||g_i||``."""

    ratio: float
    seed: int = 0
    wta: bool = True
    use_grad_norm: bool = True
    prev_grad_norm: torch.Tensor | None = None
    _generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        sample_budget(1, self.ratio)  # validates the ratio

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def grad_proxy(self, rows: int) -> torch.Tensor | None:
        h = self.prev_grad_norm
        if not self.use_grad_norm or h is None or h.numel() != rows:
            return None
        return h


def sampled_saved_bytes(
    in_features: int, rows: int, ratio: float, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes a sampled linear saves for its backward (the weight, a parameter, excluded).

    ``rows`` is N = batch * tokens. Compare with ``rows * in_features * itemsize`` for a plain
    ``nn.Linear``; the ratio of the two tends to ``ratio`` (plus 12 bytes per kept row).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    k = sample_budget(rows, ratio)
    if k >= rows:
        return rows * in_features * itemsize
    return k * in_features * itemsize + k * (8 + 4)


class _SampledLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        state: SampleState,
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # x: rows (the caller flattens, see sampled_linear)
        n = x.shape[0]
        k = sample_budget(n, state.ratio)
        if k >= n:
            idx: torch.Tensor | None = None
            w: torch.Tensor | None = None
            x_sel = x
        else:
            p = row_importance(x, state.grad_proxy(n))
            idx, w = wta_sample(p, k, state.generator(x.device), wta=state.wta)
            x_sel = x.detach().index_select(0, idx)
        ctx.save_for_backward(weight, x_sel, idx, w)
        ctx.state = state
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, x_sel, idx, w = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = gy @ weight.to(gy.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if idx is None:
                grad_w = (g2.t() @ x_sel.to(g2.dtype)).to(weight.dtype)
            else:
                grad_w = crs_weight_grad(g2, x_sel, idx, w).to(weight.dtype)
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        state: SampleState = ctx.state
        if state.use_grad_norm:
            state.prev_grad_norm = torch.linalg.vector_norm(g2.detach().float(), dim=1)
        return grad_x, grad_w, grad_b, None


def sampled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: SampleState
) -> torch.Tensor:
    """``F.linear`` with a WTA-CRS sampled weight gradient (plain linear when no grad flows)."""
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"sampled_linear: input of shape {tuple(x.shape)} does not match weight "
            f"{tuple(weight.shape)}; the last dim must be in_features={weight.shape[1]}"
        )
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(x, weight, bias)
    # The Function sees 2-D rows and returns a fresh tensor; the reshapes around it are
    # ordinary autograd views. (F.linear of a 3-D input returns a view of its 2-D result,
    # and a view made inside a custom Function cannot be modified in place: an
    # nn.ReLU(inplace=True) after the layer failed.)
    out: torch.Tensor = _SampledLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, state)
    return out.view(*x.shape[:-1], weight.shape[0])


class SampledLinear(nn.Linear):
    """``nn.Linear`` whose backward uses a WTA-CRS sample of its input (see module doc)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, ratio: float = 0.3,
        seed: int = 0, wta: bool = True, device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.sample_state = SampleState(ratio=ratio, seed=seed, wta=wta)

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, ratio: float = 0.3, seed: int = 0) -> SampledLinear:
        """A ``SampledLinear`` sharing ``lin``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.sample_state = SampleState(ratio=ratio, seed=seed)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return sampled_linear(x, self.weight, self.bias, self.sample_state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.sample_state.ratio:g}"


def _patched_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    state: SampleState = self._memopt_sample_state  # type: ignore[assignment]
    if not self.training:
        return F.linear(x, self.weight, self.bias)
    return sampled_linear(x, self.weight, self.bias, state)


@dataclass
class SampledInstall:
    """Handle returned by ``install_sampled``: the patched layers and their states."""

    layers: dict[str, nn.Linear]
    states: dict[str, SampleState]
    counting: Installed | None = None

    def remove(self) -> None:
        """Restore every patched layer's own ``forward`` (idempotent)."""
        if self.counting is not None:
            self.counting.remove()
            self.counting = None
        for lin in self.layers.values():
            if "forward" in lin.__dict__:
                del lin.forward
            if hasattr(lin, "_memopt_sample_state"):
                del lin._memopt_sample_state
        self.layers = {}


@INSTALLERS.register("sample")
def install_sampled(
    block: nn.Module, policy: ActivationPolicy, ctx: InstallContext | None = None, *,
    seed: int = 0,
) -> SampledInstall:
    """Make every ``nn.Linear`` in ``block`` (itself included) a sampled linear.

    Each layer gets its own ``SampleState`` (seed ``seed + i`` in module order). With an
    ``InstallContext`` (from ``apply``) the block's saved tensors, the samples included, are
    also counted in the ledger as ``"device"`` (they stay on the device, as for ``keep``).
    """
    if policy.action != "sample":
        raise ValueError(f"install_sampled needs action='sample', got {policy.action!r}")
    targets = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError(
            f"{type(block).__name__} holds no nn.Linear; the 'sample' policy only applies to "
            "blocks with linear layers (pick another action for this block)"
        )
    handle = SampledInstall({}, {})
    for i, (name, lin) in enumerate(targets):
        if isinstance(lin, SampledLinear) or hasattr(lin, "_memopt_sample_state"):
            handle.remove()
            raise ValueError(f"linear {name or '<block>'!r} is already sampled; remove() first")
        state = SampleState(ratio=policy.sample_ratio, seed=seed + i)
        lin._memopt_sample_state = state  # type: ignore[assignment]
        lin.forward = types.MethodType(_patched_forward, lin)  # type: ignore[method-assign]
        handle.layers[name] = lin
        handle.states[name] = state
    if ctx is not None:
        try:  # the weights as of each call (FSDP2 all-gathers new storages every forward)
            handle.counting = hooked_block(
                block, ctx,
                lambda run: counting_hooks(ctx.ledger, ctx.block_name, param_storages(ctx.root)),
                "sample",
            )
        except BaseException:
            handle.remove()
            raise
    return handle
