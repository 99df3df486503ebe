"""Pre-training heads. Legend: B batch, L tokens, M predicted positions, D width, Vl vocab rows
on this TP rank, E ITC width."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel as tp
from torch import nn

from xfm_scale.model import kernels
from xfm_scale.batch import IGNORE_INDEX
from xfm_scale.model.layers import NormalLinear, data_parallel_group, mark_tensor_parallel, tp_rank, tp_size


class MLMHead(nn.Module):
    """RoBERTa/BERT LM head: dense -> GELU -> LayerNorm -> decoder tied to the (vocab-parallel) word
    embedding, plus a vocab-parallel bias. Logits stay split over TP ranks; megatron's
    vocab_parallel_cross_entropy reduces across them.

    ``detach_decoder``: the fusion encoder's head reads the language encoder's embedding as a frozen
    output vocabulary, so IMLM sends no gradient into the language encoder (technique 1) and the model
    stays at the reference's size (no second V x D matrix)."""

    def __init__(self, hidden: int, eps: float, padded_vocab: int, vocab_size: int,
                 word_embedding: nn.Module, *, detach_decoder: bool, std: float, dtype: torch.dtype):
        super().__init__()
        self.dense = NormalLinear(hidden, hidden, std=std, dtype=dtype)
        self.layer_norm = kernels.LayerNorm(hidden, eps, dtype)
        local = padded_vocab // tp_size()
        self.bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local, dtype=dtype)), partition_dim=0)
        self.detach_decoder = detach_decoder
        # Tied, not a submodule: the embedding has one owner (the text encoder) in the state dict.
        object.__setattr__(self, "tied_embedding", word_embedding)
        first = tp_rank() * local
        self.register_buffer("is_padding_row", torch.arange(first, first + local) >= vocab_size, persistent=False)

    def forward(self, hidden_BLD: torch.Tensor, labels_BL: torch.Tensor, predict: bool = False) -> torch.Tensor:
        """Mean cross-entropy over the masked positions (labels != -100); with ``predict``, the
        arg-max token id at each of those positions instead (MLM accuracy). Called through forward
        so ZeRO-3 gathers this head's parameters (the tied embedding is registered by the engine)."""
        selected = labels_BL.ne(IGNORE_INDEX)
        logits_MV = self._logits(hidden_BLD[selected])
        if predict:
            return self._argmax(logits_MV)
        per_token = tp.vocab_parallel_cross_entropy(logits_MV.float(), labels_BL[selected])
        return global_token_mean(per_token)

    def _logits(self, hidden_MD: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [M, Vl]; rows past the real vocabulary are -inf."""
        h_MD = self.layer_norm(F.gelu(self.dense(hidden_MD)))
        h_MD = tp.copy_to_tensor_model_parallel_region(h_MD)  # identity forward, all-reduce of grad
        weight_VD = self.tied_embedding.weight
        if self.detach_decoder:
            weight_VD = weight_VD.detach()
        logits_MV = F.linear(h_MD, weight_VD) + self.bias
        return logits_MV.masked_fill(self.is_padding_row, float("-inf"))

    @staticmethod
    def _argmax(logits_MV: torch.Tensor) -> torch.Tensor:
        """Global arg-max over vocab-parallel logits: each rank's best, then the best of those."""
        best, index = logits_MV.max(dim=-1)
        index = index + tp_rank() * logits_MV.shape[-1]
        if tp_size() == 1:
            return index
        # A plain all_gather over the TP group: megatron's gather_from_tensor_model_parallel_region
        # asks for the CUDA device and fails on CPU.
        from megatron.core import parallel_state as ps

        local = torch.stack([best.float(), index.float()], -1)  # [M, 2]
        parts = [torch.empty_like(local) for _ in range(tp_size())]
        dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
        pairs = torch.stack(parts, dim=1)  # [M, TP, 2]
        winner = pairs[..., 0].argmax(dim=-1, keepdim=True)
        return pairs[..., 1].gather(-1, winner).squeeze(-1).long()


def global_token_mean(per_token_M: torch.Tensor) -> torch.Tensor:
    """Sum of this rank's token losses over the data-parallel-global token count, times the DP size:
    after the engine averages gradients over DP ranks, that is the mean over every masked token of
    the global batch, whatever the split of tokens between ranks (a per-rank mean would weight a
    rank's tokens by 1/its count)."""
    count = torch.tensor([float(per_token_M.numel())], device=per_token_M.device)
    group, world = data_parallel_group(), 1
    if group is not None:
        world = dist.get_world_size(group)
        dist.all_reduce(count, group=group)
    return per_token_M.sum() * world / count.clamp_min(1.0).squeeze()


class ContrastiveHead(nn.Module):
    """ITC projections to E (L2-normalised) and the learnable temperature."""

    def __init__(self, text_width: int, image_width: int, embed_dim: int, temperature: float,
                 bounds: tuple[float, float], std: float, dtype: torch.dtype):
        super().__init__()
        self.text_proj = NormalLinear(text_width, embed_dim, std=std, dtype=dtype)
        self.vision_proj = NormalLinear(image_width, embed_dim, std=std, dtype=dtype)
        # shape [1], not a scalar: ZeRO-3 broadcasts parameters as bytes, which a 0-dim tensor cannot be
        self.temp = nn.Parameter(torch.full((1,), temperature, dtype=dtype))
        self.bounds = bounds

    def forward(self, image_pooled_BD: torch.Tensor | None, text_cls_BD: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(image features, text features, temperature); either input may be None."""
        image = F.normalize(self.vision_proj(image_pooled_BD), dim=-1) if image_pooled_BD is not None else None
        text = F.normalize(self.text_proj(text_cls_BD), dim=-1) if text_cls_BD is not None else None
        # Clamped functionally: the reference clamps the parameter in place inside forward, which
        # under ZeRO-3 would write into a gathered copy that is then discarded.
        return image, text, self.temp.clamp(*self.bounds)


def itm_head(width: int, std: float, dtype: torch.dtype) -> nn.Sequential:
    """X-VLM's 2-way MLP on the fusion [CLS]: Linear(D, 2D), LayerNorm, GELU, Linear(2D, 2)."""
    return nn.Sequential(NormalLinear(width, 2 * width, std=std, dtype=dtype),
                         nn.LayerNorm(2 * width, dtype=dtype), nn.GELU(),
                         NormalLinear(2 * width, 2, std=std, dtype=dtype))
