"""The loader: micro-batches of one modality per global micro-step, read by random access.

Schedule (a pure function of the blend and the micro-batch sizes; the same on every rank):

* The blend's global sample sequence is split into one stream per modality, each in blend order
  (``Blend.streams``: the k-th sample of a modality is a closed form of k, computed when read).
* The modality of global micro-step t comes from a split tree (xfm_scale.data.sequence, the same
  closed form as the blend's corpus choice) over the modalities with weights
  ``w_m / micro_batch_size_m``, where ``w_m`` is the spec's normalised weight of modality m (the
  sum over its corpora). The blend fills stream m at rate ``w_m`` (within about a sample at every
  prefix), so every stream is consumed at the rate it is filled. The spec
  weights, not the realised stream lengths, make the schedule of a longer blend extend a shorter
  one's. The data-parallel size cancels out of those weights: the modality of micro-step t is the
  same for any DP size.
* A micro-step of modality m consumes the next ``mbs_m x dp_size`` samples of stream m; DP rank r
  reads the r-th contiguous slice of ``mbs_m``. Tensor-parallel ranks of one replica pass the
  same dp_rank and read identical data.
* With ``length_group_size`` set, the text and pair streams are read in length-grouped order
  (xfm_scale.data.lengths: a fixed reordering within windows of each stream, so all of the above
  holds of the reordered streams).
* The cursor (``state_dict``) is the micro-step plus one offset per stream. Resuming with another
  DP size continues every stream from its offset: no sample repeated or skipped.

Randomness (augmentation, MLM/IMLM/MIM masks) derives from (seed, global sample index) only, so
0, 1 or N DataLoader workers give identical batches. A bad sample (corrupt image, empty caption)
is counted per (corpus, reason) and replaced by a seeded random sample of the same corpus
(:func:`replacement_sample`), also a function of (seed, blend position) only.
Legend: B batch, L text length, P patches, C channels, H/W image size.
"""
from __future__ import annotations

