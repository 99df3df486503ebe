"""Loss functions that need more than a line. Legend: B local batch, G global batch (over
data-parallel ranks), E feature width, M masked patches, D width."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithLocalGrad(torch.autograd.Function):
    """All-gather over the data-parallel group; the backward returns only this rank's slice of the
    incoming gradient (the X-VLM/X-FM AllGather): each rank computes the same global loss, so the
    data-parallel gradient average over ranks is the gradient of that global loss."""

    @staticmethod
    def forward(ctx, x_BE: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x_BE) for _ in range(world)]
        dist.all_gather(parts, x_BE.contiguous(), group=group)
        ctx.rank, ctx.local = dist.get_rank(group), x_BE.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_GE: torch.Tensor):
        return grad_GE[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local], None


def gather_with_local_grad(x_BE: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x_BE
    return _GatherWithLocalGrad.apply(x_BE, group)


def contrastive_loss(image_feat_BE: torch.Tensor, text_feat_BE: torch.Tensor, temp: torch.Tensor,
                     group=None) -> torch.Tensor:
    """Symmetric InfoNCE over features gathered from all data-parallel ranks."""
    image_GE = gather_with_local_grad(image_feat_BE, group)
    text_GE = gather_with_local_grad(text_feat_BE, group)
    logits_GG = image_GE @ text_GE.t() / temp
    labels = torch.arange(logits_GG.shape[0], device=logits_GG.device)
    return (F.cross_entropy(logits_GG.float(), labels) + F.cross_entropy(logits_GG.t().float(), labels)) / 2


@torch.no_grad()
def sample_hard_negatives(image_feat_BE: torch.Tensor, text_feat_BE: torch.Tensor,
                          temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair, one negative image (for its text) and one negative text (for its image), drawn
    from the ITC softmax over the local batch with the positive excluded. Draws from the default
    generator, which is identical on all TP ranks, so every TP rank picks the same negatives."""
    sim_i2t_BB = (image_feat_BE @ text_feat_BE.t() / temp).float()
    weights_t2i = F.softmax(sim_i2t_BB.t(), dim=1) + 1e-5
    weights_i2t = F.softmax(sim_i2t_BB, dim=1) + 1e-5
    weights_t2i.fill_diagonal_(0)
    weights_i2t.fill_diagonal_(0)
    neg_image_for_text = torch.multinomial(weights_t2i, 1).squeeze(1)
    neg_text_for_image = torch.multinomial(weights_i2t, 1).squeeze(1)
    return neg_image_for_text, neg_text_for_image


def mim_loss(pred_BND: torch.Tensor, target_BND: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
    """MSE over masked patch tokens + MSE between the pooled vectors (token 0)."""
    patches = F.mse_loss(pred_BND[:, 1:][mask_BP].float(), target_BND[:, 1:][mask_BP].float())
    pooled = F.mse_loss(pred_BND[:, 0].float(), target_BND[:, 0].float())
    return patches + pooled
