"""Module buffers under ``memopt.shard`` on 2 ranks: DDP's ``broadcast_buffers`` (sweep 28, F3).

Before, stages 1/2/3 never synchronized buffers: each rank's BatchNorm statistics (and any
buffer a forward updates) followed its own data, and AsyncCheckpointer, which saves rank 0's
copy, gave every rank rank 0's on resume, so rank 1's evaluation (and, with a buffer that
feeds the forward, every rank's parameters) left the uninterrupted run.

The model: ``_Shift`` (subtracts a persistent running mean of its input in the forward, so
the parameters depend on the buffers; and keeps a non-persistent sum of what it saw) ->
Linear -> Tanh -> BatchNorm1d -> Linear. Each rank's data has another scale and offset. A step is 2
micro-batches, the first forward+backward under ``no_sync()``, then an eval forward under
``no_grad``. Checked:

- stages 1, 2 (``whole_tensor`` and ``dim0``) and 3: after every step each rank's buffers
  equal the same rank's under torch DDP (default ``broadcast_buffers``) bit for bit, as do
  the eval outputs and the parameters (stage 3, FSDP2's reduce-scatter: within 1e-6; measured
  0); the ranks' eval outputs are equal;
- a save at step 2, then a new model, optimizer and checkpointer loading it and training to
  step 4: bit-exact against the uninterrupted run on both ranks (parameters, persistent
  buffers, eval outputs);
- ``broadcast_buffers=False`` keeps the old behaviour (no hooks; the ranks' buffers differ);
- a forward on rank 0 alone after a step (sampling, a rank-0 evaluation) issues no
  collective: it neither hangs nor desynchronizes the next step (the broadcast is part of
  ``step()``, not of the forward as under DDP).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import memopt
from memopt.checkpoint import AsyncCheckpointer
from memopt.sharding import FSDPOptions, ShardConfig
from tests._harness.dist import run_distributed

K, N = 2, 4  # save after step K, train to N
#: tag -> memopt.shard arguments (None: torch DDP, the reference)
RUNS: dict[str, dict[str, Any] | None] = {
    "ddp": None,
    "s1": {"stage": 1, "layout": "whole_tensor"},
    "s2w": {"stage": 2, "layout": "whole_tensor"},
    "s2d": {"stage": 2, "layout": "dim0"},
    "s3": {"stage": 3},
    "off": {"stage": 2, "layout": "dim0", "broadcast_buffers": False},
}
RESUMED = ("s1", "s2w", "s2d", "s3")


class _Shift(nn.Module):
    """``x - mean`` with ``mean`` a running average of the inputs (updated in training)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x - self.mean
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.8).add_(x.mean(0), alpha=0.2)
                self.seen.add_(x.abs().sum())
        return out


def _build(tag: str, world: int) -> tuple[nn.Module, Any, Any]:
    """(the model to call, the optimizer, the module whose state is compared)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Shift(6), nn.Linear(6, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = RUNS[tag]
    if args is None:
        ddp = nn.parallel.DistributedDataParallel(model)
        return ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-2), model
    fsdp = FSDPOptions(modules=[model[1], model[4]]) if args["stage"] == 3 else None
    model, sharded = memopt.shard(model, opt, fsdp=fsdp, **args)
    return model, sharded, model


def _data(step: int, mb: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * mb + rank)
    x = torch.randn(4, 6, generator=g) * (1 + rank) + rank
    return x, torch.randint(0, 3, (4,), generator=g)


def _state(inner: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (whole) and every buffer, persistent or not, cloned."""
    out = {}
    for n, t in [*inner.named_parameters(), *inner.named_buffers()]:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[n] = t.detach().clone()
    return out


def _train(run: tuple[nn.Module, Any, Any], rank: int, start: int, end: int) -> dict[str, Any]:
    model, opt, inner = run
    quiet = opt.no_sync if hasattr(opt, "no_sync") else model.no_sync
    rec: dict[str, Any] = {"states": [], "evals": []}
    for step in range(start, end):
        model.train()
        for mb in range(2):
            x, y = _data(step, mb, rank)
            with quiet() if mb == 0 else nullcontext():
                nn.functional.cross_entropy(model(x), y).div(2).backward()
        opt.step()  # memopt: broadcasts the buffers here
        opt.zero_grad()
        model.eval()
        with torch.no_grad():  # DDP: broadcasts them here (the forward after a training one)
            rec["evals"].append(model(torch.ones(2, 6)).clone())
        rec["states"].append(_state(inner))
    rec["hooked"] = "buffer_sync" in vars(opt)
    return rec


