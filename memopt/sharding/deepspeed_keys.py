"""The keys of a DeepSpeed 0.19 config that ``memopt.sharding.deepspeed_config`` knows: every key of
the ``zero_optimization`` block, each with what memopt does with it (mapped, matched, ignored),
and the top-level keys that mark a whole DeepSpeed config. Data only; the translation is in
``deepspeed_config``.
"""

from __future__ import annotations

from typing import Any

OFFLOAD_ISSUE = "issue 5 (offload tiers: pinned CPU, CXL, NVMe)"
BIG = 10**9  # DeepSpeed's "1e9" defaults

#: key -> (the value memopt's behavior corresponds to, what memopt does instead)
MATCHED: dict[str, tuple[Any, str]] = {
    "contiguous_gradients": (True, "memopt always packs gradients into contiguous buckets"),
    "reduce_scatter": (True, "memopt always reduces with reduce-scatter / reduce to the owner"),
    "allgather_partitions": (True, "memopt gathers updated parameters with all-gather/broadcast"),
    "ignore_unused_parameters": (True, "a parameter without a gradient contributes zeros"),
    "compute_grad_norm": (True, "sharded_opt.clip_grad_norm_ computes the global norm on call"),
}
#: key -> (DeepSpeed's default, why the key has no effect in memopt)
IGNORED: dict[str, tuple[Any, str]] = {
    "use_multi_rank_bucket_allreduce": (True, "memopt never all-reduces buckets"),
    "round_robin_gradients": (False, "an ordering for CPU-offloaded gradients; memopt has none"),
    "load_from_fp32_weights": (True, "checkpoints are memopt.checkpoint's, not DeepSpeed's"),
    "elastic_checkpoint": (False, "checkpoints are memopt.checkpoint's, not DeepSpeed's"),
    "sub_group_size": (BIG, "memopt steps each parameter's shard separately"),
    "legacy_stage1": (False, "memopt has one stage-1 implementation"),
    "parameter_alignment": (False, "memopt pads per parameter, not per flat partition"),
    "zero_hpz_partition_size": (1, "no hierarchical (ZeRO++ hpZ) partitioning"),
    "zero_quantized_weights": (False, "collectives run in the parameter dtype"),
    "zero_quantized_nontrainable_weights": (False, "collectives run in the parameter dtype"),
    "zero_quantized_gradients": (False, "collectives run in the gradient dtype"),
    "memory_efficient_linear": (True, "memopt does not replace nn.Linear"),
    "pipeline_loading_checkpoint": (False, "no pipeline-parallel loading"),
    "override_module_apply": (True, "memopt does not patch Module.apply"),
    "log_trace_cache_warnings": (False, "no DeepSpeed trace cache"),
    "enable_sanity_checks": (False, "use MEMOPT_DEBUG_COLLECTIVES=1 for collective checks"),
    "save_muon_momentum_buffer_in_memory": (False, "no DeepSpeed Muon"),
    "leaf_module": (None, "FSDP2 groups are chosen by memopt.sharding.FSDPOptions"),
    "mics_shard_size": (-1, "no MiCS sub-group sharding"),
    "mics_hierarchical_params_gather": (False, "no MiCS sub-group sharding"),
}
#: stage-3 knobs: read only under stage 3 (DeepSpeed itself ignores them below it)
STAGE3: dict[str, tuple[Any, str]] = {
    "stage3_prefetch_bucket_size": (5 * 10**7, "FSDP2 prefetches one group ahead, no budget"),
    "stage3_param_persistence_threshold": (10**5, "FSDP2 reshards every wrapped group"),
    "stage3_model_persistence_threshold": (None, "FSDP2 reshards every wrapped group"),
    "stage3_max_live_parameters": (BIG, "FSDP2 holds at most the current and next group"),
    "stage3_max_reuse_distance": (BIG, "FSDP2 reshards after each group's forward"),
    "stage3_module_granularity_threshold": (0, "FSDP2 groups are memopt's wrapping policy"),
    "stage3_use_all_reduce_for_fetch_params": (False, "FSDP2 all-gathers parameters"),
    "stage3_allgather_sequential": (False, "FSDP2 issues one all-gather per group"),
    "stage3_gather_16bit_weights_on_model_save": (False, "saving is memopt.checkpoint's"),
    "stage3_gather_fp16_weights_on_model_save": (False, "saving is memopt.checkpoint's"),
}
MAPPED = (
    "stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
    "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "zenflow",
)  # fmt: skip
SUPPORTED_KEYS: tuple[str, ...] = tuple(sorted({*MAPPED, *MATCHED, *IGNORED, *STAGE3}))
OFFLOAD_KEYS = {
    "offload_optimizer": ("device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read",
                          "pipeline_write", "fast_init", "ratio", "super_offload",
                          "cpuadam_cores_perc", "pipeline"),
    "offload_param": ("device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu",
                      "pin_memory"),
}  # fmt: skip
#: Offload tuning knobs with no counterpart in memopt (its pipeline sizes itself): warned.
OFFLOAD_TUNING = {
    "offload_optimizer": ("buffer_count", "pipeline_read", "pipeline_write", "fast_init",
                          "pipeline", "super_offload", "cpuadam_cores_perc"),
    "offload_param": ("buffer_count", "buffer_size", "max_in_cpu", "pin_memory"),
}  # fmt: skip
READ_TOP = ("zero_optimization", "bf16", "fp16", "bfloat16")

#: Top-level keys of a whole DeepSpeed config (runtime/config.py); a mapping with one of them
#: and no ``zero_optimization`` is a whole config without ZeRO, not a block.
TOP_LEVEL = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "aio", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
    "data_types", "checkpoint", "elasticity", "compile", "torch_autocast", "dump_state",
})  # fmt: skip
#: DeepSpeed's clip when a whole config has no ``gradient_clipping`` (GRADIENT_CLIPPING_DEFAULT)
DEFAULT_CLIP = 1.0
