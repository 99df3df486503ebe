"""Rank bodies and fixed inputs shared by the export / import / resharding tests."""
from __future__ import annotations

import dataclasses
import os

import torch

FIXED_BATCH = 8
MODEL_OVERRIDES = {"objectives.itm_negative_group": 2}  # ITM negatives independent of the DP split


def fixed_pair_batch(raw: dict, image_size: int, grid: int):
    """The same 8-pair batch on every rank and in every layout: held-out pairs, fixed IMLM and MIM masks."""
    from xfm_scale.data import load_pair_eval_set, load_tokenizer
    from xfm_scale.train.evaluation import mask_captions

    pairs = load_pair_eval_set(raw["data"]["eval_manifest"], raw["data"]["tokenizer_dir"], image_size=image_size,
                               mim_grid=grid, caption_max_len=16)
    pairs = dataclasses.replace(pairs, sample_keys=pairs.sample_keys[:FIXED_BATCH], **{
        k: v[:FIXED_BATCH] for k, v in vars(pairs).items() if isinstance(v, torch.Tensor)})
    tok = load_tokenizer(raw["data"]["tokenizer_dir"])
    masked, labels = mask_captions(pairs, tok.mask_token_id, len(tok), tok.all_special_ids, seed=3)
    mim = torch.rand(FIXED_BATCH, grid * grid, generator=torch.Generator().manual_seed(5)) < 0.4
    return dataclasses.replace(pairs, imlm_input_ids_BL=masked, imlm_labels_BL=labels, mim_mask_BP=mim)


def rows(batch, start: int, stop: int):
    return dataclasses.replace(batch, sample_keys=batch.sample_keys[start:stop], **{
        k: v[start:stop] for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})


def random_text(vocab: int, pad_id: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = pad_id
    ids[:, 0] = 0  # <s>
    return ids, mask


def random_pixels(image_size: int, seed: int = 12) -> torch.Tensor:
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def probe(trainer, raw: dict) -> dict:
    """Losses on the fixed batch (this rank's DP rows, averaged over DP) and encoder outputs on
    random inputs, from the live engine."""
    import torch.distributed as dist

    from xfm_scale import distributed

    cfg = trainer.model_config
    batch = fixed_pair_batch(raw, cfg.vision.image_size, cfg.vision.grid_size)
    dp, d = trainer.layout.data_parallel_size, trainer.layout.data_parallel_rank
    per = FIXED_BATCH // dp
    local = rows(batch, d * per, (d + 1) * per)
    trainer.engine.eval()
    distributed.seed_everything(99)
    with torch.no_grad():
        out = trainer.engine(local)
        names = sorted(out.losses)
        losses = torch.stack([out.losses[n].detach().float() for n in names])
        dist.all_reduce(losses, group=parallel_dp_group())
        losses = dict(zip(names, (losses / dp).tolist()))
        ids, mask = random_text(cfg.text.vocab_size, cfg.text.pad_token_id)
        text = trainer.engine.module.encode_text(ids, mask)
        mlm = mlm_logits(trainer.engine.module, text[mask.bool()])
        image = trainer.engine.module.encode_image(random_pixels(cfg.vision.image_size))
    return {"losses": losses, "text": text, "mlm_logits": mlm, "image": image, "step": trainer.step,
            "layout": (trainer.layout.tensor_parallel_size, trainer.layout.data_parallel_size)}


def mlm_logits(model, hidden_MD: torch.Tensor) -> torch.Tensor:
    """The language encoder's MLM-head logits [M, vocab] (real vocabulary only): its parameters
    gathered from their ZeRO-3 partitions, its vocab-parallel logits gathered over TP."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    head = model.text_mlm_head
    with deepspeed.zero.GatheredParameters([*head.parameters(), head.tied_embedding.weight]):
        local = head._logits(hidden_MD)
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[:, :model.config.text.vocab_size]


def parallel_dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def train_then_probe(raw: dict) -> dict:
    """Build (or resume) the run, train to train.steps, then probe the live engine."""
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    resumed_at = trainer.step
    trainer.run()
    return {**probe(trainer, raw), "resumed_at": resumed_at}


def build_then_probe(raw: dict) -> dict:
    """Build the run (resuming or starting from init weights) and probe it before any step."""
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    return {**probe(trainer, raw), "resumed_at": trainer.step}


def build_resave_probe(raw: dict, resave_dir: str) -> dict:
    """Build the run (resuming its latest checkpoint, here possibly at another layout), write the
    loaded state to ``resave_dir`` as a new checkpoint, and probe it before any step."""
    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    checkpoint.save(trainer.engine, resave_dir, trainer.step, trainer.client_state(), keep_last=1)
    return {**probe(trainer, raw), "resumed_at": trainer.step}
