"""Offline stand-ins for the reference's starting weights (no downloads: the test machines have no
network), and the rank body that probes a run started from them.

* ``reference_beit``: BEiT-v2's pre-training encoder at the tiny preset's vision sizes, as timm
  builds it with unilm's shared relative-position table (``use_shared_rel_pos_bias``): the
  computation of unilm's ``VisionTransformerForMaskedImageModeling`` blocks, and of X-FM's encoder
  after ``load_pretrained_beit2`` (which copies the shared table into every block).
* ``unilm_state``: its weights under the exact key names of unilm's
  ``beitv2_base_patch16_224_pt1k.pth`` (``{"model": ...}``), mapped here by hand, with the
  pre-training-only parts (final ``norm``, ``lm_head``, two ``cls_pt_layers``) filled at random.
* ``save_timm_layout``: the same weights in timm's layout (a table per block), with the mask token.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

TINY_BEIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0)
"""The tiny preset's vision encoder: 32 x 32 images, 8 x 8 patches (a 4 x 4 grid), 2 layers x 64."""
LAYER_SCALE = 0.2
UNILM_BLOCK_KEYS = ("gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                    "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
"""A block of unilm's modeling_finetune.Block built with window_size=None (no table of its own)."""
UNILM_TOP_KEYS = ("cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                  "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index",
                  "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias")
MIM_VOCAB = 96  # lm_head rows (8192 in the release)


def reference_beit(seed: int = 0):
    """(timm Beit with one shared relative-position table, its mask token). Biases, tables and
    gammas are drawn away from their initial values, so that each of them shows in the outputs;
    fc_norm stays at its initial (1, 0), as X-FM's starts."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, init_values=LAYER_SCALE,
                              use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **TINY_BEIT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("fc_norm."):
                continue
            if name.endswith("bias_table"):  # as large as pretrained tables are, so that it shows in the tokens
                p.normal_(std=1.0)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            elif "gamma" in name:
                p.uniform_(0.1, 0.3)
    mask_token = torch.randn(1, 1, TINY_BEIT["embed_dim"], generator=torch.Generator().manual_seed(seed + 1))
    return model.eval(), mask_token


def unilm_state(model, mask_token: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model``'s weights under unilm's pt1k key names (our own mapping), plus the parts of the
    pre-training model that the encoder does not use, at random."""
    g = torch.Generator().manual_seed(7)
    timm_state = model.state_dict()
    d = TINY_BEIT["embed_dim"]
    out = {"cls_token": timm_state["cls_token"], "mask_token": mask_token,
           "patch_embed.proj.weight": timm_state["patch_embed.proj.weight"],
           "patch_embed.proj.bias": timm_state["patch_embed.proj.bias"],
           "rel_pos_bias.relative_position_bias_table": timm_state["rel_pos_bias.relative_position_bias_table"],
           "rel_pos_bias.relative_position_index": model.rel_pos_bias.relative_position_index.clone(),
           "norm.weight": 1 + torch.randn(d, generator=g), "norm.bias": torch.randn(d, generator=g),
           "lm_head.weight": torch.randn(MIM_VOCAB, d, generator=g), "lm_head.bias": torch.randn(MIM_VOCAB, generator=g)}
    for i in range(TINY_BEIT["depth"]):
        for key in UNILM_BLOCK_KEYS:
            out[f"blocks.{i}.{key}"] = timm_state[f"blocks.{i}.{key}"]
    for j in range(2):  # unilm's CLS-pretraining head: early_layers + head_layers blocks of the same shape
        for key in UNILM_BLOCK_KEYS:
            out[f"cls_pt_layers.{j}.{key}"] = torch.randn(timm_state[f"blocks.0.{key}"].shape, generator=g)
    assert set(out) == set(UNILM_TOP_KEYS) | {f"{p}.{i}.{k}" for p, n in (("blocks", TINY_BEIT["depth"]),
                                                                           ("cls_pt_layers", 2))
                                              for i in range(n) for k in UNILM_BLOCK_KEYS}
    return out


def save_unilm(state: dict[str, torch.Tensor], path: Path, **extra) -> Path:
    """As unilm's utils.save_model writes it: the state dict under "model" (``extra``: e.g. args, epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.clone().contiguous() for k, v in state.items()}, **extra}, path)
    return path


def save_timm_layout(model, mask_token: torch.Tensor, folder: Path) -> Path:
    """The same weights in timm's layout (a relative-position table per block: the shared one,
    copied), as save_for_hf writes a folder, with the mask token added to its weights."""
    import timm
    from safetensors.torch import load_file, save_file
    from timm.models import save_for_hf

    per_block = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0,
                                  init_values=LAYER_SCALE, **TINY_BEIT)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rel_pos_bias.")}
    for i in range(TINY_BEIT["depth"]):
        state[f"blocks.{i}.attn.relative_position_bias_table"] = model.rel_pos_bias.relative_position_bias_table.detach().clone()
    per_block.load_state_dict(state, strict=True)
    save_for_hf(per_block, str(folder), model_args={**TINY_BEIT, "init_values": LAYER_SCALE, "num_classes": 0},
                safe_serialization=True)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["mask_token"] = mask_token.contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def reference_tokens(model, mask_token: torch.Tensor, pixels: torch.Tensor, mim_mask: torch.Tensor | None = None):
    """What the imported encoder must give, computed with ``model``'s own timm modules: unilm's
    forward_features (masked patches replaced by the mask token, one shared bias for every block),
    then the vision encoder's outputs: [fc_norm(mean of patch tokens), patch tokens]."""
    with torch.no_grad():
        x = model.patch_embed(pixels)
        if mim_mask is not None:
            w = mim_mask.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + mask_token * w
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        bias = model.rel_pos_bias()
        for block in model.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        patches = model.norm(x)[:, 1:]  # norm is an Identity under mean pooling
        return torch.cat([model.fc_norm(patches.mean(dim=1)).unsqueeze(1), patches], dim=1)