import io
import json
import logging
import itertools
import tarfile
import zlib
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..batch import IGNORE_INDEX, MODALITIES, Batch, ImageBatch, PairBatch, TextBatch
from .blend import BLEND_VERSION, Blend, fingerprint
from .captions import CAPTION_MAX_WORDS, EmptyCaption, pre_caption
from .masking import IMLM_MASKING, MLM_MASKING, TOKEN_MASKING_SCHEMES, BlockMaskGenerator, mask_tokens
from .lengths import TEXT_MODALITIES, LengthGroupedStreams
from .sequence import ChoiceSequence
from .shards import DataSpecError, ShardReader, image_ext, load_index
from .sources import CAPTION_LIST_EXT
from .transforms import apply_seeded, eval_transform, sample_rngs, train_transform

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoaderConfig:
    """Everything the loader needs besides the blend and the (dp_rank, dp_size) pair."""
    tokenizer_dir: str | None
    """Local HF tokenizer folder (roberta-base, bert-base, or the demo's); never a hub name."""
    micro_batch_sizes: dict[str, int] = field(default_factory=lambda: {"text": 256, "image": 96, "pair": 96})
    """Per-GPU (per DP rank) micro-batch size of each modality (the method: text 256, image/pair 96)."""
    micro_steps_per_step: int = 1
    """Micro-steps per optimizer step (gradient accumulation); global step k = micro-steps
    ``k*A .. k*A + A - 1``."""
    micro_steps_per_group: dict[str, int] | None = None
    """The per-modality schedule (run config ``batch.step_schedule: per_modality``): this rank's
    micro-batches in the optimizer step of each modality; an iteration is one such step per
    modality of the blend, in the order text, image, pair (``iter_iterations``). None: the mixed
    schedule of ``micro_steps_per_step``."""
    image_size: int = 224
    """Side of the square pixel tensors."""
    mim_grid: int = 14
    """Patches per side (image_size / patch_size): 14 for 224/16, 4 for the tiny 32/8."""
    mim_num_masked: int = 75
    """Masked patches per image (75 of 196 in the method; e.g. 6 of 16 for tiny)."""
    mim_min_block: int = 16
    """Smallest BEiT mask block in patches (16 in the method; e.g. 2 for tiny)."""
    text_max_len: int = 128
    """Max tokens of a text sample (MLM)."""
    caption_max_len: int = 30
    """Max tokens of a caption (pairs)."""
    augment: bool = True
    """Pre-training augmentation; False: deterministic resize + centre crop (evaluation)."""
    num_workers: int = 0
    """torch DataLoader workers (the batches do not depend on it)."""
    prefetch_factor: int = 2
    """Micro-batches prefetched per worker."""
    pin_memory: bool = False
    """Put micro-batches in page-locked memory (the trainer sets it on GPU): the copy to the GPU
    then does not block the host, which goes on queueing work; with workers, DataLoader's pinning
    thread pins while the main thread drives the GPU."""
    seed: int | None = None
    """Seed of augmentation and masks; ``None``: the blend's seed."""
    max_caption_chars: int = 2000
    """A pair's caption longer than this (characters) is skipped as bad."""
    caption_cleaning: bool = False
    """Clean every pair caption with X-FM's ``pre_caption`` (xfm_scale.data.captions: lower-case,
    punctuation and ``-``/``/`` to spaces, whitespace collapsed, cut to ``caption_max_words``
    words) before tokenising; a caption left empty is an ``empty_caption`` bad sample. False: the
    caption as stored (surrounding whitespace stripped). Text samples are never cleaned (the
    reference does not clean them either)."""
    caption_max_words: int = CAPTION_MAX_WORDS
    """Words kept by caption cleaning (X-FM: 30)."""
    caption_choice: str = "first"
    """The caption of a pair sample that holds several (``KEY.captions.json``, make_shards
    ``--captions all``): ``first`` (default) reads its ``KEY.txt``, the first caption, as for any
    pair; ``draw`` draws one of the list per read (the reference's ``random.choice``), seeded by
    (seed, the sample's blend position) (:func:`caption_draw_rng`). A pair without a list reads its
    ``KEY.txt`` either way."""
    mlm_masking: str = "xfm_scale"
    """Scheme of the MLM and IMLM masks (xfm_scale.data.masking.TokenMaskingConfig.scheme):
    ``xfm_scale`` (masks counted over the non-special tokens, ``<s>``/``</s>`` never masked) or
    ``reference`` (X-FM's: counted over the whole sequence, only ``<s>`` protected)."""
    max_bad_in_a_row: int = 100
    """Give up (with an error naming the corpus) after this many consecutive bad replacements."""
    length_group_size: int = 0
    """Group text and pair samples by text length (xfm_scale.data.lengths): 0 (the default, the
    method's uniform micro-batches) is off; else samples per group, best a multiple of every
    grouped modality's global micro-batch (micro-batch x DP size), so that a micro-batch lies in
    one group and is padded only to that group's longest text."""
    length_group_window: int = 64
    """Groups per window: each window of ``length_group_size x length_group_window`` consecutive
    samples of a stream is sorted by length, cut into groups, and the groups shuffled. A larger
    window gives groups of closer lengths; the order of samples changes within a window only."""

    def validate(self, modalities: set[str]) -> None:
        for m in modalities:
            size = self.micro_batch_sizes.get(m)
            if not isinstance(size, int) or size <= 0:
                raise DataSpecError(f"the blend has '{m}' samples but micro_batch_sizes[{m!r}] is {size!r}; "
                                    "give a positive per-rank micro-batch size")
        if self.length_group_size < 0 or self.length_group_window <= 0:
            raise DataSpecError(f"length_group_size={self.length_group_size} and length_group_window="
                                f"{self.length_group_window}: give length_group_size >= 0 (0: no grouping) "
                                "and length_group_window >= 1")
        if self.micro_steps_per_step <= 0:
            raise DataSpecError(f"micro_steps_per_step={self.micro_steps_per_step}; give a positive count")
        for m in modalities if self.micro_steps_per_group is not None else ():
            if self.micro_steps_per_group.get(m, 0) <= 0:
                raise DataSpecError(f"the blend has '{m}' samples but micro_steps_per_group[{m!r}] is "
                                    f"{self.micro_steps_per_group.get(m)!r}; give a positive count")
        if self.mlm_masking not in TOKEN_MASKING_SCHEMES:
            raise DataSpecError(f"data.mlm_masking={self.mlm_masking!r}: use one of {', '.join(TOKEN_MASKING_SCHEMES)}")
        if self.caption_choice not in CAPTION_CHOICES:
            raise DataSpecError(f"data.caption_choice={self.caption_choice!r}: use one of {', '.join(CAPTION_CHOICES)}")
        if self.caption_max_words < 1:
            raise DataSpecError(f"caption_max_words={self.caption_max_words}; give a positive count")
        if modalities & {"text", "pair"} and not (self.tokenizer_dir and Path(self.tokenizer_dir).is_dir()):
            raise DataSpecError(f"tokenizer_dir={self.tokenizer_dir!r} is not a folder; give a local tokenizer "
                                "folder (e.g. a roberta-base download, or the demo's tokenizer)")
        BlockMaskGenerator(grid=self.mim_grid, num_masked=self.mim_num_masked, min_block=self.mim_min_block)


@dataclass(frozen=True)
class BadSample:
    """One bad sample met at load time."""
    corpus: str
    reason: str
    key: str | None
    """Its key in the shard; None when the shard could not be read."""
    shard: str
    """The shard it is in."""


BAD_SAMPLE_EXAMPLES = 3
"""Keys and shards named per (corpus, reason) in a bad-sample report."""


class BadSampleCounter:
    """Bad samples met at load time, per corpus and reason (e.g. ``cc3m: bad_image=3``), with the
    first keys and shards of each since the last :meth:`report`."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()
        self._reported: Counter[tuple[str, str]] = Counter()
        self._examples: dict[tuple[str, str], tuple[list[str], list[str]]] = {}

    def add(self, corpus: str, reason: str, n: int = 1, *, key: str | None = None, shard: str | None = None) -> None:
        self.counts[(corpus, reason)] += n
        keys, shards = self._examples.setdefault((corpus, reason), ([], []))
        if key is not None and key not in keys and len(keys) < BAD_SAMPLE_EXAMPLES:
            keys.append(key)
        if shard is not None and shard not in shards and len(shards) < BAD_SAMPLE_EXAMPLES:
            shards.append(shard)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Flat ``{"corpus/reason": count}``: what a trainer logs."""
        return {f"{c}/{r}": n for (c, r), n in sorted(self.counts.items())}

    def report(self) -> list[dict]:
        """The bad samples met since the last call: one dict per (corpus, reason), sorted, with
        ``corpus``, ``reason``, ``count`` (new since the last call), ``keys`` and ``shards`` (the
        first :data:`BAD_SAMPLE_EXAMPLES` distinct ones since the last call; a key is the sample's
        key in its shard). The counts since the start are :meth:`as_dict`."""
        out = []
        for (corpus, reason), total in sorted(self.counts.items()):
            new = total - self._reported[(corpus, reason)]
            if new:
                keys, shards = self._examples.get((corpus, reason), ([], []))
                out.append({"corpus": corpus, "reason": reason, "count": new, "keys": list(keys),
                            "shards": list(shards)})
        self._reported = Counter(self.counts)
        self._examples = {}
        return out

    def __repr__(self) -> str:
        return f"BadSampleCounter({self.as_dict()})"


