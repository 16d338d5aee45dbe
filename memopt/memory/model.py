"""Turn what the user has (an ``nn.Module``, a meta module, a ``transformers`` config) into a
module on the meta device and a list of ``ParamInfo`` the byte rules work on.

Nothing is allocated: a config is built under ``torch.device("meta")``; a real module is
described as it is (its parameters are only read for shape and dtype). The low-rank target
selection mirrors ``memopt.optim.param_groups`` (layer 2 may not import the optimizers): the
``weight`` of a Linear-like module whose qualified name matches ``target`` (a regex), never an
embedding, a norm or the output head (a Linear named lm_head/output/classifier/score/head, or
one whose weight is tied to an embedding); ``"all-linear"`` takes every such Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memopt._utils.modules import head_modules, is_linear, is_norm


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter: name, shape, dtype, and whether it is a low-rank target."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    low_rank: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def as_meta_module(model: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """An ``nn.Module`` (returned as is) or a ``transformers.PretrainedConfig`` (built on meta)."""
    if isinstance(model, nn.Module):
        return model
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        from transformers import AutoModelForCausalLM  # optional dependency: lazy

        try:
            with torch.device("meta"):
                module = AutoModelForCausalLM.from_config(model)
        except ValueError as e:  # not a causal-LM architecture (T5, BERT-style encoders...)
            raise ValueError(
                f"memopt.memory: a {type(model).__name__} is built as a causal LM "
                f"(AutoModelForCausalLM), which transformers refuses for it "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
                "For other models build the module (under torch.device('meta') if large) "
                "and pass it with inputs={...} for its forward"
            ) from None
        if dtype is not None:
            module = module.to(dtype)
        return module
    raise TypeError(
        f"memopt.memory: model must be an nn.Module or a transformers config, got "
        f"{type(model).__name__}; build it with LlamaConfig(...) or pass the module"
    )


def param_infos(
    model: nn.Module, target: str | None = "attn|mlp", dtype: torch.dtype | None = None
) -> list[ParamInfo]:
    """Every trainable parameter once (tied ones once), in registration order.

    ``target=None`` marks nothing low-rank (full-state optimizers). ``dtype`` overrides the
    parameters' dtype (the training dtype when the model is described in another one).
    """
    pattern = None if target in (None, "all-linear") else re.compile(target)
    heads = head_modules(model)
    seen: set[int] = set()
    out: list[ParamInfo] = []
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            candidate = (
                p_name == "weight"
                and p.dim() >= 2
                and not isinstance(mod, nn.Embedding)
                and not is_norm(mod)
                and mod_name not in heads
            )
            if target is None:
                low = False
            elif pattern is None:
                low = candidate and is_linear(mod)
            else:
                low = candidate and bool(pattern.search(mod_name))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            out.append(ParamInfo(full, tuple(p.shape), dtype or p.dtype, low))
    return out


def frozen_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the parameters that do not train (``requires_grad=False``, tied ones once):
    weights in memory, with no gradient and no optimizer state."""
    return sum(
        p.numel() * (dtype.itemsize if dtype is not None else p.element_size())
        for p in model.parameters()  # each tied parameter once
        if not p.requires_grad
    )


def buffer_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the module's buffers (rotary tables, running statistics ...)."""
    total = 0
    for b in model.buffers():
        size = dtype.itemsize if dtype is not None and b.is_floating_point() else b.element_size()
        total += b.numel() * size
    return total


def check_positions(model: nn.Module, seq_len: int) -> None:
    """Refuse a ``seq_len`` past a learned position table (GPT-2's ``n_positions``): on meta
    tensors the lookup cannot fail, so the estimate would price a run that crashes. Rotary
    models (LLaMA) compute positions, and take any length."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or seq_len <= limit:
        return
    tables = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and limit <= m.num_embeddings <= limit + 2  # OPT: +2
        and any(k in name.rsplit(".", 1)[-1].lower() for k in ("pos", "wpe"))
    ]  # fmt: skip
    if tables:
        raise ValueError(
            f"memopt.memory.estimate: seq_len={seq_len} is longer than the model's "
            f"{limit} learned positions ({tables[0]}); the forward would fail. Pass "
            f"seq_len <= {limit}, or a config with more positions"
        )


def check_target(model: nn.Module, target: str | None, infos: list[ParamInfo]) -> None:
    """A low-rank optimizer's ``target`` that selects no weight is an error, as
    ``param_groups`` makes it (the model would otherwise be priced as all full-state)."""
    if target is None or any(p.low_rank for p in infos):
        return
    heads = head_modules(model)
    names = [n for n, m in model.named_modules() if is_linear(m) and n not in heads][:8]
    raise ValueError(
        f"memopt.memory.estimate: target {target!r} matched no weight of "
        f"{type(model).__name__}; Linear modules that can be targets include {names} "
        "(embeddings, norms and the output head never are). Pass a regex over module "
        "names or 'all-linear' (param_groups refuses such a target too)"
    )
