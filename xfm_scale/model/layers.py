"""Tensor-parallel building blocks on megatron-core layers.

Legend: B batch, N query length, M key length, D width, H heads (Hl = H / TP on this rank),
d head width, F MLP width (Fl = F / TP).

Layout of a block across TP ranks (Megatron's): Q/K/V and the MLP's first projection are
ColumnParallelLinear (each rank holds whole heads / a slice of F, outputs stay split); the attention
output and the MLP's second projection are RowParallelLinear (partial sums all-reduced, bias added
once). Fused QKV uses ``stride=3``: the merged weight is the usual [q; k; v] stack (what
transformers and timm store), and each rank's shard is [q_r; k_r; v_r].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from xfm_scale.engine.megatron_compat import RowParallelLinear
from xfm_scale.model.hooks import HOOKS


def megatron_config(params_dtype: torch.dtype) -> ModelParallelConfig:
    """CPU initialisation: the full weight is drawn on CPU and then split, so a model built with the
    same seed has the same full weights at every TP size (and it is the only init that works on CPU)."""
    return ModelParallelConfig(tensor_model_parallel_size=tp_size(), use_cpu_initialization=True,
                               params_dtype=params_dtype, perform_initialization=True)


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0


def data_parallel_group():
    """The group ITC gathers over (and the trainer averages losses over); None in a single
    data-parallel replica."""
    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        return ps.get_data_parallel_group()
    return None


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int, stride: int = 1) -> nn.Parameter:
    """Tag a hand-made parameter with megatron's TP attributes (read by DeepSpeed's grad norm and by
    :mod:`xfm_scale.model.tp_layout` for merging)."""
    tp.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim, stride=stride)
    return param


def column(in_features: int, out_features: int, *, bias: bool, stride: int, config: ModelParallelConfig,
           std: float) -> tp.ColumnParallelLinear:
    return tp.ColumnParallelLinear(in_features, out_features, config=config, init_method=normal_init(std),
                                   bias=bias, gather_output=False, stride=stride)


def row(in_features: int, out_features: int, *, config: ModelParallelConfig, std: float) -> RowParallelLinear:
    return RowParallelLinear(in_features, out_features, config=config, init_method=normal_init(std),
                             bias=True, input_is_parallel=True, skip_bias_add=False)


def attend(q_BHNd: torch.Tensor, k_BHMd: torch.Tensor, v_BHMd: torch.Tensor,
           mask: torch.Tensor | None, dropout: float, training: bool) -> torch.Tensor:
    """SDPA over this rank's heads. Dropout here acts on head-partitioned probabilities, so it draws
    from the TP-region RNG stream (different per TP rank, restored by activation checkpointing)."""
    p = dropout if training else 0.0
    if p == 0.0:
        return F.scaled_dot_product_attention(q_BHNd, k_BHMd, v_BHMd, attn_mask=mask)
    return _attend_with_tensor_parallel_dropout(q_BHNd, k_BHMd, v_BHMd, mask, p)


# Swapping RNG streams (get/set_rng_state) cannot be traced by torch.compile: under compiled blocks
# this call runs eagerly between the block's compiled graphs (SDPA is one fused kernel anyway).
@torch.compiler.disable
def _attend_with_tensor_parallel_dropout(q_BHNd, k_BHMd, v_BHMd, mask, p: float) -> torch.Tensor:
    with HOOKS.tensor_parallel_rng():
        return F.scaled_dot_product_attention(q_BHNd, k_BHMd, v_BHMd, attn_mask=mask, dropout_p=p)


class SelfAttention(nn.Module):
    """Fused-QKV self-attention, heads split over TP ranks.

    ``bias="qkv"``: a bias on each of q, k, v (BERT/RoBERTa). ``bias="qv"``: separate ``q_bias`` and
    ``v_bias`` and no key bias (BEiT; timm's layout)."""

    def __init__(self, hidden: int, num_heads: int, *, bias: str, dropout: float,
                 config: ModelParallelConfig, std: float, out_std: float | None = None):
        super().__init__()
        self.heads_local = num_heads // tp_size()
        self.head_dim = hidden // num_heads
        self.dropout = dropout
        self.qkv = column(hidden, 3 * hidden, bias=(bias == "qkv"), stride=3, config=config, std=std)
        if bias == "qv":
            local = self.heads_local * self.head_dim
            self.q_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local, dtype=config.params_dtype)), 0)
            self.v_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local, dtype=config.params_dtype)), 0)
        else:
            self.q_bias = self.v_bias = None
        self.proj = row(hidden, hidden, config=config, std=out_std or std)

    def forward(self, x_BND: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x_BND.shape
        qkv, _ = self.qkv(x_BND)  # [B, N, 3 * Hl * d], laid out [q_r; k_r; v_r]
        if self.q_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = qkv.view(B, N, 3, self.heads_local, self.head_dim).permute(2, 0, 3, 1, 4)
        out_BHNd = attend(q, k, v, mask, self.dropout, self.training)
        out, _ = self.proj(out_BHNd.transpose(1, 2).reshape(B, N, self.heads_local * self.head_dim))
        return out


class CrossAttention(nn.Module):
    """Queries from the text stream, keys/values from image tokens (their own width), TP-split heads.

    Several text rows may attend to the same image (ITM's negatives and IMLM reuse the pair
    micro-batch's images): ``ctx_index_B`` then maps each of the B query rows to one of the U
    context rows, and the K/V projection runs once per context row, U rows instead of B. The keys
    and values of a row are the same either way, and autograd sums each context row's gradient
    over the query rows that used it."""

    def __init__(self, hidden: int, kv_width: int, num_heads: int, *, dropout: float,
                 config: ModelParallelConfig, std: float):
        super().__init__()
        self.heads_local = num_heads // tp_size()
        self.head_dim = hidden // num_heads
        self.dropout = dropout
        self.q = column(hidden, hidden, bias=True, stride=1, config=config, std=std)
        self.kv = column(kv_width, 2 * hidden, bias=True, stride=2, config=config, std=std)
        self.proj = row(hidden, hidden, config=config, std=std)

    def forward(self, x_BND: torch.Tensor, ctx_UMC: torch.Tensor, ctx_index_B: torch.Tensor | None = None
                ) -> torch.Tensor:
        B, N, _ = x_BND.shape
        M = ctx_UMC.shape[1]
        q, _ = self.q(x_BND)
        kv, _ = self.kv(ctx_UMC)  # [U, M, 2 * Hl * d]
        if ctx_index_B is not None:
            kv = kv.index_select(0, ctx_index_B)
        q = q.view(B, N, self.heads_local, self.head_dim).transpose(1, 2)
        k, v = kv.view(B, M, 2, self.heads_local, self.head_dim).permute(2, 0, 3, 1, 4)
        out_BHNd = attend(q, k, v, None, self.dropout, self.training)
        out, _ = self.proj(out_BHNd.transpose(1, 2).reshape(B, N, self.heads_local * self.head_dim))
        return out


class MLP(nn.Module):
    """Column-parallel up-projection, exact GELU, row-parallel down-projection."""

    def __init__(self, hidden: int, ffn: int, *, config: ModelParallelConfig, std: float,
                 out_std: float | None = None):
        super().__init__()
        self.fc1 = column(hidden, ffn, bias=True, stride=1, config=config, std=std)
        self.fc2 = row(ffn, hidden, config=config, std=out_std or std)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x_BND)
        out, _ = self.fc2(F.gelu(h))
        return out


