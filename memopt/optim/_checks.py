"""Checks of a gradient before any update uses it (shared by the step and the refreshes)."""

from __future__ import annotations

from torch import Tensor


def check_grad(grad: Tensor, label: str) -> None:
    if grad.is_meta:
        raise RuntimeError(
            f"{label} is on the meta device (its gradient is too): materialise the model "
            "before training, e.g. model.to_empty(device=...) and initialise the weights"
        )
    if grad.is_sparse:
        raise TypeError(f"{label}: sparse gradients are not supported (use torch.optim.SparseAdam)")
    if grad.is_complex():
        raise TypeError(
            f"{label}: complex gradients are not supported; view the parameter as real "
            "(torch.view_as_real) before optimizing it"
        )
