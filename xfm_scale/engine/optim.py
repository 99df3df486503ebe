"""The method's optimiser: AdamW (0.9, 0.98), decay 0.01 except on norms/biases (and, by
``optim.no_decay_rule``, tokens/gammas/bias tables/temperature), lr x2 for the parameters
``optim.lr_x2`` names, linear warm-up then linear or cosine decay.
Which Adam implementation runs is decided once, in :mod:`xfm_scale.model.kernels`, and logged."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from xfm_scale.model import kernels
from xfm_scale.config.run import OptimSection

log = logging.getLogger(__name__)

# Parameters that are tokens or lookup tables rather than weights of a projection: no decay
# (BEiT/timm's no_weight_decay list), like every 1-D parameter (biases, norm weights, gammas).
NO_DECAY_NAMES = ("cls_token", "mask_token", "relative_position_bias_table", "itc.temp")

# X-FM's create_optimizer (optim.py in zhangxinsong-nlp/XFM): no decay where the name contains one
# of these (a substring test). With xfm_scale's names it exempts every bias (the relative-position
# bias tables and the q/v biases too) and every norm (``*norm.weight``, ``layer_norm.*``), and
# decays the tokens, gammas, the temperature and ``itm_head.1.weight`` (a LayerNorm whose name has
# no "norm"), as the reference does.
REFERENCE_NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                                 "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
# X-FM's lr x2 set (XFMBase.init_params): the ITC projections, the temperature and the ITM head
# (also its box head, which xfm_scale has not, and text-encoder weights the roberta-base checkpoint
# lacks, its unused caption head; xfm_scale imports the whole of roberta-base's encoder and head).
REFERENCE_LR_X2_MODULES = ("itc", "itm_head")
LR_X2_CHOICES = ("reference", "new_modules")
NO_DECAY_CHOICES = ("reference", "xfm_scale")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # ds_shape: under ZeRO-3 the local tensor is a flat partition; the full shape is kept there.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) <= 1 or any(key in name for key in NO_DECAY_NAMES)


def _reference_no_decay(name: str) -> bool:
    return any(key in name for key in REFERENCE_NO_DECAY_SUBSTRINGS)


def _scaled(name: str, cfg: OptimSection) -> bool:
    module = name.split(".")[0]
    if cfg.lr_x2 == "reference":
        return module in REFERENCE_LR_X2_MODULES
    return module not in cfg.pretrained_modules


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """At most four groups: (lr x1 | lr x new_param_lr_scale) x (decay | no decay), in that order,
    with their lr scale. ``optim.lr_x2`` picks the scaled parameters, ``optim.no_decay_rule`` the
    undecayed ones. Group names: ``pretrained``/``new`` with ``lr_x2: new_modules`` (as before the
    switch), ``base_lr``/``lr_x2`` with ``reference``."""
    if cfg.lr_x2 not in LR_X2_CHOICES:
        raise ValueError(f"optim.lr_x2={cfg.lr_x2!r}: use one of {', '.join(LR_X2_CHOICES)}")
    if cfg.no_decay_rule not in NO_DECAY_CHOICES:
        raise ValueError(f"optim.no_decay_rule={cfg.no_decay_rule!r}: use one of {', '.join(NO_DECAY_CHOICES)}")
    labels = ("pretrained", "new") if cfg.lr_x2 == "new_modules" else ("base_lr", "lr_x2")
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = _reference_no_decay(name) if cfg.no_decay_rule == "reference" else _no_decay(name, param)
        groups.setdefault((_scaled(name, cfg), no_decay), []).append(param)
    out = []
    for (scaled, no_decay), params in sorted(groups.items()):
        scale = cfg.new_param_lr_scale if scaled else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "lr": cfg.lr * scale, "lr_scale": scale,
                    "name": f"{labels[scaled]}/{'no_decay' if no_decay else 'decay'}"})
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


def iteration_lr_multiplier(iteration: int, total_iterations: int, cfg: OptimSection) -> float:
    """Factor on the peak lr for every optimizer step of iteration ``iteration`` (0-based) in the
    per-modality schedule, as the reference's ``create_scheduler`` (a LambdaLR stepped once per
    iteration): ``k / warmup`` during warm-up, so iteration 0 runs at lr 0, then the decay of
    :func:`lr_multiplier` (linear to ``min_lr_ratio``; the reference's is 0) over the iterations
    after warm-up."""
    if cfg.warmup_steps and iteration < cfg.warmup_steps:
        return iteration / cfg.warmup_steps
    return lr_multiplier(max(iteration, cfg.warmup_steps), total_iterations, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection,
                    steps_per_iteration: int | None = None):
    """The LambdaLR DeepSpeed steps after each optimizer step. ``steps_per_iteration`` (the
    per-modality schedule: optimizer steps per iteration, ``total_steps`` then counts iterations):
    every step of iteration k gets :func:`iteration_lr_multiplier` of k."""
    if steps_per_iteration is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: iteration_lr_multiplier(step // steps_per_iteration, total_steps, cfg))