def merge_bad_sample_reports(reports: list[list[dict]]) -> list[dict]:
    """Several ranks' :meth:`BadSampleCounter.report` lists as one: counts summed per (corpus,
    reason), the first keys and shards kept. Give one report per data-parallel rank (the
    tensor-parallel ranks of a replica read the same samples: their reports are copies)."""
    merged: dict[tuple[str, str], dict] = {}
    for report in reports:
        for entry in report:
            into = merged.setdefault((entry["corpus"], entry["reason"]), {
                "corpus": entry["corpus"], "reason": entry["reason"], "count": 0, "keys": [], "shards": []})
            into["count"] += entry["count"]
            for field_name in ("keys", "shards"):
                into[field_name] += [x for x in entry[field_name] if x not in into[field_name]]
                del into[field_name][BAD_SAMPLE_EXAMPLES:]
    return [merged[k] for k in sorted(merged)]


def format_bad_sample_report(report: list[dict]) -> str:
    """One line for the log: ``corpus/reason=count (first keys ...; shards ...)`` per entry."""
    return "; ".join(
        f"{e['corpus']}/{e['reason']}={e['count']}" + (" (" + "; ".join(
            ([f"first keys {', '.join(e['keys'])}"] if e["keys"] else [])
            + ([f"shards {', '.join(e['shards'])}"] if e["shards"] else [])) + ")" if e["keys"] or e["shards"] else "")
        for e in report)


@dataclass(frozen=True)
class _Plan:
    """One micro-batch for this rank: what a worker needs to build it."""
    micro_step: int
    modality: str
    global_indices: np.ndarray  # blend positions of this rank's samples, in order
    cursor_after: tuple[int, ...]  # (micro_step, offset per modality) once this batch is consumed


