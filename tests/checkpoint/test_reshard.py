"""2 ranks on gloo: exact resume at stage 2, and resharding 2 -> 1 and 1 -> 2 for stages 1-3.

Reshard checks are exact where exactness is defined: after loading a snapshot at another
world size and saving it again there, both snapshots hold bit-equal consolidated state
(every model tensor and every ``rows``/``global`` optimizer tensor, assembled over ranks),
and the model's parameters equal the saved ones. Training on from there is compared with
the run that never stopped, to a tolerance (2 ranks and 1 process sum gradients in a
different order).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import memopt
from memopt.checkpoint import AsyncCheckpointer, CheckpointError, Snapshot
from memopt.optim import AdamW
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T

K, N = 3, 6
# (stage, layout, optimizer)
CASES = [
    (1, "whole_tensor", "galore"),
    (1, "dim0", "adamw"),
    (1, "dim0", "natural_galore"),
    (2, "whole_tensor", "apollo_mini"),
    (2, "whole_tensor", "adamw8"),
    (2, "dim0", "galore"),
    (2, "dim0", "frugal"),
    (3, "dim0", "galore"),
    (3, "dim0", "apollo_mini"),
    (3, "dim0", "apollo"),
    (0, "replicated", "torch_adamw"),  # no memopt.shard: every rank the same (rank 0 writes)
]


def _tag(case: tuple[int, str, str]) -> str:
    return f"s{case[0]}-{case[1]}-{case[2]}"


def _save_and_continue(rank: int, world: int, root: str, cases: list[Any]) -> dict[str, Any]:
    """World ``world``: train K, save, train on to N; the full parameters per case."""
    out = {}
    for case in cases:
        stage, layout, name = case
        model, opt, sched = T.make_all(name, stage if world > 1 else 0, layout, dropout=0.0)
        r, w = (rank, world) if stage else (0, 1)  # replicas see the same batch
        T.train(model, opt, sched, 0, K, r, w)
        with AsyncCheckpointer(os.path.join(root, _tag(case), "a"), keep=1) as ckpt:
            ckpt.save(K, model=model, optimizer=opt, scheduler=sched)
        T.train(model, opt, sched, K, N, r, w)
        out[_tag(case)] = T.full_params(model)
    return out


def _load_and_continue(rank: int, world: int, root: str, cases: list[Any]) -> dict[str, Any]:
    """World ``world``: load snapshot "a", save it again as "b", train on to N."""
    out = {}
    for case in cases:
        stage, layout, name = case
        model, opt, sched = T.make_all(name, stage if world > 1 else 0, layout, dropout=0.0)
        with AsyncCheckpointer(os.path.join(root, _tag(case), "a")) as ckpt:
            ckpt.load(model=model, optimizer=opt, scheduler=sched)
        with AsyncCheckpointer(os.path.join(root, _tag(case), "b")) as ckpt:
            ckpt.save(K, model=model, optimizer=opt, scheduler=sched)
        r, w = (rank, world) if stage else (0, 1)
        T.train(model, opt, sched, K, N, r, w)
        out[_tag(case)] = T.full_params(model)
    return out


def _same_consolidated(root: str) -> None:
    a = Snapshot(os.path.join(root, "a", "step_0000000003"))
    b = Snapshot(os.path.join(root, "b", "step_0000000003"))
    names = sorted(n for n in a.blocks if n.startswith(("model.", "optim.")) and "@" not in n)
    assert names and names == sorted(
        n for n in b.blocks if n.startswith(("model.", "optim.")) and "@" not in n
    )
    for n in names:
        assert torch.equal(a.full(n), b.full(n)), (root, n)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tag: str) -> None:
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=2e-4, atol=2e-5, msg=f"{tag}: {n}")


def _first_spawn(rank: int, world: int, root: str) -> dict[str, Any]:
    """Everything the first 2-rank processes do (one spawn: starting ranks costs seconds)."""
    out = _save_and_continue(rank, world, os.path.join(root, "two"), CASES)
    out["reference"] = _resume_part(rank, world, os.path.join(root, "resume"), "reference")
    _resume_part(rank, world, os.path.join(root, "resume"), "save")
    _quantized_dim0(rank, world, os.path.join(root, "q"))
    _one_rank_fails(rank, world, os.path.join(root, "fail"))
    return out


def _one_rank_fails(rank: int, world: int, root: str) -> None:
    """Rank 1's save fails at capture: no rank hangs, nothing is published, the next works."""
    with AsyncCheckpointer(root) as ckpt:
        if rank == 1:
            with pytest.raises(TypeError, match="extra.f"):
                ckpt.save(1, extra={"f": print})
            ckpt.wait()  # already raised from save: not raised twice
        else:
            ckpt.save(1, extra={"ok": 1})
            with pytest.raises(CheckpointError, match="step 1 was not published: rank 1"):
                ckpt.wait()
        assert ckpt.latest() is None
        ckpt.save(2, extra={"ok": 2})
        ckpt.wait()
        assert ckpt.latest() == 2


