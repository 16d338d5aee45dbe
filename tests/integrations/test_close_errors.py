"""``Setup.close()`` and ``MemoptCallback.close()`` release everything even when the
checkpointer's close raises a failed background save, then raise that error (sweep49 F4).

Before, both stopped at the checkpointer's error: the optimizer's NVMe state file and pinned
tiers stayed open, and the activation hooks stayed on the model (it kept swapping, and a new
``memopt.setup`` of it refused: "already managed").
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.checkpoint import AsyncCheckpointer, CheckpointError
from memopt.checkpoint.pipeline import Pipeline


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mlp(torch.relu(self.attn(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(x).pow(2).mean()


def _fail_next_save(monkeypatch: pytest.MonkeyPatch) -> None:
    def lost(self: Any, job: Any) -> None:
        raise RuntimeError("device lost (injected)")

    monkeypatch.setattr(Pipeline, "_copy", lost)


def _wrapped(model: Net) -> list[str]:
    """Blocks whose forward an activation policy replaced (its hooks still installed)."""
    return [f"layers.{i}" for i, b in enumerate(model.layers) if "forward" in vars(b)]


@pytest.mark.timeout(120)
def test_setup_close_releases_everything_then_raises_the_failed_save(
    tmp_path, monkeypatch
) -> None:
    state = tmp_path / "state"
    cfg = memopt.Config.from_dict({
        "sharding": {"stage": 2, "offload": "nvme", "nvme_path": str(state)},
        "activations": {"policies": {"layers.0": "swap", "layers.1": "swap"}},
        "checkpoint": {"directory": str(tmp_path / "ck"), "keep": 2},
    })  # fmt: skip
    model = Net()
    s = memopt.setup(model, cfg)
    s.model(torch.randn(8, 32)).backward()
    s.optimizer.step()
    s.optimizer.zero_grad()
    assert os.listdir(state) and _wrapped(model) == ["layers.0", "layers.1"]
    _fail_next_save(monkeypatch)
    s.save(1)
    assert s.checkpointer._jobs[0].done.wait(30)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"step 1 failed on rank 0: .*device lost"):
        s.close()
    assert _wrapped(model) == []  # activation hooks removed
    assert os.listdir(state) == []  # the optimizer's NVMe state file closed and removed
    s.close()  # nothing left to do, nothing raised twice
    again = memopt.setup(model, cfg)  # the model is free to be set up again
    again.close()


def test_close_all_runs_every_step_and_notes_later_errors() -> None:
    from memopt.config.setup import close_all

    ran: list[str] = []

    def fail(name: str) -> Any:
        def step() -> None:
            ran.append(name)
            raise ValueError(f"{name} failed")

        return step

    with pytest.raises(ValueError, match="^first failed") as info:
        close_all([fail("first"), None, lambda: ran.append("middle"), fail("last")])
    assert ran == ["first", "middle", "last"]
    assert any("also raised: ValueError('last failed')" in n for n in info.value.__notes__)


@pytest.mark.timeout(120)
def test_callback_close_removes_the_activation_policies_then_raises(
    tmp_path, monkeypatch
) -> None:
    pytest.importorskip("transformers")
    from memopt.activations import apply
    from memopt.integrations.hf import MemoptCallback

    model = Net()
    ckpt = AsyncCheckpointer(tmp_path, fsync=False)
    cb = MemoptCallback(checkpointer=ckpt)
    cb.activations = apply(model, {"layers.0": "swap"})
    _fail_next_save(monkeypatch)
    ckpt.save(1, model=model)
    assert ckpt._jobs[0].done.wait(30)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="device lost"):
        cb.close()
    assert _wrapped(model) == [] and cb.activations is None
    cb.close()
