"""Typed, documented configuration of the X-FM model, and its presets.

A preset is a named :class:`XFMConfig`; ``XFMConfig.from_preset(name, **overrides)`` returns a copy
with dotted-key overrides applied (``{"text.num_layers": 4}``). Validation names what to change.
The method these encode: docs/method.md.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xfm_scale.config.errors import ConfigError
from xfm_scale.config.overrides import set_field

XFM_WEIGHTS = "model.safetensors"
"""The weights file of an xfm weights folder, beside its config.json."""


@dataclass(kw_only=True)
class TransformerConfig:
    """Fields every encoder stack shares."""
    num_layers: int
    """Number of transformer blocks."""
    hidden_size: int
    """Width of the residual stream."""
    num_heads: int
    """Attention heads; must divide hidden_size, and the tensor-parallel size must divide it."""
    ffn_hidden_size: int
    """Inner width of the MLP; the tensor-parallel size must divide it."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (RoBERTa 1e-5, BERT 1e-12, BEiT 1e-6)."""
    hidden_dropout: float = 0.1
    """Dropout on attention and MLP outputs (replicated activations: same mask on all TP ranks)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (head-partitioned: drawn in the TP-region RNG stream)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    checkpointed_layers: int | None = None
    """Selective checkpointing: with activation_checkpointing, only this encoder's first N blocks
    are checkpointed (None: all). The others keep their activations: less recompute for more
    memory, to fill what the GPU has left (Megatron's "block" recompute)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def checkpointed_blocks(self) -> int:
        """How many of the blocks (the first ones) are checkpointed."""
        if not self.activation_checkpointing:
            return 0
        return self.num_layers if self.checkpointed_layers is None else min(self.checkpointed_layers, self.num_layers)

    def validate(self, name: str, tensor_parallel_size: int) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{name}: hidden_size={self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}; pick num_heads dividing hidden_size")
        if self.num_heads % tensor_parallel_size:
            raise ConfigError(f"{name}: num_heads={self.num_heads} is not divisible by the tensor-"
                              f"parallel size {tensor_parallel_size}; use a TP size dividing "
                              f"{self.num_heads} or change {name}.num_heads")
        if self.ffn_hidden_size % tensor_parallel_size:
            raise ConfigError(f"{name}: ffn_hidden_size={self.ffn_hidden_size} is not divisible by "
                              f"the tensor-parallel size {tensor_parallel_size}; change the TP size "
                              f"or {name}.ffn_hidden_size")
        for attr in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            if getattr(self, attr) < 1:
                raise ConfigError(f"{name}.{attr} must be >= 1, got {getattr(self, attr)}")
        if self.checkpointed_layers is not None and not 0 <= self.checkpointed_layers <= self.num_layers:
            raise ConfigError(f"{name}.checkpointed_layers={self.checkpointed_layers} must be in 0..{self.num_layers} "
                              f"(its num_layers), or null for all")


@dataclass(kw_only=True)
class TextEncoderConfig(TransformerConfig):
    """The language encoder: a post-LN BERT/RoBERTa stack (exports to transformers)."""
    vocab_size: int
    """Real vocabulary size of the tokenizer (the embedding is padded beyond it, see XFMConfig)."""
    max_position_embeddings: int
    """Rows of the position table (RoBERTa: max length + 2, positions start after the pad id)."""
    type_vocab_size: int = 1
    """Token-type rows (RoBERTa 1, BERT 2); all tokens use type 0."""
    pad_token_id: int = 1
    """Padding id (RoBERTa 1, BERT 0); RoBERTa positions are counted from it."""
    flavour: Literal["roberta", "bert"] = "roberta"
    """Position-id convention and export target: RoBERTa (pad-offset positions) or BERT (0..L-1)."""


@dataclass(kw_only=True)
class VisionEncoderConfig(TransformerConfig):
    """The vision encoder: a pre-LN BEiT-v2 ViT (exports to timm's Beit)."""
    image_size: int = 224
    """Input resolution (square)."""
    patch_size: int = 16
    """Patch side; image_size must be a multiple."""
    num_channels: int = 3
    """Input channels."""
    layer_scale_init: float = 0.1
    """Initial value of the per-channel layer-scale gammas (BEiT-v2 pre-training: 0.1)."""
    drop_path_rate: float = 0.1
    """Stochastic depth, linearly increasing over blocks up to this rate."""
    layer_norm_eps: float = 1e-6
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def validate(self, name: str, tensor_parallel_size: int) -> None:
        super().validate(name, tensor_parallel_size)
        if self.image_size % self.patch_size:
            raise ConfigError(f"{name}: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"{name}.drop_path_rate={self.drop_path_rate} must be in [0, 1)")


@dataclass(kw_only=True)
class FusionEncoderConfig(TransformerConfig):
    """The fusion encoder: post-LN blocks of self-attention, cross-attention to image tokens, FFN.
    Its width equals the language encoder's (it continues the text stream)."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Heads, losses and the method's two technique switches."""
    itc_embed_dim: int = 256
    """ITC projection width (text [CLS] and image pooled vector, L2-normalised)."""
    temperature_init: float = 0.07
    """Initial ITC temperature (learnable)."""
    temperature_min: float = 0.001
    """Lower clamp of the temperature."""
    temperature_max: float = 0.5
    """Upper clamp of the temperature."""
    detach_text_for_fusion: bool = True
    """Technique (1): the language encoder's output is detached where it enters the fusion encoder
    for ITM and IMLM (and the fusion MLM head's tied decoder is detached), so the language encoder
    learns only from MLM and ITC. Off for ablations and fine-tuning."""
    mim_target: Literal["unmasked_self", "none"] = "unmasked_self"
    """Technique (2): MIM regresses the vision encoder's own detached output on the unmasked image
    (the output ITC/ITM/IMLM consume). "none" turns MIM off (ablation): image-only micro-batches
    then carry no loss."""
    itm_negative_group: int = 0
    """ITM hard negatives are drawn among groups of this many consecutive pairs of a micro-batch
    (0: the whole local micro-batch, as the reference). Set it to a larger run's per-rank micro-batch
    to reproduce that run's negatives on fewer ranks with bigger micro-batches."""
    mim_num_masked: int = 75
    """Patches masked per image for MIM (BEiT block masking): 75 of 196 at 224/16."""
    mim_min_block: int = 16
    """Smallest masking block, in patches."""
    text_max_length: int = 128
    """Token length of text-only samples."""
    caption_max_length: int = 30
    """Token length of captions."""


@dataclass(kw_only=True)
class XFMConfig:
    """The whole model."""
    text: TextEncoderConfig
    """Language encoder."""
    vision: VisionEncoderConfig
    """Vision encoder."""
    fusion: FusionEncoderConfig
    """Fusion encoder."""
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Heads, losses, technique switches."""
    vocab_pad_multiple: int = 128
    """The embedding rows are padded to a multiple of lcm(this, TP size) (Megatron pads so every TP
    rank holds an equal slice); padded logits are masked out, so padding changes no output."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights (BERT/BEiT convention)."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype parameters are created in."""

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "XFMConfig":
        """A copy of preset ``name`` with dotted-key overrides (``**{"text.num_layers": 4}``)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        config = copy.deepcopy(PRESETS[name])
        config.apply_overrides(overrides)
        return config

    def apply_overrides(self, overrides: dict[str, Any]) -> None:
        """Set dotted keys (``vision.drop_path_rate``), each coerced to its field's type."""
        for dotted, value in overrides.items():
            set_field(self, dotted, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_xfm_folder(cls, folder: str | Path) -> "XFMConfig":
        """The model config of an xfm weights folder (written by tools/export_weights.py or
        tools/import_weights.py): its config.json, read without the weights (and without torch, so
        ``--check`` can validate a run that starts from it)."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file() or not (folder / XFM_WEIGHTS).is_file():
            raise ConfigError(f"{folder} is not an xfm weights folder (config.json and {XFM_WEIGHTS}); "
                              "pass the xfm/ folder that tools/export_weights.py or tools/import_weights.py wrote")
        try:
            return cls.from_dict(json.loads(config_path.read_text())["model_config"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{config_path}: not an xfm model config ({err!r}); write the folder again "
                              "with tools/export_weights.py or tools/import_weights.py") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "XFMConfig":
        return cls(text=TextEncoderConfig(**data["text"]), vision=VisionEncoderConfig(**data["vision"]),
                   fusion=FusionEncoderConfig(**data["fusion"]),
                   objectives=ObjectiveConfig(**data.get("objectives", {})),
                   **{k: v for k, v in data.items() if k not in ("text", "vision", "fusion", "objectives")})

    # ---- derived --------------------------------------------------------------------------------
    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        multiple = math.lcm(self.vocab_pad_multiple, tensor_parallel_size)
        return -(-self.text.vocab_size // multiple) * multiple

    @property
    def torch_dtype(self):
        import torch  # lazily: the CLIs that only read configs should not pay for torch

        return getattr(torch, self.params_dtype)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for encoder in (self.text, self.vision, self.fusion):
            encoder.activation_checkpointing = enabled

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ConfigError naming the field to change."""
        for name in ("text", "vision", "fusion"):
            getattr(self, name).validate(name, tensor_parallel_size)
        if self.fusion.hidden_size != self.text.hidden_size:
            raise ConfigError(f"fusion.hidden_size={self.fusion.hidden_size} must equal "
                              f"text.hidden_size={self.text.hidden_size} (the fusion encoder "
                              f"continues the text stream)")
        obj = self.objectives
        if not 0 < obj.temperature_min <= obj.temperature_init <= obj.temperature_max:
            raise ConfigError("objectives: need 0 < temperature_min <= temperature_init <= temperature_max")
        if obj.itm_negative_group < 0 or obj.itm_negative_group == 1:
            raise ConfigError(f"objectives.itm_negative_group={obj.itm_negative_group}: a pair draws its ITM hard "
                              f"negatives from the other pairs of its group; use 0 (the whole micro-batch) or >= 2")
        if obj.mim_target not in ("unmasked_self", "none"):
            raise ConfigError(f"objectives.mim_target={obj.mim_target!r}: use 'unmasked_self' or 'none'")
        if not 0 < obj.mim_num_masked <= self.vision.num_patches:
            raise ConfigError(f"objectives.mim_num_masked={obj.mim_num_masked} must be in "
                              f"1..{self.vision.num_patches} (patches per image)")
        if self.text.flavour not in ("roberta", "bert"):
            raise ConfigError(f"text.flavour={self.text.flavour!r}: use 'roberta' or 'bert'")
        if self.text.flavour == "roberta":
            needed = obj.text_max_length + self.text.pad_token_id + 1
            if self.text.max_position_embeddings < needed:
                raise ConfigError(f"text.max_position_embeddings={self.text.max_position_embeddings} "
                                  f"is too small for text_max_length={obj.text_max_length} with "
                                  f"RoBERTa positions (need >= {needed})")


# ---- presets --------------------------------------------------------------------------------------
def _roberta(layers: int, hidden: int, heads: int, ffn: int, vocab: int = 50265) -> TextEncoderConfig:
    return TextEncoderConfig(num_layers=layers, hidden_size=hidden, num_heads=heads,
                             ffn_hidden_size=ffn, vocab_size=vocab, max_position_embeddings=514,
                             pad_token_id=1, flavour="roberta")


def _beit(layers: int, hidden: int, heads: int, ffn: int, image: int = 224, patch: int = 16,
          drop_path: float = 0.1) -> VisionEncoderConfig:
    return VisionEncoderConfig(num_layers=layers, hidden_size=hidden, num_heads=heads,
                               ffn_hidden_size=ffn, image_size=image, patch_size=patch,
                               drop_path_rate=drop_path)


def _fusion(layers: int, hidden: int, heads: int, ffn: int) -> FusionEncoderConfig:
    return FusionEncoderConfig(num_layers=layers, hidden_size=hidden, num_heads=heads,
                               ffn_hidden_size=ffn, layer_norm_eps=1e-5)


PRESETS: dict[str, XFMConfig] = {
    # For tests and the CPU demo: 32x32 images in 8x8 patches (a 4x4 grid), a small vocabulary.
    "tiny": XFMConfig(
        text=TextEncoderConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256,
                               vocab_size=1000, max_position_embeddings=40, pad_token_id=1),
        vision=VisionEncoderConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256,
                                   image_size=32, patch_size=8, drop_path_rate=0.0),
        fusion=_fusion(2, 64, 4, 256),
        objectives=ObjectiveConfig(itc_embed_dim=32, mim_num_masked=6, mim_min_block=2,
                                   text_max_length=32, caption_max_length=16)),
    # The CPU demo (tools/demo.py): tiny's layout at width 128 and without dropout, which a few
    # minutes of CPU training need to bind count, colour, shape and position (docs/demo.md).
    "demo": XFMConfig(
        text=TextEncoderConfig(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512,
                               vocab_size=1000, max_position_embeddings=40, pad_token_id=1,
                               hidden_dropout=0.0, attention_dropout=0.0),
        vision=VisionEncoderConfig(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512,
                                   image_size=32, patch_size=8, drop_path_rate=0.0),
        fusion=FusionEncoderConfig(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512,
                                   layer_norm_eps=1e-5, hidden_dropout=0.0, attention_dropout=0.0),
        objectives=ObjectiveConfig(itc_embed_dim=32, mim_num_masked=6, mim_min_block=2,
                                   text_max_length=32, caption_max_length=16)),
    # The reference X-FM base: RoBERTa-base + BEiT-v2-B/16 at 224 + 12-layer fusion (~327M).
    "base": XFMConfig(text=_roberta(12, 768, 12, 3072), vision=_beit(12, 768, 12, 3072),
                      fusion=_fusion(12, 768, 12, 3072)),
    # RoBERTa-large-like text (24x1024), BEiT-v2-L/16 vision, a 12-layer fusion at 1024.
    "large": XFMConfig(text=_roberta(24, 1024, 16, 4096), vision=_beit(24, 1024, 16, 4096, drop_path=0.2),
                       fusion=_fusion(12, 1024, 16, 4096)),
    # Multi-billion: 32x2048 text, a ViT-g/14-class vision stack (40x1408, 16 heads, MLP 6144) at
    # 224, a 16-layer fusion at 2048. Needs ZeRO-3 + TP (TP up to 16 divides every head count).
    "giant": XFMConfig(text=_roberta(32, 2048, 16, 8192),
                       vision=_beit(40, 1408, 16, 6144, patch=14, drop_path=0.3),
                       fusion=_fusion(16, 2048, 16, 8192),
                       objectives=ObjectiveConfig(itc_embed_dim=512, mim_num_masked=98, mim_min_block=16)),
}
