"""A snapshot of AdamW with offloaded state (``memopt.shard(..., offload="cpu")``, whose
``OffloadedAdamW`` saves an fp32 ``master`` per parameter) loads without offload: into
``memopt.shard`` stages 1/2/3 at 2 ranks and into a plain process, as docs/checkpoint.md
("Resharding") says. memopt's AdamW refused the ``master`` as another implementation's key
("galore-torch ... start the memopt optimizer fresh"); a bf16 model with offload did not load
into stage 2 with ``master_dtype=torch.float32`` either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import memopt
from memopt.checkpoint import AsyncCheckpointer
from memopt.optim import AdamW
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T

SAVE, END = 3, 5
TARGETS: dict[str, dict[str, Any]] = {
    "s1_dim0": {"stage": 1, "layout": "dim0"},
    "s2": {"stage": 2},
    "s3": {"stage": 3},
}


def _make(bf16: bool = False, **shard: Any) -> tuple[Any, Any, Any]:
    model = T.make_model(0.0)
    if bf16:
        model = model.to(torch.bfloat16)
    opt: Any = AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if shard:
        model, opt = memopt.shard(model, opt, **shard)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))


def _train(model: Any, opt: Any, sched: Any, start: int, end: int, rank: int, world: int) -> None:
    dtype = next(model.parameters()).dtype
    per = T.BATCH // world
    for step in range(start, end):
        x, y = T.batch(step)
        out = model(x[rank * per : (rank + 1) * per].to(dtype))
        torch.nn.functional.mse_loss(out.float(), y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _saved_offloaded(path: Path, rank: int, world: int, bf16: bool = False) -> dict[str, Any]:
    """Train with stage 2 ``offload="cpu"``, save at ``SAVE``, go on to ``END``: the weights of
    the uninterrupted run."""
    model, opt, sched = _make(bf16, stage=2, offload="cpu")
    _train(model, opt, sched, 0, SAVE, rank, world)
    with AsyncCheckpointer(path) as ckpt:
        ckpt.save(SAVE, model=model, optimizer=opt, scheduler=sched)
    _train(model, opt, sched, SAVE, END, rank, world)
    ref = T.full_params(model)
    opt.close()
    return ref


def _resumed(path: Path, rank: int, world: int, bf16: bool = False, **shard: Any) -> Any:
    model, opt, sched = _make(bf16, **shard)
    with AsyncCheckpointer(path) as ckpt:
        ckpt.load(model=model, optimizer=opt, scheduler=sched)
    _train(model, opt, sched, SAVE, END, rank, world)
    return T.full_params(model)


def _ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"ref": _saved_offloaded(Path(root, "fp32"), rank, world)}
    for tag, shard in TARGETS.items():
        out[tag] = _resumed(Path(root, "fp32"), rank, world, **shard)
    out["bf16_ref"] = _saved_offloaded(Path(root, "bf16"), rank, world, bf16=True)
    out["bf16_master"] = _resumed(
        Path(root, "bf16"), rank, world, True, stage=2, master_dtype=torch.float32
    )
    return out


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], **tol: float) -> None:
    for name, t in ref.items():
        torch.testing.assert_close(got[name].float(), t.float(), msg=name, **tol)


def test_offloaded_snapshot_loads_without_offload(tmp_path: Path) -> None:
    results = run_distributed(_ranks, 2, timeout_s=240, args=(str(tmp_path),))
    ref = results[0]["ref"]
    for res in results:
        for tag in TARGETS:
            _close(res[tag], ref, rtol=2e-4, atol=2e-5)
        # bf16 weights: the target keeps fp32 masters (master_dtype), which take the saved
        # ones (memopt.shard's masters share OffloadedAdamW's 'master' key), so the run goes
        # on as the uninterrupted offloaded one, bit for bit
        _close(res["bf16_master"], results[0]["bf16_ref"], rtol=0.0, atol=0.0)
    # a plain process, no memopt.shard
    model, opt, sched = _make()
    with AsyncCheckpointer(tmp_path / "fp32") as ckpt:
        ckpt.load(model=model, optimizer=opt, scheduler=sched)
    _train(model, opt, sched, SAVE, END, 0, 1)
    _close(T.full_params(model), ref, rtol=2e-4, atol=2e-5)
