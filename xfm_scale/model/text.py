"""The language encoder: a post-LN BERT/RoBERTa stack on megatron TP layers.

Parameter names follow transformers' modules closely enough that export/import is a rename plus a
QKV split (see tp_layout and the export tools). Legend: B batch, L tokens, D width.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel as tp
from torch import nn

from xfm_scale.model import kernels
from xfm_scale.config import TextEncoderConfig, TransformerConfig
from xfm_scale.model.layers import MLP, NormalEmbedding, SelfAttention, normal_init, padding_mask, run_blocks


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, padded_vocab: int, mp_config, std: float):
        super().__init__()
        self.flavour = cfg.flavour
        self.pad_token_id = cfg.pad_token_id
        # Vocab-parallel: each TP rank holds padded_vocab / TP rows; outputs are all-reduced.
        self.word_embeddings = tp.VocabParallelEmbedding(padded_vocab, cfg.hidden_size,
                                                         init_method=normal_init(std), config=mp_config)
        pad_idx = cfg.pad_token_id if cfg.flavour == "roberta" else None
        dtype = mp_config.params_dtype
        self.position_embeddings = NormalEmbedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                   std=std, dtype=dtype, padding_idx=pad_idx)
        self.token_type_embeddings = NormalEmbedding(cfg.type_vocab_size, cfg.hidden_size, std=std, dtype=dtype)
        self.norm = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def position_ids(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        if self.flavour == "roberta":
            # RoBERTa counts positions over non-pad tokens, starting after the pad id.
            not_pad = input_ids_BL.ne(self.pad_token_id).long()
            return torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        return torch.arange(input_ids_BL.shape[1], device=input_ids_BL.device).expand_as(input_ids_BL)

    def forward(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        x_BLD = (self.word_embeddings(input_ids_BL)
                 + self.position_embeddings(self.position_ids(input_ids_BL))
                 + self.token_type_embeddings(torch.zeros_like(input_ids_BL)))
        return self.dropout(self.norm(x_BLD))


class PostLNBlock(nn.Module):
    """BERT layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: TransformerConfig, mp_config, std: float):
        super().__init__()
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, bias="qkv", dropout=cfg.attention_dropout,
                                  config=mp_config, std=std)
        self.attn_norm = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, mp_config.params_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, config=mp_config, std=std)
        self.mlp_norm = kernels.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, mp_config.params_dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x_BLD: torch.Tensor, mask_B11L: torch.Tensor) -> torch.Tensor:
        x_BLD = self.attn_norm(x_BLD + self.dropout(self.attn(x_BLD, mask_B11L)))
        return self.mlp_norm(x_BLD + self.dropout(self.mlp(x_BLD)))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, padded_vocab: int, mp_config, std: float):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg, padded_vocab, mp_config, std)
        self.blocks = nn.ModuleList(PostLNBlock(cfg, mp_config, std) for _ in range(cfg.num_layers))

    def forward(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, L, D]."""
        x_BLD = self.embeddings(input_ids_BL)
        return run_blocks(self.blocks, self.cfg.checkpointed_blocks, x_BLD, padding_mask(attention_mask_BL))
