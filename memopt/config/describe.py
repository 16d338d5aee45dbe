"""``Setup.describe()``: a few plain lines saying what ``memopt.setup`` built and where it lives.

Parameters and their bytes; the optimizer's settings (the Config's: a resume re-applies them
over the snapshot's, see ``memopt.config.resume``), its low-rank groups and the state bytes; the
sharding stage as it runs (``build.effective_stage``) with the master dtype and offload tier;
the activation policy per block (or the plan's budget and prediction); the LR schedule; the
checkpoint directory; the resume point when there is one (or, with resume off, the snapshots
already in the directory).
"""

from __future__ import annotations

from typing import Any

from memopt.config.build import default_rank, effective_stage
from memopt.memory import fmt_bytes


def _params(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{n / 1e6:.2f}M parameters ({fmt_bytes(nbytes)})"


def _live(s: Any, key: str, default: Any) -> Any:
    """``key`` of the first param group holding it: what runs (a resume keeps the snapshot's
    rank, density and state dtype, which its saved state is built on: memopt.config.resume)."""
    return next((g[key] for g in s.optimizer.param_groups if g.get(key) is not None), default)


def _optimizer(s: Any) -> str:
    oc = s.config.optimizer  # (lr, betas, wd: the Config's, re-applied on resume)
    text = f"{oc.name} lr {oc.lr:g} betas {tuple(oc.betas)} wd {oc.weight_decay:g}"
    if oc.name == "frugal":
        text += f", density {_live(s, 'density', oc.density):g} on '{oc.target}'"
    elif oc.name != "adamw":
        rank = _live(s, "rank", oc.rank if oc.rank is not None else default_rank(oc.name))
        text += f", rank {rank} on '{oc.target}', projection every {oc.update_proj_gap} steps"
    state_dtype = _live(s, "state_dtype", None)
    if state_dtype is not None:
        text += f", {state_dtype} moments"
    if oc.in_backward:
        text += ", updates inside backward"
    return text


def _sharding(s: Any) -> str:
    sc = s.config.sharding
    stage = effective_stage(sc)  # what memopt.setup built (build.shard_config)
    if stage == 0:
        return f"none (DDP over {s.world_size} ranks)" if s.world_size > 1 else "none (1 rank)"
    text = f"ZeRO-{stage} over {s.world_size} rank(s)"
    if sc.stage == 0:
        why = [w for w, on in (("an offload tier", sc.offload != "none"),
                               ("a master dtype", sc.master_dtype != "auto")) if on]
        text += f" (stage 0 with {' and '.join(why)} runs as stage 1)"
    if sc.master_dtype != "auto":
        text += f", {sc.master_dtype} master weights"
    if sc.offload != "none":
        text += f", optimizer state on {sc.offload}"
        if sc.offload == "nvme":
            text += f" ({sc.nvme_path})"
    if sc.offload_params == "cpu":
        text += ", parameters, gradients and optimizer state on the CPU"
    elif sc.offload_params == "nvme":
        text += f", parameter shards on nvme ({sc.nvme_path}), read ahead of each unit"
    return text


def _activations(s: Any) -> str:
    ac = s.config.activations
    if s.activations is None:
        return "keep (plain PyTorch)"
    if s.plan is not None:
        acts: dict[str, int] = {}
        for d in s.plan.decisions:
            acts[d.policy.describe()] = acts.get(d.policy.describe(), 0) + 1
        counts = ", ".join(f"{k} x{v}" for k, v in acts.items())
        return (f"planner, budget {ac.budget} ({fmt_bytes(s.plan.budget_bytes)}): {counts}; "
                f"predicted peak {fmt_bytes(s.plan.predicted_peak_bytes)}")
    labels = sorted({p.describe() for p in s.activations.policies.values()})
    return f"{', '.join(labels)} on {len(s.activations.policies)} block(s)"


def _checkpoint(s: Any) -> str:
    ck = s.config.checkpoint
    if not ck.directory:
        text = "off"
    else:
        every = f"every {ck.every_n_steps} steps" if ck.every_n_steps else "at the end"
        text = f"{ck.directory} {every}, keep {ck.keep}"
    if s.redundancy is None:
        return text
    if ck.redundancy == "erasure":
        return text + f", erasure-coded across peers' host memory (m={ck.erasure_m})"
    return text + f", {ck.copies} peer replica(s) in host memory"


def describe_setup(s: Any) -> str:
    """The text of ``Setup.describe()``."""
    import memopt.optim as mo

    oc = s.config.optimizer
    try:
        state = fmt_bytes(mo.state_bytes(getattr(s.optimizer, "inner", s.optimizer)).total)
    except Exception:  # state_bytes only knows memopt optimizers; the line is informative
        state = "n/a"
    lines = [
        f"model        {_params(s.raw_model)} on {s.device}, {s.config.model.dtype}"
        + (f", weights from {s.config.model.init_from}" if s.config.model.init_from else ""),
        f"optimizer    {_optimizer(s)}; state now {state}",
        f"schedule     {oc.schedule}, warm-up {oc.warmup_steps} steps, clip "
        f"{oc.max_grad_norm if oc.max_grad_norm is not None else 'off'}",
        f"sharding     {_sharding(s)}",
        f"activations  {_activations(s)}",
        f"checkpoint   {_checkpoint(s)}",
    ]
    if s.resume_message:
        lines.append(f"resume       {s.resume_message}")
    return "\n".join(lines)
