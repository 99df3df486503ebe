"""Names and configs shared with the formats downstream users load: transformers BERT/RoBERTa for
the language encoder and timm BEiT-v2 for the vision encoder.

Our parameter names follow those libraries' modules closely, so a conversion is a rename plus, for
the language encoder, a split of the fused QKV (ours: one [3D, D] weight stacked [q; k; v], which
is what :mod:`xfm_scale.model.tp_layout` merges to) into transformers' query/key/value. The
language encoder's MLM head (``text_mlm_head``) goes with it, in the layout of the hub's
roberta-base / bert-base (encoder under ``roberta.``/``bert.``, head as ``lm_head.*`` /
``cls.predictions.*``, decoder tied to the word embeddings), so both ``AutoModel`` and
``AutoModelForMaskedLM`` load the folder. The vocab rows past the real vocabulary (padding to a
multiple of 128 x TP) are dropped on export and added back as zeros on import. Everything here
works on full (TP-merged) tensors, one at a time, so the exporter can stream.
"""
from __future__ import annotations

import math
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


# ours (under text_mlm_head.) -> transformers' MLM head, per flavour. Its decoder weight is the word
# embedding in both libraries (tied), so it is neither stored nor read.
_TEXT_HEAD = {
    "roberta": {"dense.weight": "lm_head.dense.weight", "dense.bias": "lm_head.dense.bias",
                "layer_norm.weight": "lm_head.layer_norm.weight", "layer_norm.bias": "lm_head.layer_norm.bias",
                "bias": "lm_head.bias"},
    "bert": {"dense.weight": "cls.predictions.transform.dense.weight",
             "dense.bias": "cls.predictions.transform.dense.bias",
             "layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
             "layer_norm.bias": "cls.predictions.transform.LayerNorm.bias", "bias": "cls.predictions.bias"},
}
TEXT_HEAD_PREFIX = "text_mlm_head."


