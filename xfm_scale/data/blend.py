"""The blend: for every global sample, which corpus it comes from and which sample of that corpus,
computed per position on demand: no per-sample index in memory or on disk, no upfront build.

* Corpus choice: a split tree (xfm_scale.data.sequence): the corpora are the leaves of a binary
  tree whose every node splits its samples between its two children by ``floor`` of the weight
  ratio, so the count of each corpus at any prefix n is a closed form (a chain of ``floor`` from
  the root) and so is the corpus of position i (a walk down). At every prefix n, corpus c's count
  deviates from ``w_c n`` by at most the tree's bound for c (< 1 for typical specs: the count is
  ``floor`` or ``ceil`` of ``w_c n``; < 1.68 for any weights). That replaces megatron-core's greedy
  "largest deficit" helper, which needs the whole prefix (its state is the counts, which have no
  closed form) and which the tests keep as the reference of the guarantee: its counts are within
  one sample of floor/ceil of ``w_c n`` at every prefix, its deviation in real numbers up to 1.2
  for a 0.6-weight corpus and 1.93 for random 7-corpus specs.
* Each modality's corpora form one subtree, so a modality's samples in blend order (the loader's
  streams) are closed forms too: the k-th sample of a modality is a walk up from its subtree.
* Sample choice: draw j of corpus c (its j-th sample in blend order) reads position ``j % n_c`` of
  epoch ``j // n_c``'s order, a keyed Feistel bijection of ``[0, n_c)`` seeded by (seed, corpus
  name, epoch): nothing stored, and a corpus's order is unchanged when another corpus is added.
* Everything is a function of the position alone, so blends of the same spec and seed that differ
  only in length agree on their common prefix, and any DP size, rank or worker count reads the same.
* Cached: ``CACHE/blend-<hash of spec, shard sizes, N, seed>/blend.json``, a record of the blend
  (tree, bounds, corpora) of a few kB. Blends of version 1 (``corpus_index.npy`` & co.) are not
  read: :func:`stale_caches` finds them, and a loader cursor saved with one is refused by name.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .sequence import MAX_POSITIONS, EpochOrder, SplitTree
from .shards import MODALITIES, DataSpecError
from .spec import Corpus, CorpusSpec, load_spec, parse_data_path, validate

log = logging.getLogger(__name__)

BLEND_VERSION = 2
"""1: per-sample arrays built with megatron's helper and stored permutations; 2: closed forms.
Part of every fingerprint: raise it whenever the sequence computed for a spec changes (the splits,
the epoch permutation; the tree's shape is in ``Blend.sequence_id`` itself)."""
WINDOW = 1 << 16
"""Positions the split tree computes together (its temporaries stay in the CPU cache)."""
SERVE_BLOCK = 1 << 19
"""Positions served together by :meth:`Blend.window` (fewer, longer numpy calls per corpus)."""
CACHED_WINDOWS = 4
"""Windows kept per blend for repeated reads of nearby positions (10 bytes per position each)."""


@dataclass(kw_only=True)
class Blend:
    """A blend: the corpora, the length and the seed; every per-sample answer is computed."""
    corpora: list[Corpus]
    """The validated corpora, in spec order (``corpus_index`` refers to this order)."""
    num_samples: int
    """N, the length of the global sample sequence."""
    seed: int
    """Seed of the per-epoch orders (and default seed of the loader's augmentation)."""
    fingerprint: str
    """Hash of everything the blend depends on: the cache key."""
    path: Path | None = None
    """Cache folder holding ``blend.json``, if cached."""
    cache_hit: bool = False
    """True when the cache already held this blend's record."""
    cache_dir: Path | None = None
    """Where shard indexes not written beside their shards are cached."""
    tree: SplitTree = field(init=False, repr=False)
    """The split tree over the corpora of positive weight (leaf i = corpus ``active[i]``)."""
    active: np.ndarray = field(init=False, repr=False)
    """[leaves] int16: corpus index of each leaf of the tree."""

    def __post_init__(self):
        active = [i for i, c in enumerate(self.corpora) if c.weight > 0]
        self.active = np.array(active, dtype=np.int16)
        self.tree = SplitTree([self.corpora[i].weight for i in active],
                              groups=[self.corpora[i].modality for i in active])
        self._orders = {i: EpochOrder(self.seed, self.corpora[i].name, self.corpora[i].num_samples) for i in active}
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.corpus_index = BlendColumn(self, 0)
        """[N] int16, computed when indexed: corpus of global sample i."""
        self.sample_index = BlendColumn(self, 1)
        """[N] int64, computed when indexed: sample (index into the corpus's shards in order) of i."""
        self.streams = {m: Stream(self, m) for m in MODALITIES}
        """Per modality (all of ``MODALITIES``; empty if absent): the blend positions of its samples,
        in blend order, computed when indexed."""

    @property
    def sequence_id(self) -> str:
        """Hash of what the sample sequence depends on, its length excluded: the resume guard.

        Every answer is a function of the position alone, so blends that differ only in
        num_samples agree on their common prefix, and a run whose train.steps grew resumes. The
        tree's shape is part of it: a change of how trees are chosen cannot pass unnoticed.
        """
        return hashlib.sha256(f"{fingerprint(self.corpora, 0, self.seed)} {self.tree.shape!r}".encode()).hexdigest()

    def modality_weights(self) -> dict[str, float]:
        """Normalised spec weight of each modality present (the sum over its corpora)."""
        return modality_shares(self.corpora)

    # ------------------------------------------------------------------ counts (closed forms)
    def counts(self, n: int | None = None) -> np.ndarray:
        """[corpora] int64: samples of each corpus among the first ``n`` (default N) positions."""
        out = np.zeros(len(self.corpora), dtype=np.int64)
        out[self.active] = self.tree.leaf_counts(self.num_samples if n is None else n)
        return out

    def modality_count(self, modality: str, n: int | None = None) -> int:
        """Samples of a modality among the first ``n`` (default N) positions."""
        node = self.tree.group_node.get(modality)
        return 0 if node is None else self.tree.counts(self.num_samples if n is None else n)[node]

    def deviation_bounds(self) -> np.ndarray:
        """[corpora]: the largest |count - weight x n| of each corpus at any prefix n."""
        out = np.zeros(len(self.corpora))
        out[self.active] = self.tree.bounds
        return out

    # ------------------------------------------------------------------ per-sample answers
    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(corpus int16, sample int64) of the samples at these blend positions (any order)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= MAX_POSITIONS):
            raise IndexError(f"blend positions must lie in 0..{MAX_POSITIONS - 1}")
        leaf, draw = self.tree.descend(positions)
        corpus = self.active[leaf]
        sample = np.empty(len(positions), dtype=np.int64)
        for i in np.unique(leaf):
            here = leaf == i
            sample[here] = self._orders[int(self.active[i])](draw[here])
        return corpus, sample

    def locate_one(self, position: int) -> tuple[int, int]:
        """(corpus, sample) of one blend position."""
        leaf, draw = self.tree.descend_one(int(position))
        corpus = int(self.active[leaf])
        return corpus, int(self._orders[corpus](np.array([draw]))[0])

    def window(self, start: int, stop: int, samples: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(corpus int16 [stop-start], sample int64 [stop-start]) of consecutive positions: what the
        old per-sample arrays held at ``start:stop``, computed block by block. ``samples=False``:
        the draw numbers instead of the samples (what megatron's helper computes)."""
        corpus = np.empty(max(0, stop - start), dtype=np.int16)
        sample = np.empty(max(0, stop - start), dtype=np.int64)
        for a in range(start, stop, SERVE_BLOCK):
            b = min(stop, a + SERVE_BLOCK)
            self._fill(a, b, corpus[a - start:b - start], sample[a - start:b - start], samples)
        return corpus, sample

    def _fill(self, a: int, b: int, corpus: np.ndarray, sample: np.ndarray, samples: bool = True) -> None:
        """Positions a..b-1: each corpus's draws there are consecutive (from its counts at a and
        b, closed forms); their positions come from walking up the tree, their samples from the
        epoch orders, both in cache-sized pieces. The corpus column starts as the block's most
        drawn corpus, so only the others are scattered into it."""
        first, last = self.tree.leaf_counts(a), self.tree.leaf_counts(b)
        drawn = last - first
        most = int(np.argmax(drawn))
        corpus[:] = self.active[most]
        for leaf in np.flatnonzero(drawn).tolist():
            d0, d1 = int(first[leaf]), int(last[leaf])
            c = int(self.active[leaf])
            offsets = np.empty(d1 - d0, dtype=np.int64)
            for j in range(d0, d1, WINDOW):
                self.tree.position_range(leaf, j, min(d1, j + WINDOW), out=offsets[j - d0:j - d0 + WINDOW], shift=a)
            if leaf != most:
                corpus[offsets] = c
            # (int64 before the scatter: numpy scatters a uint32 source through a slower casting loop)
            sample[offsets] = self._orders[c].range(d0, d1).astype(np.int64) if samples else np.arange(d0, d1)

    def _cached_window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``w`` (positions ``w*WINDOW ..``), kept in a small LRU for nearby reads."""
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        start = w * WINDOW
        out = self.window(start, min(self.num_samples, start + WINDOW))
        self._windows[w] = out
        while len(self._windows) > CACHED_WINDOWS:
            self._windows.popitem(last=False)
        return out

    def index_bytes(self) -> int:
        """Bytes of per-sample data this blend holds now (its LRU windows): no term grows with N."""
        return sum(a.nbytes + b.nbytes for a, b in self._windows.values())

    def stream_positions(self, modality: str, start: int, stop: int) -> np.ndarray:
        """Blend positions of a modality's samples ``start..stop-1`` (in blend order)."""
        node = self.tree.group_node.get(modality)
        if node is None or stop <= start:
            return np.zeros(0, dtype=np.int64)
        return self.tree.position(node, np.arange(start, stop, dtype=np.int64))

    def report(self) -> list[dict]:
        """Per corpus: weight (normalised), realized share, samples drawn, epochs implied, and the
        largest deviation from weight x n at any prefix (samples). Closed forms: nothing is drawn."""
        counts = self.counts()
        bounds = self.deviation_bounds()
        total_weight = sum(c.weight for c in self.corpora)
        return [{"name": c.name, "modality": c.modality, "weight": c.weight / total_weight,
                 "realized_share": int(counts[i]) / self.num_samples, "samples_drawn": int(counts[i]),
                 "corpus_samples": c.num_samples, "epochs": int(counts[i]) / c.num_samples,
                 "max_deviation": float(bounds[i])}
                for i, c in enumerate(self.corpora)]


class BlendColumn:
    """``corpus_index`` or ``sample_index`` of a blend as a read-only [N] array computed when
    indexed: ``col[i]``, ``col[a:b]``, ``col[positions]``, ``len(col)``, ``np.asarray(col)``
    (the last only for blends small enough to hold whole)."""

    MATERIALISE_LIMIT = 1 << 27

    def __init__(self, blend: Blend, which: int):
        self.blend, self.which = blend, which
        self.dtype = np.dtype(np.int16 if which == 0 else np.int64)

    def __len__(self) -> int:
        return self.blend.num_samples

    @property
    def shape(self) -> tuple[int]:
        return (self.blend.num_samples,)

    def __getitem__(self, key):
        n = self.blend.num_samples
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"position {key} of a blend of {n} samples")
            w = i // WINDOW
            if w in self.blend._windows:
                return self.blend._cached_window(w)[self.which][i - w * WINDOW]
            return self.blend.locate_one(i)[self.which]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                if stop - start <= WINDOW and start // WINDOW == (stop - 1) // WINDOW and stop > start:
                    w = start // WINDOW
                    return self.blend._cached_window(w)[self.which][start - w * WINDOW:stop - w * WINDOW].copy()
                return self.blend.window(start, max(start, stop))[self.which]
            key = np.arange(start, stop, step)
        positions = np.asarray(key, dtype=np.int64)
        if len(positions.reshape(-1)) and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"positions outside 0..{n - 1}")
        return self.blend.locate(positions)[self.which].reshape(positions.shape)

    def __array__(self, dtype=None, copy=None):
        if self.blend.num_samples > self.MATERIALISE_LIMIT:
            raise MemoryError(f"a blend of {self.blend.num_samples:,} samples is not materialised; "
                              "read windows (col[a:b]) or positions (col[array])")
        out = self.blend.window(0, self.blend.num_samples)[self.which]
        return out if dtype is None else out.astype(dtype)


