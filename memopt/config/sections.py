"""The sections of ``memopt.Config``: frozen dataclasses, validated when built.

One section per part of memopt (optimizer, sharding with its offload tiers, activations,
checkpointing) plus the run-level sections a recipe needs (model, data, train). Every field
carries its documentation (``opt(default, doc)``), from which docs/config.md is generated.
Validation is eager: ``__post_init__`` coerces each field to its annotation (a bad value raises
``ValueError`` naming ``section.key``) and checks ranges and combinations, before any model,
optimizer or process group is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from memopt.config._fields import check_fields, numbers_in, opt, positive

OptimizerName = Literal["adamw", "galore", "natural_galore", "apollo", "apollo_mini", "frugal"]
LOW_RANK = ("galore", "natural_galore", "apollo", "apollo_mini")
ACTION_NAMES = ("keep", "recompute", "swap", "split", "sample")


@dataclass(frozen=True)
class OptimizerConfig:
    """``optimizer:`` the update rule, its low-rank groups, and the LR schedule."""

    name: OptimizerName = opt("adamw", "update rule (memopt.optim): AdamW, GaLore, Natural "
                              "GaLore, APOLLO, APOLLO-Mini or FRUGAL")
    lr: float = opt(1e-3, "peak learning rate")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas")
    eps: float | None = opt(None, "Adam epsilon (null: the optimizer's own default)")
    weight_decay: float = opt(0.0, "decoupled weight decay (matrices only; 1-D params never)")
    target: str = opt("attn|mlp", "regex over module names picking the low-rank (or FRUGAL "
                      "state-full subspace) matrices; 'all-linear' for every Linear but the head")
    rank: int | None = opt(None, "projection rank (null: 128 for GaLore/APOLLO, 1 for "
                           "APOLLO-Mini); ignored by AdamW and FRUGAL")
    density: float = opt(0.25, "FRUGAL: fraction of each target kept in the state-full subspace")
    update_proj_gap: int = opt(200, "steps between projection refreshes")
    scale: float | None = opt(None, "low-rank update scale (null: the optimizer's default: 0.25 "
                              "GaLore, 1 APOLLO, 128 APOLLO-Mini)")
    proj: str | None = opt(None, "projector name (memopt.optim.PROJECTORS; null: default)")
    state_dtype: Literal["auto", "float32", "int8", "int4"] = opt(
        "auto", "dtype of the Adam moments ('auto': the parameter's dtype)")
    matmul_dtype: Literal["auto", "bfloat16"] = opt(
        "auto", "dtype of the low-rank projection GEMMs ('auto': the gradient's; 'bfloat16': "
        "~3x faster GEMMs where the hardware has bf16 dot products, at bf16 rounding of the "
        "projected gradient and the update); not for AdamW or index projectors")
    in_backward: bool = opt(False, "update each parameter inside backward (optimizer-in-"
                            "backward); one process only: not with sharding, offload or "
                            "several DDP ranks (each rank would step on its local gradient)")
    max_grad_norm: float | None = opt(1.0, "global gradient-norm clip (null: off)")
    schedule: Literal["cosine", "constant"] = opt("cosine", "LR schedule after warm-up")
    warmup_steps: int = opt(0, "linear warm-up steps: step k (from 0) runs at lr * (k + 1) / "
                            "(warmup_steps + 1)")
    min_lr_ratio: float = opt(0.1, "cosine floor as a fraction of lr")

    def __post_init__(self) -> None:
        check_fields(self, "optimizer")
        positive(self, "optimizer", "lr", "rank", "update_proj_gap", "scale")
        positive(self, "optimizer", "weight_decay", "warmup_steps", "min_lr_ratio", zero_ok=True)
        positive(self, "optimizer", "eps", zero_ok=True)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(
                f"config key 'optimizer.betas' must each lie in [0, 1), got {self.betas}")
        if self.min_lr_ratio > 1.0:
            raise ValueError(
                f"config key 'optimizer.min_lr_ratio' is a fraction of lr in [0, 1], got "
                f"{self.min_lr_ratio}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(
                f"config key 'optimizer.density' must lie in (0, 1], got {self.density}")
        positive(self, "optimizer", "max_grad_norm")  # (null: no clipping)
        if self.name == "apollo_mini" and self.rank not in (None, 1):
            raise ValueError(
                f"config key 'optimizer.rank' is {self.rank} but apollo_mini is rank 1; set "
                f"rank: 1 (or null), or name: apollo for APOLLO at rank {self.rank}")
        if self.proj is not None:
            from memopt.optim import PROJECTORS

            known = [*PROJECTORS.names(), "block"]  # (block: FRUGAL's own mode)
            if self.proj not in known:
                raise ValueError(f"config key 'optimizer.proj' must be one of {known}, got "
                                 f"{self.proj!r}")


@dataclass(frozen=True)
class ShardingConfig:
    """``sharding:`` ZeRO stage, layout, master weights and the offload tiers."""

    stage: Literal[0, 1, 2, 3] = opt(0, "ZeRO stage: 0 none (DDP when >1 rank), 1 optimizer "
                                     "state, 2 + gradients, 3 + parameters (FSDP2)")
    layout: Literal["auto", "whole_tensor", "dim0"] = opt(
        "auto", "stages 1/2: whole tensors per rank or row shards ('auto': whole_tensor; "
        "stage 3 is always dim0)")
    master_dtype: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "dtype of the master weights the optimizer updates ('auto': the parameters'; "
        "at stage 0 a master dtype runs as stage 1, which on one rank is the plain update on "
        "master copies)")
    bucket_bytes: int = opt(25 << 20, "gradient reduce / gather bucket size", size=True)
    offload: Literal["none", "cpu", "nvme"] = opt(
        "none", "optimizer state tier (stage 0 is run as stage 1 on one rank; at stage 3 each "
        "unit's state is streamed through the step)")
    nvme_path: str | None = opt(None, "directory of the NVMe swap files (offload: nvme, "
                                "offload_params: nvme)")
    offload_params: Literal["none", "cpu", "nvme"] = opt(
        "none", "stage 3: 'cpu' keeps parameter shards, gradients and optimizer state on the "
        "CPU; 'nvme' keeps parameter shards in a file under nvme_path, read ahead of use")
    hybrid_update: bool = opt(False, "offload: update each group on the CPU or the device, by "
                              "measured rates (Deep Optimizer States); fp32-state AdamW only: "
                              "with a low-rank optimizer or int8 state it is an error")

    def __post_init__(self) -> None:
        check_fields(self, "sharding")
        positive(self, "sharding", "bucket_bytes")
        for key in ("offload", "offload_params"):
            if getattr(self, key) == "nvme" and not self.nvme_path:
                raise ValueError(f"config key 'sharding.nvme_path' is required with {key}: nvme")
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError("config key 'sharding.offload_params' needs sharding.stage: 3")
        if self.hybrid_update and self.stage == 3:
            raise ValueError("sharding.hybrid_update applies to stages 0-2 (ZeRO-Offload's "
                             "pipeline); set it to false at stage 3")
        if self.hybrid_update and self.offload == "none":
            raise ValueError("sharding.hybrid_update splits the offloaded optimizer step "
                             "between CPU and device: it needs sharding.offload cpu or nvme")


@dataclass(frozen=True)
class ActivationsConfig:
    """``activations:`` saved-activation policies, by planner budget or per block."""

    budget: str | None = opt(None, "run the planner under this budget of saved bytes "
                             "('6GiB', '512MB', '50%' of the unmanaged peak); null: no planner")
    actions: tuple[str, ...] = opt(("keep", "recompute", "swap", "split"),
                                   "what the planner may choose per block")
    policy: str | None = opt(None, "one action for every block (keep/recompute/swap/split/"
                             "sample) instead of the planner")
    policies: dict[str, str] = opt({}, "per-block actions by block name "
                                   "('model.layers.0': recompute); others keep. Override: "
                                   "activations.policies.model.layers.0=recompute")
    tier: Literal["cpu", "nvme"] = opt("cpu", "where swapped activations go")
    nvme_path: str | None = opt(None, "directory for tier: nvme")

    def __post_init__(self) -> None:
        check_fields(self, "activations")
        chosen = [k for k in ("budget", "policy") if getattr(self, k)] + (
            ["policies"] if self.policies else [])
        if len(chosen) > 1:
            raise ValueError(f"activations: set one of budget, policy, policies (got {chosen})")
        for where, action in [("policy", self.policy), *self.policies.items()]:
            if action is not None and action not in ACTION_NAMES:
                raise ValueError(f"activations.{where}={action!r}: choose one of {ACTION_NAMES}")
        bad = [a for a in self.actions if a not in ACTION_NAMES]
        if bad or not self.actions:
            raise ValueError(f"activations.actions={self.actions}: a subset of {ACTION_NAMES}")
        if self.tier == "nvme" and not self.nvme_path:
            raise ValueError("config key 'activations.nvme_path' is required with tier: nvme")
        if self.budget is not None:
            from memopt.activations.planner import parse_budget

            try:
                parse_budget(self.budget, 1 << 40)
            except (TypeError, ValueError) as e:
                raise ValueError(f"config key 'activations.budget': {e}") from None

    @property
    def enabled(self) -> bool:
        return bool(self.budget or self.policy or self.policies)


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint:`` asynchronous snapshots (memopt.checkpoint.AsyncCheckpointer)."""

    directory: str | None = opt(None, "snapshot directory (null: no snapshots)")
    every_n_steps: int = opt(0, "snapshot every N optimizer steps (0: only at the end)")
    keep: int = opt(3, "published snapshots kept")
    resume: bool = opt(True, "resume from the newest snapshot in directory when there is one "
                       "(a snapshot whose files fail their checksums is skipped with a warning "
                       "for the one before it, and the RESUMED line names it; the newest step "
                       "is whichever run wrote it: after a resume: false run "
                       "into a directory holding an earlier run's snapshots, the next resume may "
                       "pick the earlier run's, so give a fresh run a fresh directory). The "
                       "model, moments and step come from the snapshot; the optimizer's lr, "
                       "betas, eps, weight_decay, scale, update_proj_gap, matmul_dtype and the "
                       "schedule are the Config's (a change is reported); state_dtype, rank, "
                       "density and proj stay the snapshot's")
    redundancy: Literal["none", "replicate", "erasure"] = opt(
        "none", "also keep each rank's latest snapshot in peers' host memory (REFT; needs 2+ "
        "ranks and directory): 'replicate' whole copies on the next ranks, 'erasure' k + m "
        "Reed-Solomon parity over the ranks (needs zfec)")
    copies: int = opt(1, "redundancy: replicate: copies of each snapshot (survives that many "
                      "lost ranks)")
    erasure_k: int = opt(0, "redundancy: erasure: data blocks per stripe (0: world size - "
                         "erasure_m; k + m must equal the world size)")
    erasure_m: int = opt(1, "redundancy: erasure: parity blocks per stripe (survives that many "
                         "lost ranks)")
    fsync: bool = opt(True, "fsync before publishing (off only for throwaway runs)")

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        positive(self, "checkpoint", "keep")
        positive(self, "checkpoint", "every_n_steps", zero_ok=True)
        positive(self, "checkpoint", "copies")
        positive(self, "checkpoint", "erasure_m")
        positive(self, "checkpoint", "erasure_k", zero_ok=True)


