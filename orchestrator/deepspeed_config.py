"""The DeepSpeed config, derived from the run config (never written by hand).

Only what DeepSpeed must know is here: batch sizes, ZeRO stage, precision, clipping. The
optimiser is a torch.optim object handed to `deepspeed.initialize` (an "optimizer" block would
JIT-compile DeepSpeed's CPU Adam, ~70 s), and the LR is set per step by the trainer.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig


def deepspeed_config(cfg: TrainConfig, world_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config for `cfg` at `world_size` workers (default: scaling's maximum);
    gradient accumulation keeps the reference global batch (ScalingConfig.accumulation)."""
    world = world_size or cfg.scaling.max_workers
    micro = cfg.data.batch_size
    accum, _ = cfg.scaling.accumulation(micro, world)
    precision = cfg.scaling.precision
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        # a torch.optim optimiser under ZeRO is "untested" to DeepSpeed; SGD and AdamW work.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints are noise
        "wall_clock_breakdown": False,
    }
    if precision != "fp32":
        # DeepSpeed casts every parameter (BN's too) but no buffer; BN then meets bf16 weights and
        # fp32 running statistics, which batch_norm rejects. Buffers follow the parameters instead.
        config["data_types"] = {"buffer_dtype": precision}
    return config