def text_model_to_hf(name: str, tensor: torch.Tensor, cfg: TextEncoderConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers ...ForMaskedLM (name, tensor) pairs for one of our full parameter names: the
    language encoder (``text.``) under the ``roberta.``/``bert.`` prefix, its MLM head
    (``text_mlm_head.``) under the head's names, bias cut to the vocabulary; nothing for the rest."""
    if name.startswith("text."):
        for hf_name, piece in text_to_hf(name[len("text."):], tensor, cfg.vocab_size):
            yield f"{cfg.flavour}.{hf_name}", piece
    elif name.startswith(TEXT_HEAD_PREFIX):
        rest = name[len(TEXT_HEAD_PREFIX):]
        if rest not in _TEXT_HEAD[cfg.flavour]:
            raise KeyError(f"no transformers name for MLM-head parameter {name!r}")
        yield _TEXT_HEAD[cfg.flavour][rest], tensor[:cfg.vocab_size] if rest == "bias" else tensor


def text_head_hf_names(flavour: str) -> list[str]:
    """transformers' names of the MLM-head tensors a checkpoint stores (the tied decoder excluded)."""
    return list(_TEXT_HEAD[flavour].values())


def text_head_from_hf(hf_state: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our ``text_mlm_head`` state (names without the prefix) from a transformers ...ForMaskedLM
    state dict. Refuses a decoder that is not the word embedding: ours is tied to it."""
    out = {ours: _take(hf_state, theirs) for ours, theirs in _TEXT_HEAD[cfg.flavour].items()}
    decoder = {"roberta": "lm_head.decoder.weight", "bert": "cls.predictions.decoder.weight"}[cfg.flavour]
    embedding = hf_state.get(f"{cfg.flavour}.embeddings.word_embeddings.weight")
    if decoder in hf_state and embedding is not None and not torch.equal(hf_state[decoder], embedding):
        raise ConfigError(f"the pretrained MLM decoder ({decoder}) differs from the word embeddings; the "
                          "language encoder's MLM head decodes with the word embeddings (tie_word_embeddings)")
    return out


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
    """A transformers RobertaConfig/BertConfig for the language encoder and its MLM head, naming the
    ...ForMaskedLM architecture as the hub's roberta-base does (no pooler weights exist: AutoModel
    reports the pooler as newly initialised, as for any MLM-pretrained checkpoint)."""
    import transformers

    cls = transformers.RobertaConfig if cfg.flavour == "roberta" else transformers.BertConfig
    architecture = "RobertaForMaskedLM" if cfg.flavour == "roberta" else "BertForMaskedLM"
    return cls(architectures=[architecture], tie_word_embeddings=True, vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               intermediate_size=cfg.ffn_hidden_size, hidden_act="gelu",
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
    MIM mask token, which timm has not, is kept from ``mask_token`` when given). A model without
    layer scale gets gammas of 1.0, which compute the same and leave no parameter uninitialised."""
    out = {}
    for name, tensor in timm_state.items():
        if name.startswith("head.") or name.endswith("relative_position_index"):
            continue
        out[name.replace(".attn.relative_position_bias_table", ".rel_pos.relative_position_bias_table")] = tensor
    for name, tensor in timm_state.items():
        if name.endswith(".norm1.weight"):  # one per block
            block = name[:-len("norm1.weight")]
            for gamma in ("gamma_1", "gamma_2"):
                out.setdefault(block + gamma, torch.ones_like(tensor))
    if mask_token is not None:
        out["mask_token"] = mask_token
    return out


TIMM_LAYER_NORM_EPS = 1e-6
"""timm's Beit normalises with its LayerNorm default; model_args cannot pass another eps (a class)."""


def vision_model_args(cfg: VisionEncoderConfig) -> dict:
    """timm ``Beit`` keyword arguments that build this vision encoder (no classifier, mean pooling).
    Refuses what timm cannot build exactly: a LayerNorm eps other than timm's, no layer scale."""
    if cfg.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        raise ConfigError(f"vision.layer_norm_eps={cfg.layer_norm_eps}: timm's Beit uses {TIMM_LAYER_NORM_EPS} and "
                          "its config.json cannot change it; the vision encoder cannot be exported to timm")
    if not cfg.layer_scale_init:  # timm builds no gammas for init_values 0, but ours has them
        raise ConfigError(f"vision.layer_scale_init={cfg.layer_scale_init}: timm's Beit has no layer scale at 0; "
                          "use 1.0 for a model without layer scale")
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.num_channels,
            "embed_dim": cfg.hidden_size, "depth": cfg.num_layers, "num_heads": cfg.num_heads,
            "mlp_ratio": _timm_mlp_ratio(cfg.hidden_size, cfg.ffn_hidden_size), "init_values": cfg.layer_scale_init,
            "use_abs_pos_emb": False, "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False,
            "qkv_bias": True, "num_classes": 0, "global_pool": "avg"}


def _timm_mlp_ratio(hidden: int, ffn: int) -> float:
    """An mlp_ratio from which timm rebuilds exactly ``ffn``: it truncates int(hidden * ratio), and
    ffn / hidden can land one ulp low (hidden 88, ffn 120 -> 119), so step up to the next float."""
    ratio = ffn / hidden
    for _ in range(4):
        if int(hidden * ratio) == ffn:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ConfigError(f"vision.ffn_hidden_size={ffn} with hidden_size={hidden}: no mlp_ratio makes timm's "
                      "int(hidden_size * mlp_ratio) equal it; choose another ffn_hidden_size")


