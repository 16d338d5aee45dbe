"""Bit-exact resume of a bf16 model trained through fp32 masters (``memopt.shard(...,
master_dtype=torch.float32)``, stages 1/2, both layouts, AdamW and GaLore): the snapshot
holds each rank's masters (per-parameter state ``master``), a fresh model and optimizer
loaded from it train on to the very bits, masters included, of the uninterrupted run, and
the masters reshard 2 -> 1 and 1 -> 2 ranks exactly. Before, the masters were not saved: the
resume rebuilt them from the bf16 weights and drifted by up to a bf16 ulp.

Also: a weight edited after the load still rebuilds its master; a snapshot without masters
(bf16 stepped in place) still loads; a plain torch AdamW takes no ``master`` state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import memopt
from memopt.checkpoint import AsyncCheckpointer
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T

SAVE, END = 3, 5
#: tag -> (optimizer, stage, layout)
CASES: dict[str, tuple[str, int, str]] = {
    "adamw_s1_dim0": ("adamw", 1, "dim0"),
    "galore_s1_whole": ("galore", 1, "whole_tensor"),
    "adamw_s2_whole": ("adamw", 2, "whole_tensor"),
    "galore_s2_dim0": ("galore", 2, "dim0"),
}
Masters = dict[str, tuple[int, Tensor]]  # name -> (first row held, the master rows)


def _make(case: str, master: bool = True) -> tuple[Any, Any, Any]:
    name, stage, layout = CASES[case]
    model = T.make_model(0.0).to(torch.bfloat16)
    opt: Any = T.make_optimizer(name, model)
    dtype = torch.float32 if master else None
    model, opt = memopt.shard(model, opt, stage=stage, layout=layout, master_dtype=dtype)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))


def _train(model: Any, opt: Any, sched: Any, start: int, end: int, rank: int, world: int) -> None:
    per = T.BATCH // world
    for step in range(start, end):
        x, y = T.batch(step)
        out = model(x[rank * per : (rank + 1) * per].to(torch.bfloat16))
        torch.nn.functional.mse_loss(out.float(), y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _masters(opt: Any) -> Masters:
    """The master copies this rank steps, by parameter name (read from the optimizer's
    tensors, so the same on code that does not save them)."""
    out: Masters = {}
    for p in opt.checkpoint_layout()["params"]:
        local = opt.locals.get(p["index"])
        if p["held"] and local is not None:
            assert local.dtype == torch.float32, (p["name"], local.dtype)
            out[p["name"]] = (int(p["rows"][0]), local.detach().clone())
    return out


def _no_grad_step(opt: Any) -> None:
    """A step without gradients: nothing is updated, but the masters are refreshed (the check
    that the weights written by the load keep the loaded masters)."""
    opt.zero_grad()
    opt.step()


def _load(path: Path, model: Any, opt: Any, sched: Any) -> None:
    with AsyncCheckpointer(path) as ckpt:
        ckpt.load(model=model, optimizer=opt, scheduler=sched)


def _case(root: Path, case: str, rank: int, world: int) -> dict[str, Any]:
    model, opt, sched = _make(case)
    _train(model, opt, sched, 0, SAVE, rank, world)
    with AsyncCheckpointer(root / case) as ckpt:
        ckpt.save(SAVE, model=model, optimizer=opt, scheduler=sched)
    out: dict[str, Any] = {"saved": _masters(opt)}
    _train(model, opt, sched, SAVE, END, rank, world)
    out["ref"] = (T.full_params(model), _masters(opt))

    model, opt, sched = _make(case)  # fresh objects: load, train on
    _load(root / case, model, opt, sched)
    _train(model, opt, sched, SAVE, END, rank, world)
    out["resumed"] = (T.full_params(model), _masters(opt))

    model, opt, sched = _make(case)  # a weight edited after the load rebuilds its master
    _load(root / case, model, opt, sched)
    with torch.no_grad():
        model.mid.weight.add_(1.0)
    _no_grad_step(opt)
    out["edited"] = (T.full_params(model), _masters(opt))
    return out


def _ranks(rank: int, world: int, root: str, one: str) -> dict[str, Any]:
    out = {case: _case(Path(root), case, rank, world) for case in CASES}
    # 1 -> 2: the 1-process snapshot of the parent, loaded here
    model, opt, sched = _make("galore_s2_dim0")
    _load(Path(one), model, opt, sched)
    _no_grad_step(opt)
    out["from_one"] = _masters(opt)
    # a snapshot without masters (bf16 parameters stepped in place) loads into masters
    model, opt, sched = _make("adamw_s2_whole", master=False)
    _train(model, opt, sched, 0, SAVE, rank, world)
    with AsyncCheckpointer(Path(root, "nomaster")) as ckpt:
        ckpt.save(SAVE, model=model, optimizer=opt, scheduler=sched)
    model, opt, sched = _make("adamw_s2_whole")
    _load(Path(root, "nomaster"), model, opt, sched)
    _no_grad_step(opt)
    out["nomaster"] = (T.full_params(model), _masters(opt))
    _train(model, opt, sched, SAVE, END, rank, world)
    return out


def _whole(per_rank: list[Masters]) -> dict[str, Tensor]:
    """The masters of every rank put together into whole tensors, by name."""
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    for masters in per_rank:
        for name, (start, t) in masters.items():
            pieces.setdefault(name, []).append((start, t))
    return {
        n: torch.cat([t for _, t in sorted(ps, key=lambda x: x[0])]) for n, ps in pieces.items()
    }


def _same(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    diff = {n: (got[n].float() - want[n].float()).abs().max().item() for n in want
            if not torch.equal(got[n], want[n])}  # fmt: skip
    assert not diff, f"{what}: differ (max abs) {diff}"


def _one_process_snapshot(path: Path) -> dict[str, Tensor]:
    model, opt, sched = _make("galore_s2_dim0")
    _train(model, opt, sched, 0, SAVE, 0, 1)
    with AsyncCheckpointer(path) as ckpt:
        ckpt.save(SAVE, model=model, optimizer=opt, scheduler=sched)
    return _whole([_masters(opt)])


def test_master_weights_resume_bit_exact(tmp_path: Path) -> None:
    one = _one_process_snapshot(tmp_path / "one")
    results = run_distributed(_ranks, 2, timeout_s=240, args=(str(tmp_path), str(tmp_path / "one")))
    for case in CASES:
        for rank, res in enumerate(results):
            ref_params, ref_masters = res[case]["ref"]
            params, masters = res[case]["resumed"]
            _same(params, ref_params, f"{case} rank {rank}: resumed parameters")
            _same(_whole([masters]), _whole([ref_masters]), f"{case} rank {rank}: masters")
            # a manual edit after the load: that master follows the weights, the others are
            # the loaded ones
            params, masters = res[case]["edited"]
            edited, saved = dict(masters), dict(res[case]["saved"])
            if "mid.weight" in edited:  # (held by this rank)
                start, t = edited.pop("mid.weight")
                assert torch.equal(t, _rows_of(params["mid.weight"], start, t)), (case, rank)
                assert not torch.equal(t, saved.pop("mid.weight")[1]), (case, rank)
            _same(_whole([edited]), _whole([saved]), f"{case} rank {rank}: untouched masters")
        # 2 -> 1: the 2-rank snapshot in one process, masters exact
        model, opt, sched = _make(case)
        _load(tmp_path / case, model, opt, sched)
        _no_grad_step(opt)
        _same(_whole([_masters(opt)]), _whole([r[case]["saved"] for r in results]),
              f"{case}: 2 -> 1 masters")  # fmt: skip
    _same(_whole([r["from_one"] for r in results]), one, "1 -> 2 masters")
    for rank, res in enumerate(results):  # no masters saved: rebuilt from the loaded weights
        params, masters = res["nomaster"]
        for name, (start, t) in masters.items():
            assert torch.equal(t, _rows_of(params[name], start, t)), (rank, name)


def _rows_of(param: Tensor, start: int, like: Tensor) -> Tensor:
    """The rows ``like`` covers of ``param``, upcast to fp32."""
    return param[start : start + like.shape[0]].float().reshape(like.shape)


def test_plain_torch_adamw_takes_no_master(tmp_path: Path) -> None:
    """A masters snapshot loaded into a plain bf16 model and torch AdamW: the masters are
    dropped (torch would keep each as an extra fp32 tensor per parameter)."""
    model, opt, sched = _make("adamw_s1_dim0")
    _train(model, opt, sched, 0, SAVE, 0, 1)
    assert all("master" in st for st in opt.state_dict()["state"].values())
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(SAVE, model=model, optimizer=opt, scheduler=sched)
    plain = T.make_model(0.0).to(torch.bfloat16)
    torch_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.load(model=plain, optimizer=torch_opt)
    states = list(torch_opt.state.values())
    assert states and all("master" not in st and "exp_avg" in st for st in states)
