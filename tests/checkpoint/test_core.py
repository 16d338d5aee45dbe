"""Single-process behaviour: the lazy fence, the file format, rotation, export to HF."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from memopt.checkpoint import AsyncCheckpointer, CheckpointConfig, export_hf, pipeline, writer
from memopt.checkpoint.codec import decode, encode
from tests.checkpoint import _common as T


def _slow_copy(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    orig = pipeline.Pipeline._copy

    def slow(self: pipeline.Pipeline, job: pipeline.Job) -> None:
        time.sleep(delay)
        orig(self, job)

    monkeypatch.setattr(pipeline.Pipeline, "_copy", slow)


COPY_S = 0.8  # long enough that save() returning sooner is not luck on a loaded machine


@pytest.mark.parametrize("name, stage", [("adamw", 0), ("galore", 2)])
def test_fence_keeps_pre_step_values(tmp_path, monkeypatch, name, stage) -> None:
    """(stage 2 at world size 1: the hook is on memopt.shard's ShardedOptimizer)"""
    _slow_copy(monkeypatch, COPY_S)
    model, opt, sched = T.make_all(name, stage)
    T.train(model, opt, sched, 0, 2)
    before = T.full_params(model)
    state_before = opt.state_dict()["state"][0]["exp_avg"].clone()
    with AsyncCheckpointer(tmp_path, keep=2) as ckpt:
        t = time.perf_counter()
        ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
        assert time.perf_counter() - t < COPY_S / 2  # save returns before the (slow) copy
        T.train(model, opt, sched, 2, 3)  # the step pre-hook waits for the copy
        assert T.equal(before, T.full_params(model))  # the step did change the parameters
        ckpt.wait()
        rec = ckpt.stats.last
        # the copy took >= COPY_S and the step waited for it (how long depends on how long the
        # forward and backward took first: no fixed lower bound on a loaded machine)
        assert rec is not None and rec.ok and rec.copied_s >= COPY_S and rec.stall_s > 0.0
        assert rec.durable_s >= rec.copied_s
        m2, o2, s2 = T.make_all(name, stage)
        ckpt.load(model=m2, optimizer=o2, scheduler=s2)
    assert T.equal(before, T.full_params(m2)) == []
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], state_before)


def test_no_stall_when_copy_finishes_first(tmp_path) -> None:
    model, opt, sched = T.make_all("adamw")
    T.train(model, opt, sched, 0, 1)
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, model=model, optimizer=opt)
        ckpt.wait()
        rec = ckpt.stats.last
        assert rec is not None and rec.stall_s == rec.capture_s


