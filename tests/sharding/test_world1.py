"""World size 1 (no process group) runs the plain single-process arithmetic, bit for bit."""

from __future__ import annotations

import pytest
import torch

import memopt
from tests.sharding import _train as T


@pytest.mark.parametrize("name", T.OPTIMIZERS)
def test_world_size_one_is_the_plain_path(name: str) -> None:
    ref_losses, ref_model, ref_opt = T.reference(name)
    for stage in (1, 2):
        for layout in ("whole_tensor", "dim0"):
            model = T.make_model()
            model, sharded = memopt.shard(model, T.make_optimizer(name, model), stage, layout)
            assert T.train(model, sharded) == ref_losses
            for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
                assert torch.equal(a, b), f"{name} stage {stage} {layout}"
            sd = sharded.state_dict()
            assert sd["sharding"]["world_size"] == 1
            assert sd["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_state_dict_round_trip() -> None:
    model = T.make_model()
    model, sharded = memopt.shard(model, T.make_optimizer("galore", model), 2, "dim0")
    T.train(model, sharded)
    sd = sharded.state_dict()
    model2 = T.make_model()
    model2.load_state_dict(model.state_dict())
    _, again = memopt.shard(model2, T.make_optimizer("galore", model2), 2, "dim0")
    again.load_state_dict(sd)
    torch.testing.assert_close(again.state_dict()["state"], sd["state"])
    bad = dict(sd, sharding=dict(sd["sharding"], layout="whole_tensor"))
    with pytest.raises(ValueError, match="same world size"):
        again.load_state_dict(bad)