def vision_pretrained_cfg(cfg: VisionEncoderConfig) -> dict:
    """timm's pretrained_cfg: the preprocessing the model was trained and evaluated with
    (:mod:`xfm_scale.data.transforms`: CLIP mean/std; evaluation resizes the short side to the
    image size with bicubic interpolation, then centre-crops it whole, i.e. crop_pct 1.0)."""
    from xfm_scale.data.transforms import CLIP_MEAN, CLIP_STD

    return {"input_size": [cfg.num_channels, cfg.image_size, cfg.image_size], "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}


def vision_timm_config(cfg: VisionEncoderConfig) -> dict:
    """config.json in timm's hub layout: ``architecture``, ``model_args``, ``pretrained_cfg``."""
    return {"architecture": TIMM_ARCHITECTURE, "num_classes": 0, "num_features": cfg.hidden_size,
            "global_pool": "avg", "model_args": vision_model_args(cfg), "pretrained_cfg": vision_pretrained_cfg(cfg)}


def vision_config_from_timm_model(model, layer_scale_init: float | None = None) -> VisionEncoderConfig:
    """Our vision-encoder config from a built timm BEiT(-v2) model (its sizes, read off the modules;
    the model may live on the meta device when ``layer_scale_init`` is given: the pretrained
    gammas' mean, else the model's own gammas are read)."""
    blocks = list(model.blocks)
    if getattr(model, "pos_embed", None) is not None or getattr(blocks[0].attn, "relative_position_bias_table", None) is None:
        raise ConfigError("the vision encoder imports BEiT-v2 models with per-block relative position bias "
                          "and no absolute position embedding")
    if not isinstance(getattr(model, "norm", None), torch.nn.Identity):
        raise ConfigError("the vision encoder imports timm BEiT models with average pooling (global_pool='avg': "
                          "fc_norm on the mean patch token, no norm after the last block); this one has a final norm")
    hidden = model.embed_dim
    gamma = getattr(blocks[0], "gamma_1", None)
    if gamma is not None and layer_scale_init is not None:
        gamma = torch.tensor([layer_scale_init])
    return VisionEncoderConfig(
        num_layers=len(blocks), hidden_size=hidden, num_heads=blocks[0].attn.num_heads,
        ffn_hidden_size=blocks[0].mlp.fc1.out_features, layer_norm_eps=blocks[0].norm1.eps,
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels,
        # Without layer scale the block adds attn/mlp unscaled: gammas of 1.0 do the same (the
        # pretrained gammas, when there are some, are loaded over this initial value).
        layer_scale_init=float(gamma.detach().mean()) if gamma is not None else 1.0)




# ---- vision encoder <- unilm's BEiT-v2 pre-training checkpoint ---------------------------------------
# Microsoft unilm's beit2 release (beitv2_base_patch16_224_pt1k.pth: ``{"model": state dict}``) is its
# VisionTransformerForMaskedImageModelingCLS. Its blocks carry timm's (and ours') names, but:
# one relative-position table shared by all blocks (rel_pos_bias.*), no per-block ones; a mask
# token; a final LayerNorm ``norm``, the MIM head ``lm_head`` and the CLS-pretraining head's blocks
# ``cls_pt_layers`` (pre-training only); no ``fc_norm``.
UNILM_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_VISION_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
                      "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                      "mlp.fc2.weight", "mlp.fc2.bias")
_GAMMAS = ("gamma_1", "gamma_2")

VISION_UNUSED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("head.weight, head.bias", r"head\.(weight|bias)", "a classifier head: the vision encoder has none"),
    ("*relative_position_index", r"(.+\.)?relative_position_index",
     "an index buffer the model computes itself (the same formula in unilm, timm and xfm_scale)"),
)
"""Keys a vision source may hold that are not imported, in any layout: (names, pattern, why)."""
UNILM_UNUSED_KEYS: tuple[tuple[str, str, str], ...] = VISION_UNUSED_KEYS + (
    ("norm.weight, norm.bias", r"norm\.(weight|bias)",
     "the pre-training model's final LayerNorm: X-FM discards it, and xfm_scale's encoder (timm's "
     "average-pooling form) has no norm after the last block"),
    ("lm_head.*", r"lm_head\.(weight|bias)", "the MIM head over the VQ-KD codebook (pre-training only)"),
    ("cls_pt_layers.*", r"cls_pt_layers\.\d+\..+", "the CLS-pretraining head's blocks (pre-training only)"),
    ("cls_pt_norm.*, cls_pt_lm_head.*", r"cls_pt_(norm|lm_head)\.(weight|bias)",
     "that head's own norm and MIM head, saved when it was trained with shared_lm_head=False (pre-training only)"),
)
"""Keys of a unilm BEiT-v2 pre-training checkpoint that are not imported: (names, pattern, why)."""
VISION_NOT_IN_SOURCE = {
    "timm": (("mask_token", "timm's Beit has no mask token: it starts new (truncated normal, std init_std) "
                            "unless the file holds one, which is imported"),),
    "unilm": (("fc_norm.weight, fc_norm.bias", "the pooled vector's LayerNorm, absent from the pre-training "
                                              "model: it starts new (weight 1, bias 0), as X-FM's fc_norm does"),),
}
"""Vision-encoder parameters a source of each layout may lack, and what they start as."""


