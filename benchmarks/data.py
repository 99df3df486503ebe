#!/usr/bin/env python
"""Data benchmarks, each written as a dated row to benchmarks/RESULTS.md.

1. Loader throughput (samples/s, CPU): BlendLoader (random access by tar offsets) against a plain
   webdataset pipeline (streaming the same shards), with the same decode, augmentation, tokenizer
   and masks (both call the loader's pair-batch builder), for 0 and 2 DataLoader workers.
2. Blend (``--only blend``): the closed-form blend against megatron's ``build_blending_indices``
   alone at N = 100M and 10B (default): time to the first micro-batch, time per million samples
   served (at the start, middle and end of the sequence), bytes of index per rank and on disk.
   The helper cannot hold 10B samples' arrays (100 GB); its 10B time is simulated from its
   measured rate at 100M. Validation of shards is excluded: it scales with shards, not N. Then
   further specs (round and equal weights, an X-FM-sized one) served at 10B against the helper's
   in-cache million with their weights.
3. Padding (``--only padding``): the share of text positions that are padding in text and pair
   micro-batches, without and with length grouping (data.length_group_size), for a global
   micro-batch split over DP ranks: each rank pads to its own longest text, and all wait for the
   slowest. Also the FLOPs of a preset's micro-batch at the slowest rank's length (language,
   vision and fusion encoders; the MLM heads, which compute the masked positions only, are left
   out), and the time the loader takes to group one window. Counted, not timed on a GPU. On a
   generated corpus (caption and text word counts drawn from log-normal distributions, stated in
   the row), or on your own blend with ``--spec SPEC --tokenizer DIR`` (only the txt members are read).

  DS_ACCELERATOR=cpu python benchmarks/data.py [--blend-samples 100000000 10000000000] [--loader-samples 1536]
  python benchmarks/data.py --only padding [--spec blend.yaml --tokenizer roberta-base/] [--dp-size 8]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml
from PIL import Image

import results  # benchmarks/results.py
from generated import CAPTION_WORDS, TEXT_WORDS, lognormal_word_texts  # benchmarks/generated.py
from xfm_scale.batch import IGNORE_INDEX, PairBatch, TextBatch
from xfm_scale.config import XFMConfig
from xfm_scale.data.blend import (CACHED_WINDOWS, WINDOW, Blend, _save, build_blend, megatron_blending_helper,
                                  modality_shares)
from xfm_scale.data.demo import build_demo_data, png_bytes
from xfm_scale.data.lengths import TEXT_MODALITIES, cache_text_bytes
from xfm_scale.data.loader import (BlendLoader, LoaderConfig, _MicroBatchDataset, _PlanSampler, decode_sample,
                                   padded_text_length)
from xfm_scale.data.shards import MODALITIES, ShardReader, write_corpus
from xfm_scale.data.spec import Corpus, load_spec
from xfm_scale.train.flops import micro_batch_flops

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


BLEND_SIZES = [5_000_000, 2_000_000, 1_000_000, 100_000, 10_000]
BLEND_WEIGHTS = [0.5, 0.3, 0.15, 0.049, 0.001]
HELPER_LIMIT = 100_000_000
"""Largest N the helper runs for (1 GB of arrays); beyond, its time is simulated from its rate."""


def _best_of(fn, tries: int = 5) -> float:
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


OTHER_SPECS = {
    "round weights .4/.2/.2/.1/.1 on the same corpora": (BLEND_SIZES, [0.4, 0.2, 0.2, 0.1, 0.1]),
    "8 equal corpora of 100k": ([100_000] * 8, [0.125] * 8),
    "1.3B pairs, 400M texts, 14M images at .5/.3/.2": ([1_300_000_000, 400_000_000, 14_000_000], [0.5, 0.3, 0.2]),
}
"""Further specs served at N = 10B, each against the helper building one million with its weights
(splits of 1/2 or 1/q take other paths of the walk up; small corpora are read many epochs a block)."""


def _helper_seconds(helper, n: int, weights: list[float] = BLEND_WEIGHTS) -> float:
    """megatron's helper building n samples' (corpus, draw) arrays, allocation included."""
    weights = np.asarray(weights) / sum(weights)
    start = time.perf_counter()
    idx, draws = np.zeros(n, np.int16), np.zeros(n, np.int64)
    helper(idx, draws, weights, len(weights), n, False)
    elapsed = time.perf_counter() - start
    del idx, draws
    return elapsed


def bench_blend(sizes: list[int], micro_batch: int = 256) -> str:
    """The closed-form blend against megatron's helper alone, at each N in ``sizes``: time to the
    first micro-batch, time per million samples served, bytes of index held and on disk.

    The helper runs for real where its arrays fit (N <= 100M here); beyond, its time is its
    measured per-sample rate at the largest N it ran times N, and its bytes are its 10 bytes per
    sample (int16 corpus + int64 draw; the version-1 blend stored 18 with the streams). The split
    tree is measured at every N: windows at the start, the middle and the end of the sequence."""
    corpora = [Corpus(name=f"c{i}", modality="text", weight=w, shards=[], shard_samples=[n])
               for i, (n, w) in enumerate(zip(BLEND_SIZES, BLEND_WEIGHTS))]
    helper = megatron_blending_helper()
    million = 1_000_000
    helper_1m = _best_of(lambda: _helper_seconds(helper, million))  # in the CPU cache: its best case
    helper_runs: dict[int, float] = {}
    parts = [f"{len(corpora)} corpora (5M..10k samples, weights .5..0.001), one process, load average "
             f"{os.getloadavg()[0]:.1f} at the start (shared machine: best of 5 runs)"]
    for n in sizes:
        if n <= HELPER_LIMIT:
            helper_runs[n] = helper_total = _helper_seconds(helper, n)
            simulated = ""
        else:
            ran = max(helper_runs, default=million)
            helper_total = helper_runs.get(ran, helper_1m) / ran * n
            simulated = f" (simulated: its rate at N={ran:,})"
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            blend = Blend(corpora=corpora, num_samples=n, seed=0, fingerprint=f"bench-{n}", cache_dir=Path(tmp))
            setup = time.perf_counter() - start
            stream = blend.streams["text"]
            first = stream[0:micro_batch]
            blend.locate(first)
            first_batch = time.perf_counter() - start
            _save(blend, Path(tmp) / "blend-x")
            disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        served = {}
        for name, at in (("start", 0), ("middle", n // 2), ("end", n - million)):
            served[name] = _best_of(lambda: blend.window(at, at + million), tries=5)
        draws_only = _best_of(lambda: blend.window(n // 2, n // 2 + million, samples=False), tries=5)
        batch = _best_of(lambda: blend.locate(stream[n // 2:n // 2 + micro_batch]), tries=5)
        held = blend.index_bytes() + len(pickle.dumps(blend.tree))
        worst = max(served.values())
        parts.append(
            f"N={n:,}: megatron helper alone {helper_total:.2f} s to its first micro-batch{simulated}, "
            f"{helper_total / n * million * 1e3:.1f} ms per 1M samples ({helper_1m * 1e3:.1f} ms for N=1M, in cache), "
            f"{10 * n / 1e9:.2f} GB of index per rank (the version-1 blend: {18 * n / 1e9:.2f} GB on disk); "
            f"closed-form blend: first micro-batch of {micro_batch} in {first_batch * 1e3:.1f} ms (setup {setup * 1e3:.1f} ms), "
            f"served {served['start'] * 1e3:.1f} / {served['middle'] * 1e3:.1f} / {served['end'] * 1e3:.1f} ms per 1M "
            f"samples at the start / middle / end (corpus + epoch-permuted sample; corpus + draw alone, the helper's "
            f"output: {draws_only * 1e3:.1f} ms), {worst / (helper_total / n * million):.2f}x the helper's time per sample at "
            f"this N ({draws_only / (helper_total / n * million):.2f}x for corpus + draw), {worst / helper_1m:.2f}x its "
            f"in-cache 1M ({draws_only / helper_1m:.2f}x); one {micro_batch}-sample micro-batch's indices "
            f"{batch * 1e3:.2f} ms; index held {held / 1e3:.1f} kB per rank after serving (the tree; reads of single "
            f"positions and short slices add an LRU of at most {CACHED_WINDOWS} windows of {WINDOW:,} positions, "
            f"{CACHED_WINDOWS * WINDOW * 10 / 1e6:.1f} MB), {disk / 1e3:.1f} kB on disk")
    parts.append("other specs at N=10B, served per 1M (middle) against the helper's in-cache 1M with the same "
                 "weights: " + ", ".join(_other_spec(helper, name, sizes, weights)
                                         for name, (sizes, weights) in OTHER_SPECS.items()))
    return "; ".join(parts)


def _other_spec(helper, name: str, sizes: list[int], weights: list[float]) -> str:
    n, million = 10_000_000_000, 1_000_000
    corpora = [Corpus(name=f"c{i}", modality=MODALITIES[i % 3], weight=w, shards=[], shard_samples=[size])
               for i, (size, w) in enumerate(zip(sizes, weights))]
    helper_1m = _best_of(lambda: _helper_seconds(helper, million, weights))
    with tempfile.TemporaryDirectory() as tmp:
        blend = Blend(corpora=corpora, num_samples=n, seed=0, fingerprint=f"bench-{name}", cache_dir=Path(tmp))
        served = _best_of(lambda: blend.window(n // 2, n // 2 + million))
    return f"{name} {served * 1e3:.1f} ms ({served / helper_1m:.2f}x of {helper_1m * 1e3:.1f} ms)"


def generated_corpus(root: Path, samples: int) -> tuple[Path, Path]:
    """(blend spec, tokenizer folder): text and pair corpora of generated lengths (the pairs' images
    are one tiny PNG: only the captions are read here)."""
    rng = np.random.default_rng(0)
    demo = build_demo_data(root / "demo", num_pairs=10, num_images=10, num_text=200, num_eval_pairs=10)
    image = png_bytes(Image.new("RGB", (4, 4)))

    captions = lognormal_word_texts(rng, *CAPTION_WORDS, samples)
    pairs = write_corpus(({"png": image, "txt": t} for t in captions), out_dir=root / "pairs", name="pairs",
                         modality="pair", maxcount=10_000).manifest_path
    texts = write_corpus(({"txt": t} for t in lognormal_word_texts(rng, *TEXT_WORDS, samples)),
                         out_dir=root / "texts", name="texts", modality="text", maxcount=10_000).manifest_path
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [{"name": "pairs", "modality": "pair", "weight": 0.5, "manifest": str(pairs)},
                                                {"name": "texts", "modality": "text", "weight": 0.5, "manifest": str(texts)}]}))
    return spec, demo.tokenizer_dir


def text_lengths(dataset: _MicroBatchDataset, reader: ShardReader, positions: np.ndarray, max_len: int) -> list[int]:
    """Token counts (special tokens included, truncated at ``max_len``) of the texts at these blend
    positions, as the loader's tokenizer call gives them; only the txt members are read."""
    texts = []
    for gi in positions:
        c, sample = int(dataset.blend.corpus_index[gi]), int(dataset.blend.sample_index[gi])
        _, spans, shard = dataset._locate(c, sample)
        members = {"txt": reader.read(shard, tuple(spans["txt"]))} if "txt" in spans else {}
        decoded = decode_sample(members, "text")
        texts.append(decoded["txt"] if isinstance(decoded, dict) else "")  # a bad one: as short as can be
    return [len(ids) for ids in dataset._tokens(texts, max_len)[0]]


