"""Length grouping: text and pair micro-batches whose samples have similar text lengths.

The loader pads a micro-batch's text to its longest sample (rounded up to a multiple of 8). With
the method's uniformly drawn micro-batches, 96 captions nearly always include one at the length
cap, so every caption of the micro-batch is computed at the cap: the language encoder and the
fusion encoder run mostly on padding when captions are short (in the base preset a pair
micro-batch at 32 tokens costs 18% more FLOPs than at 16). Grouping sorts samples into groups of
similar length, so a micro-batch cut from one group is padded only to that group's longest.

The reordering is a pure function of the blend and the seed, like the rest of the loader's schedule:

* A modality's stream (its samples' blend positions, in blend order) is cut into windows of
  ``group_size x window_groups`` consecutive positions.
* Each window is sorted by text length (stable, so ties keep blend order) and cut into groups of
  ``group_size`` samples; the groups' order is shuffled, seeded by (seed, modality, window).
* Micro-batches then read the reordered stream exactly as they read the plain one: the same cursor,
  every sample once, the same order for any data-parallel size. A group size that is a multiple of
  the global micro-batch (micro-batch x DP size) keeps every micro-batch inside one group; any
  other size is still correct, and a micro-batch may then straddle two groups.
* Only whole windows are read: the samples after a stream's last whole window are not used. A
  longer blend of the same spec (a run whose train.steps grew) holds the same whole windows, so a
  saved cursor continues exactly; a partial window would be sorted and shuffled differently once
  the blend grows. (The trainer sizes the blend with room for that tail.)

The text length is the byte size of the sample's ``txt`` member, read from the shard indexes (the
loader's random-access indexes): no shard data is read, decoded or tokenized to group. Bytes track
tokens closely enough to sort by (a few characters per token for a BPE vocabulary).

This changes what a micro-batch holds, so it is off by default (the method draws batches
uniformly). With grouping, the in-batch negatives of ITC and ITM are captions of similar length.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .shards import MODALITIES, load_index
from .spec import Corpus

_GROUP_SHUFFLE_STREAM = 0x1E6C7  # keeps these draws apart from the blend's and the samples' streams
TEXT_MODALITIES = frozenset({"text", "pair"})
"""The modalities whose micro-batches are padded text, and so are grouped."""


def corpus_text_bytes(corpus: Corpus, cache_dir: str | Path | None = None) -> np.ndarray:
    """[samples of the corpus] uint16: byte size of each sample's ``txt`` member (0 when it has
    none; capped at 65535, far beyond any text length cap), in the corpus's sample order.

    Read from the shard indexes; with ``cache_dir`` kept there as one ``.npy`` per corpus (keyed by
    its shards and their sizes) and memory-mapped, so the ranks of a node share one copy in the
    page cache and a relaunch reads no index again.
    """
    path = None
    if cache_dir is not None:
        files = [corpus.shards, corpus.shard_samples, corpus.shard_bytes]  # not the weight: a reweighted spec reuses it
        key = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "text-bytes" / f"{corpus.name}-{key}.npy"
        if path.exists():
            return np.load(path, mmap_mode="r")
    sizes = np.zeros(corpus.num_samples, dtype=np.uint16)
    start = 0
    for shard, count in zip(corpus.shards, corpus.shard_samples):
        members = load_index(shard, cache_dir)["members"][:count]
        sizes[start:start + len(members)] = [min(m.get("txt", (0, 0))[1], 65535) for m in members]
        start += count
    if path is None:
        return sizes
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as f:
        np.save(f, sizes)
    os.replace(f.name, path)  # atomic: ranks writing the same file at once leave one whole copy
    return np.load(path, mmap_mode="r")


def cache_text_bytes(blend) -> None:
    """Write the text byte sizes of the blend's text and pair corpora to its cache (one rank does
    this before the others start: otherwise every rank reads every shard index at once)."""
    for corpus in blend.corpora:
        if corpus.modality in TEXT_MODALITIES:
            corpus_text_bytes(corpus, blend.cache_dir)


class LengthGroupedStreams:
    """The streams of the text and pair modalities reordered into length groups (see the module
    docstring); other modalities' streams are returned as they are.

    ``positions(m, start, stop)`` is what ``streams[m][start:stop]`` is without grouping. Windows
    are computed when first read and the last two of each modality kept: a rank's micro-batches
    advance through a window in order.
    """

    def __init__(self, blend, group_size: int, window_groups: int, seed: int):
        if group_size <= 0 or window_groups <= 0:
            raise ValueError(f"group_size={group_size} and window_groups={window_groups} must be positive")
        self.blend, self.group_size, self.seed = blend, group_size, seed
        self.window = group_size * window_groups
        self._text_bytes: dict[int, np.ndarray] = {}
        self._windows: dict[tuple[str, int], np.ndarray] = {}

    def usable_length(self, modality: str) -> int:
        """Samples of the modality's stream the loader may read: whole windows only when grouped."""
        n = len(self.blend.streams[modality])
        return n - n % self.window if modality in TEXT_MODALITIES else n

    def positions(self, modality: str, start: int, stop: int) -> np.ndarray:
        stream = self.blend.streams[modality]
        stop = min(stop, self.usable_length(modality))
        if modality not in TEXT_MODALITIES or start >= stop:
            return np.array(stream[start:stop])
        parts = [self._window(modality, w)[max(start - w * self.window, 0):stop - w * self.window]
                 for w in range(start // self.window, (stop - 1) // self.window + 1)]
        return np.concatenate(parts)

    def text_bytes(self, positions: np.ndarray) -> np.ndarray:
        """Text byte size of the samples at these blend positions."""
        corpus, sample = self.blend.locate(positions)
        sizes = np.zeros(len(positions), dtype=np.int64)
        for c in map(int, np.unique(corpus)):
            if c not in self._text_bytes:
                self._text_bytes[c] = corpus_text_bytes(self.blend.corpora[c], self.blend.cache_dir)
            here = corpus == c
            sizes[here] = self._text_bytes[c][sample[here]]
        return sizes

    def _window(self, modality: str, w: int) -> np.ndarray:
        key = (modality, w)
        if key not in self._windows:
            stream = self.blend.streams[modality]
            positions = np.array(stream[w * self.window:(w + 1) * self.window])
            by_length = positions[np.argsort(self.text_bytes(positions), kind="stable")]
            groups = [by_length[g:g + self.group_size] for g in range(0, len(by_length), self.group_size)]
            rng = np.random.default_rng([self.seed, MODALITIES.index(modality), w, _GROUP_SHUFFLE_STREAM])
            self._windows[key] = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
            for old in [k for k in self._windows if k[0] == modality and k[1] < w - 1]:
                del self._windows[old]
        return self._windows[key]