def unused_vision_key(name: str, layout: str) -> bool:
    """Whether ``name`` of a ``layout`` ("timm" or "unilm") source is one it may hold and we drop."""
    allowed = UNILM_UNUSED_KEYS if layout == "unilm" else VISION_UNUSED_KEYS
    return any(re.fullmatch(pattern, name) for _, pattern, _ in allowed)


def relative_table_rows(grid: int) -> int:
    """Rows of a BEiT relative-position table for a square grid: offsets, then cls->patch, patch->cls, cls->cls."""
    return (2 * grid - 1) ** 2 + 3


def grid_from_table_rows(rows: int) -> int | None:
    """The grid side a table of ``rows`` rows serves, or None when no square grid has that many."""
    side = math.isqrt(max(rows - 3, 0))
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 == 1 else None


def unilm_shapes(cfg: VisionEncoderConfig, layer_scale: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor (name -> shape) of a unilm BEiT-v2 pre-training checkpoint's encoder for ``cfg``
    (the allow-listed heads and buffers excluded)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    out = {"cls_token": (1, 1, d), "mask_token": (1, 1, d),
           "patch_embed.proj.weight": (d, cfg.num_channels, cfg.patch_size, cfg.patch_size), "patch_embed.proj.bias": (d,),
           UNILM_SHARED_TABLE: (relative_table_rows(cfg.grid_size), cfg.num_heads)}
    block = {"attn.qkv.weight": (3 * d, d), "attn.proj.weight": (d, d), "mlp.fc1.weight": (f, d),
             "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f)}
    for i in range(cfg.num_layers):
        for key in _VISION_BLOCK_KEYS + (_GAMMAS if layer_scale else ()):
            out[f"blocks.{i}.{key}"] = block.get(key, (d,))
    return out


def vision_shapes(cfg: VisionEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every vision-encoder parameter of ours (names without ``vision.``) -> its full (TP-merged) shape."""
    out = unilm_shapes(cfg, layer_scale=True)
    table = out.pop(UNILM_SHARED_TABLE)
    for i in range(cfg.num_layers):
        out[f"blocks.{i}.rel_pos.relative_position_bias_table"] = table
    out["fc_norm.weight"] = out["fc_norm.bias"] = (cfg.hidden_size,)
    return out


def vision_from_unilm(state: dict[str, torch.Tensor], cfg: VisionEncoderConfig) -> dict[str, torch.Tensor]:
    """Our vision-encoder state from a unilm BEiT-v2 pre-training state dict already checked against
    :func:`unilm_shapes`: its shared relative-position table copied into every block (as X-FM's
    load_pretrained_beit2 does), the mask token kept, gammas of 1.0 when it has no layer scale, the
    allow-listed keys (:data:`UNILM_UNUSED_KEYS`) dropped; ``fc_norm`` is not given (it starts new)."""
    out = {}
    for name, tensor in state.items():
        if name == UNILM_SHARED_TABLE or unused_vision_key(name, "unilm"):
            continue
        out[name] = tensor
    for i in range(cfg.num_layers):
        out[f"blocks.{i}.rel_pos.relative_position_bias_table"] = state[UNILM_SHARED_TABLE].clone()
        for gamma in _GAMMAS:
            out.setdefault(f"blocks.{i}.{gamma}", torch.ones(cfg.hidden_size, dtype=state["cls_token"].dtype))
    return out
