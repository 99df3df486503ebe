"""Length grouping (xfm_scale.data.lengths): text and pair micro-batches of similar text lengths pad
far less, while the loader's guarantees hold of the reordered streams: every sample once, the same
order for any DP size and worker count, exact resume (also at another DP size); image streams and
the micro-step schedule unchanged."""
from __future__ import annotations

import logging
import random
from dataclasses import replace

import numpy as np
import pytest

from xfm_scale.data.blend import build_blend
from xfm_scale.data.lengths import corpus_text_bytes
from xfm_scale.data.loader import BlendLoader, LoaderConfig
from xfm_scale.data.shards import DataSpecError, write_corpus
from conftest import png, write_spec
from test_data_loader import assert_same_batches, take

pytestmark = pytest.mark.unit
MBS = {"text": 4, "image": 3, "pair": 3}
# Words of 4 to 6 letters the demo tokenizer knows: bytes then track tokens as in real text (a
# mix of 1- and 8-letter one-token words would make bytes a poor proxy, as no real corpus is).
WORDS = "blue green circle square small right".split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Texts of 1..40 words and captions of 1..16 words (lengths spread as in real corpora), images."""
    root, rng = tmp_path_factory.mktemp("lengths"), random.Random(0)
    texts = [{"txt": _sentence(rng, 1, 40)} for _ in range(500)]
    pairs = [{"png": png((i % 250, 40, 90)), "txt": _sentence(rng, 1, 16)} for i in range(400)]
    images = [{"png": png((30, i % 250, 60))} for i in range(200)]
    manifests = {name: write_corpus(records, out_dir=root / name, name=name, modality=modality,
                                    maxcount=64).manifest_path
                 for name, modality, records in (("texts", "text", texts), ("pairs", "pair", pairs),
                                                 ("images", "image", images))}
    spec = write_spec(root / "spec.yaml", [
        {"name": "texts", "modality": "text", "weight": 0.4, "manifest": str(manifests["texts"])},
        {"name": "pairs", "modality": "pair", "weight": 0.4, "manifest": str(manifests["pairs"])},
        {"name": "images", "modality": "image", "weight": 0.2, "manifest": str(manifests["images"])}])
    return spec, {"texts": texts, "pairs": pairs}


@pytest.fixture(scope="module")
def blend(corpora, tmp_path_factory):
    return build_blend(corpora[0], num_samples=1250, seed=3, cache_dir=tmp_path_factory.mktemp("cache"))  # 500 texts and pairs: 5 windows of 96 + 20


@pytest.fixture(scope="module")
def cfg(demo):
    return LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes=MBS, micro_steps_per_step=2,
                        image_size=16, mim_grid=4, mim_num_masked=6, mim_min_block=2, text_max_len=64,
                        caption_max_len=30, augment=False)


def grouped(cfg, size=24, window=4):
    return replace(cfg, length_group_size=size, length_group_window=window)


def text_masks(batches, modality: str) -> list:
    return [b.attention_mask_BL if modality == "text" else b.caption_mask_BL for b in batches if b.modality == modality]


def padding_share(batches, modality: str) -> float:
    """Padded share of the text tokens the model computes, over this kind's micro-batches."""
    masks = text_masks(batches, modality)
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def padding_to_longest_share(batches, modality: str) -> float:
    """The share padded up to each micro-batch's longest text: what grouping removes (the rounding
    of the length up to a multiple of 8 comes on top)."""
    masks = text_masks(batches, modality)
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.shape[0] * int(m.sum(1).max()) for m in masks)


def test_text_bytes_come_from_the_shard_indexes_and_are_cached(blend, corpora):
    texts = corpora[1]["texts"]
    corpus = next(c for c in blend.corpora if c.name == "texts")
    sizes = corpus_text_bytes(corpus, blend.cache_dir)
    assert sizes.tolist() == [len(r["txt"].encode()) for r in texts]
    assert isinstance(sizes, np.memmap) and len(list((blend.cache_dir / "text-bytes").glob("texts-*.npy"))) == 1
    images = next(c for c in blend.corpora if c.name == "images")
    assert not corpus_text_bytes(images).any()  # no txt member: 0, and nothing cached without a cache_dir


def test_grouping_reorders_each_window_and_keeps_images_and_the_schedule(blend, cfg):
    plain, grouped_loader = BlendLoader(blend, cfg), BlendLoader(blend, grouped(cfg))
    assert np.array_equal(plain.schedule.modality, grouped_loader.schedule.modality)
    window = 24 * 4
    shuffled = 0
    for m in ("text", "pair", "image"):
        stream = np.asarray(blend.streams[m])
        order = grouped_loader.schedule.positions(m, 0, len(stream))
        if m == "image":
            assert np.array_equal(order, stream)
            continue
        assert len(order) == len(stream) - len(stream) % window > 0  # whole windows only
        sizes = grouped_loader.schedule.grouped.text_bytes(order)
        for w in range(0, len(order), window):
            assert sorted(order[w:w + window]) == sorted(stream[w:w + window])  # the window's samples, reordered
            groups = [sizes[g:g + 24] for g in range(w, w + window, 24)]
            assert all(np.all(np.diff(group) >= 0) for group in groups)  # sorted within a group
            by_length = sorted(groups, key=lambda x: x[0])
            assert all(a[-1] <= b[0] for a, b in zip(by_length, by_length[1:]))  # disjoint length ranges
            shuffled += any(a[0] > b[0] for a, b in zip(groups, groups[1:]))  # groups not read short to long
    assert shuffled >= 4, shuffled


