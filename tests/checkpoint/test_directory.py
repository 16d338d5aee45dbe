"""The snapshot directory: rotation beside later steps (a reused directory, a rollback),
hand-damaged manifests, hand-named snapshot directories, readers racing with rotation,
export into a new directory, and steps that are not ints."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from memopt.checkpoint import (
    AsyncCheckpointer,
    CorruptSnapshotError,
    Snapshot,
    export_hf,
    loading,
)
from memopt.checkpoint.publish import step_dir


def _saves(ckpt: AsyncCheckpointer, model: nn.Module, steps: tuple[int, ...]) -> list[str]:
    """Save and wait for each step; the warnings raised meanwhile."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in steps:
            ckpt.save(s, model=model, extra={"s": s})
            ckpt.wait()
    return [str(w.message) for w in caught]


def test_rotation_never_removes_the_new_snapshot_nor_later_steps(tmp_path) -> None:
    """keep=1 in a directory that holds step 500 of an earlier run: each new save stays
    published (it used to be rotated out at once), 500 is left alone, one warning says so."""
    model = nn.Linear(4, 4)
    with AsyncCheckpointer(tmp_path, keep=1, save_rng=False) as ckpt:
        assert _saves(ckpt, model, (500,)) == []
    with AsyncCheckpointer(tmp_path, keep=1, save_rng=False) as ckpt:
        caught = _saves(ckpt, model, (10, 20))
        assert ckpt.steps() == [20, 500]
        assert ckpt.load(20, model=model)["s"] == 20
    assert len(caught) == 1  # once per checkpointer
    assert "later than step 10" in caught[0] and "[500]" in caught[0]
    assert "latest() returns 500" in caught[0] and "Move or delete" in caught[0]


def test_rollback_after_a_corrupt_newest_keeps_the_new_run(tmp_path) -> None:
    """The newest snapshot (200) is corrupt, load() falls back to 100, training goes on and
    saves 110, 120, 130 with keep=2: the new run's two newest stay, 200 is not deleted (it
    might be another run's), and the user is told that latest() still returns it."""
    model = nn.Linear(4, 4)
    with AsyncCheckpointer(tmp_path, keep=2, save_rng=False) as ckpt:
        _saves(ckpt, model, (100, 200))
        path = tmp_path / "step_0000000200" / "rank_00000.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.warns(UserWarning, match="checksum"):
            assert ckpt.load(model=model)["s"] == 100
        caught = _saves(ckpt, model, (110, 120, 130))
        assert ckpt.steps() == [120, 130, 200] and ckpt.latest() == 200
        assert ckpt.load(130, model=model)["s"] == 130
    assert len(caught) == 1 and "[200]" in caught[0] and "later than step 110" in caught[0]


def test_manifest_without_files_is_a_corrupt_snapshot(tmp_path) -> None:
    model = nn.Linear(4, 4)
    with AsyncCheckpointer(tmp_path, keep=3, save_rng=False) as ckpt:
        _saves(ckpt, model, (1, 2, 3))
    bad = {
        2: lambda m: {k: v for k, v in m.items() if k != "files"},  # valid JSON, no "files"
        3: lambda m: [m],  # valid JSON, not an object
    }
    for step, damage in bad.items():
        path = tmp_path / f"step_{step:010d}" / "manifest.json"
        path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ckpt.load(model=model)["s"] == 1
        assert len(caught) == 2 and all("not a valid manifest" in str(w.message) for w in caught)
        with pytest.raises(CorruptSnapshotError, match="step_0000000002/manifest.json is not a "
                                                       "valid manifest.*files"):  # fmt: skip
            ckpt.load(2, model=model)


def test_manifest_without_a_files_checksum_is_corrupt(tmp_path) -> None:
    model = nn.Linear(4, 4)
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        _saves(ckpt, model, (1,))
    path = tmp_path / "step_0000000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {}
    path.write_text(json.dumps(manifest))
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        with pytest.raises(CorruptSnapshotError, match="lists no checksum of rank 0"):
            ckpt.load(1, model=model)
    with AsyncCheckpointer(tmp_path, save_rng=False, verify=False) as ckpt:
        assert ckpt.load(1, model=model)["s"] == 1  # nothing to verify against: loads


