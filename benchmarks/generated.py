"""Generated texts of natural lengths, for the benchmarks that need texts shorter than the maximum.

Word counts are drawn log-normally (median, sigma), as caption and paragraph lengths in web corpora
roughly are; the words come from the demo world's vocabulary, so the demo tokenizer (which
benchmarks/data.py and benchmarks/train_step.py use) gives about one token per word."""
from __future__ import annotations

import numpy as np

# Captions of about 10 words on average (CC3M's reported mean is 10.3), texts of paragraph length
# with a tail past base's 128-token cap.
CAPTION_WORDS, TEXT_WORDS = (9, 0.45), (40, 0.8)
DEMO_WORDS = "red green blue yellow purple black circle square triangle diamond left right top bottom".split()
MAX_WORDS = 400


def lognormal_word_texts(rng: np.random.Generator, median: float, sigma: float, n: int) -> list[str]:
    """``n`` texts of demo words whose word counts are log-normal (clipped to 1..MAX_WORDS)."""
    counts = np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, MAX_WORDS).astype(int)
    return [" ".join(rng.choice(DEMO_WORDS, c)) for c in counts]
