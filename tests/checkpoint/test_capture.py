"""What a snapshot holds: the values at ``save()`` for state the loop changes before the next
optimizer step (buffers, small extras, a tensor lr), optimizer state with tensors outside
``state`` tensors (a tensor lr or betas, lists of tensors), the types of scheduler state,
and names that two key paths would share."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer, pipeline
from memopt.checkpoint.capture import SMALL_COPY


@pytest.fixture
def held_copy(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The background copy to staging starts only once the returned event is set, so what
    the loop does between ``save()`` and that moment is deterministic."""
    go = threading.Event()
    orig = pipeline.Pipeline._copy

    def held(self: pipeline.Pipeline, job: pipeline.Job) -> None:
        assert go.wait(30), "the test never released the copy"
        orig(self, job)

    monkeypatch.setattr(pipeline.Pipeline, "_copy", held)
    return go


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.lin(x)))


def test_buffers_hold_their_values_at_save(tmp_path, held_copy) -> None:
    """BatchNorm's running statistics change in the next forward, before the next
    optimizer step (the fence): the snapshot must hold them as they were at save()."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)
        model(torch.randn(8, 6)).sum().backward()  # the next forward: buffers change
        assert not torch.equal(model.bn.running_mean, at_save["bn.running_mean"])
        held_copy.set()
        ckpt.wait()
        fresh = BNNet()
        ckpt.load(model=fresh)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, at_save[name]), name
    # the parameters were not copied in save(): the snapshot referenced the live ones
    assert ckpt.stats.last is not None and ckpt.stats.last.ok


def test_small_extras_are_copied_at_save_large_ones_referenced(tmp_path, held_copy) -> None:
    pos = torch.tensor([5])
    big = torch.zeros(SMALL_COPY // 4 + 1)  # float32: just over SMALL_COPY bytes
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, extra={"pos": pos, "big": big})
        pos.add_(1)  # the loop moves on before the copy ran
        big.add_(1)  # documented: a large extra is read by the background copy
        held_copy.set()
        got = ckpt.load()
    assert got["pos"].tolist() == [5]
    assert torch.equal(got["big"], big)  # by reference: fence() before changing it


def _tensor_hyper_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99))
    )


def test_tensor_lr_and_betas_round_trip(tmp_path, held_copy) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _tensor_hyper_optimizer(model)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)
        opt.param_groups[0]["lr"].fill_(5.0)  # e.g. a scheduler, in place, before the copy
        held_copy.set()
        ckpt.wait()
        model2 = nn.Linear(4, 3)
        opt2 = torch.optim.AdamW(
            model2.parameters(), lr=torch.tensor(1.0), betas=(torch.tensor(0.1), torch.tensor(0.2))
        )
        ckpt.load(model=model2, optimizer=opt2)
    group = opt2.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(1e-2)
    assert isinstance(group["betas"], tuple)
    assert [b.item() for b in group["betas"]] == pytest.approx([0.9, 0.99])
    assert group["params"] == list(model2.parameters())
    # training on from the loaded state matches training on from the original state
    opt.param_groups[0]["lr"].fill_(1e-2)
    x = torch.randn(2, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)


class HistoryOpt(torch.optim.Optimizer):
    """Keeps a list of tensors in its per-parameter state (a non-tensor value holding
    tensors) and a plain counter."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                hist = st.setdefault("hist", [])
                hist.append(p.grad.clone())
                st["n"] = len(hist)
                p.sub_(group["lr"] * torch.stack(hist).mean(0))


def test_tensors_inside_non_tensor_optimizer_state(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = HistoryOpt(model.parameters())
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)
        ckpt.wait()
        opt2 = HistoryOpt(nn.Linear(3, 2).parameters())
        ckpt.load(optimizer=opt2)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(),
                    strict=True):  # fmt: skip
        assert a["n"] == b["n"] == 2 and isinstance(b["hist"], list)
        assert all(torch.equal(x, y) for x, y in zip(a["hist"], b["hist"], strict=True))


def test_scheduler_counter_and_ordered_dict_keep_their_types(tmp_path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 2, 4], gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    order = OrderedDict([("b", 1), ("a", 2)])
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(3, optimizer=opt, scheduler=sched,
                  extra={"order": order, "count": Counter("abca"), 7: Counter({1: 2})})  # fmt: skip
        ckpt.wait()
        opt2 = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[9])
        got = ckpt.load(optimizer=opt2, scheduler=sched2)
    assert type(sched2.milestones) is Counter and sched2.milestones == Counter([2, 2, 4])
    assert type(got["order"]) is OrderedDict and list(got["order"]) == ["b", "a"]
    assert type(got["count"]) is Counter and got["count"] == Counter("abca")
    assert type(got[7]) is Counter and got[7] == Counter({1: 2})
    with pytest.warns(UserWarning):  # torch deprecates step(epoch); it needs the Counter
        sched.step(5)
        sched2.step(5)
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    "extra, first, second",
    [
        ({"ema": {"l.w": torch.ones(2), "l": {"w": torch.zeros(2)}}},
         "extra['ema']['l.w']", "extra['ema']['l']['w']"),
        ({0: torch.ones(2), "0": torch.zeros(2)}, "extra[0]", "extra['0']"),
    ],
)  # fmt: skip
def test_tensor_names_that_collide_are_refused(tmp_path, extra, first, second) -> None:
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        with pytest.raises(ValueError, match=rf"{__import__('re').escape(first)} and "
                                             rf"{__import__('re').escape(second)}"):  # fmt: skip
            ckpt.save(1, extra=extra)
        ckpt.save(2, extra={"ema": {"l.w": torch.ones(2), "m": {"w": torch.zeros(2)}}})
        ckpt.wait()
        assert ckpt.steps() == [2]  # the refused save took no slot and wrote nothing
        got = ckpt.load()
    assert torch.equal(got["ema"]["l.w"], torch.ones(2))
    assert torch.equal(got["ema"]["m"]["w"], torch.zeros(2))