def _encoder_flops(config: XFMConfig, modality: str, rows: int, length: int) -> float:
    """FLOPs of a micro-batch of ``rows`` samples at text length ``length``, heads left out."""
    ids = torch.ones(rows, length, dtype=torch.long)
    none = torch.full_like(ids, IGNORE_INDEX)
    if modality == "text":
        return micro_batch_flops(config, TextBatch(input_ids_BL=ids, attention_mask_BL=ids, mlm_labels_BL=none)).model
    size = config.vision.image_size
    return micro_batch_flops(config, PairBatch(
        pixel_values_BCHW=torch.zeros(rows, 3, size, size), caption_ids_BL=ids, caption_mask_BL=ids,
        imlm_input_ids_BL=ids, imlm_labels_BL=none,
        mim_mask_BP=torch.zeros(rows, config.vision.grid_size ** 2, dtype=torch.bool))).model


def measure_padding(blend, tokenizer_dir, micro_batch: dict[str, int], dp: int, group_size: int, window: int,
                    micro_steps: int, config: XFMConfig) -> dict:
    """Per kind with text: padding shares and encoder FLOPs over the first ``micro_steps`` global
    micro-steps, plain and grouped (``group_size``: 0 for plain)."""
    obj = config.objectives
    max_len = {"text": obj.text_max_length, "pair": obj.caption_max_length}
    cfg = LoaderConfig(tokenizer_dir=str(tokenizer_dir), micro_batch_sizes={m: n * dp for m, n in micro_batch.items()},
                       length_group_size=group_size, length_group_window=window)
    loader = BlendLoader(blend, cfg)  # DP 1 with the global micro-batch: split into the ranks' slices below
    reader, out = ShardReader(), {}
    window_seconds = None
    if group_size:
        cache_text_bytes(blend)  # the shard indexes are read here, not in the timed window
        start = time.perf_counter()
        loader.schedule.positions("pair", 0, 1)
        window_seconds = time.perf_counter() - start
    for plan in itertools.islice(_PlanSampler(loader, loader._cursor), micro_steps):
        m = plan.modality
        if m not in TEXT_MODALITIES:
            continue
        lengths = text_lengths(loader._dataset, reader, plan.global_indices, max_len[m])
        slices = [lengths[r * micro_batch[m]:(r + 1) * micro_batch[m]] for r in range(dp)]
        own = [padded_text_length(s, max_len[m]) for s in slices]
        row = out.setdefault(m, {"real": 0, "own": 0, "slowest": 0, "longest": 0, "flops": 0.0, "micro_batches": 0})
        row["real"] += sum(lengths)
        row["longest"] += len(lengths) * max(lengths)  # without the rounding up to a multiple of 8
        row["own"] += sum(len(s) * n for s, n in zip(slices, own))
        row["slowest"] += len(lengths) * max(own)
        row["flops"] += _encoder_flops(config, m, micro_batch[m], max(own))
        row["micro_batches"] += 1
    reader.close()
    for row in out.values():
        row["own_padding"] = 1 - row["real"] / row["own"]
        row["slowest_padding"] = 1 - row["real"] / row["slowest"]
        row["unrounded_padding"] = 1 - row["real"] / row["longest"]
        row["tflops_per_micro_batch"] = row["flops"] / row["micro_batches"] / 1e12
    return {"kinds": out, "window_seconds": window_seconds}


