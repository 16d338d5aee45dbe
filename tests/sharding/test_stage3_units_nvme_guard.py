"""Stage 3 with ``offload_params="nvme"``: ``full_tensor()`` and ``redistribute()`` of a
parameter whose shard is evicted to NVMe raise the same clear ``RuntimeError`` as
``to_local()`` (before, ``full_tensor()`` read the freed storage in its all-gather and every
rank died with SIGSEGV); inside ``opt.resident_params()`` they work."""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import Replicate

from tests._harness.dist import run_distributed
from tests.sharding import _train as T
from tests.sharding.test_param_swap_failures import _build, _step


def _calls(rank: int, world: int, path: str) -> dict[str, Any]:
    model, opt = _build(f"{path}/r{rank}", state=False)
    _step(model, opt, T.batches()[0])
    p = model.blocks[0].up.weight
    out: dict[str, Any] = {}
    for name, call in (
        ("to_local", lambda: p.to_local()),
        ("full_tensor", lambda: p.full_tensor()),
        ("redistribute", lambda: p.redistribute(placements=[Replicate()])),
    ):
        try:
            call()
            out[name] = ""
        except RuntimeError as e:
            out[name] = str(e)
    with opt.resident_params():
        out["inside"] = tuple(p.full_tensor().shape)
    _step(model, opt, T.batches()[1])  # and training goes on
    opt.close()
    return out


def test_full_tensor_of_an_evicted_shard_raises_instead_of_crashing(tmp_path: Any) -> None:
    outs = run_distributed(_calls, world_size=2, timeout_s=120, args=(str(tmp_path),))
    for rank, out in enumerate(outs):
        for method in ("to_local", "full_tensor", "redistribute"):
            msg = out[method]
            assert "'blocks.0.up.weight'" in msg and f"({method}()" in msg, (rank, method, msg)
            assert "resident_params()" in msg
        assert out["inside"] == (21, 13)
