"""Parameter counts per encoder and head, from a model built on the meta device (no memory)."""
from __future__ import annotations

import torch
from torch import nn

from xfm_scale.config import XFMConfig

HEADS = ("text_mlm_head", "fusion_mlm_head", "itc", "itm_head")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(config: XFMConfig) -> dict:
    """Counts at TP=1 (full shapes). Needs megatron parallel state (``distributed.initialize``)."""
    from xfm_scale.model.xfm import XFM

    with torch.device("meta"):
        model = XFM(config)
    heads = {name: _count(getattr(model, name)) for name in HEADS}
    return {
        "text_encoder": _count(model.text),
        "vision_encoder": _count(model.vision),
        "fusion_encoder": _count(model.fusion),
        "heads": heads,
        "heads_total": sum(heads.values()),
        "total": _count(model),
        "padded_vocab_size": config.padded_vocab_size(1),
    }