PRESETS: dict[str, dict[str, int]] = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4),
    "llama-small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16),
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """``model:`` a random-init transformers LLaMA (no download)."""

    preset: Literal["llama-tiny", "llama-small", "llama-60m", "llama-350m"] = opt(
        "llama-tiny", "named size: tiny 64x2, small 128x4, 60m 512x8, 350m 1024x24 (hidden x "
        "layers)")
    overrides: dict[str, Any] = opt({}, "LlamaConfig keyword arguments over the preset "
                                    "(hidden_size, num_hidden_layers, ...)")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "dtype of the parameters and persistent buffers; "
                                         "non-persistent ones (RoPE inv_freq) keep theirs")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "'auto': cuda when available")
    init_from: str | None = opt(None, "a memopt snapshot directory whose newest model weights "
                                "initialise the model (fine-tuning); null: random init")

    def __post_init__(self) -> None:
        check_fields(self, "model")
        # A mapping of Any, so no field type coerces it: "1e-5" written in Python (or read by a
        # YAML 1.1 loader) is made the number it spells, as the typed keys do.
        object.__setattr__(self, "overrides", numbers_in(self.overrides))


@dataclass(frozen=True)
class DataConfig:
    """``data:`` text shipped with Python, byte-level tokens; or random tokens."""

    source: Literal["stdlib", "random"] = opt(
        "stdlib", "'stdlib': the interpreter's standard-library .py files as bytes (vocab 256);"
        " 'random': uniform tokens over the model's vocabulary")
    max_bytes: int = opt(2_000_000, "bytes of text read (stdlib)", size=True)

    def __post_init__(self) -> None:
        check_fields(self, "data")
        positive(self, "data", "max_bytes")


@dataclass(frozen=True)
class TrainConfig:
    """``train:`` the recipe loop's length, batch shape and logging."""

    steps: int = opt(20, "optimizer steps")
    batch_size: int = opt(4, "sequences per micro-batch per rank")
    seq_len: int = opt(128, "tokens per sequence")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    log_every: int = opt(1, "print a log line every N steps")
    seed: int = opt(0, "seed of the model init and the data order (each rank offsets it); "
                    "0 <= seed < 2**63")

    def __post_init__(self) -> None:
        check_fields(self, "train")
        positive(self, "train", "steps", "batch_size", "seq_len", "grad_accum", "log_every")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed takes 64 bits; ranks add 1000 * rank
            raise ValueError(f"config key 'train.seed' must lie in [0, 2**63), got {self.seed}")