class _Schedule:
    """The modality of every global micro-step, and the per-modality streams of blend positions."""

    def __init__(self, blend: Blend, micro_batch_sizes: dict[str, int]):
        # The blend's own streams: closed forms computed when read, nothing held per sample.
        self.streams = blend.streams
        present = [m for m in MODALITIES if len(self.streams[m])]
        self.present = set(present)
        mbs = {m: micro_batch_sizes.get(m, 1) for m in present}
        # Micro-steps per modality in proportion to the spec's weights (not the realised stream
        # lengths, which shift with num_samples): the schedule of a longer blend extends a shorter one's.
        spec_weights = blend.modality_weights()
        weights = [spec_weights[m] / mbs[m] for m in present]
        # Enough micro-steps for DP size 1 (the most micro-steps any DP size can use).
        length = sum(-(-len(self.streams[m]) // mbs[m]) for m in present) + 1
        self._codes = np.array([MODALITIES.index(m) for m in present], dtype=np.int8)
        self.modality = _ModalityCodes(ChoiceSequence(weights, length), self._codes)
        """[micro-steps] int8 modality code (index into MODALITIES) of each global micro-step,
        computed when indexed."""
        self.grouped: LengthGroupedStreams | None = None  # BlendLoader sets it with length grouping on

    def usable_length(self, modality: str) -> int:
        """Samples of a modality's stream the loader may read (with length grouping, whole windows)."""
        return self.grouped.usable_length(modality) if self.grouped is not None else len(self.streams[modality])

    def positions(self, modality: str, start: int, stop: int) -> np.ndarray:
        """Blend positions ``start:stop`` of a modality's stream in the order they are read (with
        length grouping, the grouped order): a copy, not a view of the map."""
        if self.grouped is not None:
            return self.grouped.positions(modality, start, stop)
        return np.array(self.streams[modality][start:stop])

    def micro_steps_before(self, micro_step: int) -> dict[str, int]:
        """Per present modality: its global micro-steps among the first ``micro_step`` (closed form)."""
        counts = self.modality.choice.tree.leaf_counts(min(micro_step, len(self.modality)))
        return {MODALITIES[int(code)]: int(n) for code, n in zip(self._codes, counts)}

    def modality_at(self, micro_step: int) -> str:
        return MODALITIES[self.modality[micro_step]] if micro_step < len(self.modality) else MODALITIES[0]


class _ModalityCodes:
    """The micro-step schedule as a read-only int8 array of modality codes, computed when indexed."""

    def __init__(self, choice: ChoiceSequence, codes: np.ndarray):
        self.choice, self.codes = choice, codes

    def __len__(self) -> int:
        return len(self.choice)

    def __getitem__(self, key):
        leaf = self.choice[key]
        return int(self.codes[leaf]) if np.ndim(leaf) == 0 else self.codes[leaf]

    def __array__(self, dtype=None, copy=None):
        out = self.codes[np.asarray(self.choice)]
        return out if dtype is None else out.astype(dtype)


class _PlanSampler(Sampler):
    """Yields this rank's plans from a cursor, whole optimizer steps only, until the blend runs out."""

    def __init__(self, loader: "BlendLoader", cursor: dict[str, int]):
        self.loader, self.cursor = loader, dict(cursor)

    def __iter__(self) -> Iterator[_Plan]:
        if self.loader.cfg.micro_steps_per_group is not None:
            yield from self._iterations()
            return
        ld, cfg = self.loader, self.loader.cfg
        t = self.cursor["micro_step"]
        offsets = {m: self.cursor[f"offset_{m}"] for m in MODALITIES}
        while True:
            if t % cfg.micro_steps_per_step == 0 and not ld._step_fits(t, offsets):
                return
            m = ld.schedule.modality_at(t)
            mbs = cfg.micro_batch_sizes[m]
            start = offsets[m] + ld.dp_rank * mbs
            indices = ld.schedule.positions(m, start, start + mbs)
            offsets[m] += mbs * ld.dp_size
            t += 1
            yield _Plan(t - 1, m, indices, (t, *(offsets[k] for k in MODALITIES)))

    def _iterations(self) -> Iterator[_Plan]:
        """The per-modality schedule: per iteration, each modality's micro-batches in turn. The
        cursor's ``micro_step`` counts whole iterations (the same at any DP size)."""
        ld = self.loader
        iteration = self.cursor["micro_step"]
        offsets = {m: self.cursor[f"offset_{m}"] for m in MODALITIES}
        order = ld.iteration_order()
        while ld._iteration_fits(offsets):
            for m in order:
                mbs, count = ld.cfg.micro_batch_sizes[m], ld.cfg.micro_steps_per_group[m]
                for j in range(count):
                    start = offsets[m] + ld.dp_rank * mbs
                    indices = ld.schedule.positions(m, start, start + mbs)
                    offsets[m] += mbs * ld.dp_size
                    done = m == order[-1] and j == count - 1
                    yield _Plan(iteration, m, indices, (iteration + done, *(offsets[k] for k in MODALITIES)))
            iteration += 1

    def __len__(self) -> int:  # unknown in general; DataLoader only needs it for len(loader)
        raise TypeError("the number of micro-batches depends on the blend; see BlendLoader.num_steps")


def _identity(x):
    return x


class BlendLoader:
    """Micro-batches of one modality each for data-parallel rank ``dp_rank`` of ``dp_size``.

    Iterate it for consecutive micro-steps (``Batch`` objects); ``state_dict()`` after any batch
    is the cursor to resume from; ``bad_samples`` counts skipped samples of this rank.
    """

    def __init__(self, blend: Blend, cfg: LoaderConfig, *, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise DataSpecError(f"dp_rank={dp_rank} is not in 0..{dp_size - 1} (dp_size={dp_size})")
        self.blend, self.cfg, self.dp_rank, self.dp_size = blend, cfg, dp_rank, dp_size
        self.schedule = _Schedule(blend, cfg.micro_batch_sizes)
        cfg.validate(self.schedule.present)
        if cfg.length_group_size:
            self.schedule.grouped = LengthGroupedStreams(blend, cfg.length_group_size, cfg.length_group_window,
                                                         blend.seed if cfg.seed is None else cfg.seed)
            self._check_group_size()
        self.bad_samples = BadSampleCounter()
        self._dataset = _MicroBatchDataset(blend, cfg)
        self._cursor = {"micro_step": 0, **{f"offset_{m}": 0 for m in MODALITIES}}

    def _check_group_size(self) -> None:
        for m in sorted(TEXT_MODALITIES & self.schedule.present):
            global_micro_batch = self.cfg.micro_batch_sizes[m] * self.dp_size
            if self.cfg.length_group_size % global_micro_batch:
                log.warning("length_group_size=%d is not a multiple of the global %s micro-batch (%d x DP %d = "
                            "%d): some micro-batches straddle two length groups and are padded to the longer; "
                            "a multiple of it pads less", self.cfg.length_group_size, m,
                            self.cfg.micro_batch_sizes[m], self.dp_size, global_micro_batch)

    # -------------------------------------------------------------- schedule queries
    def micro_steps_of(self, step: int) -> range:
        """The global micro-steps of optimizer step ``step``."""
        a = self.cfg.micro_steps_per_step
        return range(step * a, (step + 1) * a)

    def step_modalities(self, step: int) -> list[str]:
        """Modalities of the micro-steps of optimizer step ``step`` (same on every rank)."""
        return [self.schedule.modality_at(t) for t in self.micro_steps_of(step)]

    def iteration_order(self) -> list[str]:
        """The per-modality schedule's step order: the blend's modalities as text, image, pair
        (the reference's loop: its text step, its image step, then its pair step)."""
        return [m for m in ("text", "image", "pair") if m in self.schedule.present]

    def _iteration_fits(self, offsets: dict[str, int]) -> bool:
        return all(offsets[m] + self.cfg.micro_steps_per_group[m] * self.cfg.micro_batch_sizes[m] * self.dp_size
                   <= self.schedule.usable_length(m) for m in self.iteration_order())

    def _step_fits(self, micro_step: int, offsets: dict[str, int]) -> bool:
        if micro_step + self.cfg.micro_steps_per_step > len(self.schedule.modality):
            return False
        need = Counter(self.schedule.modality_at(t) for t in range(micro_step, micro_step + self.cfg.micro_steps_per_step))
        return all(offsets[m] + n * self.cfg.micro_batch_sizes[m] * self.dp_size <= self.schedule.usable_length(m)
                   for m, n in need.items())

    @property
    def num_steps(self) -> int:
        """Optimizer steps (iterations, in the per-modality schedule) the blend can still feed from
        the current cursor at this DP size: what iterating would yield, in closed form (a few
        count evaluations of the split trees, at any blend length)."""
        cursor, cfg = self._cursor, self.cfg
        offsets = {m: cursor[f"offset_{m}"] for m in MODALITIES}
        if cfg.micro_steps_per_group is not None:
            return min(max(0, (self.schedule.usable_length(m) - offsets[m])
                           // (cfg.micro_steps_per_group[m] * cfg.micro_batch_sizes[m] * self.dp_size))
                       for m in self.iteration_order())
        a, t0 = cfg.micro_steps_per_step, cursor["micro_step"]
        t1 = -(-t0 // a) * a  # the rest of a step begun before the cursor is fed unchecked
        before = self.schedule.micro_steps_before(t0)

        def fits(s: int) -> bool:  # does the step starting at micro-step t1 + s*a fit?
            end = t1 + (s + 1) * a
            if end > len(self.schedule.modality):
                return False
            used = self.schedule.micro_steps_before(end)
            return all(offsets[m] + (used[m] - before[m]) * cfg.micro_batch_sizes[m] * self.dp_size
                       <= self.schedule.usable_length(m) for m in self.schedule.present)

        # each modality's micro-step count only grows with the step: the steps that fit are a prefix
        low, high = 0, max(0, (len(self.schedule.modality) - t1) // a) + 1  # fits(low - 1), not fits(high)
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if fits(mid) else (low, mid)
        return ((t1 - t0) + low * a) // a

    def stream_keys(self, modality: str, start: int = 0, stop: int | None = None) -> list[str]:
        """Sample keys of positions ``start:stop`` of a modality's global stream (before bad-sample
        replacement): the order in which all ranks together consume that modality."""
        keys = []
        stop = self.schedule.usable_length(modality) if stop is None else stop
        corpus, sample = self.blend.locate(self.schedule.positions(modality, start, stop))
        for c, s in zip(corpus.tolist(), sample.tolist()):
            key, _, _ = self._dataset._locate(c, s)
            keys.append(f"{self.blend.corpora[c].name}/{key}")
        return keys

    # -------------------------------------------------------------- iteration and state
    def __iter__(self) -> Iterator[Batch]:
        cfg = self.cfg
        sampler = _PlanSampler(self, self._cursor)
        if cfg.num_workers == 0:
            items = (self._dataset[plan] for plan in sampler)
        else:
            items = iter(DataLoader(self._dataset, sampler=sampler, batch_size=None, collate_fn=_identity,
                                    num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                                    pin_memory=cfg.pin_memory))
        for batch, bad, cursor_after in items:
            if cfg.pin_memory and cfg.num_workers == 0:
                batch = batch.pin_memory()
            for b in bad:
                self.bad_samples.add(b.corpus, b.reason, key=b.key, shard=b.shard)
            # Advance only when the batch reaches the trainer: workers run ahead of it.
            self._cursor = dict(zip(("micro_step", *(f"offset_{m}" for m in MODALITIES)), cursor_after))
            yield batch

    def iter_iterations(self) -> Iterator[list[list[Batch]]]:
        """Whole training steps, each a list of optimizer steps, each a list of micro-batches: one
        step of ``micro_steps_per_step`` mixed micro-batches, or (the per-modality schedule) one
        step per modality in :meth:`iteration_order`."""
        if self.cfg.micro_steps_per_group is None:
            for step in self.iter_steps():
                yield [step]
            return
        sizes = [self.cfg.micro_steps_per_group[m] for m in self.iteration_order()]
        batches = iter(self)
        while True:
            groups = [list(itertools.islice(batches, n)) for n in sizes]
            if len(groups[-1]) < sizes[-1]:
                return
            yield groups

    def new_bad_samples(self) -> list[dict]:
        """This rank's bad samples since the last call, per corpus and reason, with the first keys
        and shards (:meth:`BadSampleCounter.report`); :func:`merge_bad_sample_reports` joins the
        ranks' reports, :func:`format_bad_sample_report` makes the log line."""
        return self.bad_samples.report()

    def iter_steps(self) -> Iterator[list[Batch]]:
        """Whole optimizer steps: lists of ``micro_steps_per_step`` micro-batches."""
        step: list[Batch] = []
        for batch in self:
            step.append(batch)
            if len(step) == self.cfg.micro_steps_per_step:
                yield step
                step = []

    def _length_groups(self) -> dict[str, int]:
        size = self.cfg.length_group_size
        return {"length_group_size": size, "length_group_window": self.cfg.length_group_window if size else 0}

    def state_dict(self) -> dict[str, int]:
        """The cursor: global micro-step, one offset per modality stream, a checksum of the blend's
        sample sequence (its length excluded: a longer blend of the same spec continues it), and
        the length grouping the offsets count in."""
        return {**self._cursor, "blend_crc": zlib.crc32(self.blend.sequence_id.encode()), **self._length_groups(),
                "per_modality_steps": int(self.cfg.micro_steps_per_group is not None)}

    def _step_schedule(self) -> str:
        return "mixed" if self.cfg.micro_steps_per_group is None else "per_modality"

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("blend_crc") != zlib.crc32(self.blend.sequence_id.encode()):
            old = [v for v in range(1, BLEND_VERSION)
                   if state.get("blend_crc") == zlib.crc32(fingerprint(self.blend.corpora, 0, self.blend.seed, v).encode())]
            if old:
                raise DataSpecError(f"the loader state was saved with blend version {old[0]} of this spec (per-sample "
                                    f"arrays built with megatron's helper); this xfm_scale computes blend version "
                                    f"{BLEND_VERSION} (closed forms), whose sample order differs, so the cursor "
                                    "cannot continue it exactly: finish the run with the xfm_scale that saved it, "
                                    "or start a new run")
            raise DataSpecError("the loader state was saved with another blend (spec, shards or "
                                "seed differ); resume with the blend spec and data.seed it was saved with")
        saved = {k: int(state.get(k, 0)) for k in ("length_group_size", "length_group_window")}  # older cursors: off
        if saved != self._length_groups():
            # the offsets count samples of the streams in the saved order: another grouping would
            # repeat some samples and skip others
            raise DataSpecError(f"the loader state was saved with data.length_group_size={saved['length_group_size']}, "
                                f"length_group_window={saved['length_group_window']}, this run has "
                                f"{self.cfg.length_group_size}, {self.cfg.length_group_window}; resume with the "
                                "saved values (0: off)")
        saved_schedule = "per_modality" if state.get("per_modality_steps", 0) else "mixed"  # older cursors: mixed
        if saved_schedule != self._step_schedule():
            # the cursor's micro_step counts micro-steps in one, iterations in the other
            raise DataSpecError(f"the loader state was saved with batch.step_schedule={saved_schedule}, this run has "
                                f"{self._step_schedule()}; resume with the saved schedule")
        self._cursor = {k: int(state[k]) for k in ("micro_step", *(f"offset_{m}" for m in MODALITIES))}


class _MicroBatchDataset(Dataset):
    """Builds one micro-batch from a plan (runs in DataLoader workers)."""

    def __init__(self, blend: Blend, cfg: LoaderConfig):
        self.blend, self.cfg = blend, cfg
        self.seed = blend.seed if cfg.seed is None else cfg.seed
        self.corpus_starts = [np.cumsum([0, *c.shard_samples]).tolist() for c in blend.corpora]
        self.mim = BlockMaskGenerator(grid=cfg.mim_grid, num_masked=cfg.mim_num_masked, min_block=cfg.mim_min_block)
        self.transform = train_transform(cfg.image_size) if cfg.augment else eval_transform(cfg.image_size)
        self._lazy: dict = {}  # per process: tokenizer, shard reader, shard indexes

    def __getstate__(self):  # spawned workers rebuild the per-process state
        return {**self.__dict__, "_lazy": {}}

    @property
    def tokenizer(self):
        if "tok" not in self._lazy:
            self._lazy["tok"] = load_tokenizer(self.cfg.tokenizer_dir)
        return self._lazy["tok"]

    def __getitem__(self, plan: _Plan):
        bad: list[tuple[str, str]] = []
        corpus, sample = self.blend.locate(plan.global_indices)
        samples = [self._sample(int(i), c, s, plan.modality, bad)
                   for i, c, s in zip(plan.global_indices.tolist(), corpus.tolist(), sample.tolist())]
        build = {"text": self._text_batch, "image": self._image_batch, "pair": self._pair_batch}[plan.modality]
        # Per-sample seeding must not disturb the trainer's RNG: apply_seeded seeds only the CPU
        # generator (never CUDA's), and fork_rng(devices=[]) restores exactly that one.
        with torch.random.fork_rng(devices=[]):
            batch = build(samples)
        return batch, bad, plan.cursor_after

    def __len__(self) -> int:
        return self.blend.num_samples

    # -------------------------------------------------------------- reading one sample
    def _sample(self, global_index: int, c: int, sample: int, modality: str, bad: list) -> tuple[int, str, dict]:
        """(global index, sample key, decoded members) of the sample ``sample`` of corpus ``c`` at
        blend position ``global_index``, replacing bad ones. A replacement keeps the bad sample's
        global index: its augmentation and masks are seeded from the blend position, whichever
        sample fills it."""
        corpus = self.blend.corpora[c]
        draw = modality == "pair" and self.cfg.caption_choice == "draw"
        for attempt in range(self.cfg.max_bad_in_a_row + 1):
            key = None
            try:
                key, members = self._read(c, sample)
            except FileNotFoundError:  # a shard that disappeared after the blend was built
                members = "missing_shard"
            except (EOFError, OSError, tarfile.TarError):  # cut short, or unreadable storage
                members = "truncated_shard"
            decoded = members if isinstance(members, str) else decode_sample(
                members, modality, self.cfg.max_caption_chars, caption_cleaning=self.cfg.caption_cleaning,
                caption_max_words=self.cfg.caption_max_words,
                caption_rng=caption_draw_rng(self.seed, global_index) if draw else None)
            if not isinstance(decoded, str):
                return global_index, f"{corpus.name}/{key}", decoded
            bad.append(BadSample(corpus.name, decoded, key, self._shard(c, sample)))
            sample = replacement_sample(self.seed, global_index, attempt, corpus.num_samples)
        raise RuntimeError(f"corpus '{corpus.name}': more than {self.cfg.max_bad_in_a_row} "
                           f"bad samples in a row (last: {decoded}); check its shards with tools/make_shards.py")

    def _shard(self, c: int, sample: int) -> str:
        """The shard holding sample ``sample`` of corpus ``c``."""
        return self.blend.corpora[c].shards[bisect_right(self.corpus_starts[c], sample) - 1]

    def _locate(self, c: int, sample: int) -> tuple[str, dict[str, list[int]], str]:
        """(key, member spans, shard path) of sample ``sample`` of corpus ``c``."""
        s = bisect_right(self.corpus_starts[c], sample) - 1
        shard = self.blend.corpora[c].shards[s]
        index = self._lazy.get(("idx", shard))
        if index is None:
            index = self._lazy[("idx", shard)] = load_index(shard, self.blend.cache_dir)
        local = sample - self.corpus_starts[c][s]
        if local >= len(index["keys"]):  # the manifest promised more samples than the shard holds
            raise EOFError(f"{shard} holds {len(index['keys'])} samples, its manifest says more")
        return index["keys"][local], index["members"][local], shard

    def _read(self, c: int, sample: int) -> tuple[str, dict[str, bytes]]:
        key, spans, shard = self._locate(c, sample)
        reader = self._lazy.setdefault("reader", ShardReader())
        return key, {ext: reader.read(shard, tuple(span)) for ext, span in spans.items()}

    # -------------------------------------------------------------- micro-batch builders
    def _tokens(self, texts: list[str], max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        enc = self.tokenizer(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True)
        return ([np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
                [np.asarray(x, dtype=bool) for x in enc["special_tokens_mask"]])

    def _masked_text(self, samples, max_len: int, masking) -> tuple[torch.Tensor, ...]:
        """(ids [B, L], attention [B, L], masked ids [B, L], labels [B, L]) for the samples' text."""
        tok = self.tokenizer
        ids, special = self._tokens([s[2]["txt"] for s in samples], max_len)
        length = padded_text_length([len(x) for x in ids], max_len)
        out = {k: np.full((len(ids), length), v, dtype=np.int64)
               for k, v in (("ids", tok.pad_token_id), ("att", 0), ("masked", tok.pad_token_id),
                            ("labels", IGNORE_INDEX))}
        for b, ((gi, _, _), seq, spec) in enumerate(zip(samples, ids, special)):
            _, rng = sample_rngs(self.seed, gi)
            masked, labels = mask_tokens(seq, spec, masking, tok.mask_token_id, len(tok), rng)
            n = len(seq)
            out["ids"][b, :n], out["att"][b, :n], out["masked"][b, :n], out["labels"][b, :n] = seq, 1, masked, labels
        return tuple(torch.from_numpy(out[k]) for k in ("ids", "att", "masked", "labels"))

    def _pixels_and_mim(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, masks = [], []
        for gi, _, members in samples:
            torch_seed, rng = sample_rngs(self.seed, gi)
            pixels.append(apply_seeded(self.transform, members["image"], torch_seed))
            rng = np.random.default_rng(rng.integers(2 ** 63))  # a stream apart from the text masks
            masks.append(torch.from_numpy(self.mim(rng)))
        return torch.stack(pixels), torch.stack(masks)

    def _text_batch(self, samples) -> TextBatch:
        masking = replace(MLM_MASKING, scheme=self.cfg.mlm_masking)
        _, attention, masked, labels = self._masked_text(samples, self.cfg.text_max_len, masking)
        return TextBatch(input_ids_BL=masked, attention_mask_BL=attention, mlm_labels_BL=labels,
                         sample_keys=tuple(s[1] for s in samples))

    def _image_batch(self, samples) -> ImageBatch:
        pixels, mim = self._pixels_and_mim(samples)
        return ImageBatch(pixel_values_BCHW=pixels, mim_mask_BP=mim, sample_keys=tuple(s[1] for s in samples))

    def _pair_batch(self, samples) -> PairBatch:
        pixels, mim = self._pixels_and_mim(samples)
        masking = replace(IMLM_MASKING, scheme=self.cfg.mlm_masking)
        ids, attention, masked, labels = self._masked_text(samples, self.cfg.caption_max_len, masking)
        return PairBatch(pixel_values_BCHW=pixels, caption_ids_BL=ids, caption_mask_BL=attention,
                         imlm_input_ids_BL=masked, imlm_labels_BL=labels, mim_mask_BP=mim,
                         sample_keys=tuple(s[1] for s in samples))


def padded_text_length(lengths: list[int], max_len: int) -> int:
    """The text length a micro-batch is padded to: its longest text rounded up to a multiple of 8,
    at most ``max_len``."""
    return min(max_len, -(-max(lengths) // 8) * 8)


_REPLACEMENT_STREAM = 0x5EB1AC  # keeps these draws apart from sample_rngs' (seed, index) stream


def replacement_sample(seed: int, global_index: int, attempt: int, corpus_size: int) -> int:
    """The sample of the same corpus that stands in for the bad sample at blend position
    ``global_index`` on replacement try ``attempt`` (0, 1, ...): a seeded uniform draw over the
    whole corpus.

    Not the corpus's next blend position: in a micro-step the next draw of the same corpus is
    usually the next data-parallel rank's slot, so two ranks would train on one sample. A uniform
    draw meets another sample of the same global micro-batch only with probability (its samples of
    that corpus) / corpus_size. A function of (seed, blend position, attempt) alone, so the result
    is the same for any worker count and DP size, and after a resume.
    """
    rng = np.random.default_rng([seed, global_index, attempt, _REPLACEMENT_STREAM])
    return int(rng.integers(corpus_size))


CAPTION_CHOICES = ("first", "draw")
"""``LoaderConfig.caption_choice``: the ``KEY.txt`` of a pair, or a caption drawn from its list."""


def caption_draw_rng(seed: int, global_index: int) -> np.random.Generator:
    """The generator that draws the caption of the pair at blend position ``global_index``
    (``caption_choice: draw``): spawned from the numpy generator of :func:`sample_rngs` for that
    position, so it derives from (seed, global index) alone, like the sample's augmentation and
    masks, and is a stream apart from theirs (they are unchanged by the draw)."""
    _, rng = sample_rngs(seed, global_index)
    return rng.spawn(1)[0]


def _drawn_caption(raw: bytes, rng: np.random.Generator) -> tuple[str | None, str | None]:
    """(caption, None) drawn uniformly from a ``KEY.captions.json`` member, or (None, reason):
    ``bad_caption_list`` (not UTF-8 JSON, not a list, or an entry that is not a string),
    ``empty_caption_list`` (``[]``)."""
    try:
        captions = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "bad_caption_list"
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None, "bad_caption_list"
    if not captions:
        return None, "empty_caption_list"
    return captions[int(rng.integers(len(captions)))].strip(), None


def decode_sample(members: dict[str, bytes], modality: str, max_caption_chars: int = 2000, *,
                  caption_cleaning: bool = False, caption_max_words: int = CAPTION_MAX_WORDS,
                  caption_rng: np.random.Generator | None = None) -> dict | str:
    """Decoded members (``txt``: str, ``image``: RGB PIL image) or the reason the sample is bad.
    A caption longer than ``max_caption_chars`` is bad (corrupt or mislabeled text, not a caption).
    ``caption_cleaning``: a pair's caption passes through X-FM's ``pre_caption`` (after the length
    check, which looks at the stored caption); one with no words left is ``empty_caption``.
    ``caption_rng`` (``caption_choice: draw``): a pair holding a caption list
    (:data:`~xfm_scale.data.sources.CAPTION_LIST_EXT`) takes its caption from the list, drawn with
    this generator (:func:`caption_draw_rng`), instead of its ``txt``; a list that is not a list of
    strings is ``bad_caption_list``, an empty one ``empty_caption_list``. None: the ``txt``."""
    out = {}
    if modality in ("text", "pair"):
        if modality == "pair" and caption_rng is not None and CAPTION_LIST_EXT in members:
            text, reason = _drawn_caption(members[CAPTION_LIST_EXT], caption_rng)
            if reason is not None:
                return reason
        elif "txt" not in members:
            return "missing_text"
        else:
            try:
                text = members["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                return "bad_utf8"
        if not text:
            return "empty_caption" if modality == "pair" else "empty_text"
        if modality == "pair" and len(text) > max_caption_chars:
            return "overlong_caption"
        if modality == "pair" and caption_cleaning:
            try:
                text = pre_caption(text, caption_max_words)
            except EmptyCaption:
                return "empty_caption"
        out["txt"] = text
    if modality in ("image", "pair"):
        ext = image_ext(members)
        if ext is None:
            return "missing_image"
        try:
            with Image.open(io.BytesIO(members[ext])) as img:
                out["image"] = img.convert("RGB")
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt bytes
            return "bad_image"
    return out


def load_tokenizer(tokenizer_dir: str | Path):
    """A fast HF tokenizer from a local folder (offline: never a hub download)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise DataSpecError(f"tokenizer {tokenizer_dir} has no mask or pad token; MLM needs both "
                            "(use a roberta/bert tokenizer or the demo's)")
    return tok


def load_pair_eval_set(manifest: str | Path, tokenizer_dir: str | Path, *, image_size: int, mim_grid: int,
                       caption_max_len: int = 30, caption_cleaning: bool = False,
                       caption_max_words: int = CAPTION_MAX_WORDS) -> PairBatch:
    """A whole held-out pair corpus as one PairBatch (retrieval evaluation).

    Deterministic resize + centre crop, no masking: ``imlm_*`` equal the clean caption with no
    labels, and ``mim_mask_BP`` is all False. ``caption_cleaning``: captions cleaned as in
    training (:class:`LoaderConfig`), so that evaluation sees the same caption form.
    """
    from .spec import CorpusSpec, validate

    manifest = Path(manifest).resolve()
    corpus = validate([CorpusSpec(name=manifest.name.split(".")[0], modality="pair", weight=1.0,
                                  manifest=manifest.name)], manifest.parent)[0]
    tok = load_tokenizer(tokenizer_dir)
    transform, reader = eval_transform(image_size), ShardReader()
    keys, images, texts = [], [], []
    for shard in corpus.shards:
        index = load_index(shard)
        for key, spans in zip(index["keys"], index["members"]):
            decoded = decode_sample({e: reader.read(shard, tuple(s)) for e, s in spans.items()}, "pair",
                                    caption_cleaning=caption_cleaning, caption_max_words=caption_max_words)
            if isinstance(decoded, str):
                raise DataSpecError(f"eval set {manifest}: sample {key} is bad ({decoded}); rebuild it")
            keys.append(f"{corpus.name}/{key}")
            images.append(transform(decoded["image"]))
            texts.append(decoded["txt"])
    reader.close()
    enc = tok(texts, truncation=True, max_length=caption_max_len, padding=True, return_tensors="pt")
    ids, attention = enc["input_ids"].long(), enc["attention_mask"].long()
    return PairBatch(pixel_values_BCHW=torch.stack(images), caption_ids_BL=ids, caption_mask_BL=attention,
                     imlm_input_ids_BL=ids.clone(), imlm_labels_BL=torch.full_like(ids, IGNORE_INDEX),
                     mim_mask_BP=torch.zeros(len(keys), mim_grid * mim_grid, dtype=torch.bool),
                     sample_keys=tuple(keys))
