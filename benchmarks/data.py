#!/usr/bin/env python
"""Data benchmarks, each written as a dated row to benchmarks/RESULTS.md.

1. Loader throughput (samples/s, CPU): BlendLoader (random access by tar offsets) against a plain
   webdataset pipeline (streaming the same shards), with the same decode, augmentation, tokenizer
   and masks (both call the loader's pair-batch builder), for 0 and 2 DataLoader workers.
2. Blend build time for N samples (default 100M) against megatron's ``build_blending_indices``
   alone (the blend adds the per-epoch shuffles on top of it; validation of shards is excluded:
   it scales with shards, not N).

  DS_ACCELERATOR=cpu python benchmarks/data.py [--blend-samples 100000000] [--loader-samples 1536]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml

import results  # benchmarks/results.py
from xfm_scale.data.blend import blend_corpus_choice, build_blend, megatron_blending_helper, shuffle_draws
from xfm_scale.data.demo import build_demo_data
from xfm_scale.data.loader import BlendLoader, LoaderConfig, _MicroBatchDataset, decode_sample
from xfm_scale.data.spec import Corpus

PACKAGES = ("torch", "torchvision", "webdataset", "megatron-core", "numpy", "tokenizers")


def add_row(benchmark: str, result: str) -> None:
    results.add_row(benchmark, result, PACKAGES)


def bench_loader(root: Path, samples: int, image_size: int, mbs: int) -> str:
    demo = build_demo_data(root / "demo", image_size=image_size, num_pairs=samples, num_images=10,
                           num_text=10, num_eval_pairs=10)
    spec = root / "pairs.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [{"name": "demo_pairs", "modality": "pair", "weight": 1,
                                                 "manifest": str(demo.manifests["demo_pairs"])}]}))
    blend = build_blend(spec, num_samples=samples, seed=0, cache_dir=root / "cache")
    cfg = LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes={"pair": mbs},
                       image_size=image_size, mim_grid=image_size // 8, mim_num_masked=6, mim_min_block=2)
    shards = sorted(str(p) for p in demo.manifests["demo_pairs"].parent.glob("demo_pairs-*.tar"))
    parts = []
    for workers in (0, 2):
        ours = _rate(BlendLoader(blend, replace(cfg, num_workers=workers)))
        theirs = _rate(_webdataset_pipeline(shards, blend, replace(cfg, num_workers=workers), mbs))
        parts.append(f"{workers} workers: loader {ours:.0f} vs webdataset {theirs:.0f} samples/s")
    return (f"pairs {image_size}px, micro-batch {mbs}, {samples} samples (RandomResizedCrop+flip+RandAugment"
            f"+tokenize+IMLM+MIM): " + "; ".join(parts))


def _webdataset_pipeline(shards, blend, cfg, mbs):
    """Plain streaming webdataset: shards split over workers, same decode and batch builder."""
    builder = _MicroBatchDataset(blend, cfg)
    counter = iter(range(10 ** 12))

    def decode(sample):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        return next(counter), f"demo_pairs/{sample['__key__']}", decode_sample(members, "pair")

    def collate(samples):
        with torch.random.fork_rng(devices=[]):
            return builder._pair_batch(samples)

    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples(),
                                wds.map(decode), wds.batched(mbs, collation_fn=collate, partial=False))
    if cfg.num_workers == 0:
        return pipeline
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=cfg.num_workers)


def _rate(batches) -> float:
    it = iter(batches)
    first = next(it)  # excluded: worker start-up and tokenizer load
    start, n = time.perf_counter(), 0
    for batch in it:
        n += batch.size
    elapsed = time.perf_counter() - start
    del first
    return n / elapsed


def bench_blend(num_samples: int) -> str:
    sizes = [5_000_000, 2_000_000, 1_000_000, 100_000, 10_000]
    weights = [0.5, 0.3, 0.15, 0.049, 0.001]
    corpora = [Corpus(name=f"c{i}", modality="text", weight=w, shards=[], shard_samples=[n])
               for i, (n, w) in enumerate(zip(sizes, weights))]
    helper = megatron_blending_helper()
    start = time.perf_counter()
    idx, draws = np.zeros(num_samples, np.int16), np.zeros(num_samples, np.int64)
    helper(idx, draws, np.asarray(weights) / sum(weights), len(weights), num_samples, False)
    alone = time.perf_counter() - start
    del idx, draws
    start = time.perf_counter()
    idx, draws = blend_corpus_choice(weights, num_samples)
    chosen = time.perf_counter() - start
    shuffle_draws(idx, draws, corpora, seed=0)
    total = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        np.save(Path(tmp) / "c.npy", idx)
        np.save(Path(tmp) / "s.npy", draws)
        save = time.perf_counter() - start
    return (f"blend of {num_samples:,} samples, 5 corpora (5M..10k samples, weights .5..0.001): megatron helper "
            f"alone {alone:.2f}s; our build {total:.2f}s (helper call {chosen:.2f}s + per-epoch shuffles "
            f"{total - chosen:.2f}s); cache write {save:.2f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blend-samples", type=int, default=100_000_000)
    p.add_argument("--loader-samples", type=int, default=1536)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        loader = bench_loader(Path(tmp), args.loader_samples, args.image_size, args.micro_batch)
    print(loader)
    blend = bench_blend(args.blend_samples)
    print(blend)
    if not args.no_write:
        add_row("benchmarks/data.py loader", loader)
        add_row("benchmarks/data.py blend", blend)


if __name__ == "__main__":
    main()
