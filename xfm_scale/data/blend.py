"""The blend: for every global sample, which corpus it comes from and which sample of that corpus.

* Corpus choice: megatron-core's compiled ``build_blending_indices`` (greedy "largest deficit"),
  so at every prefix n the realized count of every corpus is within one sample of its ideal
  integer share (floor/ceil of ``weight x n``). In real numbers it can lag ``weight x n`` by a bit
  more than one: the helper decides sample i against the target of the prefix before it (measured:
  1.2 for a 0.6-weight corpus, up to 1.93 with random 7-corpus specs; tests/data/test_data_blend.py).
* Sample choice: the helper numbers the draws from corpus c as 0, 1, 2, ...; draw j is pass
  (epoch) ``j // n_c``, position ``j % n_c`` of a permutation seeded by (seed, corpus name, epoch
  block).
  Seeding by name keeps a corpus's order unchanged when another corpus is added to the spec.
* Cached as ``.npy`` arrays under ``CACHE/blend-<hash of spec, shard sizes, N, seed>/``: the two
  above plus, per modality, the blend positions of its samples (the loader's streams, 8 bytes per
  sample). Loaded memory-mapped, so every rank and DataLoader worker of a node shares one copy in
  the page cache instead of holding 18 bytes per blend sample each.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .shards import MODALITIES, DataSpecError
from .spec import Corpus, CorpusSpec, load_spec, parse_data_path, validate

BLEND_VERSION = 1


@dataclass(kw_only=True)
class Blend:
    """A built (or cache-loaded) blend."""
    corpora: list[Corpus]
    """The validated corpora, in spec order (``corpus_index`` refers to this order)."""
    corpus_index: np.ndarray
    """[N] int16: corpus of global sample i."""
    sample_index: np.ndarray
    """[N] int64: sample (index into the corpus's shards in order) of global sample i."""
    num_samples: int
    """N, the length of the global sample sequence."""
    streams: dict[str, np.ndarray]
    """Per modality (all of ``MODALITIES``; empty if absent): [count_m] int64 blend positions of its
    samples, in blend order. Memory-mapped from the cache when the blend is cached."""
    seed: int
    """Seed of the per-epoch shuffles (and default seed of the loader's augmentation)."""
    fingerprint: str
    """Hash of everything the blend depends on: the cache key."""
    path: Path | None = None
    """Cache folder holding the arrays, if cached."""
    cache_hit: bool = False
    """True when loaded from the cache rather than built."""
    cache_dir: Path | None = None
    """Where shard indexes not written beside their shards are cached."""

    @property
    def sequence_id(self) -> str:
        """Hash of what the sample sequence depends on, its length excluded: the resume guard.

        Every step of the build is prefix-stable (megatron's helper decides sample i from the
        counts before it; epoch orders are seeded per epoch block), so blends that differ only in
        num_samples agree on their common prefix, and a run whose train.steps grew resumes.
        """
        return fingerprint(self.corpora, 0, self.seed)

    def modality_weights(self) -> dict[str, float]:
        """Normalised spec weight of each modality present (the sum over its corpora)."""
        return modality_shares(self.corpora)

    def report(self) -> list[dict]:
        """Per corpus: weight (normalised), realized share, samples drawn, epochs implied."""
        counts = np.bincount(self.corpus_index, minlength=len(self.corpora))
        total_weight = sum(c.weight for c in self.corpora)
        return [{"name": c.name, "modality": c.modality, "weight": c.weight / total_weight,
                 "realized_share": int(counts[i]) / self.num_samples, "samples_drawn": int(counts[i]),
                 "corpus_samples": c.num_samples, "epochs": int(counts[i]) / c.num_samples}
                for i, c in enumerate(self.corpora)]


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
    """megatron-core's compiled ``build_blending_indices``.

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
    """(corpus index, draw number within the corpus) for N samples, via megatron's helper.

    Zero-weight corpora are left out of the helper's input: with them in, a tie of all deficits
    at 0 (e.g. weights 0, .5, .5 at sample 2) picks index 0, a corpus that asked for nothing.
    """
    weights = np.asarray(weights, dtype=np.float64)
    active = np.flatnonzero(weights > 0)
    if len(active) > np.iinfo(np.int16).max:
        raise DataSpecError(f"{len(active)} corpora with positive weight; megatron's helper allows 32767")
    dataset_index = np.zeros(num_samples, dtype=np.int16)
    draw_index = np.zeros(num_samples, dtype=np.int64)
    helper = megatron_blending_helper()
    helper(dataset_index, draw_index, weights[active] / weights[active].sum(), len(active), num_samples, False)
    if not np.array_equal(active, np.arange(len(active))):
        dataset_index = active.astype(np.int16)[dataset_index]
    return dataset_index, draw_index


def epochs_per_block(size: int) -> int:
    """Epoch permutations drawn together: one for big corpora, many for small ones.

    A small corpus repeated millions of times would otherwise cost one Generator per epoch; a
    block of epochs is one ``argsort`` of a [block, size] random matrix. Depends on ``size``
    only, so epoch e's order does not depend on how many epochs the blend needs.
    """
    return 1 << max(0, (2 ** 20 // max(size, 1)).bit_length() - 1)


def epoch_orders(seed: int, corpus_name: str, size: int, num_epochs: int) -> np.ndarray:
    """[num_epochs * size]: the concatenated sample orders of epochs 0..num_epochs-1 of a corpus."""
    block = epochs_per_block(size)
    name = zlib.crc32(corpus_name.encode())
    parts = []
    for b in range(-(-num_epochs // block)):
        rng = np.random.default_rng([seed, name, b])
        if block == 1:
            parts.append(rng.permutation(size))
        else:
            parts.append(np.argsort(rng.random((block, size)), axis=1).reshape(-1))
    return np.concatenate(parts)[:num_epochs * size]


def shuffle_draws(corpus_index: np.ndarray, draws: np.ndarray, corpora: list[Corpus], seed: int) -> None:
    """Replace, in place, every draw number by the sample it reads (per-epoch seeded shuffle).

    The helper numbers the draws of each corpus 0, 1, 2, ...; so draw j of corpus c reads
    ``orders_c[j]``. All corpora's orders are concatenated and read with one vectorised gather.
    """
    # count_nonzero per corpus is ~6x faster than bincount on int16 (no int64 copy of N entries).
    counts = (np.array([np.count_nonzero(corpus_index == c) for c in range(len(corpora))], dtype=np.int64)
              if len(corpora) <= 32 else np.bincount(corpus_index, minlength=len(corpora)))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    orders = [epoch_orders(seed, corpus.name, corpus.num_samples, -(-int(n) // corpus.num_samples))[:n]
              for corpus, n in zip(corpora, counts) if n]
    flat = np.concatenate(orders) if orders else np.zeros(0, np.int64)
    np.add(draws, starts[corpus_index], out=draws)
    np.take(flat, draws, out=draws)


STREAM_CHUNK = 1 << 24
"""Blend samples per chunk when splitting the blend into modality streams (bounds the temporaries)."""


def stream_file(modality: str) -> str:
    return f"stream_{modality}.npy"


def modality_streams(corpus_index: np.ndarray, corpora: list[Corpus], folder: Path | None = None) -> dict[str, np.ndarray]:
    """Per modality: [count_m] int64, the blend positions of its samples in blend order.

    With ``folder`` the arrays are written there as ``stream_<m>.npy`` (the caller maps them back
    read-only), else returned in memory. Built chunk by chunk in two passes (count, then fill), so
    no full-length temporary exists: ``flatnonzero(codes == m)`` over the whole blend would cost
    N bytes of codes plus N bytes of mask on top of the output.
    """
    code_of = np.array([MODALITIES.index(c.modality) for c in corpora], dtype=np.int8)
    chunks = range(0, len(corpus_index), STREAM_CHUNK)
    counts = np.zeros(len(MODALITIES), dtype=np.int64)
    for start in chunks:
        codes = code_of[corpus_index[start:start + STREAM_CHUNK]]
        counts += [np.count_nonzero(codes == i) for i in range(len(MODALITIES))]  # ~5x bincount's speed
    out = {m: np.lib.format.open_memmap(folder / stream_file(m), mode="w+", dtype=np.int64, shape=(int(n),))
           if folder is not None else np.empty(int(n), dtype=np.int64) for m, n in zip(MODALITIES, counts)}
    filled = dict.fromkeys(MODALITIES, 0)
    for start in chunks:
        codes = code_of[corpus_index[start:start + STREAM_CHUNK]]
        for i, m in enumerate(MODALITIES):
            positions = np.flatnonzero(codes == i) + start
            out[m][filled[m]:filled[m] + len(positions)] = positions
            filled[m] += len(positions)
    if folder is not None:
        for array in out.values():
            array.flush()
    return out


def _map_streams(folder: Path) -> dict[str, np.ndarray]:
    return {m: np.load(folder / stream_file(m), mmap_mode="r") for m in MODALITIES}


def fingerprint(corpora: list[Corpus], num_samples: int, seed: int) -> str:
    payload = {"version": BLEND_VERSION, "num_samples": num_samples, "seed": seed,
               "corpora": [asdict(c) for c in corpora]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_blend(spec: str | Path | list[CorpusSpec], *, num_samples: int, seed: int = 0,
                cache_dir: str | Path | None = None, data_path: str | None = None) -> Blend:
    """Build the blend of ``spec`` (a YAML path, or parsed specs), or load it from ``cache_dir``.

    ``data_path`` is the Megatron form ``"w1 p1 w2 p2"`` instead of a spec (pass ``spec=None``).
    Safe to call from several ranks at once (atomic rename), but cheaper on one rank + barrier.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise DataSpecError(f"num_samples={num_samples!r}; give a positive number of samples to draw")
    if data_path is not None:
        specs, root = parse_data_path(data_path), Path.cwd()
    elif isinstance(spec, (str, Path)):
        specs, root = load_spec(spec)
    else:
        specs, root = list(spec), Path.cwd()
    corpora = validate(specs, root, cache_dir)
    key = fingerprint(corpora, int(num_samples), seed)
    folder = Path(cache_dir) / f"blend-{key[:16]}" if cache_dir is not None else None
    if folder is not None and (folder / "blend.json").exists():
        return _load(folder, corpora, key, Path(cache_dir))
    corpus_index, sample_index = blend_corpus_choice([c.weight for c in corpora], int(num_samples))
    shuffle_draws(corpus_index, sample_index, corpora, seed)
    blend = Blend(corpora=corpora, corpus_index=corpus_index, sample_index=sample_index,
                  num_samples=int(num_samples), streams={}, seed=seed, fingerprint=key,
                  cache_dir=Path(cache_dir) if cache_dir is not None else None)
    if folder is not None:
        _save(blend, folder)  # maps the streams back from the cache
    else:
        blend.streams = modality_streams(corpus_index, corpora)
    return blend


def _save(blend: Blend, folder: Path) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "corpus_index.npy", blend.corpus_index)
    np.save(tmp / "sample_index.npy", blend.sample_index)
    modality_streams(blend.corpus_index, blend.corpora, tmp)
    meta = {"fingerprint": blend.fingerprint, "num_samples": blend.num_samples, "seed": blend.seed,
            "corpora": [asdict(c) for c in blend.corpora]}
    (tmp / "blend.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)  # atomic: another rank that built the same blend wins harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    blend.path = folder
    blend.streams = _map_streams(folder)


def _load(folder: Path, corpora: list[Corpus], key: str, cache_dir: Path) -> Blend:
    meta = json.loads((folder / "blend.json").read_text())
    corpus_index = np.load(folder / "corpus_index.npy", mmap_mode="r")
    try:
        if not all((folder / stream_file(m)).exists() for m in MODALITIES):
            _add_streams(folder, corpus_index, corpora)
        streams = _map_streams(folder)
    except OSError:  # a read-only cache from before the streams were cached: build them here
        streams = modality_streams(corpus_index, corpora)
    return Blend(corpora=corpora, corpus_index=corpus_index,
                 sample_index=np.load(folder / "sample_index.npy", mmap_mode="r"),
                 num_samples=meta["num_samples"], streams=streams, seed=meta["seed"],
                 fingerprint=key, path=folder, cache_hit=True, cache_dir=cache_dir)


def _add_streams(folder: Path, corpus_index: np.ndarray, corpora: list[Corpus]) -> None:
    """Write the streams into a cache folder from before they were cached (its fingerprint, and so
    the resume guard of the checkpoints made with it, stays the same). Ranks doing this at once
    each write their own temporaries and rename identical files over each other."""
    tmp = Path(tempfile.mkdtemp(prefix="streams.tmp", dir=folder))  # unique across hosts, unlike a pid
    modality_streams(corpus_index, corpora, tmp)
    for m in MODALITIES:
        os.replace(tmp / stream_file(m), folder / stream_file(m))
    shutil.rmtree(tmp, ignore_errors=True)


def format_report(rows: list[dict]) -> str:
    """The per-corpus table printed by tools/blend_data.py."""
    head = f"{'corpus':<20} {'modality':<8} {'weight':>8} {'realized':>8} {'drawn':>12} {'size':>10} {'epochs':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20} {r['modality']:<8} {r['weight']:>8.4f} {r['realized_share']:>8.4f} "
                     f"{r['samples_drawn']:>12,} {r['corpus_samples']:>10,} {r['epochs']:>8.2f}")
    return "\n".join(lines)
