"""2 ranks: a failure never makes the ranks pair different saves, and never hangs a rank.

One spawn (starting ranks costs seconds) runs four scenarios, each in its own directory:

- ``paired``: rank 0's write of step 3 fails; rank 0 notices it at ``save(4)``, rank 1 only at
  ``save(5)`` (it called ``save(4)`` while step 3 was still being published). Each of those
  saves is skipped on its rank (and fails on the other), so every later save pairs the same
  step on both ranks: every published snapshot holds both ranks' files and loads;
- ``out_of_step``: the ranks call ``save()`` for different steps (a caller's bug): nothing is
  published, both ranks raise, no tmp dir is left;
- ``lost_contact``: the exchange of a save's outcome fails (a peer died): the error names the
  step and the rank;
- ``commit_raises``: rank 0's commit raises a non-``OSError``: both ranks raise it (before,
  rank 1 waited forever for the broadcast), and the next save publishes.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

from memopt.checkpoint import AsyncCheckpointer, CheckpointError
from tests._harness.dist import run_distributed


def _save(ck: AsyncCheckpointer, step: int, model: Any, said: list[str]) -> None:
    try:
        ck.save(step, model=model)
    except CheckpointError as e:
        said.append(f"save({step}): {e}")


def _paired(rank: int, root: str) -> dict[str, Any]:
    real = AsyncCheckpointer._write

    def fail_3(self: AsyncCheckpointer, job: Any) -> None:
        if rank == 0 and job.step == 3:
            time.sleep(0.5)
            raise OSError(28, "No space left on device (injected)")
        real(self, job)

    AsyncCheckpointer._write = fail_3  # type: ignore[method-assign]
    try:
        ck = AsyncCheckpointer(root, keep=20, fsync=False)
    finally:
        AsyncCheckpointer._write = real  # type: ignore[method-assign]
    model, said = torch.nn.Linear(16, 16), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            _save(ck, step, model, said)
        if rank == 0:  # rank 0 sees step 3 fail before its save(4); rank 1 does not
            assert ck._jobs[-1].done.wait(30)
        _save(ck, 4, model, said)
        if rank == 1:
            assert next(j for j in ck._jobs if j.step == 3).done.wait(30)
        for step in (5, 6, 7):
            _save(ck, step, model, said)
        try:
            ck.wait()
        except CheckpointError as e:
            said.append(f"wait: {e}")
    said += [str(w.message) for w in caught]
    dist.barrier()
    for step in ck.steps():
        ck.load(step, model=torch.nn.Linear(16, 16))  # every rank's files are there
    ck.close()
    return {"steps": ck.steps(), "listing": sorted(os.listdir(root)), "said": said}


def _out_of_step(rank: int, root: str) -> dict[str, Any]:
    ck = AsyncCheckpointer(root, fsync=False)
    ck.save(1, extra={"rank": rank})
    ck.wait()
    for step in (2, 3) if rank == 0 else (3, 4):  # rank 1 missed one save() call
        ck.save(step, extra={"rank": rank})
    with pytest.raises(CheckpointError, match=r"not published: the ranks' saves are out of step"):
        ck.wait()
    ck.close()
    dist.barrier()
    return {"steps": ck.steps(), "listing": sorted(os.listdir(root))}


def _lost_contact(rank: int, root: str) -> None:
    ck = AsyncCheckpointer(root, fsync=False)
    real = dist.all_gather_object

    def reset(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Connection reset by peer (injected)")

    dist.all_gather_object = reset  # type: ignore[assignment]
    try:
        ck.save(2, extra={"rank": rank})
        with pytest.raises(CheckpointError, match=rf"^checkpoint step 2: rank {rank} lost "
                           r"contact .*Connection reset by peer"):  # fmt: skip
            ck.wait()
    finally:
        dist.all_gather_object = real
    ck.save(3, extra={"rank": rank})
    ck.close()
    assert ck.steps() == [3]


def _commit_raises(rank: int, root: str) -> None:
    ck = AsyncCheckpointer(root, fsync=False)
    if rank == 0:  # (only rank 0 writes the manifest)
        ck.metadata = {"bad": object()}  # past the constructor's check
    ck.save(1, extra={"rank": rank})
    with pytest.raises(CheckpointError, match=r"step 1: publishing .* failed on rank 0: TypeError"):
        ck.wait()
    ck.metadata = {}
    ck.save(2, extra={"rank": rank})
    ck.close()
    assert ck.steps() == [2]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


def _scenarios(rank: int, world: int, root: str) -> dict[str, Any]:
    out = {"paired": _paired(rank, os.path.join(root, "paired"))}
    out["out_of_step"] = _out_of_step(rank, os.path.join(root, "out_of_step"))
    _lost_contact(rank, os.path.join(root, "lost_contact"))
    _commit_raises(rank, os.path.join(root, "commit_raises"))
    return out


@pytest.mark.timeout(120)
def test_failures_keep_the_ranks_paired_and_never_hang(tmp_path) -> None:
    results = run_distributed(_scenarios, world_size=2, timeout_s=90, args=(str(tmp_path),))
    for rank, out in enumerate(results):
        paired = out["paired"]
        assert paired["steps"] == [1, 2, 6, 7], (rank, paired)
        assert not [n for n in paired["listing"] if n.startswith(".tmp")], (rank, paired)
        said = "\n".join(paired["said"])
        own, other = (4, 5) if rank == 0 else (5, 4)
        assert f"save({own}): checkpoint step {own} was NOT saved, because an earlier save " \
               "failed: checkpoint step 3" in said, (rank, said)  # fmt: skip
        assert f"checkpoint step {other} was not published: rank {1 - rank} did not save it" \
               in said, (rank, said)  # fmt: skip
        assert out["out_of_step"]["steps"] == [1], rank
        assert out["out_of_step"]["listing"] == ["step_0000000001"], rank