def test_grouped_micro_batches_pad_far_less(blend, cfg):
    plain = take(BlendLoader(blend, cfg, dp_rank=0, dp_size=2), 60)
    grouped_batches = take(BlendLoader(blend, grouped(cfg), dp_rank=0, dp_size=2), 60)
    for m in ("text", "pair"):
        # Uniform batches: a third of the tokens pad up to a long sample; grouped ones nearly none
        # (measured: text 36% -> 4%, pairs 24% -> 3%).
        assert padding_to_longest_share(plain, m) > 0.2, m
        assert padding_to_longest_share(grouped_batches, m) < padding_to_longest_share(plain, m) / 4, m
        assert padding_share(grouped_batches, m) < padding_share(plain, m) - 0.1, m


def test_ranks_split_one_global_micro_batch_and_workers_change_nothing(blend, cfg):
    cfg = grouped(cfg)
    ranks = [take(BlendLoader(blend, cfg, dp_rank=r, dp_size=2), 10) for r in range(2)]
    whole = take(BlendLoader(blend, replace(cfg, micro_batch_sizes={m: 2 * n for m, n in MBS.items()})), 10)
    for step in range(10):
        assert ranks[0][step].sample_keys + ranks[1][step].sample_keys == whole[step].sample_keys
    assert_same_batches(take(BlendLoader(blend, replace(cfg, num_workers=2), dp_rank=1, dp_size=2), 10), ranks[1])


@pytest.mark.parametrize("size, window", [(24, 4), (8, 2)])  # (8, 2): micro-batches straddle windows
def test_resume_mid_window_at_another_dp_size_repeats_and_loses_nothing(blend, cfg, size, window):
    cfg = grouped(cfg, size, window)
    uninterrupted = take(BlendLoader(blend, cfg, dp_rank=1, dp_size=2), 14)
    first = BlendLoader(blend, cfg, dp_rank=1, dp_size=2)
    take(first, 6)
    resumed = BlendLoader(blend, cfg, dp_rank=1, dp_size=2)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 8), uninterrupted[6:])

    seen: dict[str, list[str]] = {m: [] for m in MBS}
    state = None
    for dp, micro_steps in ((2, 6), (3, 8), (1, 6)):
        loaders = [BlendLoader(blend, cfg, dp_rank=r, dp_size=dp) for r in range(dp)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        for step in zip(*(take(loader, micro_steps) for loader in loaders)):
            seen[step[0].modality].extend(k for b in step for k in b.sample_keys)
        state = loaders[0].state_dict()
    reference = BlendLoader(blend, cfg)
    for m in MBS:
        assert seen[m] == reference.stream_keys(m, 0, len(seen[m]))  # the grouped order, no gap, no repeat
    assert min(len(seen[m]) for m in ("text", "pair")) > 2 * size * window or size == 24


def test_a_longer_blend_continues_a_grouped_cursor(blend, cfg, corpora, tmp_path):
    """A run whose train.steps grew builds a longer blend: grouped streams are read in whole windows
    only, which the longer blend holds unchanged, so the cursor of the used-up shorter blend goes on."""
    cfg = grouped(cfg)
    longer = build_blend(corpora[0], num_samples=2 * blend.num_samples, seed=blend.seed, cache_dir=tmp_path)
    finished = BlendLoader(blend, cfg, dp_rank=0, dp_size=2)
    read = [batch for step in finished.iter_steps() for batch in step]  # the short blend used up
    used = finished.state_dict()
    continued = BlendLoader(longer, cfg, dp_rank=0, dp_size=2)
    continued.load_state_dict(used)
    reference = take(BlendLoader(longer, cfg, dp_rank=0, dp_size=2), used["micro_step"] + 6)
    assert_same_batches(read, reference[:-6])  # what the short blend read, the longer reads first
    assert_same_batches(take(continued, 6), reference[-6:])


def test_a_cursor_is_resumed_only_with_the_grouping_it_was_saved_with(blend, cfg):
    saved = BlendLoader(blend, grouped(cfg), dp_rank=0, dp_size=2)
    take(saved, 5)
    for other in (cfg, grouped(cfg, size=48), grouped(cfg, window=8)):
        with pytest.raises(DataSpecError, match="saved with data.length_group_size=24, length_group_window=4"):
            BlendLoader(blend, other, dp_rank=0, dp_size=2).load_state_dict(saved.state_dict())
    plain = BlendLoader(blend, cfg).state_dict()
    with pytest.raises(DataSpecError, match="saved with data.length_group_size=0, length_group_window=0"):
        BlendLoader(blend, grouped(cfg)).load_state_dict(plain)
    del plain["length_group_size"], plain["length_group_window"]  # a cursor from before grouping existed
    BlendLoader(blend, cfg).load_state_dict(plain)


def test_bad_group_settings_are_refused_and_a_size_that_splits_micro_batches_warns(blend, cfg, caplog):
    with pytest.raises(DataSpecError, match="length_group_size=-1"):
        BlendLoader(blend, grouped(cfg, size=-1))
    with pytest.raises(DataSpecError, match="length_group_window"):
        BlendLoader(blend, grouped(cfg, window=0))
    with caplog.at_level(logging.WARNING, logger="xfm_scale.data.loader"):
        BlendLoader(blend, grouped(cfg, size=24), dp_size=2)  # 24 = 3 x (4 x 2) = 4 x (3 x 2)
        assert not caplog.records
        BlendLoader(blend, grouped(cfg, size=20), dp_size=2)
    assert [r.getMessage().split(" micro-batch")[0][-4:] for r in caplog.records] == ["pair", "text"]

