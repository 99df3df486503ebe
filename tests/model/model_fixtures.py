"""Deterministic tiny configs and micro-batches shared by the model tests (single and multi-rank)."""
from __future__ import annotations

import torch

from xfm_scale.batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch
from xfm_scale.config import XFMConfig


def tiny_config(dropout: bool = False, **overrides) -> XFMConfig:
    cfg = XFMConfig.from_preset("tiny", **overrides)
    if not dropout:
        for enc in (cfg.text, cfg.vision, cfg.fusion):
            enc.hidden_dropout = enc.attention_dropout = 0.0
        cfg.vision.drop_path_rate = 0.0
    else:
        cfg.vision.drop_path_rate = 0.1
    return cfg


def _text(g: torch.Generator, cfg: XFMConfig, B: int, L: int, mask_prob: float):
    ids = torch.randint(5, cfg.text.vocab_size, (B, L), generator=g)
    ids[:, 0] = 0
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, cfg.text.pad_token_id)
    chosen = (torch.rand(B, L, generator=g) < mask_prob) & (mask == 1)
    chosen[:, 0] = False
    chosen[:, 1] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    masked = torch.where(chosen, torch.full_like(ids, 4), ids)
    return ids, mask, masked, labels


def _pixels_and_mask(g: torch.Generator, cfg: XFMConfig, B: int):
    pixels = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    P, k = cfg.vision.num_patches, cfg.objectives.mim_num_masked
    order = torch.stack([torch.randperm(P, generator=g) for _ in range(B)])
    mim = torch.zeros(B, P, dtype=torch.bool).scatter_(1, order[:, :k], True)
    return pixels, mim


def batches(cfg: XFMConfig, seed: int = 0, B: int = 4) -> list:
    """One text, one image and one pair micro-batch, identical in every process for a seed."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.objectives.caption_max_length
    _, tmask, tmasked, tlabels = _text(g, cfg, B, cfg.objectives.text_max_length, 0.15)
    ipix, imim = _pixels_and_mask(g, cfg, B)
    cids, cmask, cmasked, clabels = _text(g, cfg, B, L, 0.5)
    ppix, pmim = _pixels_and_mask(g, cfg, B)
    return [TextBatch(input_ids_BL=tmasked, attention_mask_BL=tmask, mlm_labels_BL=tlabels),
            ImageBatch(pixel_values_BCHW=ipix, mim_mask_BP=imim),
            PairBatch(pixel_values_BCHW=ppix, caption_ids_BL=cids, caption_mask_BL=cmask,
                      imlm_input_ids_BL=cmasked, imlm_labels_BL=clabels, mim_mask_BP=pmim)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    denom = expected.float().norm().item()
    diff = (actual.float() - expected.float()).norm().item()
    return diff / denom if denom > 0 else diff
