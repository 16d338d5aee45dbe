"""memopt.setup from a Config at ZeRO-3 with parameter shards and optimizer state on NVMe
(``sharding.offload_params: nvme``, ``sharding.offload: nvme``, one ``nvme_path``) on 2 gloo
ranks: trains like the 1-rank run on the concatenated batch, and a snapshot resumes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import memopt
from memopt import Config
from tests._harness.dist import run_distributed
from tests.config.test_setup_dist import _steps


class _Blocks(nn.Module):
    """Three FSDP units (the ModuleList's children) and the root (the head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _cfg(stage: int, root: str | None = None) -> Config:
    sharding: dict = {"stage": stage}
    if root is not None:
        sharding.update(offload_params="nvme", offload="nvme", nvme_path=f"{root}/nvme")
    return Config.from_dict({
        "model": {"device": "cpu"},
        "train": {"steps": 5},
        "optimizer": {"name": "adamw", "lr": 1e-2, "max_grad_norm": None, "schedule": "constant"},
        "sharding": sharding,
        "checkpoint": {"directory": f"{root}/ckpt" if root else None, "fsync": False},
    })  # fmt: skip


def _ranked(rank: int, world: int, root: str) -> dict:
    s = memopt.setup(_Blocks(), _cfg(3, root))
    described = s.describe()
    _steps(s, 3, rank, world)
    s.save(3)
    s.close()
    # list between two barriers: after every rank closed its tiers, before any rank's next
    # setup opens a new one (the state tier opens before the first collective)
    torch.distributed.barrier()
    files = sorted(p.name for p in Path(root, "nvme").iterdir())
    torch.distributed.barrier()
    again = memopt.setup(_Blocks(), _cfg(3, root))
    _steps(again, 2, rank, world, first=3)
    with again.optimizer.resident_params():
        weights = [p.full_tensor().detach().clone() for p in again.raw_model.parameters()]
    again.close()
    return {"described": described, "files": files, "resumed": again.resumed_from,
            "weights": weights}  # fmt: skip


def test_zero3_params_and_state_on_nvme_from_config_trains_and_resumes() -> None:
    with tempfile.TemporaryDirectory() as d:
        out = run_distributed(_ranked, world_size=2, timeout_s=180, args=(d,))
    ref = memopt.setup(_Blocks(), _cfg(0))
    _steps(ref, 5, 0, 1)
    expected = [p.detach().clone() for p in ref.model.parameters()]
    for r in out:
        assert "parameter shards on nvme" in r["described"]
        # the state tier's swap files were removed by close(); the parameter tier keeps its
        # own subdirectory (emptied too)
        assert r["files"] == ["params"], r["files"]
        assert r["resumed"] == 3
        for p, q in zip(r["weights"], expected, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
