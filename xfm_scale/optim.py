"""The method's optimiser: AdamW (0.9, 0.98), decay 0.01 except on norms/biases/tokens/bias tables,
lr x2 for newly initialised parameters, linear warm-up then linear or cosine decay.
Which Adam implementation runs is decided once, in :mod:`xfm_scale.kernels`, and logged."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from xfm_scale import kernels
from xfm_scale.run_config import OptimSection

log = logging.getLogger(__name__)

# Parameters that are tokens or lookup tables rather than weights of a projection: no decay
# (BEiT/timm's no_weight_decay list), like every 1-D parameter (biases, norm weights, gammas).
NO_DECAY_NAMES = ("cls_token", "mask_token", "relative_position_bias_table", "itc.temp")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # ds_shape: under ZeRO-3 the local tensor is a flat partition; the full shape is kept there.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) <= 1 or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Four groups: (pretrained | new) x (decay | no decay), with their lr scale."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = name.split(".")[0] not in cfg.pretrained_modules
        groups.setdefault((new, _no_decay(name, param)), []).append(param)
    out = []
    for (new, no_decay), params in sorted(groups.items()):
        scale = cfg.new_param_lr_scale if new else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "lr": cfg.lr * scale, "lr_scale": scale,
                    "name": f"{'new' if new else 'pretrained'}/{'no_decay' if no_decay else 'decay'}"})
    return out


def build_optimizer(groups: list[dict], cfg: OptimSection, cpu_offload: bool) -> torch.optim.Optimizer:
    """Apex FusedAdam / torch's fused AdamW by kernels.choice(); DeepSpeedCPUAdam when
    ZeRO offloads optimizer states to CPU (DeepSpeed expects it there)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    choice = kernels.choice().optimizer
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        choice = "deepspeed.ops.adam.DeepSpeedCPUAdam"
        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    elif choice.startswith("apex"):
        from apex.optimizers import FusedAdam

        optimizer = FusedAdam(groups, adam_w_mode=True, **kw)
    else:  # fused: one pass over each tensor instead of one per operation
        optimizer = torch.optim.AdamW(groups, fused=True, **kw)
    log.info("optimizer: %s", choice)
    optimizer.xfm_implementation = choice
    return optimizer


def lr_multiplier(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Factor on the peak lr after ``step`` optimizer steps (LambdaLR convention)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
