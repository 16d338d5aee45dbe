"""``MemoptTrainer`` with a model built on the meta device (sweep29 F1).

HF's ``Trainer.__init__`` moves the model with ``model.to(device)``, which a meta model cannot
take ("Cannot copy out of meta tensor"); with ``memopt_shard`` stage 3 and an initializer the
move is skipped and ``memopt.shard`` materializes the model when training starts. Any other
meta model is refused at construction with an error naming the fix.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from memopt.integrations.hf import MemoptTrainer  # noqa: E402
from memopt.sharding import FSDPOptions  # noqa: E402
from tests.integrations._tiny import Tokens, tiny_llama  # noqa: E402


def _meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_llama(0)


def _args(out: str, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=2,
        logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def _stage3(model: torch.nn.Module) -> dict[str, object]:
    return {"stage": 3, "fsdp": FSDPOptions(init_fn=model._init_weights)}  # type: ignore[arg-type,operator]


def _train(tmp_path, model: torch.nn.Module, optimizer: str = "adamw") -> MemoptTrainer:
    options = {"rank": 8} if optimizer == "galore" else {}
    t = MemoptTrainer(model=model, args=_args(str(tmp_path)), train_dataset=Tokens(),
                      memopt_optimizer=optimizer, memopt_options=options,
                      memopt_shard=_stage3(model))  # fmt: skip
    meta = any(p.is_meta for p in model.parameters())
    if meta:  # no weights before train(): a clear error, not torch's "copy out of meta"
        with pytest.raises(RuntimeError, match="still on the meta device.*call train"):
            t.evaluate(Tokens(4))
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert t.state.global_step == 2
    return t


@pytest.fixture(params=["plain", "fsdp2"])
def stage3_path(request, tmp_path, monkeypatch):
    """Stage 3 in one process takes the plain path; a 1-rank gloo group with
    MEMOPT_SHARD_WORLD1_COLLECTIVES takes FSDP2's (the path of 2+ ranks)."""
    if request.param == "fsdp2":
        import torch.distributed as dist

        monkeypatch.setenv("MEMOPT_SHARD_WORLD1_COLLECTIVES", "1")
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                world_size=1)  # fmt: skip (conftest destroys it)
    return request.param


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_meta_model_trains_at_stage3(tmp_path, stage3_path, optimizer) -> None:
    model = _meta_llama()
    t = _train(tmp_path, model, optimizer)
    trained = dict(t.model.named_parameters())
    assert not any(p.is_meta for p in trained.values())
    if stage3_path == "fsdp2":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in trained.values())
        trained = {n: p.full_tensor() for n, p in trained.items()}
    # filled by _init_weights (std initializer_range=0.02, norms 1), not left as to_empty's
    # garbage; 2 steps at lr 1e-3 move each weight by ~2e-3 at most
    emb = trained["model.embed_tokens.weight"].detach()
    assert 0.015 < float(emb.std()) < 0.025
    norm = trained["model.norm.weight"].detach()
    assert torch.allclose(norm, torch.ones_like(norm), atol=5e-3)
    assert math.isfinite(t.evaluate(Tokens(4))["eval_loss"])  # (after train: weights now)


@pytest.fixture
def shard_calls(monkeypatch) -> list[dict[str, object]]:
    from memopt.integrations import hf_trainer

    seen: list[dict[str, object]] = []
    real = hf_trainer.shard_under

    def spy(accelerator, model, opt, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw)
        return real(accelerator, model, opt, **kw)

    monkeypatch.setattr(hf_trainer, "shard_under", spy)
    return seen


def test_meta_model_is_materialized_on_the_trainers_device(tmp_path, shard_calls) -> None:
    """memopt.shard's own default for a meta model is the CPU without an NCCL group (one
    GPU, plain path): the Trainer's batches go to args.device, so the shards must too."""
    model = _meta_llama()
    t = _train(tmp_path, model)
    (kw,) = shard_calls
    fsdp = kw["fsdp"]
    assert isinstance(fsdp, FSDPOptions) and fsdp.init_device == t.args.device
    assert fsdp.init_fn == model._init_weights  # the caller's options kept
    shard_calls.clear()
    model = _meta_llama()
    options = FSDPOptions(init_fn=model._init_weights, init_device="cpu")
    t = MemoptTrainer(model=model, args=_args(str(tmp_path)), train_dataset=Tokens(),
                      memopt_optimizer="adamw", memopt_shard={"stage": 3, "fsdp": options})
    t.create_optimizer()
    assert shard_calls[0]["fsdp"] is options  # an explicit init_device is left alone


def test_real_model_still_trains_at_stage3(tmp_path, shard_calls) -> None:
    model = tiny_llama(0)
    _train(tmp_path, model)
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    assert shard_calls[0]["fsdp"].init_device is None  # (nothing to place: options as given)


@pytest.mark.parametrize(
    "shard,match",
    [
        (None, r"meta device.*no memopt_shard.*'stage': 3.*init_fn=model._init_weights\)\} does"),
        ({"stage": 2}, "meta device.*memopt_shard stage 2.*'stage': 3"),
        ({"stage": 3}, "meta-device model.*reset_parameters.*init_fn"),
    ],
)
def test_meta_model_without_materializing_path_is_refused(tmp_path, shard, match) -> None:
    with pytest.raises(ValueError, match=match):
        MemoptTrainer(model=_meta_llama(), args=_args(str(tmp_path)), train_dataset=Tokens(),
                      memopt_optimizer="adamw", memopt_shard=shard)  # fmt: skip


def test_meta_model_from_model_init_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="meta device.*no memopt_shard"):
        MemoptTrainer(model_init=_meta_llama, args=_args(str(tmp_path)), train_dataset=Tokens(),
                      memopt_optimizer="adamw")  # fmt: skip
