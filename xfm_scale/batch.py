"""The micro-batch contract between the data loader and the model.

A micro-batch holds one modality. Every data-parallel rank gets the same modality at the same
micro-step (ZeRO-3 gathers parameters module by module, so ranks must run the same sub-modules);
ranks differ only in which samples they read.

Legend: B batch, L text length, P patches per image, C=3 channels, H/W image size.
Labels use -100 for "not predicted" (torch's cross-entropy ignore index).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

IGNORE_INDEX = -100
MODALITIES = ("text", "image", "pair")


@dataclass
class _Batch:
    sample_keys: tuple[str, ...] = field(default=(), kw_only=True)
    """Globally unique keys of the samples (``corpus/key``): determinism and resume checks."""

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "_Batch":
        """Move tensors; ``dtype`` applies to floating tensors only (pixels). ``non_blocking``: an
        asynchronous host-to-GPU copy (when the batch is in pinned memory, see :meth:`pin_memory`)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None,
                                 non_blocking=non_blocking)
            moved[f.name] = value
        return replace(self, **moved)

    def pin_memory(self) -> "_Batch":
        """A copy in page-locked host memory (DataLoader's ``pin_memory=True`` calls this)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def size(self) -> int:
        return len(next(v for v in vars(self).values() if isinstance(v, torch.Tensor)))

    @property
    def text_mask_BL(self) -> torch.Tensor | None:
        """The real-token mask of the text the encoders read (padding is 0), or None without text."""
        return None


@dataclass
class TextBatch(_Batch):
    """Text-only micro-batch: MLM on the language encoder."""
    modality = "text"
    input_ids_BL: torch.Tensor
    """Token ids after MLM masking (80% mask token, 10% random, 10% kept), [B, L] long."""
    attention_mask_BL: torch.Tensor
    """1 for real tokens, 0 for padding, [B, L] long."""
    mlm_labels_BL: torch.Tensor
    """Original id at masked positions, -100 elsewhere, [B, L] long."""

    @property
    def text_mask_BL(self) -> torch.Tensor:
        return self.attention_mask_BL


@dataclass
class ImageBatch(_Batch):
    """Image-only micro-batch: MIM on the vision encoder."""
    modality = "image"
    pixel_values_BCHW: torch.Tensor
    """Augmented, normalised pixels, [B, 3, H, W] float."""
    mim_mask_BP: torch.Tensor
    """True for patches replaced by the mask token (BEiT block masking), [B, P] bool."""


@dataclass
class PairBatch(_Batch):
    """Image-text pair micro-batch: ITC, ITM, IMLM and MIM."""
    modality = "pair"
    pixel_values_BCHW: torch.Tensor
    """Augmented, normalised pixels, [B, 3, H, W] float."""
    caption_ids_BL: torch.Tensor
    """Unmasked caption ids (ITC, ITM), [B, L] long."""
    caption_mask_BL: torch.Tensor
    """1 for real tokens, 0 for padding, [B, L] long."""
    imlm_input_ids_BL: torch.Tensor
    """Caption ids after IMLM masking (prob 0.5, at most 15), [B, L] long."""
    imlm_labels_BL: torch.Tensor
    """Original id at IMLM-masked positions, -100 elsewhere, [B, L] long."""
    mim_mask_BP: torch.Tensor
    """True for masked patches, [B, P] bool."""

    @property
    def text_mask_BL(self) -> torch.Tensor:
        return self.caption_mask_BL


Batch = TextBatch | ImageBatch | PairBatch


def text_positions(batches: list[Batch]) -> dict[str, tuple[int, int]]:
    """Per micro-batch kind with text (text, pair): (real tokens, text positions padding included)
    over ``batches``, the positions the encoders compute."""
    counts: dict[str, tuple[int, int]] = {}
    for batch in batches:
        if batch.text_mask_BL is not None:
            real, positions = counts.get(batch.modality, (0, 0))
            counts[batch.modality] = (real + int(batch.text_mask_BL.sum()), positions + batch.text_mask_BL.numel())
    return counts
