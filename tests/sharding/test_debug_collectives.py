"""MEMOPT_DEBUG_COLLECTIVES=1: ranks issuing different collectives raise on every rank.

Each case runs 2 gloo ranks under a hard timeout (a hang fails the test); each rank catches
its own error and returns the message, so the test sees that *both* ranks raised and what
each said.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import memopt
from memopt.sharding.comm import (
    DEBUG_ENV,
    DEBUG_TIMEOUT_ENV,
    CollectiveMismatchError,
    Comm,
    debug_enabled,
)
from tests._harness.dist import run_distributed

TIMEOUT_S = 60


def _comm() -> Comm:
    os.environ[DEBUG_ENV] = "1"
    import torch.distributed as dist

    return Comm(dist.group.WORLD, dist.get_rank(), dist.get_world_size())


def _mismatch(rank: int, world: int, kind: str) -> str:
    comm = _comm()
    try:
        comm.all_reduce_sum(torch.ones(3), what="a matched warm-up")  # passes the check
        if kind == "size":
            n = 8 if rank == 0 else 16
            comm.all_gather(torch.empty(n * world), torch.ones(n), what=f"layer{rank}.weight")
        elif kind == "op":
            t = torch.ones(4)
            w = comm.broadcast(t, 0, what="basis") if rank == 0 else comm.reduce(t, 0)
            w.wait()
        elif kind == "dtype":
            dtype = torch.float32 if rank == 0 else torch.bfloat16
            comm.all_reduce_sum(torch.ones(4, dtype=dtype), what="grad norm")
    except CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        (
            "size",
            [
                "input numel",
                "rank 0: collective #2: all_gather of 8 x float32 (output 16) for layer0.weight",
                "rank 1: collective #2: all_gather of 16 x float32 (output 32) for layer1.weight",
            ],
        ),
        (
            "op",
            [
                "op",
                "rank 0: collective #2: broadcast of 4 x float32, root rank 0 for basis",
                "rank 1: collective #2: reduce of 4 x float32, root rank 0",
            ],
        ),
        ("dtype", ["dtype", "4 x float32 for grad norm", "4 x bfloat16 for grad norm"]),
    ],
)
def test_mismatch_raises_on_every_rank(kind: str, expect: list[str]) -> None:
    messages = run_distributed(_mismatch, 2, timeout_s=TIMEOUT_S, args=(kind,))
    for msg in messages:
        assert "different collectives" in msg
        for part in expect:
            assert part in msg
    assert messages[0] == messages[1]  # both ranks name both calls


def _matched(rank: int, world: int) -> tuple[list[float], int]:
    comm = _comm()
    out = torch.empty(2 * world)
    comm.all_gather(out, torch.full((2,), float(rank)), what="x").wait()
    comm.broadcast(t := torch.full((1,), float(rank + 5)), 1).wait()
    return out.tolist() + t.tolist(), comm.seq


def test_matched_calls_pass() -> None:
    for values, seq in run_distributed(_matched, 2, timeout_s=TIMEOUT_S):
        assert values == [0.0, 0.0, 1.0, 1.0, 6.0]
        assert seq == 2


def _missing(rank: int, world: int) -> str:
    import time

    os.environ[DEBUG_TIMEOUT_ENV] = "2"
    comm = _comm()
    if rank == 1:
        time.sleep(6)  # issues nothing (and stays alive, so rank 0 sees a timeout)
        return "idle"
    try:
        comm.all_reduce_sum(torch.ones(2), what="the extra call")
    except CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


def test_missing_peer_times_out_with_a_message() -> None:
    msg = run_distributed(_missing, 2, timeout_s=TIMEOUT_S)[0]
    assert "rank 0 issued collective #1: all_reduce_sum of 2 x float32 for the extra call" in msg
    assert "fewer collectives" in msg


class _TwoBranch(nn.Module):
    """Two branches; ``swap`` registers them in the other order (a different bucket order)."""

    def __init__(self, swap: bool, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        first, second = nn.Linear(7, width), nn.Linear(width, 5, bias=False)
        if swap:
            self.b, self.a = second, first
        else:
            self.a, self.b = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _end_to_end(rank: int, world: int, kind: str) -> str:
    os.environ[DEBUG_ENV] = "1"
    width = 13 + rank if kind == "size" else 13
    model = _TwoBranch(swap=kind == "order" and rank == 1, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = memopt.shard(model, opt, stage=2, bucket_bytes=64)  # a bucket per parameter
    try:
        model(torch.randn(4, 7)).sum().backward()  # the stage-2 hooks launch the reductions
        opt.step()
    except CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("kind", ["size", "order"])
def test_end_to_end_mismatched_models(kind: str) -> None:
    messages = run_distributed(_end_to_end, 2, timeout_s=TIMEOUT_S, args=(kind,))
    for msg in messages:
        assert "different collectives" in msg
        assert "gradient whole-tensor bucket 0" in msg
    # bucket 0 is the last registered parameter: named as each rank sees it
    rank1 = {
        "size": "reduce of 70 x float32, root rank 1 for gradient whole-tensor bucket 0 [b.weight]",
        "order": "reduce of 13 x float32, root rank 1 for gradient whole-tensor bucket 0 [a.bias]",
    }[kind]
    lines = messages[0].splitlines()
    assert "rank 0: collective #2: reduce of 65 x float32" in lines[1]
    assert "[b.weight]" in lines[1] and rank1 in lines[2]


def test_debug_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, on in [("1", True), ("yes", True), ("0", False), ("", False), ("off", False)]:
        monkeypatch.setenv(DEBUG_ENV, value)
        assert debug_enabled() is on
    monkeypatch.delenv(DEBUG_ENV)
    assert not debug_enabled()
    assert not Comm(None, 0, 1).debug


@pytest.mark.parametrize("raw", ["-5", "0", "nan", "abc"])
def test_debug_timeout_must_be_positive_seconds(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # -5 made every rank report a false "ranks issued different collectives"
    from memopt.sharding.comm import _debug_timeout

    monkeypatch.setenv(DEBUG_TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match="must be a number of seconds > 0"):
        _debug_timeout()