def bench_padding(root: Path, args) -> tuple[str, dict]:
    """(the RESULTS.md row, the figures of the plain and grouped measurements)."""
    if args.spec:
        spec, tokenizer, source = Path(args.spec), Path(args.tokenizer), f"blend {args.spec}"
    else:
        spec, tokenizer = generated_corpus(root, args.padding_corpus)
        source = (f"generated: {args.padding_corpus:,} captions and texts, log-normal word counts (median "
                  f"{CAPTION_WORDS[0]}, sigma {CAPTION_WORDS[1]}; median {TEXT_WORDS[0]}, sigma {TEXT_WORDS[1]})")
    config = XFMConfig.from_preset(args.preset)
    micro_batch = {"pair": args.micro_batch_pairs, "text": args.text_micro_batch, "image": args.micro_batch_pairs}
    group_size = args.group_size or int(np.lcm(micro_batch["pair"], micro_batch["text"])) * args.dp_size
    largest = max(micro_batch.values()) * args.dp_size
    shares = modality_shares(load_spec(spec)[0])
    grouped_share = min(shares.get(m, 1.0) for m in TEXT_MODALITIES)  # whole windows only: room for a tail
    blend = build_blend(spec, num_samples=args.padding_micro_steps * largest + int(group_size * args.window / grouped_share),
                        seed=0, cache_dir=root / "cache")
    plain, grouped = (measure_padding(blend, tokenizer, micro_batch, args.dp_size, size, args.window,
                                      args.padding_micro_steps, config) for size in (0, group_size))
    parts = []
    for m in sorted(plain["kinds"]):
        a, b = plain["kinds"][m], grouped["kinds"][m]
        parts.append(f"{m} ({micro_batch[m]} x DP {args.dp_size}, {a['micro_batches']} micro-batches): padded positions "
                     f"{a['slowest_padding']:.1%} -> {b['slowest_padding']:.1%} at the slowest rank's length "
                     f"(each rank's own: {a['own_padding']:.1%} -> {b['own_padding']:.1%}; without the rounding to a "
                     f"multiple of 8: {a['unrounded_padding']:.1%} -> {b['unrounded_padding']:.1%}); {args.preset} "
                     f"encoder FLOPs per micro-batch {a['tflops_per_micro_batch']:.2f} -> {b['tflops_per_micro_batch']:.2f} "
                     f"TFLOP ({b['tflops_per_micro_batch'] / a['tflops_per_micro_batch'] - 1:+.1%})")
    row = (f"length grouping off -> on (group {group_size:,} samples, window {args.window} groups), {source}: "
           + "; ".join(parts) + f"; grouping one window of {group_size * args.window:,} samples took "
           f"{grouped['window_seconds']:.2f} s in the loader's main process")
    return row, {"plain": plain, "grouped": grouped, "group_size": group_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blend-samples", type=int, nargs="+", default=[100_000_000, 10_000_000_000],
                   help="blend lengths N to measure (the helper runs for real up to 100M)")
    p.add_argument("--loader-samples", type=int, default=1536)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--only", choices=("loader", "blend", "padding"), default=None,
                   help="run one benchmark (default: loader and blend)")
    padding = p.add_argument_group("padding")
    padding.add_argument("--spec", default=None, help="measure this blend spec's texts (default: a generated corpus)")
    padding.add_argument("--tokenizer", default=None, help="tokenizer folder for --spec")
    padding.add_argument("--preset", default="base", help="X-FM preset whose text caps and FLOPs are used")
    padding.add_argument("--micro-batch-pairs", type=int, default=96, help="pair micro-batch per rank")
    padding.add_argument("--text-micro-batch", type=int, default=256, help="text micro-batch per rank")
    padding.add_argument("--dp-size", type=int, default=8, help="data-parallel ranks sharing a global micro-batch")
    padding.add_argument("--group-size", type=int, default=0,
                         help="samples per length group (default: lcm of the micro-batches x DP size)")
    padding.add_argument("--window", type=int, default=64, help="groups per window")
    padding.add_argument("--padding-micro-steps", type=int, default=200, help="global micro-steps measured")
    padding.add_argument("--padding-corpus", type=int, default=20_000, help="generated samples per corpus")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", default=None, help="write the padding figures to this file")
    args = p.parse_args()
    if args.spec and not args.tokenizer:
        p.error("--spec needs --tokenizer (the tokenizer folder the run uses)")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "loader"):
            rows.append(("benchmarks/data.py loader",
                         bench_loader(Path(tmp), args.loader_samples, args.image_size, args.micro_batch)))
        if args.only in (None, "blend"):
            rows.append(("benchmarks/data.py blend", bench_blend(args.blend_samples)))
        if args.only == "padding":
            row, figures = bench_padding(Path(tmp), args)
            rows.append(("benchmarks/data.py padding", row))
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=1))
    for name, row in rows:
        print(row)
        if not args.no_write:
            add_row(name, row)


if __name__ == "__main__":
    main()
