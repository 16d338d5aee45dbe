"""Save parameters and optimizer state the way a checkpoint would, and build them again."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch


def reload(
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """(new parameters, new optimizer) after a ``torch.save`` / ``torch.load(weights_only=True)``
    round trip of the parameters and ``opt.state_dict()``; ``make`` builds the optimizer."""
    buf = io.BytesIO()
    torch.save({"p": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(t.clone()) for t in blob["p"]]
    opt2 = make(params2)
    opt2.load_state_dict(blob["opt"])
    return params2, opt2
