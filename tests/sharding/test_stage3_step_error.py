"""Stage 3 with ``offload_params="nvme"``: an exception in the step that is not a tier error
(the inner optimizer raising, a Ctrl-C) ends the step's I/O too. Before, only an ``OSError``
drained the tiers: the parameter swapper stayed in step mode, so every later forward load
counted as one for an update and each eviction wrote its unit back synchronously."""

from __future__ import annotations

from typing import Any

import torch

from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding.test_param_swap_failures import _build, _step


def _run(rank: int, world: int, path: str) -> dict[str, Any]:
    model, opt = _build(path, state=False)
    batches = T.batches()
    _step(model, opt, batches[0])
    real = opt.inner.step

    def fails(*a: Any, **k: Any) -> Any:
        raise RuntimeError("injected: the inner step failed")

    opt.inner.step = fails
    torch.nn.functional.mse_loss(model(batches[1][0]), batches[1][1]).backward()
    try:
        opt.step()
        raised = ""
    except RuntimeError as e:
        raised = str(e)
    swapper = opt.param_swapper
    left = (swapper._stepping, sum(len(u.writes) for u in swapper.units))
    opt.inner.step = real
    opt.zero_grad()
    _step(model, opt, batches[2])  # and training goes on
    opt.close()
    return {"raised": raised, "left": left}


def test_a_non_tier_error_in_the_step_ends_its_io(tmp_path: Any) -> None:
    out = run_distributed(_run, world_size=1, timeout_s=120, args=(str(tmp_path),))[0]
    assert out["raised"] == "injected: the inner step failed"
    assert out["left"] == (False, 0), out["left"]  # out of step mode, nothing in flight