def test_file_format_aligned_safetensors_and_manifest(tmp_path) -> None:
    model, opt, sched = T.make_all("galore")
    T.train(model, opt, sched, 0, 3)
    with AsyncCheckpointer(tmp_path, metadata={"run": "abc"}) as ckpt:
        ckpt.save(3, model=model, optimizer=opt, scheduler=sched, extra={"pos": 17})
    snap = tmp_path / "step_0000000003"
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["metadata"] == {"run": "abc"}
    assert set(manifest["files"]) == {"rank_00000.safetensors", "rank_00000.json"}
    assert manifest["checksum"] in ("crc32c", "crc32") and manifest["versions"]["torch"]
    raw = (snap / "rank_00000.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 4096 == 0
    for name, info in header.items():
        if name != "__metadata__" and not name.startswith("__pad__"):
            assert info["data_offsets"][0] % 4096 == 0, name
    with safe_open(str(snap / "rank_00000.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.mid.weight")
    assert torch.equal(w, model.mid.weight.detach())
    rank_json = json.loads((snap / "rank_00000.json").read_text())
    assert rank_json["tensors"]["model.mid.weight"]["global_shape"] == [64, 64]
    assert rank_json["extra"] == {"pos": 17}


def test_staging_memory_is_reused_not_grown(tmp_path) -> None:
    """A bigger snapshot unmaps the smaller free staging chunk; same sizes reuse it."""
    with AsyncCheckpointer(tmp_path, max_inflight=1) as ckpt:
        ckpt.save(1, extra={"blob": torch.ones(2 << 20, dtype=torch.uint8)})
        ckpt.wait()
        for step in (2, 3, 4):
            ckpt.save(step, extra={"blob": torch.ones((5 << 20) - step, dtype=torch.uint8)})
            ckpt.wait()
        report = ckpt.arena.report()
        assert report.capacity_bytes == 6 << 20 and ckpt.arena.chunk_count() == 1
        assert ckpt.load()["blob"].sum() == (5 << 20) - 4


def test_rotation_keeps_newest(tmp_path) -> None:
    model, opt, sched = T.make_all("adamw")
    with AsyncCheckpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest() is None
        for step in range(1, 5):
            T.train(model, opt, sched, step - 1, step)
            ckpt.save(step, model=model, optimizer=opt, extra={"s": step})
        ckpt.wait()
        assert ckpt.steps() == [3, 4] and ckpt.latest() == 4
        assert ckpt.load(model=model)["s"] == 4
        assert ckpt.load(3, model=model)["s"] == 3


def test_export_hf_loads_in_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with AsyncCheckpointer(tmp_path / "ck") as ckpt:
        ckpt.save(7, model=model)
    out = tmp_path / "hf"
    out.mkdir()
    cfg.save_pretrained(out)
    path = export_hf(tmp_path / "ck", out)
    assert path.endswith("model.safetensors")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert export_hf(7, tmp_path / "w.safetensors", directory=tmp_path / "ck")


def test_codec_round_trip_keeps_types() -> None:
    obj = {
        "a": (1, 2.5, float("inf")),
        3: [None, True, "x"],
        "d": torch.bfloat16,
        "t": torch.arange(3),
    }
    tensors: dict[str, torch.Tensor] = {}
    skel = json.loads(json.dumps(encode(obj, tensors, "x")))
    back = decode(skel, tensors.__getitem__)
    assert back["a"] == (1, 2.5, float("inf")) and back[3] == [None, True, "x"]
    assert back["d"] is torch.bfloat16 and torch.equal(back["t"], obj["t"])
    with pytest.raises(TypeError, match="no pickle"):
        encode({"f": object()}, {}, "x")


def test_config_is_validated(tmp_path) -> None:
    with pytest.raises(TypeError, match="not both"):
        AsyncCheckpointer(tmp_path, config=CheckpointConfig(), fsync=False)
    with pytest.raises(TypeError, match="unexpected keyword"):
        AsyncCheckpointer(tmp_path, fsynk=False)
    with pytest.raises(ValueError, match="keep"):
        CheckpointConfig(keep=0)
    with pytest.raises(ValueError, match="alignment"):
        CheckpointConfig(alignment=3000)
    with pytest.raises(ValueError, match="checksum"):
        CheckpointConfig(checksum="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"background_nice must be an int in \[0, 19\], got 20"):
        CheckpointConfig(background_nice=20)
    with pytest.raises(ValueError, match="checksum_in_copy must be a bool, got 'yes'"):
        CheckpointConfig(checksum_in_copy="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fsync must be a bool, got 'no'"):  # "no" was truthy
        CheckpointConfig(fsync="no")  # type: ignore[arg-type]


def test_background_nice_lowers_the_threads_and_copies_exactly(tmp_path, monkeypatch) -> None:
    """With background_nice the copier and writer run niced (the training thread does not),
    and the snapshot loads bit for bit."""
    import os
    import threading

    model, opt, sched = T.make_all("adamw", 0)
    T.train(model, opt, sched, 0, 2)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with AsyncCheckpointer(tmp_path, keep=2, background_nice=7) as ckpt:
        ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
        ckpt.wait()
        nices = {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
                 for t in threading.enumerate() if t.name.startswith("memopt-ckpt-")}
        assert nices == {"memopt-ckpt-copy": max(7, mine), "memopt-ckpt-write": max(7, mine)}
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
        fresh, fresh_opt, fresh_sched = T.make_all("adamw", 0)
        ckpt.load(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"],
                       fresh_opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("path", ["fused", "one_thread", "team"])
def test_cpu_copy_paths_and_cpu_time(tmp_path, monkeypatch, path) -> None:
    """CPU tensors are staged by the copier thread alone: by the native copy that computes
    the CRC-32C in the same pass (``checksum_in_copy``, the default), so the writer makes no
    checksum pass, or with it off by numpy's one-thread copy. ``copy_team`` brings torch's
    copy back. Every path gives the same files (checksums verified on load), and
    ``background_cpu_s`` counts the copy and checksum."""
    if path == "fused" and not pipeline.fused_ok():
        pytest.skip("the native copy + CRC-32C is not built here")
    calls: dict[str, int] = {"fused": 0, "one_thread": 0, "writer_crc": 0}

    def counted(name, fn):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return fn(*a, **k)

        return run

    monkeypatch.setattr(pipeline, "copy_crc32c", counted("fused", pipeline.copy_crc32c))
    monkeypatch.setattr(pipeline, "_copy_one_thread",
                        counted("one_thread", pipeline._copy_one_thread))  # fmt: skip
    monkeypatch.setattr(writer, "parallel_checksum",
                        counted("writer_crc", writer.parallel_checksum))  # fmt: skip
    monkeypatch.setattr(pipeline.Pipeline, "copy_team", path == "team")
    big = {"w": torch.randn(1 << 23), "b": torch.arange(1000, dtype=torch.int64),
           "t": torch.randn(300, 200).t(), "z": torch.zeros(0)}  # fmt: skip
    off = {"checksum_in_copy": False} if path == "one_thread" else {}  # else the default: on
    with AsyncCheckpointer(tmp_path, save_rng=False, checksum="crc32c", **off) as ckpt:
        ckpt.save(1, extra=big)
        ckpt.wait()
        rec = ckpt.stats.records[-1]
        got = ckpt.load()  # verify=True: the file's checksum is checked
    assert all(torch.equal(got[k], v) for k, v in big.items())
    if path == "fused":  # 3 tensors copied in one pass; the transposed one by torch
        assert calls == {"fused": 3, "one_thread": 0, "writer_crc": 0}
    elif path == "one_thread":
        assert calls["fused"] == 0 and calls["one_thread"] == 4 and calls["writer_crc"] == 1
    else:
        assert calls == {"fused": 0, "one_thread": 0, "writer_crc": 1}
    # a 32 MB copy plus a CRC-32C over it: well above a millisecond of CPU, and no more
    # than the two threads could have spent while the save ran
    assert 1e-3 < rec.background_cpu_s <= 2 * rec.durable_s + 0.05


def test_fused_copy_crc_matches_the_crc32c_package() -> None:
    """``copy_crc32c`` copies exactly and continues a running CRC-32C like ``crc32c.crc32c``,
    at every length around its 3 x 8 KiB rounds and any alignment of source and target."""
    crc32c = pytest.importorskip("crc32c")
    from memopt.checkpoint.copy_crc import available, copy_crc32c

    if not available():
        pytest.skip("the native copy + CRC-32C is not built here")
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 24575, 24576, 24577, 3 * 8192 * 4 + 13, (1 << 20) + 3):
        src = torch.randint(0, 256, (n + 3,), dtype=torch.uint8, generator=g)
        out = torch.zeros(n + 8, dtype=torch.uint8)
        for so, do, prev in ((0, 0, 0), (1, 0, 7), (3, 5, 0xDEADBEEF)):
            s, d = src[so : so + n], out[do : do + n]
            d.zero_()
            assert copy_crc32c(d, s, prev) == crc32c.crc32c(s.numpy().tobytes(), prev)
            assert torch.equal(d, s)
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match="uint8 view of 140 bytes"):
        copy_crc32c(torch.empty(139, dtype=torch.uint8), x)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        copy_crc32c(torch.empty(140, dtype=torch.uint8), x.t())