def padding_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] 1/0 -> SDPA boolean mask [B, 1, 1, L] (True = attend)."""
    return attention_mask_BL.bool()[:, None, None, :]


def run_blocks(blocks: nn.ModuleList, checkpointed: int, x: torch.Tensor, *extra) -> torch.Tensor:
    """Apply blocks in order; the first ``checkpointed`` blocks' activations are recomputed in
    backward through the installed checkpoint hook (DeepSpeed's, which replays dropout RNG exactly)."""
    # Checkpoint only where backward will run: some input carries grad (fusion: the image tokens do
    # even when the text stream is detached). Otherwise nothing is saved for backward anyway.
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, *extra))):
        checkpointed = 0
    for index, block in enumerate(blocks):
        x = HOOKS.checkpoint(block, x, *extra) if index < checkpointed else block(x, *extra)
    return x


# Initialisation happens in each module's own reset_parameters, i.e. inside its __init__: under
# ZeRO-3's zero.Init a module's parameters are partitioned the moment its __init__ returns, so an
# init applied afterwards by a parent would silently touch an empty shard.
class NormalLinear(nn.Linear):
    """nn.Linear with N(0, std) weights and zero bias (BERT/BEiT init)."""

    def __init__(self, in_features: int, out_features: int, *, std: float, dtype: torch.dtype, bias: bool = True):
        object.__setattr__(self, "_init_std", std)
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self._init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalEmbedding(nn.Embedding):
    """nn.Embedding with N(0, std) rows (and a zero padding row when padding_idx is set)."""

    def __init__(self, num: int, dim: int, *, std: float, dtype: torch.dtype, padding_idx: int | None = None):
        object.__setattr__(self, "_init_std", std)
        super().__init__(num, dim, padding_idx=padding_idx, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self._init_std)
        self._fill_padding_idx_with_zero()


def layer_scale_init(dim: int, value: float, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.full((dim,), value, dtype=dtype))


__all__ = ["SelfAttention", "CrossAttention", "MLP", "padding_mask", "run_blocks", "megatron_config",
           "tp_size", "tp_rank", "mark_tensor_parallel", "NormalLinear", "NormalEmbedding",
           "layer_scale_init"]