class Stream:
    """A modality's blend positions in blend order, as a read-only array computed when indexed."""

    def __init__(self, blend: Blend, modality: str):
        self.blend, self.modality = blend, modality
        self.length = blend.modality_count(modality)
        self.dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step == 1:
                return self.blend.stream_positions(self.modality, start, max(start, stop))
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.length if key < 0 else 0)
            if not 0 <= k < self.length:
                raise IndexError(f"index {key} of a stream of {self.length}")
            return int(self.blend.stream_positions(self.modality, k, k + 1)[0])
        k = np.asarray(key, dtype=np.int64)
        if k.size == 0:
            return np.zeros(k.shape, dtype=np.int64)
        if k.min() < 0 or k.max() >= self.length:
            raise IndexError(f"indices outside 0..{self.length - 1}")
        node = self.blend.tree.group_node[self.modality]
        return self.blend.tree.position(node, k.reshape(-1)).reshape(k.shape)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def modality_shares(corpora: list[Corpus] | list[CorpusSpec]) -> dict[str, float]:
    """Normalised weight of each modality with a positive weight (the sum over its corpora), of
    validated corpora or of a spec's entries as written."""
    total = sum(c.weight for c in corpora)
    out: dict[str, float] = {}
    for c in corpora:
        if c.weight > 0:
            out[c.modality] = out.get(c.modality, 0.0) + c.weight / total
    return out