def _all(rank: int, world: int, root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every run straight (saving at K), then the resumes, in one launch of the ranks."""
    return _straight(rank, world, root), _resumed(rank, world, root)


def _straight(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in RUNS:
        run = _build(tag, world)
        rec = _train(run, rank, 0, K)
        if tag in RESUMED:
            with AsyncCheckpointer(f"{root}/{tag}", keep=1) as ckpt:
                ckpt.save(K, model=run[2], optimizer=run[1])
        after = _train(run, rank, K, N)
        rec["states"] += after["states"]
        rec["evals"] += after["evals"]
        out[tag] = rec
    out["solo_ok"] = _rank0_alone(rank, world)
    return out


def _resumed(rank: int, world: int, root: str) -> dict[str, Any]:
    """A new model, optimizer and checkpointer load step K and train to N (the buffer sync's
    state lives on the model, so this is what a new process sees)."""
    out = {}
    for tag in RESUMED:
        run = _build(tag, world)
        with AsyncCheckpointer(f"{root}/{tag}") as ckpt:
            ckpt.load(model=run[2], optimizer=run[1])
        out[tag] = _train(run, rank, K, N)
    return out


def _rank0_alone(rank: int, world: int) -> bool:
    """After a training step, rank 0 alone runs forwards (no_grad eval, then a train-mode
    one); then both ranks train another step and end with equal buffers."""
    model, opt, inner = _build("s2d", world)
    for step in range(2):
        x, y = _data(9 + step, 0, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and step == 0:
            model.eval()
            with torch.no_grad():
                model(torch.ones(2, 6))
            model.train()
            with torch.no_grad():
                model(torch.ones(2, 6))  # (changes rank 0's statistics: broadcast at the step)
    state = _state(inner)
    box: list[Any] = [state if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return all(torch.equal(state[n], box[0][n]) for n in state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], list[Any]]:
    root = str(tmp_path_factory.mktemp("buffers"))
    both = run_distributed(_all, world_size=2, timeout_s=120, args=(root,))
    return [b[0] for b in both], [b[1] for b in both]


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


@pytest.mark.parametrize("tag", ["s1", "s2w", "s2d", "s3"])
def test_buffers_follow_ddp(runs: tuple[list[Any], list[Any]], tag: str) -> None:
    straight = runs[0]
    tol = 1e-6 if tag == "s3" else 0.0
    for rank in (0, 1):
        mine, ddp = straight[rank][tag], straight[rank]["ddp"]
        for step in range(N):
            d = _diff(mine["states"][step], ddp["states"][step])
            assert d <= tol, f"{tag} rank {rank} step {step}: {d:.3g} from DDP"
            e = (mine["evals"][step] - ddp["evals"][step]).abs().max().item()
            assert e <= tol, f"{tag} rank {rank} step {step}: eval {e:.3g} from DDP"
        assert mine["hooked"]
    for step in range(N):  # rank 1 evaluates with rank 0's statistics
        assert torch.equal(straight[0][tag]["evals"][step], straight[1][tag]["evals"][step])


@pytest.mark.parametrize("tag", RESUMED)
def test_resume_is_bit_exact(runs: tuple[list[Any], list[Any]], tag: str) -> None:
    straight, resumed = runs
    for rank in (0, 1):
        a, b = straight[rank][tag], resumed[rank][tag]
        for i in range(N - K):
            want, got = a["states"][K + i], b["states"][i]
            persistent = [n for n in want if not n.endswith(".seen")]  # (not checkpointed)
            bad = [n for n in persistent if not torch.equal(want[n], got[n])]
            assert not bad, f"{tag} rank {rank} step {K + i}: {bad} differ after resume"
            assert torch.equal(a["evals"][K + i], b["evals"][i]), f"{tag} rank {rank}"


def test_broadcast_buffers_false_keeps_per_rank_buffers(
    runs: tuple[list[Any], list[Any]],
) -> None:
    straight = runs[0]
    off = [straight[r]["off"] for r in (0, 1)]
    assert not off[0]["hooked"] and not off[1]["hooked"]
    last = [o["states"][-1] for o in off]
    for name in ("3.running_mean", "0.mean", "0.seen"):
        assert not torch.equal(last[0][name], last[1][name]), name
    assert not torch.equal(off[0]["evals"][-1], off[1]["evals"][-1])


def test_forward_on_rank0_alone_needs_no_other_rank(runs: tuple[list[Any], list[Any]]) -> None:
    assert all(r["solo_ok"] for r in runs[0])


def test_option_checked_and_world1_installs_nothing() -> None:
    with pytest.raises(TypeError, match="broadcast_buffers must be True or False"):
        ShardConfig(broadcast_buffers="yes")  # type: ignore[arg-type]
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters())
    model, sharded = memopt.shard(model, opt, stage=2)  # no process group: the plain path
    assert "buffer_sync" not in vars(sharded) and not model._forward_pre_hooks
