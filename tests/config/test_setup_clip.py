"""``Setup.clip_grad_norm_``: one call that clips at every stage, as ``memopt run`` does.

The guide's own loop called ``s.optimizer.clip_grad_norm_(cfg.optimizer.max_grad_norm)``,
which raised AttributeError at stage 0 (a plain memopt optimizer has no such method) and
TypeError with ``max_grad_norm: null`` (sweep44 F1)."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt import Config
from memopt.config.workload import batches, build_model
from memopt.sharding import ShardedOptimizer

BASE = {
    "model": {"preset": "llama-tiny", "device": "cpu"},
    "train": {"steps": 4, "batch_size": 2, "seq_len": 16},
    "data": {"max_bytes": 20000},
}


def _setup(**sections: dict) -> memopt.Setup:
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    cfg = Config.from_dict(data)
    s = memopt.setup(build_model(cfg), cfg)
    x = next(batches(cfg))
    s.model(input_ids=x, labels=x).loss.backward()
    return s


def _grads(s: memopt.Setup) -> list[torch.Tensor]:
    return [p.grad.clone() for p in s.model.parameters() if p.grad is not None]


def test_stage0_clips_with_the_configs_limit() -> None:
    s = _setup(optimizer={"max_grad_norm": 0.05})
    assert not hasattr(s.optimizer, "clip_grad_norm_")  # (the guide's old call raised here)
    before = _grads(s)
    total = s.clip_grad_norm_()
    assert total is not None
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(before))
    assert float(total) > 0.05  # (so the clip did something)
    after = torch.nn.utils.get_total_norm(_grads(s))
    assert float(after) == pytest.approx(0.05, rel=1e-4)
    s.close()


def test_stage2_one_process_gives_the_same_norm_as_stage0() -> None:
    plain = _setup(optimizer={"max_grad_norm": 0.05})
    sharded = _setup(optimizer={"max_grad_norm": 0.05}, sharding={"stage": 2})
    assert isinstance(sharded.optimizer, ShardedOptimizer)
    a, b = plain.clip_grad_norm_(), sharded.clip_grad_norm_()
    assert a is not None and b is not None
    torch.testing.assert_close(a, b)
    plain.optimizer.step()
    sharded.optimizer.step()
    for p, q in zip(plain.model.parameters(), sharded.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    plain.close()
    sharded.close()


@pytest.mark.parametrize("stage", [0, 2])
def test_null_limit_is_a_no_op_and_an_explicit_one_still_clips(stage: int) -> None:
    s = _setup(optimizer={"max_grad_norm": None}, sharding={"stage": stage})
    before = _grads(s)
    assert s.clip_grad_norm_() is None
    for g, h in zip(before, _grads(s), strict=True):
        assert torch.equal(g, h)
    total = s.clip_grad_norm_(0.01)
    assert total is not None and float(total) > 0.01
    assert float(torch.nn.utils.get_total_norm(_grads(s))) == pytest.approx(0.01, rel=1e-4)
    s.close()


def test_in_backward_is_a_no_op() -> None:
    s = _setup(optimizer={"in_backward": True, "max_grad_norm": 0.05})
    assert s.in_backward is not None
    weights = [p.detach().clone() for p in s.model.parameters()]
    grads = _grads(s)
    assert s.clip_grad_norm_() is None and s.clip_grad_norm_(0.01) is None
    for w, p in zip(weights, s.model.parameters(), strict=True):
        assert torch.equal(w, p)
    for g, h in zip(grads, _grads(s), strict=True):
        assert torch.equal(g, h)
    s.close()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1.0"])
def test_bad_limit_is_refused(bad: object) -> None:
    s = _setup()
    before = _grads(s)
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        s.clip_grad_norm_(bad)  # type: ignore[arg-type]
    for g, h in zip(before, _grads(s), strict=True):
        assert torch.equal(g, h)
    s.close()