def megatron_blending_helper():
    """megatron-core's compiled ``build_blending_indices`` (the reference the tests and
    benchmarks/data.py compare the split tree with; the blend itself no longer calls it).

    ``import megatron.core`` pulls in its whole training stack (about 8 s on this machine, per
    CLI call and per spawned process); the helper is a standalone pybind module, so when
    megatron.core is not imported yet we load the same compiled file directly.
    """
    name = "megatron.core.datasets.helpers_cpp"
    if name in sys.modules:
        return sys.modules[name].build_blending_indices
    spec = importlib.util.find_spec("megatron")
    folder = Path(next(iter(spec.submodule_search_locations))) / "core" / "datasets" if spec else None
    files = sorted(folder.glob("helpers_cpp*.so")) if folder and folder.exists() else []
    if not files:  # unusual layout: take the ordinary (slow) import path
        from megatron.core.datasets.helpers_cpp import build_blending_indices
        return build_blending_indices
    loader = importlib.machinery.ExtensionFileLoader(name, str(files[0]))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    sys.modules[name] = module
    return module.build_blending_indices


def blend_corpus_choice(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus index, draw number within the corpus) for N samples, via megatron's helper: the
    reference of the share guarantee (the blend computes its own sequence with a split tree).

    Zero-weight corpora are left out of the helper's input: with them in, a tie of all deficits
    at 0 (e.g. weights 0, .5, .5 at sample 2) picks index 0, a corpus that asked for nothing.
    """
    weights = np.asarray(weights, dtype=np.float64)
    active = np.flatnonzero(weights > 0)
    dataset_index = np.zeros(num_samples, dtype=np.int16)
    draw_index = np.zeros(num_samples, dtype=np.int64)
    helper = megatron_blending_helper()
    helper(dataset_index, draw_index, weights[active] / weights[active].sum(), len(active), num_samples, False)
    if not np.array_equal(active, np.arange(len(active))):
        dataset_index = active.astype(np.int16)[dataset_index]
    return dataset_index, draw_index


def fingerprint(corpora: list[Corpus], num_samples: int, seed: int, version: int = BLEND_VERSION) -> str:
    payload = {"version": version, "num_samples": num_samples, "seed": seed,
               "corpora": [asdict(c) for c in corpora]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_blend(spec: str | Path | list[CorpusSpec], *, num_samples: int, seed: int = 0,
                cache_dir: str | Path | None = None, data_path: str | None = None) -> Blend:
    """The blend of ``spec`` (a YAML path, or parsed specs): validates the corpora and sets up the
    closed forms (milliseconds at any N); with ``cache_dir``, records it in ``blend-<hash>/blend.json``.

    ``data_path`` is the Megatron form ``"w1 p1 w2 p2"`` instead of a spec (pass ``spec=None``).
    Safe to call from several ranks at once (atomic rename).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise DataSpecError(f"num_samples={num_samples!r}; give a positive number of samples to draw")
    if num_samples > MAX_POSITIONS:
        raise DataSpecError(f"num_samples={num_samples:,} is beyond the blend's {MAX_POSITIONS:,} positions")
    if data_path is not None:
        specs, root = parse_data_path(data_path), Path.cwd()
    elif isinstance(spec, (str, Path)):
        specs, root = load_spec(spec)
    else:
        specs, root = list(spec), Path.cwd()
    corpora = validate(specs, root, cache_dir)
    key = fingerprint(corpora, int(num_samples), seed)
    blend = Blend(corpora=corpora, num_samples=int(num_samples), seed=seed, fingerprint=key,
                  cache_dir=Path(cache_dir) if cache_dir is not None else None)
    if cache_dir is not None:
        folder = Path(cache_dir) / f"blend-{key[:16]}"
        blend.path = folder
        if (folder / "blend.json").exists():
            blend.cache_hit = True
        else:
            _save(blend, folder)
            stale = stale_caches(cache_dir)
            if stale:
                log.warning("%d blend cache folder(s) of version 1 in %s (%.1f GB) are no longer read: "
                            "the blend is computed per position now; delete them (%s)", len(stale), cache_dir,
                            sum(_folder_bytes(f) for f in stale) / 1e9, ", ".join(f.name for f in stale[:3]))
    return blend


