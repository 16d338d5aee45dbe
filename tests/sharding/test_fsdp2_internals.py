"""The FSDP2-internals check names what a torch version lacks, before any hook is installed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memopt.sharding.fsdp2_internals import check_fsdp2_internals


def _param(**drop: bool) -> SimpleNamespace:
    fields = {"sharded_param": SimpleNamespace(_local_tensor=torch.zeros(2)),
              "_sharded_param_data": torch.zeros(2)}  # fmt: skip
    return SimpleNamespace(**{k: v for k, v in fields.items() if k not in drop})


def _group(params: list, **drop: bool) -> SimpleNamespace:
    fields = {"unshard": lambda async_op=False: None, "wait_for_unshard": lambda: None,
              "lazy_init": lambda: None, "_all_gather_result": None, "is_unsharded": False,
              "fsdp_params": params}  # fmt: skip
    return SimpleNamespace(**{k: v for k, v in fields.items() if k not in drop})


def test_complete_internals_pass() -> None:
    check_fsdp2_internals([_group([_param(), _param()])], "feature")


def test_missing_method_and_attribute_are_named_with_the_torch_version() -> None:
    groups = [_group([_param(_sharded_param_data=True)], lazy_init=True)]
    with pytest.raises(NotImplementedError) as info:
        check_fsdp2_internals(groups, "memopt.shard(offload_params='nvme')")
    msg = str(info.value)
    assert "SimpleNamespace.lazy_init()" in msg and "SimpleNamespace._sharded_param_data" in msg
    assert torch.__version__ in msg and "offload_params='nvme'" in msg
    assert "unshard()" not in msg.replace("wait_for_unshard", "")  # only what is missing


def test_no_units_is_an_error() -> None:
    with pytest.raises(NotImplementedError, match="found no FSDP2 units"):
        check_fsdp2_internals([], "feature")
