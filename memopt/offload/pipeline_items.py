"""The items ``OffloadedAdamState.step`` takes (``AdamHyper``, ``StepItem``) and the
``PipelineStats`` it keeps; apart from ``pipeline`` so that module stays about the pipeline
itself. ``memopt.offload.pipeline`` re-exports them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from torch import Tensor

from memopt.offload.cpu_adam import EpsMode

__all__ = ["AdamHyper", "PipelineStats", "StepItem"]


@dataclass(frozen=True)
class AdamHyper:
    """One tensor's AdamW hyperparameters for this step (``step`` is 1-based)."""

    step: int
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    eps_mode: EpsMode = "torch"


@dataclass
class StepItem:
    """One tensor to update: its state key, gradient, the model tensor that receives the
    updated values (any dtype/device, same number of elements) and its hyperparameters."""

    key: Hashable
    grad: Tensor
    param: Tensor
    hyper: AdamHyper


@dataclass
class PipelineStats:
    """Seconds spent waiting for reads/writes and updating, and bytes moved, since reset."""

    io_wait_s: float = 0.0
    update_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    steps: int = 0
    groups: list[int] = field(default_factory=list)  # tensors per group, last step
