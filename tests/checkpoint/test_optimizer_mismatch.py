"""Loading a snapshot into another optimizer than the one that saved it names the real cause.

An AdamW snapshot loaded into a GaLoreAdamW (``optimizer.name`` changed between runs) used to
fail with "optimizer parameters differ ... snapshot [64] vs [64, 64]": the parameters were
compared position by position and GaLore groups them in another order, so the message blamed
shapes. The saving class is now compared first. A reorder of the same parameters (by name) is
reported as such, and a reorder of same-shaped parameters, which used to load one parameter's
moments into another without a word, is refused. Nothing is loaded when the load refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer, SnapshotMismatchError
from memopt.checkpoint import layout as L
from memopt.checkpoint import restore as R
from memopt.offload import PinnedCPUTier
from memopt.offload.state_offload import StateOffloadedOptimizer
from memopt.optim import AdamW
from tests.checkpoint import _common as T


def _save(path: Path, opt_name: str) -> None:
    model, opt, sched = T.make_all(opt_name)
    T.train(model, opt, sched, 0, 2)
    with AsyncCheckpointer(path, save_rng=False) as ckpt:
        ckpt.save(2, model=model, optimizer=opt)


def _refused(path: Path, model: nn.Module, opt: torch.optim.Optimizer, match: str) -> str:
    """Load must raise ``SnapshotMismatchError`` matching ``match`` and change nothing."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with AsyncCheckpointer(path) as ckpt:
        with pytest.raises(SnapshotMismatchError, match=match) as info:
            ckpt.load(model=model, optimizer=opt)
    assert T.equal(before, model.state_dict()) == []
    assert len(opt.state) == 0
    return str(info.value)


def test_adamw_snapshot_into_galore_names_both_classes(tmp_path) -> None:
    _save(tmp_path, "adamw")
    model = T.make_model()
    msg = _refused(
        tmp_path,
        model,
        T.make_optimizer("galore", model),
        r"saved by AdamW, this optimizer is GaLoreAdamW; load it into the same optimizer",
    )
    assert "shape" not in msg and "snapshot [" not in msg
    # through a memopt wrapper (state on a tier) the wrapped class is the one compared
    model = T.make_model()
    wrapped = StateOffloadedOptimizer(T.make_optimizer("galore", model), PinnedCPUTier())
    _refused(tmp_path, model, wrapped, "saved by AdamW, this optimizer is GaLoreAdamW")


def test_torch_adamw_snapshot_into_galore_says_the_order_differs(tmp_path) -> None:
    """torch's AdamW records no class: the same parameters by name in another order."""
    _save(tmp_path, "torch_adamw")
    model = T.make_model()
    msg = _refused(
        tmp_path,
        model,
        T.make_optimizer("galore", model),
        "the optimizer's parameter order differs",
    )
    assert "#1: snapshot inp.bias vs here mid.weight" in msg


def _biases_first(model: nn.Module, swap: bool) -> AdamW:
    first = [model.mid.bias, model.inp.bias] if swap else [model.inp.bias, model.mid.bias]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return AdamW([{"params": first}, {"params": rest}], lr=1e-2)


def test_same_shape_reorder_is_refused_not_loaded_crosswise(tmp_path) -> None:
    """inp.bias and mid.bias both have 64 elements: by shape alone, swapping them in the
    groups loaded each one's moments into the other without any error."""
    model = T.make_model()
    opt = _biases_first(model, swap=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    T.train(model, opt, sched, 0, 2)
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(2, model=model, optimizer=opt)
    model = T.make_model()
    msg = _refused(tmp_path, model, _biases_first(model, swap=True), "parameter order differs")
    assert "#0: snapshot inp.bias vs here mid.bias" in msg
    assert "#1: snapshot mid.bias vs here inp.bias" in msg
    model = T.make_model()  # the saved order loads
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.load(model=model, optimizer=_biases_first(model, swap=False))


class _Snap:  # what the check reads of a Snapshot: its path, for the message
    path = "ck/step_0000000002"


SNAP: Any = _Snap()


def _layout(names: list[str], shapes: list[tuple[int, ...]]) -> list[L.ParamLayout]:
    return [
        L.ParamLayout(i, n, s, (0, s[0]), True, False, 0)
        for i, (n, s) in enumerate(zip(names, shapes, strict=True))
    ]


def _saved(names: list[str], shapes: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    return [
        {"index": i, "name": n, "shape": list(s)}
        for i, (n, s) in enumerate(zip(names, shapes, strict=True))
    ]


def test_names_changed_by_a_wrapper_or_a_rename_do_not_refuse_a_good_resume() -> None:
    shapes = [(4,), (4,)]
    saved = _saved(["a.bias", "b.bias"], shapes)
    check = R._check_same_params
    for here in (
        ["module.a.bias", "module.b.bias"],  # DDP
        ["_orig_mod.a.bias", "_orig_mod.b.bias"],  # torch.compile
        ["param.0", "param.1"],  # no model given to name them
        ["x.bias", "y.bias"],  # renamed: the names cannot be matched, shapes are
    ):
        check(SNAP, saved, _layout(here, shapes))
    with pytest.raises(SnapshotMismatchError, match="snapshot a.bias vs here module.b.bias"):
        check(SNAP, saved, _layout(["module.b.bias", "module.a.bias"], shapes))
