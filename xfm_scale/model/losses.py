"""Loss functions that need more than a line. Legend: B local batch, G global batch (over
data-parallel ranks), E feature width, M masked patches, D width."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithLocalGrad(torch.autograd.Function):
    """All-gather over the data-parallel group; backward keeps this rank's slice of the gradient.

    Every rank computes the same global loss L from the gathered features, so the gradient of the
    sum over ranks w.r.t. this rank's features is W x its slice; the engine then averages over the
    W data-parallel ranks, which leaves exactly dL/dtheta: the gradient a single rank holding the
    whole global batch would get. (X-VLM's AllGather returns the slice unscaled, i.e. 1/W of that
    gradient: the ITC step size would shrink as the cluster grows.)"""

    @staticmethod
    def forward(ctx, x_BE: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x_BE) for _ in range(world)]
        dist.all_gather(parts, x_BE.contiguous(), group=group)
        ctx.rank, ctx.local, ctx.world = dist.get_rank(group), x_BE.shape[0], world
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_GE: torch.Tensor):
        return grad_GE[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local] * ctx.world, None


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


def _key_seed(step_seed: int, key: str) -> int:
    return (zlib.crc32(key.encode()) * 1_000_003 + step_seed) % (2**63 - 1)


def _draw(weights_BB: torch.Tensor, keys: tuple[str, ...], salt: str, group: int) -> torch.Tensor:
    """One index per row from the row's weights (non-zero only inside the row's group of ``group``
    consecutive columns). With sample keys: Gumbel-max, with noise over the group's columns drawn
    from a generator keyed by (step seed, sample key), so the draw depends on the sample and its
    place in its group, not on the rank or the micro-batch size; without keys: the default generator."""
    if not keys:
        return torch.multinomial(weights_BB, 1).squeeze(1)
    B = weights_BB.shape[0]
    step_seed = torch.initial_seed()
    noise_BG = torch.stack([torch.rand(group, generator=torch.Generator().manual_seed(
        _key_seed(step_seed, salt + key))) for key in keys])
    first = (torch.arange(B) // group) * group  # first column of each row's group
    candidates_BG = first[:, None] + torch.arange(group)[None, :]
    gumbel_BG = -torch.log(-torch.log(noise_BG.clamp_min(1e-20))).to(weights_BB.device)
    scores_BG = weights_BB.gather(1, candidates_BG.to(weights_BB.device)).log() + gumbel_BG
    return candidates_BG.to(weights_BB.device).gather(1, scores_BG.argmax(dim=1, keepdim=True)).squeeze(1)


@torch.no_grad()
def sample_hard_negatives(image_feat_BE: torch.Tensor, text_feat_BE: torch.Tensor, temp: torch.Tensor,
                          sample_keys: tuple[str, ...] = (), group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair, one negative image (for its text) and one negative text (for its image), drawn
    from the ITC softmax with the positive excluded, among the pairs of its negative group:
    ``group`` consecutive rows of the micro-batch (0: the whole local micro-batch, as X-VLM).
    All TP ranks draw the same negatives (same keys, or the same default generator)."""
    B = image_feat_BE.shape[0]
    G = group or B
    if B % G:
        raise ValueError(f"objectives.itm_negative_group={G} must divide the micro-batch size {B}")
    if G < 2:
        raise ValueError(f"ITM needs at least 2 pairs per negative group (a pair's hard negatives are the other "
                         f"pairs'); got groups of {G}: raise the pair micro-batch size")
    same_group = (torch.arange(B)[:, None] // G == torch.arange(B)[None, :] // G).to(image_feat_BE.device)
    sim_i2t_BB = (image_feat_BE @ text_feat_BE.t() / temp).float().masked_fill(~same_group, float("-inf"))
    weights_t2i = F.softmax(sim_i2t_BB.t(), dim=1) + 1e-5 * same_group
    weights_i2t = F.softmax(sim_i2t_BB, dim=1) + 1e-5 * same_group
    weights_t2i.fill_diagonal_(0)
    weights_i2t.fill_diagonal_(0)
    return _draw(weights_t2i, sample_keys, "img:", G), _draw(weights_i2t, sample_keys, "txt:", G)


def mim_loss(pred_BND: torch.Tensor, target_BND: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
    """MSE over masked patch tokens + MSE between the pooled vectors (token 0).

    Patch tokens are compared after a per-token LayerNorm (no affine): the reference's tokens carry
    a final norm, timm's export form (ours) does not, and raw residual-stream tokens would make the
    loss grow with the features' scale (and reward shrinking them). The pooled vector is already
    normalised by fc_norm."""
    def norm(x_MD: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_MD.float(), x_MD.shape[-1:])

    patches = F.mse_loss(norm(pred_BND[:, 1:][mask_BP]), norm(target_BND[:, 1:][mask_BP]))
    pooled = F.mse_loss(pred_BND[:, 0].float(), target_BND[:, 0].float())
    return patches + pooled
