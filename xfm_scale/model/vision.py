"""The vision encoder: a pre-LN BEiT-v2 ViT on megatron TP layers, in timm's ``Beit`` layout.

Relative position bias per block (no absolute positions), layer scale, drop-path, a learned mask
token for MIM. Output of :meth:`VisionEncoder.forward`: tokens [B, 1+P, D] where index 0 is the
pooled vector ``fc_norm(mean(patch tokens))`` (timm's avg-pool head for ``beitv2_*``, one norm)
and 1.. are the patch tokens as timm's ``forward_features`` returns them (its ``norm`` is Identity
under avg pooling). The reference X-FM pools ``fc_norm(norm(x))`` (two norms), which timm cannot load
unmodified; we keep timm's form so the export loads as-is (the fusion encoder normalises incoming
image tokens itself). Legend: B batch, P patches, N=1+P tokens, D width, Hl heads on this rank.
"""
from __future__ import annotations

import math

import torch
from timm.models.beit import gen_relative_position_index
from torch import nn

from xfm_scale.model import kernels
from xfm_scale.config import VisionEncoderConfig
from xfm_scale.model.layers import MLP, SelfAttention, layer_scale_init, mark_tensor_parallel, run_blocks, tp_size


class RelativePositionBias(nn.Module):
    """BEiT's learned bias per (relative offset, head); the table is split over TP ranks by head."""

    def __init__(self, grid: int, num_heads: int, dtype: torch.dtype):
        super().__init__()
        num_relative = (2 * grid - 1) ** 2 + 3  # offsets + cls->patch, patch->cls, cls->cls
        self.relative_position_bias_table = mark_tensor_parallel(
            nn.Parameter(torch.zeros(num_relative, num_heads // tp_size(), dtype=dtype)), partition_dim=1)
        # timm's index (the library's own function keeps the export layout exact).
        self.register_buffer("relative_position_index", gen_relative_position_index((grid, grid)),
                             persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias_NNH = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias_NNH.permute(2, 0, 1).unsqueeze(0)  # [1, Hl, N, N]


class DropPath(nn.Module):
    """Stochastic depth as timm's ``DropPath`` (drop whole samples' residual branch, scale by
    1/keep), with the rate held in a tensor buffer.

    Why not timm's: it keeps the rate as a Python float, and BEiT gives every block its own rate.
    torch 2.14's dynamo guarded on each float: compiled ``base`` blocks recompiled once per block
    and stopped at its recompile limit (8), leaving the deeper blocks eager. As a tensor the rate
    is an input of one graph that serves every block. Every block of an encoder with a non-zero
    rate has one (the first, at rate 0, draws a mask that keeps everything), so all blocks share
    the graph. Under ZeRO-3's ``zero.Init`` with bf16, DeepSpeed creates the buffer in bf16: the
    rates are rounded to bf16 (0.1 -> 0.1001), a negligible change to a regularisation rate."""

    def __init__(self, rate: float):
        super().__init__()
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate.float()
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        kept = (torch.rand(shape, device=x.device) < keep).to(x.dtype)
        return x * kept / keep.to(x.dtype)


class PreLNBlock(nn.Module):
    """BEiT block: x += drop_path(gamma_1 * attn(norm1(x))); x += drop_path(gamma_2 * mlp(norm2(x)))."""

    def __init__(self, cfg: VisionEncoderConfig, layer_id: int, drop_path: float, mp_config, std: float):
        super().__init__()
        dtype = mp_config.params_dtype
        # BEiT rescales the residual output projections by depth (its fix_init_weight).
        out_std = std / math.sqrt(2.0 * (layer_id + 1))
        self.norm1 = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, bias="qv", dropout=cfg.attention_dropout,
                                  config=mp_config, std=std, out_std=out_std)
        self.rel_pos = RelativePositionBias(cfg.grid_size, cfg.num_heads, dtype)
        self.gamma_1 = layer_scale_init(cfg.hidden_size, cfg.layer_scale_init, dtype)
        self.norm2 = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, config=mp_config, std=std, out_std=out_std)
        self.gamma_2 = layer_scale_init(cfg.hidden_size, cfg.layer_scale_init, dtype)
        self.drop_path = DropPath(drop_path) if cfg.drop_path_rate > 0 else nn.Identity()
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm1(x_BND), self.rel_pos().to(x_BND.dtype))
        x_BND = x_BND + self.drop_path(self.gamma_1 * self.dropout(attn))
        return x_BND + self.drop_path(self.gamma_2 * self.dropout(self.mlp(self.norm2(x_BND))))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size, dtype=dtype)

    def forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels_BCHW).flatten(2).transpose(1, 2)  # [B, P, D]


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig, mp_config, std: float):
        super().__init__()
        self.cfg = cfg
        dtype = mp_config.params_dtype
        self.patch_embed = PatchEmbed(cfg, dtype)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size, dtype=dtype))
        self.mask_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size, dtype=dtype))
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.trunc_normal_(self.mask_token, std=std)
        rates = [cfg.drop_path_rate * i / max(cfg.num_layers - 1, 1) for i in range(cfg.num_layers)]
        self.blocks = nn.ModuleList(PreLNBlock(cfg, i, rates[i], mp_config, std) for i in range(cfg.num_layers))
        self.fc_norm = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def forward(self, pixels_BCHW: torch.Tensor, mim_mask_BP: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, 1+P, D]: pooled vector at 0, patch tokens after. Masked patches (MIM) are
        replaced by the learned mask token before the blocks."""
        x_BPD = self.patch_embed(pixels_BCHW.to(self.cls_token.dtype))
        if mim_mask_BP is not None:
            w_BP1 = mim_mask_BP.unsqueeze(-1).to(x_BPD.dtype)
            x_BPD = x_BPD * (1 - w_BP1) + self.mask_token * w_BP1
        x_BND = torch.cat([self.cls_token.expand(x_BPD.shape[0], -1, -1), x_BPD], dim=1)
        x_BND = run_blocks(self.blocks, self.cfg.checkpointed_blocks, x_BND)
        patches_BPD = x_BND[:, 1:]
        pooled_BD = self.fc_norm(patches_BPD.mean(dim=1))
        return torch.cat([pooled_BD.unsqueeze(1), patches_BPD], dim=1)
