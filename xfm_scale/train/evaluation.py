"""Held-out evaluation: zero-shot image<->text retrieval (R@1, R@5) and masked-token accuracy.

Every data-parallel rank encodes an equal slice of the held-out pairs (padded by repeating the
last pair, so all ranks run the same modules the same number of times, as ZeRO-3 requires), the
ITC features are all-gathered over the DP group, and every rank scores the full similarity matrix.
Legend: N held-out pairs, E ITC width, L caption tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from xfm_scale.batch import IGNORE_INDEX, PairBatch
from xfm_scale.data.masking import IMLM_MASKING, mask_tokens


def recall_at_k(sim_NN: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Row i's correct column is i. Rank = how many columns score strictly higher (ties count in
    favour: identical captions of different images are equally correct)."""
    correct = sim_NN.diagonal().unsqueeze(1)
    rank = (sim_NN > correct).sum(dim=1)
    return {k: (rank < k).float().mean().item() for k in ks}


def mask_captions(eval_set: PairBatch, mask_id: int, vocab_size: int, special_ids: list[int],
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed IMLM-style masks (prob 0.5, at most 15) on the held-out captions, for MLM accuracy."""
    rng = np.random.default_rng(seed)
    ids = eval_set.caption_ids_BL.numpy()
    special = np.isin(ids, special_ids) | (eval_set.caption_mask_BL.numpy() == 0)
    masked, labels = zip(*(mask_tokens(row, sp, IMLM_MASKING, mask_id, vocab_size, rng, IGNORE_INDEX)
                           for row, sp in zip(ids, special)))
    return torch.from_numpy(np.stack(masked)), torch.from_numpy(np.stack(labels))


def _rank_slice(n: int, dp_rank: int, dp_size: int, micro_batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's micro-batches of pair indices, and which of them are real (not padding)."""
    per_rank = math.ceil(n / dp_size / micro_batch) * micro_batch
    wanted = np.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    index, real = np.minimum(wanted, n - 1), wanted < n
    return [(index[i:i + micro_batch], real[i:i + micro_batch]) for i in range(0, per_rank, micro_batch)]


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def evaluate(model, eval_set: PairBatch, masked_ids: torch.Tensor, mlm_labels: torch.Tensor, *,
             micro_batch: int, dp_rank: int, dp_size: int, group, device) -> dict[str, float]:
    """Retrieval R@1/R@5 both ways and MLM (language encoder) / IMLM (fusion) accuracy."""
    n = eval_set.size
    dtype = next(model.parameters()).dtype
    image_feats, text_feats, reals = [], [], []
    counts = torch.zeros(3, device=device)  # mlm hits, imlm hits, masked tokens (on device: NCCL)
    for index, real in _rank_slice(n, dp_rank, dp_size, micro_batch):
        pix = eval_set.pixel_values_BCHW[index].to(device=device, dtype=dtype)
        ids, mask = eval_set.caption_ids_BL[index].to(device), eval_set.caption_mask_BL[index].to(device)
        image = model.encode_image(pix)
        img_f, txt_f, _ = model.itc(image[:, 0], model.encode_text(ids, mask)[:, 0])
        image_feats.append(img_f.float())
        text_feats.append(txt_f.float())
        reals.append(torch.from_numpy(real).to(device))
        labels = mlm_labels[index].to(device)
        labels[torch.from_numpy(~real).to(device)] = IGNORE_INDEX  # padding pairs are not scored
        masked_text = model.encode_text(masked_ids[index].to(device), mask)
        target = labels[labels != IGNORE_INDEX]
        mlm_pred = model.text_mlm_head(masked_text, labels, predict=True)
        imlm_pred = model.fusion_mlm_head(model.fuse(masked_text, mask, image), labels, predict=True)
        counts += torch.tensor([(mlm_pred == target).sum().item(), (imlm_pred == target).sum().item(),
                                float(target.numel())], device=device)
    real_all = _gather(torch.cat(reals), group)
    images = _gather(torch.cat(image_feats), group)[real_all]
    texts = _gather(torch.cat(text_feats), group)[real_all]
    sim = images @ texts.t()
    i2t, t2i = recall_at_k(sim), recall_at_k(sim.t())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return {"eval/i2t_r1": i2t[1], "eval/i2t_r5": i2t[5], "eval/t2i_r1": t2i[1], "eval/t2i_r5": t2i[5],
            "eval/mlm_acc": (counts[0] / counts[2].clamp_min(1)).item(),
            "eval/imlm_acc": (counts[1] / counts[2].clamp_min(1)).item(),
            "eval/pairs": float(n), "eval/chance_r1": 1.0 / n}
