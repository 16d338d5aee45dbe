"""The built-in tiny workload of ``memopt estimate`` / ``memopt report``: a random-init LLaMA
(transformers ``LlamaConfig``) trained for a few steps with a memopt optimizer, optionally
sharded with ``memopt.shard`` (``--stage``, ``--offload``, ``--offload-params``). ``report``
measures one process: it runs a sharded workload on a one-rank group (``one_rank_group``), as
``memopt run --nproc-per-node 1`` does; recipes are ``memopt run``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZERS = ("adamw", "galore", "natural_galore", "apollo", "apollo_mini", "frugal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The size of each low-rank optimizer when --rank / --density give none.
DEFAULT_SIZE: dict[str, dict[str, Any]] = {
    "galore": {"rank": 128}, "natural_galore": {"rank": 128}, "apollo": {"rank": 128},
    "apollo_mini": {"rank": 1}, "frugal": {"density": 0.25},
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """A tiny LLaMA, an optimizer and a ZeRO stage: everything ``estimate`` and the run share."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int | None = None
    vocab: int = 8000
    batch_size: int = 4
    seq_len: int = 128
    optimizer: str = "adamw"
    rank: int | None = None
    density: float | None = None
    state_dtype: str | None = None
    stage: int = 0
    world_size: int = 1
    param_dtype: str = "float32"
    activation_policy: str = "keep"
    offload: str | None = None
    offload_params: str | None = None
    nvme_path: str | None = None  # directory of the swap files (offload / offload_params nvme)
    activation_budget: str | None = None  # run the activation planner under this budget

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate or (self.hidden * 8 // 3 + 63) // 64 * 64,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            vocab_size=self.vocab,
            max_position_embeddings=max(self.seq_len, 128),
        )

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The optimizer's options, resolved once for the estimate and the run alike: the
        given rank or density, else the workload's default size (``DEFAULT_SIZE``)."""
        kw: dict[str, Any] = {}
        if self.rank is not None:
            kw["rank"] = self.rank
        if self.density is not None:
            kw["density"] = self.density
        if not kw:
            kw.update(DEFAULT_SIZE.get(self.optimizer, {}))
        if self.state_dtype is not None:
            kw["state_dtype"] = self.state_dtype
        return kw

    def estimate(self, device_kind: str = "cpu") -> Any:
        from memopt.memory import estimate

        return estimate(
            self.llama_config(),
            optimizer=self.optimizer,
            optimizer_kwargs=self.optimizer_kwargs(),
            stage=self.stage,
            world_size=self.world_size,
            param_dtype=DTYPES[self.param_dtype],
            offload=self.offload,
            offload_params=self.offload_params,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            activation_policy=self.activation_policy,
            device_kind=device_kind,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def build_optimizer(w: Workload, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``w`` with exactly the options its estimate prices
    (``Workload.optimizer_kwargs``)."""
    import memopt.optim as mo

    kw = w.optimizer_kwargs()
    sd = {"state_dtype": kw.pop("state_dtype")} if "state_dtype" in kw else {}
    if w.optimizer == "adamw":
        if kw:  # as the estimate refuses it
            raise ValueError(f"adamw keeps full state: {sorted(kw)} do(es) not apply")
        return mo.AdamW(model.parameters(), **sd)
    cls = {
        "galore": mo.GaLoreAdamW,
        "natural_galore": mo.NaturalGaLoreAdamW,
        "apollo": mo.ApolloAdamW,
        "apollo_mini": mo.ApolloMini,
        "frugal": mo.FrugalAdamW,
    }
    return cls[w.optimizer](mo.param_groups(model, **kw), **sd)


def run(
    w: Workload, steps: int, timeline: Any, seed: int = 0, notes: list[str] | None = None
) -> float:
    """Build the model inside ``timeline`` (so it is counted) and train ``steps`` steps.

    With ``w.activation_budget`` the planner profiles a copy of the model before the timeline
    starts (so its unmanaged profiling step is not the measured peak), the plan is applied to
    the measured model, and its predictions against the measured ledger are appended to
    ``notes``."""
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from memopt.api import shard

    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if sharded(w) and ranks != w.world_size:
        raise ValueError(
            f"--world-size {w.world_size}, but this process runs {ranks} rank(s): measure one "
            f"process with --world-size 1, or use memopt estimate --world-size {w.world_size} "
            "for the prediction per rank"
        )
    warm_up(w)
    torch.manual_seed(seed)
    x = torch.randint(0, w.vocab, (w.batch_size, w.seq_len))
    the_plan = _plan(w, x) if w.activation_budget else None
    with timeline:
        model: Any = LlamaForCausalLM(w.llama_config())
        model = model.to(dtype=DTYPES[w.param_dtype])
        manager = _activations(model, w.activation_policy, the_plan)
        opt: Any = build_optimizer(w, model)
        if sharded(w):
            model, opt = shard(model, opt, **shard_kwargs(w))
        timeline.mark("built")
        loss = torch.zeros(())
        for step in range(steps):
            with _outside_blocks(manager, model):  # (the plan's peak counts those saves too)
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            timeline.mark(f"step {step}")
    if manager is not None:
        if the_plan is not None and notes is not None:
            from memopt.activations import compare

            notes.append(compare(the_plan, manager.ledger))
            notes.append(manager.report(the_plan))
        manager.remove()
    return float(loss.detach())


def _outside_blocks(manager: Any, model: Any) -> Any:
    """With a manager: its ledger also counts the saves made outside the managed blocks
    (embedding, head, loss), as ``measure_step`` does, so ``compare`` sets like against like."""
    if manager is None:
        return contextlib.nullcontext()
    from memopt.activations.measure import count_outside_blocks

    return count_outside_blocks(manager.ledger, model)


def _plan(w: Workload, x: torch.Tensor) -> Any:
    """The activation planner's plan for ``w``'s model under ``w.activation_budget``, made on a
    copy (same config and dtype) so the measured model never runs unmanaged."""
    from transformers import LlamaForCausalLM

    from memopt.activations import plan

    probe: Any = LlamaForCausalLM(w.llama_config())
    probe = probe.to(dtype=DTYPES[w.param_dtype])
    result = plan(probe, {"input_ids": x, "labels": x}, w.activation_budget or "50%")
    del probe
    return result


def sharded(w: Workload) -> bool:
    """Whether ``w`` runs ``memopt.shard`` (a stage, or an offload tier)."""
    return bool(w.stage or w.offload or w.offload_params)


@contextlib.contextmanager
def one_rank_group(w: Workload) -> Iterator[None]:
    """A one-rank gloo process group for a sharded ``w`` when none is up (ended on exit), as
    ``memopt run`` starts on one process: parameter offload runs FSDP2, which needs a group
    even on one device; stages 1-3 without it take the same plain one-rank path. An
    in-process store: no port, no file, nothing to clean up."""
    import torch.distributed as dist

    if not sharded(w) or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_kwargs(w: Workload) -> dict[str, Any]:
    """``memopt.shard`` arguments for ``w`` (stage 0 with an offload tier runs as stage 1)."""
    from memopt.offload import NVMeConfig, OffloadConfig

    if "nvme" in (w.offload, w.offload_params) and not w.nvme_path:
        raise ValueError("an nvme offload needs nvme_path (--nvme-path DIR)")
    kw: dict[str, Any] = {"stage": w.stage or 1}
    if w.offload is not None:
        kw["offload"] = OffloadConfig(device=w.offload, nvme_path=w.nvme_path)  # type: ignore[arg-type]
    if w.offload_params is not None:
        kw["offload_params"] = w.offload_params
    if w.offload_params == "nvme":
        kw["param_nvme"] = NVMeConfig(directory=w.nvme_path)  # type: ignore[arg-type]
    return kw


def warm_up(w: Workload) -> None:
    """One step of a one-layer model of the same kind, widths, vocabulary, batch shape and
    dtype, so lazily imported code and one-time buffers (kernels, thread pools, GEMM packing,
    the per-shape buffers of the head's forward and the loss's backward) are in the baseline,
    not in the measured growth. (With a 256-token vocabulary and 16 tokens, as before, about
    5.7 MiB of them landed in the first measured run of a process: tests/memory/test_peak.py
    read 0.95 for that case and 1.00 for the next ones.)"""
    import gc

    from transformers import LlamaForCausalLM

    micro = dataclasses.replace(w, layers=1)
    # in the measured dtype: reduced-precision kernels (oneDNN bf16/fp16 matmuls) make their
    # own one-time buffers, ~16 MiB that read as 0.78 of a bf16 peak when first made inside
    # the measurement
    model: Any = LlamaForCausalLM(micro.llama_config())
    model = model.to(dtype=DTYPES[w.param_dtype])
    opt: Any = build_optimizer(micro, model)
    if sharded(w):  # the same collectives and tiers: their one-time buffers
        from memopt.api import shard

        model, opt = shard(model, opt, **shard_kwargs(w))
    x = torch.randint(0, micro.vocab, (w.batch_size, w.seq_len))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    close = getattr(opt, "close", None)
    if callable(close):  # give the tiers (and their files) back before the measured run
        close()
    del model, opt
    gc.collect()


def _activations(model: torch.nn.Module, policy: str, the_plan: Any = None) -> Any:
    """Install ``the_plan``, else ``policy`` on every block, with memopt.activations (None for
    "keep")."""
    from memopt.activations import ActivationPolicy, apply, find_blocks

    if the_plan is not None:
        return apply(model, the_plan)
    if policy == "keep":
        return None

    plan = {name: ActivationPolicy(action=policy) for name, _ in find_blocks(model)}  # type: ignore[arg-type]
    return apply(model, plan)
