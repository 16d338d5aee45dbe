"""A load refused on one rank is refused on every rank, and no rank has changed anything.

Before, each rank decided alone. Under ``layout="whole_tensor"`` a rank that owns only 1-D
parameters took a torch AdamW snapshot into GaLore while the rank owning the matrix refused
it (no projector state): one rank trained on the snapshot's weights, the other on its own. A
model that does not fit the snapshot on one rank only, and a damaged copy of a file read by
one rank only, did the same; and ``load()`` of the newest snapshot fell back to an older step
on the rank that saw the damage while the others loaded the newest. Now every rank raises
(the refusing one its own error, the others one naming it), nothing is loaded anywhere, and
the newest snapshot is the newest one intact on every rank.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import memopt
from memopt.checkpoint import AsyncCheckpointer, CorruptSnapshotError, SnapshotMismatchError
from memopt.checkpoint.publish import rank_files, step_dir
from memopt.optim import GaLoreAdamW
from tests._harness.dist import run_distributed
from tests.checkpoint import _common as T


class Split(nn.Module):
    """One matrix (owned by rank 0 under ``whole_tensor``) and two vectors (rank 1's)."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mat = nn.Linear(16, 16, bias=False)
        self.a = nn.Parameter(torch.randn(16) * 0.1)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        if extra:  # (a model that does not fit the snapshot)
            self.register_buffer("extra_buffer", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mat(x) * self.a + self.b


def _groups(model: Split, low: bool) -> list[dict[str, Any]]:
    mat: dict[str, Any] = {"params": [model.mat.weight]}
    if low:
        mat.update(rank=4, update_proj_gap=4)
    return [mat, {"params": [model.a, model.b]}]


def _build(galore: bool, bf16: bool) -> tuple[nn.Module, Any]:
    model = Split().to(torch.bfloat16) if bf16 else Split()
    groups = _groups(model, galore)  # type: ignore[arg-type]
    opt = GaLoreAdamW(groups, lr=1e-2) if galore else torch.optim.AdamW(groups, lr=1e-2)
    master = torch.float32 if bf16 else None
    return memopt.shard(model, opt, stage=2, layout="whole_tensor", master_dtype=master)


def _train(model: nn.Module, opt: Any, start: int, end: int, rank: int, world: int) -> None:
    dtype = next(model.parameters()).dtype
    for step in range(start, end):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(2 * world, 16, generator=g), torch.randn(2 * world, 16, generator=g)
        out = model(x[2 * rank : 2 * rank + 2].to(dtype)).float()
        nn.functional.mse_loss(out, y[2 * rank : 2 * rank + 2]).backward()
        opt.step()
        opt.zero_grad()


def _copy(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_copy(v) for v in x)
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _refused_case(root: Path, bf16: bool, trained: int, rank: int, world: int) -> dict[str, Any]:
    """A sharded torch AdamW snapshot into sharded GaLore: rank 0 (the matrix) refuses inside
    GaLore's load, rank 1 (vectors only) would take it. Nothing may change on either rank,
    and one more step must match a twin that never saw the load (hidden state: masters)."""
    path = root / f"snap_{bf16}"
    if trained == 0 or not bf16:  # (the first case of each dtype saves; the same on each rank)
        model, opt = _build(galore=False, bf16=bf16)
        _train(model, opt, 0, 2, rank, world)
        with AsyncCheckpointer(path, save_rng=False) as ckpt:
            ckpt.save(2, model=model, optimizer=opt)
    model, opt = _build(galore=True, bf16=bf16)
    twin, twin_opt = _build(galore=True, bf16=bf16)
    owns = {p["name"] for p in opt.checkpoint_layout()["params"] if p["held"]}
    _train(model, opt, 5, 5 + trained, rank, world)
    _train(twin, twin_opt, 5, 5 + trained, rank, world)
    weights, state = T.full_params(model), _copy(opt.state_dict())
    error = ""
    with AsyncCheckpointer(path) as ckpt:
        try:
            ckpt.load(model=model, optimizer=opt)
        except ValueError as e:
            error = str(e)
    unchanged = (T.equal(weights, T.full_params(model)), _same(state, opt.state_dict()))
    _train(model, opt, 9, 10, rank, world)
    _train(twin, twin_opt, 9, 10, rank, world)
    after = (T.equal(T.full_params(twin), T.full_params(model)),
             _same(twin_opt.state_dict(), opt.state_dict()))  # fmt: skip
    return {"owns": sorted(owns), "error": error, "unchanged": unchanged, "after": after}


def _stack(kind: str) -> tuple[nn.Module, Any]:
    model = Split()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if kind == "offload":  # an OffloadedAdamW inside: moments and fp32 masters on a tier
        return memopt.shard(model, opt, stage=2, layout="dim0", offload="cpu")
    return memopt.shard(model, opt, stage=3)  # FSDP2 (FSDPOptimizer)


def _forced_case(root: Path, kind: str, rank: int, world: int) -> dict[str, Any]:
    """Rank 1's optimizer refuses (a stand-in for any refusal of its own: a tier error, a
    check on its shard); rank 0 had loaded, and must put its state back."""
    path = root / kind
    model, opt = _stack(kind)
    _train(model, opt, 0, 2, rank, world)
    with AsyncCheckpointer(path, save_rng=False) as ckpt:
        ckpt.save(2, model=model, optimizer=opt)
    model, opt = _stack(kind)
    twin, twin_opt = _stack(kind)
    _train(model, opt, 5, 6, rank, world)
    _train(twin, twin_opt, 5, 6, rank, world)
    if rank == 1:

        def refuse(sd: Any) -> None:
            raise ValueError("simulated refusal of rank 1's optimizer; nothing was loaded")

        opt.load_state_dict = refuse
    weights, state = T.full_params(model), _copy(opt.state_dict())
    error = ""
    with AsyncCheckpointer(path) as ckpt:
        try:
            ckpt.load(model=model, optimizer=opt)
        except ValueError as e:
            error = str(e)
    unchanged = (T.equal(weights, T.full_params(model)), _same(state, opt.state_dict()))
    _train(model, opt, 9, 10, rank, world)
    _train(twin, twin_opt, 9, 10, rank, world)
    after = (T.equal(T.full_params(twin), T.full_params(model)),
             _same(twin_opt.state_dict(), opt.state_dict()))  # fmt: skip
    for o in (opt, twin_opt):
        close = getattr(o, "close", None)
        if close is not None:
            close()
    return {"error": error, "unchanged": unchanged, "after": after}


def _ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    """Both 2-rank scenarios in one spawn (starting the ranks is most of the time)."""
    out: dict[str, Any] = {"refusals": {}}
    for bf16, trained in ((False, 1), (True, 0), (True, 1)):  # (order: see _refused_case)
        out["refusals"][f"bf16={bf16},trained={trained}"] = _refused_case(
            Path(root, "refusals"), bf16, trained, rank, world
        )
    out["one_rank_sees"] = _one_rank_sees(rank, world, str(Path(root, "copies")))
    out["forced"] = {k: _forced_case(Path(root, "forced"), k, rank, world)
                     for k in ("offload", "stage3")}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("agree")
    return run_distributed(_ranks, 2, timeout_s=300, args=(str(root),))


def test_a_refusal_inside_one_ranks_optimizer_load_is_everyones(two_ranks) -> None:
    results = [r["refusals"] for r in two_ranks]
    for case in results[0]:
        r0, r1 = results[0][case], results[1][case]
        assert r0["owns"] == ["mat.weight"] and r1["owns"] == ["a", "b"], (r0, r1)  # the setup
        assert "without memopt's projector state" in r0["error"], (case, r0["error"])
        assert "refused on rank(s) [0]" in r1["error"], (case, r1["error"])
        assert "without memopt's projector state" in r1["error"], (case, r1["error"])
        assert "nothing was loaded on any rank" in r1["error"], (case, r1["error"])
        for rank, r in enumerate((r0, r1)):
            assert r["unchanged"] == ([], True), (case, rank, r["unchanged"])
            assert r["after"] == ([], True), (case, rank, r["after"])


def test_the_ranks_that_loaded_put_their_optimizer_state_back(two_ranks) -> None:
    """Other optimizer stacks: OffloadedAdamW (state and masters on a tier), stage 3."""
    for kind in ("offload", "stage3"):
        r0, r1 = (r["forced"][kind] for r in two_ranks)
        assert r1["error"].startswith("simulated refusal"), (kind, r1["error"])
        assert "refused on rank(s) [1]" in r0["error"], (kind, r0["error"])
        assert "put their own back" in r0["error"], (kind, r0["error"])
        for rank, r in enumerate((r0, r1)):
            assert r["unchanged"] == ([], True), (kind, rank, r["unchanged"])
            assert r["after"] == ([], True), (kind, rank, r["after"])


def _plain(extra: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Split(extra)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _one_rank_sees(rank: int, world: int, root: str) -> dict[str, Any]:
    """Replicated training, snapshots of steps 1 and 2; each rank then reads its own copy of
    the directory (node-local disks), rank 1's copy of step 2 being damaged."""
    shared = Path(root, "shared")
    model, opt = _plain()
    weights = {}
    with AsyncCheckpointer(shared, save_rng=False) as ckpt:
        for step in (1, 2):
            _train(model, opt, step, step + 1, 0, 1)  # (the same batch on both ranks)
            weights[step] = T.full_params(model)
            ckpt.save(step, model=model, optimizer=opt, extra={"step": step})
    dist.barrier()
    if rank == 0:
        for r in range(world):
            shutil.copytree(shared, Path(root, f"local{r}"))
        data = os.path.join(step_dir(str(Path(root, "local1")), 2), rank_files(0)[0])
        with open(data, "r+b") as f:  # one flipped byte in the middle of the data
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    out: dict[str, Any] = {}
    fresh, fresh_opt = _plain()
    with AsyncCheckpointer(Path(root, f"local{rank}")) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["newest"] = ckpt.load(model=fresh, optimizer=fresh_opt)["step"]
        out["warned"] = [str(w.message) for w in caught]
        out["weights"] = T.equal(weights[1], T.full_params(fresh))
        before = T.full_params(fresh)
        try:
            ckpt.load(2, model=fresh, optimizer=fresh_opt)
            out["step2"] = ("loaded", "")
        except CorruptSnapshotError as e:
            out["step2"] = ("CorruptSnapshotError", str(e))
        out["step2_unchanged"] = T.equal(before, T.full_params(fresh))
        other, other_opt = _plain(extra=rank == 1)  # rank 1's model does not fit
        before = T.full_params(other)
        try:
            ckpt.load(1, model=other, optimizer=other_opt)
            out["misfit"] = ("loaded", "")
        except SnapshotMismatchError as e:
            out["misfit"] = ("SnapshotMismatchError", str(e))
        out["misfit_unchanged"] = (T.equal(before, T.full_params(other)), other_opt.state == {})
    return out


def test_one_ranks_damaged_copy_or_misfit_model_stops_every_rank(two_ranks) -> None:
    r0, r1 = (r["one_rank_sees"] for r in two_ranks)
    # the newest snapshot intact on every rank: step 1, on both
    assert (r0["newest"], r1["newest"]) == (1, 1), (r0["newest"], r1["newest"])
    assert r0["weights"] == [] and r1["weights"] == []
    assert any("not on rank(s) [1]" in w for w in r0["warned"]), r0["warned"]
    assert any("falling back to an older snapshot" in w for w in r1["warned"]), r1["warned"]
    # a given step that one rank cannot read
    assert r1["step2"][0] == "CorruptSnapshotError" and "checksum" in r1["step2"][1], r1
    assert r0["step2"][0] == "CorruptSnapshotError", r0["step2"]
    assert "refused on rank(s) [1]" in r0["step2"][1] and "checksum" in r0["step2"][1], r0
    assert r0["step2_unchanged"] == [] and r1["step2_unchanged"] == []
    # a model that does not fit on one rank
    assert r1["misfit"][0] == r0["misfit"][0] == "SnapshotMismatchError", (r0, r1)
    assert "refused on rank(s) [1]" in r0["misfit"][1] and "extra_buffer" in r0["misfit"][1], r0
    assert r0["misfit_unchanged"] == ([], True) and r1["misfit_unchanged"] == ([], True)


def test_one_process_issues_no_collective(tmp_path, monkeypatch) -> None:
    """Without a process group nothing changes: no collective, the refusal as before."""
    model, opt = _plain()
    _train(model, opt, 0, 1, 0, 1)
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)

    def no_collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective without a process group")

    for name in ("all_reduce", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, no_collective)
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.load(model=_plain()[0])
        with pytest.raises(SnapshotMismatchError, match="does not fit this model"):
            ckpt.load(model=_plain(extra=True)[0])
