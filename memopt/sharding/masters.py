"""Which ``master_dtype`` a parameter the optimizer holds may have a master copy in: one
rule for stages 1, 2 and 3, checked before anything is changed.

A master copy exists so the optimizer adds each update in more precision than the weights
keep (a bf16 model with fp32 masters). So a master must be *wider* than its parameter:

- equal dtypes: no copy, the parameter is stepped in place;
- a master narrower than the parameter (bf16 masters of fp32 weights) would round every
  update to fewer bits: refused;
- a master of the same width in another format (bf16 masters of fp16 weights, fp16 of bf16)
  is refused too. bf16 keeps 8 significant bits where fp16 keeps 11, so a bf16 master rounds
  the weights coarser than fp16 itself holds them; an fp16 master has 5 exponent bits where
  bf16 has 8, so weights or updates outside fp16's range (above 65504, below 6e-5 as normal
  numbers) overflow or lose precision. Neither holds the small updates the weights would
  lose, which is what a master is for. Before this check stages 1/2 kept such a copy and
  stage 3 (which casts only narrower parameters to the master dtype) stepped the
  parameters themselves: the same call trained differently by stage.

Stages 1/2 (``setup.apply_sharding``, before ``ShardedOptimizer`` touches the optimizer's
groups) and stage 3 (``fsdp_dtypes.plan_dtypes``, before any unit is cast or sharded) raise
the same ``ValueError``, on one process too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["check_held_masters", "check_master_dtypes", "master_problem"]


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _significand(dtype: torch.dtype) -> int:
    """Significant bits, the implicit leading one included (fp16: 11, bf16: 8, fp32: 24)."""
    return 1 - round(math.log2(torch.finfo(dtype).eps))


def master_problem(name: str, dtype: torch.dtype, master: torch.dtype | None) -> str | None:
    """Why parameter ``name`` of ``dtype`` cannot have a ``master`` copy, or None if it can
    (no master, the same dtype, or a wider one)."""
    if master is None or master == dtype or not dtype.is_floating_point:
        return None
    if _bits(master) < _bits(dtype):
        return (
            f"memopt.shard: master_dtype={master} is narrower than the parameter {name!r} "
            f"({dtype}): every update would round the weights to {master}; master weights "
            "are for low-precision parameters (use master_dtype=None here)"
        )
    if _bits(master) > _bits(dtype):
        return None
    m, d = torch.finfo(master), torch.finfo(dtype)
    return (
        f"memopt.shard: master_dtype={master} has the same width as the parameter {name!r} "
        f"({dtype}, {_bits(dtype)} bits) in another format: {master} keeps "
        f"{_significand(master)} significant bits and a range up to {m.max:.3g}, {dtype} "
        f"{_significand(dtype)} and {d.max:.3g}, so a {master} master would lose precision or "
        "range that the weights themselves keep, and no master holds the small updates a "
        f"{dtype} weight loses. A master must be wider than its parameter: use "
        f"master_dtype=torch.float32 (fp32 masters of the {dtype} weights), or "
        f"master_dtype=None (step the {dtype} parameters in place); every stage refuses "
        "this combination"
    )


def check_master_dtypes(named: Iterable[tuple[str, Tensor]], master: torch.dtype | None) -> None:
    """Raise the first parameter's ``master_problem`` as a ValueError (nothing changed)."""
    if master is None:
        return
    for name, p in named:
        problem = master_problem(name, p.dtype, master)
        if problem is not None:
            raise ValueError(problem)


def check_held_masters(
    model: nn.Module, optimizer: torch.optim.Optimizer, master: torch.dtype | None
) -> None:
    """``check_master_dtypes`` over the parameters ``optimizer`` holds, named as in
    ``model`` (stages 1/2 keep a master of exactly these)."""
    names = {id(p): n for n, p in model.named_parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    check_master_dtypes(((names.get(id(p), f"#{i}"), p) for i, p in enumerate(held)), master)