def _second_spawn(rank: int, world: int, root: str) -> dict[str, Any]:
    """Fresh 2-rank processes: load the 1-process snapshots (1 -> 2), resume stage 2."""
    out = _load_and_continue(rank, world, os.path.join(root, "one"), CASES)
    out["resumed"] = _resume_part(rank, world, os.path.join(root, "resume"), "resume")
    return out


def _resume_part(rank: int, world: int, root: str, phase: str) -> dict[str, torch.Tensor]:
    model, opt, sched = T.make_all("galore", 2, "dim0")
    if phase == "reference":
        T.train(model, opt, sched, 0, N, rank, world)
    elif phase == "save":
        T.train(model, opt, sched, 0, K, rank, world)
        with AsyncCheckpointer(root) as ckpt:
            ckpt.save(K, model=model, optimizer=opt, scheduler=sched, extra={"next": K})
    else:
        torch.manual_seed(99 + rank)
        with AsyncCheckpointer(root) as ckpt:
            start = ckpt.load(model=model, optimizer=opt, scheduler=sched)["next"]
        T.train(model, opt, sched, start, N, rank, world)
    return T.full_params(model)


class Wide(torch.nn.Module):
    """128 x 64: 4096 elements per rank at dim0 on 2 ranks, so 8-bit state is quantized."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _quantized_dim0(rank: int, world: int, root: str) -> None:
    model = Wide()
    opt = AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    if world > 1:
        model, opt = memopt.shard(model, opt, stage=2, layout="dim0")
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    with AsyncCheckpointer(root) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)


@pytest.mark.timeout(300)
def test_two_ranks(tmp_path) -> None:
    """Exact stage-2 resume in fresh processes; reshard 2 -> 1 and 1 -> 2 for every case."""
    first = run_distributed(_first_spawn, 2, timeout_s=240, args=(str(tmp_path),))
    ref1 = _save_and_continue(0, 1, str(tmp_path / "one"), CASES)
    second = run_distributed(_second_spawn, 2, timeout_s=240, args=(str(tmp_path),))
    for r in range(2):  # bit-exact resume on both ranks
        assert T.equal(first[r]["reference"], second[r]["resumed"]) == [], r
    cont1 = _load_and_continue(0, 1, str(tmp_path / "two"), CASES)
    for case in CASES:
        tag = _tag(case)
        _same_consolidated(str(tmp_path / "two" / tag))
        _close(first[0][tag], cont1[tag], f"2->1 {tag}")
        _same_consolidated(str(tmp_path / "one" / tag))
        _close(ref1[tag], second[0][tag], f"1->2 {tag}")
    # a plain (replicated) optimizer at 2 ranks: rank 0 alone wrote model and optimizer
    rep = Snapshot(str(tmp_path / "two" / "s0-replicated-torch_adamw" / "a" / "step_0000000003"))
    assert not [n for n in rep.skeletons[1]["tensors"] if n.startswith(("model.", "optim."))]
    assert [n for n in rep.skeletons[0]["tensors"] if n.startswith("optim.")]
    # 8-bit state quantized over a row shard's blocks: a clear error, not a silent reshard
    model = Wide()
    opt = AdamW(model.parameters(), lr=1e-2, state_dtype="int8")
    with AsyncCheckpointer(tmp_path / "q") as ckpt:
        with pytest.raises(NotImplementedError, match="block-quantized over rows"):
            ckpt.load(model=model, optimizer=opt)