def _save(blend: Blend, folder: Path) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"version": BLEND_VERSION, "fingerprint": blend.fingerprint, "num_samples": blend.num_samples,
            "seed": blend.seed, "tree": repr(blend.tree.shape), "leaves": blend.active.tolist(),
            "max_deviation": blend.deviation_bounds().tolist(), "corpora": [asdict(c) for c in blend.corpora]}
    (tmp / "blend.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)  # atomic: another rank that recorded the same blend wins harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_caches(cache_dir: str | Path) -> list[Path]:
    """Blend folders of version 1 (per-sample ``.npy`` arrays) under ``cache_dir``: unused now."""
    return sorted(p.parent for p in Path(cache_dir).glob("blend-*/corpus_index.npy"))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def format_report(rows: list[dict]) -> str:
    """The per-corpus table printed by tools/blend_data.py."""
    head = (f"{'corpus':<20} {'modality':<8} {'weight':>8} {'realized':>8} {'drawn':>14} {'size':>12} "
            f"{'epochs':>10} {'max dev':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20} {r['modality']:<8} {r['weight']:>8.4f} {r['realized_share']:>8.4f} "
                     f"{r['samples_drawn']:>14,} {r['corpus_samples']:>12,} {r['epochs']:>10.2f} "
                     f"{r['max_deviation']:>7.3f}")
    return "\n".join(lines)