def mim_mask(grid: int = 4, seed: int = 13) -> torch.Tensor:
    mask = torch.rand(2, grid * grid, generator=torch.Generator().manual_seed(seed)) < 0.4
    mask[:, 0] = True  # at least one masked patch per image
    return mask


def save_roberta(folder: Path, vocab: int, seed: int = 0) -> Path:
    """A small random RobertaForMaskedLM, saved as roberta-base is (encoder and MLM head)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=1)
    model = transformers.RobertaForMaskedLM(cfg)
    with torch.no_grad():  # a head that is not its initialisation (zero bias, unit LayerNorm)
        for p in (model.lm_head.bias, model.lm_head.layer_norm.weight, model.lm_head.layer_norm.bias):
            p.normal_(std=0.5)
    model.save_pretrained(folder)
    return folder


def start_then_probe(raw: dict, sets: list[str]) -> dict:
    """Build a new run from ``raw`` with the command line's ``--set`` values ``sets`` (parsed as the
    entry point parses them), then read the live engine's encoders on fixed inputs: text hidden
    states and MLM logits, image tokens without and with a MIM mask."""
    from export_fixtures import mlm_logits, random_pixels, random_text

    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    cfg = run_config.from_dict(raw, base_dir=os.getcwd(), overrides=run_config.parse_overrides(sets))
    trainer = Trainer(cfg)
    model, mc = trainer.engine.module, trainer.model_config
    trainer.engine.eval()
    with torch.no_grad():
        ids, mask = random_text(mc.text.vocab_size, mc.text.pad_token_id)
        text = model.encode_text(ids, mask)
        pixels = random_pixels(mc.vision.image_size)
        return {"text": text, "mlm_logits": mlm_logits(model, text[mask.bool()]),
                "image": model.encode_image(pixels), "masked_image": model.encode_image(pixels, mim_mask(mc.vision.grid_size)),
                "vision_config": dataclasses.asdict(mc.vision),
                "layout": (trainer.layout.tensor_parallel_size, trainer.layout.data_parallel_size),
                "init_text_from": cfg.model.init_text_from, "init_vision_from": cfg.model.init_vision_from}