def test_export_hf_into_a_directory_that_does_not_exist(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with AsyncCheckpointer(tmp_path / "ck", save_rng=False) as ckpt:
        ckpt.save(1, model=model)
    want = model.state_dict()
    for out, expect in (
        (f"{tmp_path}/hf_out{os.sep}", tmp_path / "hf_out" / "model.safetensors"),
        (tmp_path / "a" / "b", tmp_path / "a" / "b" / "model.safetensors"),
        (tmp_path / "w.safetensors", tmp_path / "w.safetensors"),
    ):
        path = export_hf(tmp_path / "ck", out)
        assert path == os.fspath(expect)
        got = load_file(path)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        export_hf(tmp_path / "ck", tmp_path / "missing" / "w.safetensors")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file, not a directory"):
        export_hf(tmp_path / "ck", tmp_path / "plain")


def test_step_must_be_an_int_not_a_bool(tmp_path) -> None:
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        with pytest.raises(ValueError, match=r"step must be an int >= 0, got True \(bool\)"):
            ckpt.save(True, extra={"x": 1})
        with pytest.raises(ValueError, match=r"got 2.0 \(float\)"):
            ckpt.save(2.0, extra={"x": 1})  # type: ignore[arg-type]
        ckpt.save(1, extra={"x": 1})  # the refused saves took no staging slot
        ckpt.wait()
        assert ckpt.steps() == [1]


def test_export_hf_falls_back_from_a_damaged_newest_snapshot(tmp_path) -> None:
    """export_hf of a checkpoint directory takes the newest intact snapshot, as load() does
    (it raised on a damaged newest one)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with AsyncCheckpointer(tmp_path / "ck", save_rng=False, keep=3) as ckpt:
        ckpt.save(1, model=model)
        ckpt.wait()
        old = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(2, model=model)
    newest = Path(step_dir(str(tmp_path / "ck"), 2))
    data = next(p for p in newest.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="falling back"):
        path = export_hf(tmp_path / "ck", tmp_path / "hf")
    got = load_file(path)
    assert all(torch.equal(got[k], old[k]) for k in old)


def test_a_snapshot_the_optimizer_refuses_leaves_the_model_untouched(tmp_path) -> None:
    """The optimizer's part is read and checked before the model is restored: a load that
    fails on the optimizer (here: it manages other parameters) used to replace the model's
    weights first and then raise, leaving snapshot weights with a fresh optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    with AsyncCheckpointer(tmp_path, save_rng=False) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)
        other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        before = {k: v.clone() for k, v in other.state_dict().items()}
        partial = torch.optim.AdamW(other[0].parameters())  # not the saved optimizer's params
        with pytest.raises(Exception, match="optimizer parameters differ"):
            ckpt.load(model=other, optimizer=partial)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_a_hand_named_snapshot_is_foreign_and_ignored(tmp_path) -> None:
    """``step_5`` (not zero-padded) used to count as published while every path is rebuilt
    as ``step_0000000005``: load() aborted, load(5) contradicted itself and rotation failed
    every later save. It is now ignored, with a warning naming it, and left alone."""
    model = nn.Linear(4, 4)
    with AsyncCheckpointer(tmp_path, keep=2, save_rng=False) as ckpt:
        _saves(ckpt, model, (3, 5))
    os.rename(tmp_path / "step_0000000005", tmp_path / "step_5")
    with AsyncCheckpointer(tmp_path, keep=2, save_rng=False) as ckpt:
        with pytest.warns(UserWarning, match=r"ignoring step_5: .*zero-padded to 10 digits"):
            assert ckpt.latest() == 3
        assert ckpt.load(model=model)["s"] == 3
        with pytest.raises(FileNotFoundError, match=r"no published snapshot of step 5 .*"
                                                    r"\(published: \[3\]\).*ignoring step_5"):
            ckpt.load(5, model=model)
        assert _saves(ckpt, model, (10, 11, 12)) == []  # each save published and rotated
        assert ckpt.steps() == [11, 12]
    assert Snapshot(str(tmp_path / "step_5")).step == 5  # left alone, still readable


def _race(monkeypatch, root: Path, where: str) -> None:
    """Steps 1 and 2 saved, step 2 moved aside (``_prepare``); from now on, the first listing
    of ``root`` (``where`` = "listing") or the first read of a snapshot ("reading") runs a
    keep=1 rotation: step 2 published, step 1 renamed to trash. A snapshot exists at every
    moment."""
    aside = root.parent / "aside"
    fired: list[bool] = []

    def rotate() -> None:
        if not fired:
            fired.append(True)
            os.rename(aside, root / "step_0000000002")
            os.rename(root / "step_0000000001", root / ".trash-race")

    if where == "listing":
        real_listdir = os.listdir

        def listdir(path: Any = ".") -> list[str]:
            names = real_listdir(path)
            if os.fspath(path) == str(root):
                rotate()
            return names

        monkeypatch.setattr(os, "listdir", listdir)
    else:
        real_snapshot = loading.Snapshot

        def snapshot(path: str, verify: bool = True) -> Snapshot:
            rotate()
            return real_snapshot(path, verify)

        monkeypatch.setattr(loading, "Snapshot", snapshot)


@pytest.mark.parametrize(
    ("where", "reader"),
    [("listing", "latest"), ("listing", "load"), ("listing", "export_hf"),
     ("reading", "load"), ("reading", "export_hf")],
)  # fmt: skip
def test_a_reader_racing_with_rotation_finds_the_newer_snapshot(
    tmp_path, monkeypatch, where: str, reader: str
) -> None:
    """It saw no snapshot at all (listing: "is neither a snapshot nor holds one", "no
    loadable snapshot") or aborted on the vanished one (reading)."""
    root = tmp_path / "ck"
    with AsyncCheckpointer(root, keep=3, save_rng=False) as ckpt:
        _saves(ckpt, nn.Linear(4, 3), (1, 2))
    os.rename(root / "step_0000000002", tmp_path / "aside")
    with AsyncCheckpointer(root, save_rng=False) as ckpt:  # (opened before the race)
        _race(monkeypatch, root, where)
        if reader == "latest":
            assert ckpt.latest() == 2
        elif reader == "load":
            assert ckpt.load(model=nn.Linear(4, 3))["s"] == 2
    if reader == "export_hf":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to an older snapshot either
            assert load_file(export_hf(root, tmp_path / "hf")).keys() == {"weight", "bias"}
    assert not (tmp_path / "aside").exists()  # the race ran
