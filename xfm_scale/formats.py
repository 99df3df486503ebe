"""Names and configs shared with the formats downstream users load: transformers BERT/RoBERTa for
the language encoder and timm BEiT-v2 for the vision encoder.

Our parameter names follow those libraries' modules closely, so a conversion is a rename plus, for
the language encoder, a split of the fused QKV (ours: one [3D, D] weight stacked [q; k; v], which
is what :mod:`xfm_scale.model.tp_layout` merges to) into transformers' query/key/value. The vocab
rows past the real vocabulary (padding to a multiple of 128 x TP) are dropped on export and added
back as zeros on import. Everything here works on full (TP-merged) tensors, one at a time, so the
exporter can stream.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from xfm_scale.config import ConfigError, TextEncoderConfig, VisionEncoderConfig

# ---- language encoder <-> transformers --------------------------------------------------------------
_TEXT_FIXED = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
}
_TEXT_BLOCK = {  # ours (under blocks.N.) -> transformers (under encoder.layer.N.)
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight",
    "attn_norm.bias": "attention.output.LayerNorm.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
    "mlp_norm.weight": "output.LayerNorm.weight",
    "mlp_norm.bias": "output.LayerNorm.bias",
}
_QKV = ("query", "key", "value")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def text_to_hf(name: str, tensor: torch.Tensor, vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers (name, tensor) pairs for one language-encoder tensor (names without ``text.``)."""
    if name in _TEXT_FIXED:
        if name == "embeddings.word_embeddings.weight":
            tensor = tensor[:vocab_size]
        yield _TEXT_FIXED[name], tensor
        return
    match = _BLOCK.match(name)
    if not match:
        raise KeyError(f"no transformers name for language-encoder parameter {name!r}")
    layer, rest = match.groups()
    prefix = f"encoder.layer.{layer}."
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        for part, piece in zip(_QKV, tensor.chunk(3, dim=0)):
            yield f"{prefix}attention.self.{part}.{rest.rsplit('.', 1)[1]}", piece
        return
    yield prefix + _TEXT_BLOCK[rest], tensor


def text_from_hf(hf_state: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our language-encoder state (names without ``text.``) from a transformers BERT/RoBERTa state
    dict (``bert.``/``roberta.`` prefixes and the pooler/LM head are ignored)."""
    hf = {re.sub(r"^(bert|roberta)\.", "", k): v for k, v in hf_state.items()}
    out = {}
    for ours, theirs in _TEXT_FIXED.items():
        out[ours] = _take(hf, theirs)
    for layer in range(cfg.num_layers):
        prefix = f"encoder.layer.{layer}."
        for kind in ("weight", "bias"):
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
                [_take(hf, f"{prefix}attention.self.{part}.{kind}") for part in _QKV])
        for ours, theirs in _TEXT_BLOCK.items():
            out[f"blocks.{layer}.{ours}"] = _take(hf, prefix + theirs)
    return out


def _take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise ConfigError(f"the pretrained weights have no {name!r}; give a BERT or RoBERTa checkpoint")
    return state[name]


def text_config_to_hf(cfg: TextEncoderConfig):
    """A transformers RobertaConfig/BertConfig for the language encoder (no pooler weights exist:
    AutoModel reports the pooler as newly initialised, as for any MLM-pretrained checkpoint)."""
    import transformers

    cls = transformers.RobertaConfig if cfg.flavour == "roberta" else transformers.BertConfig
    return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_hidden_size, hidden_act="gelu",
               hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
               max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
               layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id)


def text_config_from_hf(hf_config) -> TextEncoderConfig:
    """Our language-encoder config from a transformers BERT/RoBERTa config (its sizes decide ours)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("bert", "roberta"):
        raise ConfigError(f"model_type {model_type!r}: the language encoder imports BERT or RoBERTa checkpoints")
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ConfigError(f"hidden_act {hf_config.hidden_act!r}: the language encoder uses exact GELU")
    return TextEncoderConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads, ffn_hidden_size=hf_config.intermediate_size,
        layer_norm_eps=hf_config.layer_norm_eps, hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob, vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings, type_vocab_size=hf_config.type_vocab_size,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0, flavour=model_type)


# ---- vision encoder <-> timm BEiT-v2 -----------------------------------------------------------------
TIMM_ARCHITECTURE = "beitv2_base_patch16_224"
"""The timm architecture named in exports; config.json's model_args give the actual sizes."""
_NOT_IN_TIMM = ("mask_token",)  # MIM pre-training only


def vision_to_timm(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """timm (name, tensor) pairs for one vision-encoder tensor (names without ``vision.``)."""
    if name in _NOT_IN_TIMM:
        return
    yield name.replace(".rel_pos.relative_position_bias_table", ".attn.relative_position_bias_table"), tensor


def vision_from_timm(timm_state: dict[str, torch.Tensor], mask_token: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Our vision-encoder state from a timm BEiT(-v2) state dict (its classifier head dropped; the
    MIM mask token, which timm has not, is kept from ``mask_token`` when given)."""
    out = {}
    for name, tensor in timm_state.items():
        if name.startswith("head.") or name.endswith("relative_position_index"):
            continue
        out[name.replace(".attn.relative_position_bias_table", ".rel_pos.relative_position_bias_table")] = tensor
    if mask_token is not None:
        out["mask_token"] = mask_token
    return out


def vision_model_args(cfg: VisionEncoderConfig) -> dict:
    """timm ``Beit`` keyword arguments that build this vision encoder (no classifier, mean pooling)."""
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.num_channels,
            "embed_dim": cfg.hidden_size, "depth": cfg.num_layers, "num_heads": cfg.num_heads,
            "mlp_ratio": cfg.ffn_hidden_size / cfg.hidden_size, "init_values": cfg.layer_scale_init,
            "use_abs_pos_emb": False, "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False,
            "qkv_bias": True, "num_classes": 0, "global_pool": "avg"}


def vision_timm_config(cfg: VisionEncoderConfig) -> dict:
    """config.json in timm's hub layout: ``architecture``, ``model_args``, ``pretrained_cfg``."""
    return {"architecture": TIMM_ARCHITECTURE, "num_classes": 0, "num_features": cfg.hidden_size,
            "global_pool": "avg", "model_args": vision_model_args(cfg),
            "pretrained_cfg": {"input_size": [cfg.num_channels, cfg.image_size, cfg.image_size],
                               "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "num_classes": 0, "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


def vision_config_from_timm_model(model) -> VisionEncoderConfig:
    """Our vision-encoder config from a built timm BEiT(-v2) model (its sizes, read off the modules)."""
    blocks = list(model.blocks)
    if getattr(model, "pos_embed", None) is not None or getattr(blocks[0].attn, "relative_position_bias_table", None) is None:
        raise ConfigError("the vision encoder imports BEiT-v2 models with per-block relative position bias "
                          "and no absolute position embedding")
    hidden = model.embed_dim
    gamma = getattr(blocks[0], "gamma_1", None)
    return VisionEncoderConfig(
        num_layers=len(blocks), hidden_size=hidden, num_heads=blocks[0].attn.num_heads,
        ffn_hidden_size=blocks[0].mlp.fc1.out_features, layer_norm_eps=blocks[0].norm1.eps,
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels,
        layer_scale_init=float(gamma.detach().mean()) if gamma is not None else 0.1)


