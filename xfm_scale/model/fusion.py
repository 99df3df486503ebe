"""The fusion encoder: post-LN blocks of self-attention over text, cross-attention to image tokens,
and an FFN (BERT's cross-attention layer). Legend: B batch, L text tokens, M image tokens,
D text width, C image width, U distinct images."""
from __future__ import annotations

import torch
from torch import nn

from xfm_scale.model import kernels
from xfm_scale.config import FusionEncoderConfig
from xfm_scale.model.layers import MLP, CrossAttention, SelfAttention, padding_mask, run_blocks


class FusionBlock(nn.Module):
    def __init__(self, cfg: FusionEncoderConfig, image_width: int, mp_config, std: float):
        super().__init__()
        D, eps, dtype = cfg.hidden_size, cfg.layer_norm_eps, mp_config.params_dtype
        self.self_attn = SelfAttention(D, cfg.num_heads, bias="qkv", dropout=cfg.attention_dropout,
                                       config=mp_config, std=std)
        self.self_norm = kernels.LayerNorm(D, eps, dtype)
        self.cross_attn = CrossAttention(D, image_width, cfg.num_heads, dropout=cfg.attention_dropout,
                                         config=mp_config, std=std)
        self.cross_norm = kernels.LayerNorm(D, eps, dtype)
        self.mlp = MLP(D, cfg.ffn_hidden_size, config=mp_config, std=std)
        self.mlp_norm = kernels.LayerNorm(D, eps, dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x_BLD: torch.Tensor, mask_B11L: torch.Tensor, image_UMC: torch.Tensor,
                image_index_B: torch.Tensor | None = None) -> torch.Tensor:
        x_BLD = self.self_norm(x_BLD + self.dropout(self.self_attn(x_BLD, mask_B11L)))
        x_BLD = self.cross_norm(x_BLD + self.dropout(self.cross_attn(x_BLD, image_UMC, image_index_B)))
        return self.mlp_norm(x_BLD + self.dropout(self.mlp(x_BLD)))


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionEncoderConfig, image_width: int, mp_config, std: float):
        super().__init__()
        self.cfg = cfg
        # The vision encoder returns timm's un-normalised patch tokens (see vision.py); this norm
        # plays the role of the reference's final `norm` on the tokens the fusion attends to.
        self.image_norm = kernels.LayerNorm(image_width, 1e-6, mp_config.params_dtype)
        self.blocks = nn.ModuleList(FusionBlock(cfg, image_width, mp_config, std) for _ in range(cfg.num_layers))

    def forward(self, text_BLD: torch.Tensor, text_mask_BL: torch.Tensor, image_UMC: torch.Tensor,
                image_index_B: torch.Tensor | None = None) -> torch.Tensor:
        """Text row b attends to image ``image_index_B[b]`` (to image b without an index). Several
        rows sharing an image cost its norm and K/V projections once (see CrossAttention)."""
        return run_blocks(self.blocks, self.cfg.checkpointed_blocks, text_BLD,
                          padding_mask(text_mask_BL), self.image_norm(image_UMC), image_index_B)
