"""The method's two masking schemes, as pure functions of a numpy Generator (deterministic).

* :func:`mask_tokens`: X-VLM/X-FM MLM masking. ``n = min(max_masks, max(1, round(len * prob)))``
  positions are chosen in random order; from each start, with probability ``span_prob`` a span of
  2..``max_span`` tokens is masked, else one token. Chosen positions get the mask token 80%, a
  random token 10%, and stay unchanged 10%. Two schemes (``TokenMaskingConfig.scheme``):
  ``xfm_scale`` counts ``len`` over the non-special tokens and never masks a special token;
  ``reference`` is X-FM's own: ``len`` is the whole sequence (``<s>`` and ``</s>`` included) and
  only position 0 is protected, so ``</s>`` may be masked and predicted.
* :class:`BlockMaskGenerator`: BEiT block-wise masking: rectangles of random area (drawn between
  ``min_block`` patches and what is left to mask) and aspect ratio (0.3..1/0.3) until the target
  count, then topped up with single patches so every image has exactly ``num_masked`` masked
  patches (as BEiT-v2 does), so batches stack.

Written from the method's description (docs/method.md) and BEiT's published generator, not copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

TOKEN_MASKING_SCHEMES = ("xfm_scale", "reference")


@dataclass(frozen=True, kw_only=True)
class TokenMaskingConfig:
    prob: float
    """Fraction of (non-special) tokens to predict: 0.15 for MLM, 0.5 for IMLM."""
    max_masks: int
    """At most this many predicted tokens per sequence: 20 for MLM, 15 for IMLM."""
    span_prob: float = 0.2
    """Probability that a chosen start begins a span ("skipgram") rather than one token."""
    max_span: int = 3
    """Spans are 2..max_span tokens long."""
    scheme: Literal["xfm_scale", "reference"] = "xfm_scale"
    """``xfm_scale``: the count is taken over the non-special tokens and no special token (``<s>``,
    ``</s>``, padding) is ever masked, so ``prob`` is the share of the text's own tokens that is
    predicted. ``reference``: X-FM's TextMaskingGenerator: the count is taken over the whole
    unpadded sequence, ``<s>`` and ``</s>`` included, and every position but 0 may be chosen, so
    ``</s>`` is sometimes masked and predicted (the ``special`` argument of :func:`mask_tokens` is
    then ignored; pass the sequence without padding)."""

    def __post_init__(self):
        if self.scheme not in TOKEN_MASKING_SCHEMES:
            raise ValueError(f"token masking scheme {self.scheme!r}: use one of {', '.join(TOKEN_MASKING_SCHEMES)}")


MLM_MASKING = TokenMaskingConfig(prob=0.15, max_masks=20)
IMLM_MASKING = TokenMaskingConfig(prob=0.5, max_masks=15)


def mask_tokens(ids: np.ndarray, special: np.ndarray, cfg: TokenMaskingConfig, mask_id: int,
                vocab_size: int, rng: np.random.Generator, ignore_index: int = -100
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return (masked ids, labels) for one sequence. ``special[i]`` marks positions never masked
    (scheme ``xfm_scale``; the ``reference`` scheme protects position 0 only)."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full_like(ids, ignore_index)
    if cfg.scheme == "reference":
        candidates = np.arange(1, len(ids))
        counted = len(ids)  # <s> and </s> count towards n (Python's round: half to even, as X-FM's)
    else:
        candidates = np.flatnonzero(~np.asarray(special, dtype=bool))
        counted = len(candidates)
    if len(candidates) == 0:
        return ids.copy(), labels
    n_pred = min(cfg.max_masks, max(1, int(round(counted * cfg.prob))))
    allowed = set(candidates.tolist())
    chosen: set[int] = set()
    for start in rng.permutation(candidates):
        if len(chosen) >= n_pred:
            break
        if start in chosen:
            continue
        length = int(rng.integers(2, cfg.max_span + 1)) if (
            cfg.max_span >= 2 and rng.random() < cfg.span_prob) else 1
        for pos in range(int(start), int(start) + length):
            if pos not in allowed:
                break  # a span stops at a special token or the end
            chosen.add(pos)
    positions = np.array(sorted(chosen), dtype=np.int64)
    if len(positions) > n_pred:  # a last span may overshoot: keep a random n_pred of them
        positions = np.sort(rng.choice(positions, n_pred, replace=False))
    masked = ids.copy()
    labels[positions] = ids[positions]
    for pos in positions:
        draw = rng.random()
        if draw < 0.8:
            masked[pos] = mask_id
        elif draw < 0.9:
            masked[pos] = int(rng.integers(0, vocab_size))
    return masked, labels


@dataclass(frozen=True, kw_only=True)
class BlockMaskGenerator:
    grid: int
    """Patches per side (image_size / patch_size): 14 for 224/16."""
    num_masked: int
    """Exactly this many patches are masked per image: 75 of 196 in the method."""
    min_block: int = 16
    """Smallest area (in patches) drawn for a rectangle, also once fewer patches than that are
    left to mask (BEiT's ``min_num_patches``)."""
    min_aspect: float = 0.3
    """Aspect ratios are drawn log-uniformly in [min_aspect, 1/min_aspect]."""

    def __post_init__(self):
        if not 0 < self.num_masked <= self.grid * self.grid:
            raise ValueError(f"num_masked={self.num_masked} must be in 1..{self.grid ** 2} "
                             f"(patches of a {self.grid}x{self.grid} grid)")

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Up to 10 tries to place one rectangle that adds between 1 and ``budget`` new patches;
        returns how many it added (0: every try failed)."""
        log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))
        for _ in range(10):
            # BEiT draws the area uniformly between min_block and the budget in that order, also
            # when the budget is below min_block: the area then lies in [budget, min_block], so a
            # late rectangle is about as large as what is left or larger, and mostly fits only by
            # overlapping the mask already drawn. That merges it into an existing block instead of starting a
            # small new one (fewer, larger blocks: 1.79 per 224/16 image rather than 2.12 with an
            # area clipped to the budget). Written as low + (high - low) * u, Python's
            # random.uniform, because numpy leaves uniform(low, high) with high < low undefined.
            area = self.min_block + (budget - self.min_block) * rng.random()
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.grid and 0 < w < self.grid:
                top = int(rng.integers(0, self.grid - h + 1))
                left = int(rng.integers(0, self.grid - w + 1))
                window = mask[top:top + h, left:left + w]
                new = int(h * w - window.sum())
                if 0 < new <= budget:
                    window[:] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A [grid*grid] bool mask with exactly ``num_masked`` True entries."""
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        if count < self.num_masked:  # top up with random single patches, as BEiT-v2 does
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, self.num_masked - count, replace=False)] = True
        return flat
