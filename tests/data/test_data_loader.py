"""The loader: one modality per global micro-step on all ranks, worker-count independence, exact
resume, resume at another data-parallel size with no sample repeated or lost, bad samples replaced
without duplicating another rank's, streams memory-mapped from the blend cache."""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from data_fixtures import assert_same_batches, take
import torch

from xfm_scale.batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch
from xfm_scale.data.blend import build_blend
from xfm_scale.data.loader import BlendLoader, LoaderConfig
from xfm_scale.data.shards import MODALITIES, DataSpecError, write_corpus
from conftest import write_spec

pytestmark = pytest.mark.unit
MBS = {"text": 6, "image": 3, "pair": 4}


@pytest.fixture(scope="module")
def blend(demo, tmp_path_factory):
    return build_blend(demo.spec, num_samples=1500, seed=7, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cfg(demo):
    return LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes=MBS, micro_steps_per_step=3,
                        image_size=32, mim_grid=4, mim_num_masked=6, mim_min_block=2)


def test_batches_have_the_contracts_shapes_and_masks(blend, cfg):
    batches = take(BlendLoader(blend, cfg, dp_rank=1, dp_size=2), 12)
    kinds = Counter(type(b).__name__ for b in batches)
    assert set(kinds) == {"TextBatch", "ImageBatch", "PairBatch"}
    for b in batches:
        assert b.size == MBS[b.modality] == len(b.sample_keys)
        if isinstance(b, (ImageBatch, PairBatch)):
            assert b.pixel_values_BCHW.shape == (b.size, 3, 32, 32)
            assert b.mim_mask_BP.shape == (b.size, 16) and (b.mim_mask_BP.sum(1) == 6).all()
            assert -2.0 < b.pixel_values_BCHW.mean() < 2.0
        if isinstance(b, TextBatch):
            predicted = (b.mlm_labels_BL != IGNORE_INDEX).sum(1)
            real = b.attention_mask_BL.sum(1) - 2  # <s> and </s> are never masked
            expected = torch.clamp(torch.round(real * 0.15), min=1, max=20)
            assert torch.equal(predicted, expected)
        if isinstance(b, PairBatch):
            assert b.caption_ids_BL.shape[1] <= 30
            changed = b.imlm_labels_BL != IGNORE_INDEX
            assert torch.equal(b.caption_ids_BL[changed], b.imlm_labels_BL[changed])
            assert (changed.sum(1) >= 1).all()


def test_modality_schedule_is_the_same_for_every_rank_and_dp_size(blend, cfg):
    reference = [BlendLoader(blend, cfg, dp_size=1).step_modalities(k) for k in range(40)]
    for dp in (2, 4):
        for rank in range(dp):
            loader = BlendLoader(blend, cfg, dp_rank=rank, dp_size=dp)
            assert [loader.step_modalities(k) for k in range(40)] == reference
    # The micro-steps of each modality consume its stream at the blend's rate.
    loader = BlendLoader(blend, cfg)
    micro = Counter(m for k in range(loader.num_steps) for m in loader.step_modalities(k))
    consumed = {m: micro[m] * MBS[m] for m in MBS}
    share = {m: len(loader.schedule.streams[m]) / blend.num_samples for m in MBS}
    for m in MBS:
        assert consumed[m] / sum(consumed.values()) == pytest.approx(share[m], abs=0.01)


def test_every_loader_reads_the_blends_computed_streams(blend, cfg):
    """No loader holds a per-sample array: the streams and the micro-step schedule are computed
    when read (the blend's LRU of computed windows is all that is kept)."""
    loaders = [BlendLoader(blend, cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for m in MBS:
        assert all(loader.schedule.streams[m] is blend.streams[m] for loader in loaders)
    take(loaders[0], 6)
    assert not any(isinstance(v, np.ndarray) and v.size > 100 for loader in loaders
                   for v in (*vars(loader.schedule).values(), *vars(loader).values()))
    assert blend.index_bytes() < 3 * 2 ** 20


def test_ranks_read_disjoint_slices_of_the_same_global_micro_batch(blend, cfg):
    ranks = [take(BlendLoader(blend, cfg, dp_rank=r, dp_size=3), 9) for r in range(3)]
    whole = take(BlendLoader(blend, replace(cfg, micro_batch_sizes={m: 3 * n for m, n in MBS.items()})), 9)
    for step in range(9):
        modalities = {ranks[r][step].modality for r in range(3)}
        assert modalities == {whole[step].modality}
        joined = sum((ranks[r][step].sample_keys for r in range(3)), ())
        assert joined == whole[step].sample_keys


def test_same_samples_for_0_1_and_3_workers(blend, cfg):
    runs = [take(BlendLoader(blend, replace(cfg, num_workers=w), dp_rank=1, dp_size=2), 10) for w in (0, 1, 3)]
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])


def test_exact_resume_at_a_step(blend, cfg):
    uninterrupted = take(BlendLoader(blend, cfg, dp_rank=0, dp_size=2), 15)
    first = BlendLoader(blend, replace(cfg, num_workers=2), dp_rank=0, dp_size=2)
    steps = iter(first.iter_steps())
    for _ in range(2):  # two optimizer steps = 6 micro-steps
        next(steps)
    state = first.state_dict()
    assert state["micro_step"] == 6 and all(isinstance(v, int) for v in state.values())
    resumed = BlendLoader(blend, cfg, dp_rank=0, dp_size=2)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 9), uninterrupted[6:15])


def test_resume_at_another_dp_size_repeats_and_loses_nothing(blend, cfg):
    seen: dict[str, list[str]] = {m: [] for m in MBS}

    def consume(dp, state, micro_steps):
        loaders = [BlendLoader(blend, cfg, dp_rank=r, dp_size=dp) for r in range(dp)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        per_rank = [take(loader, micro_steps) for loader in loaders]
        for step in zip(*per_rank):
            assert len({b.modality for b in step}) == 1
            seen[step[0].modality].extend(k for b in step for k in b.sample_keys)
        return loaders[0].state_dict()

    state = consume(2, None, 6)
    state = consume(3, state, 9)
    state = consume(1, state, 6)
    reference = BlendLoader(blend, cfg)
    for m in MBS:
        assert seen[m] == reference.stream_keys(m, 0, len(seen[m]))  # the global order, no gap, no repeat
        assert state[f"offset_{m}"] == len(seen[m])
    assert state["micro_step"] == 21


def test_num_steps_stops_at_the_end_of_the_blend(blend, cfg):
    loader = BlendLoader(blend, cfg, dp_rank=0, dp_size=2)
    n = loader.num_steps
    steps = list(loader.iter_steps())
    assert len(steps) == n > 10
    left = {m: len(loader.schedule.streams[m]) - loader.state_dict()[f"offset_{m}"] for m in MBS}
    assert all(v >= 0 for v in left.values())
    assert min(left[m] / (MBS[m] * 2) for m in MBS) < cfg.micro_steps_per_step  # no whole step left


@pytest.mark.parametrize("schedule", ["mixed", "per_modality", "grouped"])
def test_num_steps_is_what_iterating_yields_from_any_cursor(blend, cfg, schedule):
    """num_steps is a closed form (a few tree counts, at any blend length): from cursors at the
    start, mid-step, mid-blend and past the end, at DP 1, 2 and 3, it equals the steps the sampler
    walks to, for the mixed schedule, the per-modality one and with length grouping."""
    from xfm_scale.data.loader import _PlanSampler

    if schedule == "per_modality":
        cfg = replace(cfg, micro_steps_per_step=1, micro_steps_per_group={"text": 2, "image": 1, "pair": 3})
    if schedule == "grouped":
        cfg = replace(cfg, length_group_size=24, length_group_window=4)
    per_step = sum(cfg.micro_steps_per_group.values()) if cfg.micro_steps_per_group else cfg.micro_steps_per_step
    seen = set()
    for dp in (1, 2, 3):
        loader = BlendLoader(blend, cfg, dp_rank=dp - 1, dp_size=dp)
        start, origin = loader.state_dict(), dict(loader._cursor)
        walked = sum(1 for _ in _PlanSampler(loader, origin)) // per_step
        assert loader.num_steps == walked > 5
        seen.add(walked)
        for micro_steps in (1, 4, 3 * walked, 10 ** 6):  # a cursor after that many micro-batches
            *_, last = itertools.islice(_PlanSampler(loader, origin), micro_steps)
            state = {**start, **dict(zip(("micro_step", *(f"offset_{m}" for m in MODALITIES)), last.cursor_after))}
            loader.load_state_dict(state)
            walked = sum(1 for _ in _PlanSampler(loader, loader._cursor)) // per_step
            assert loader.num_steps == walked, (dp, micro_steps)
    assert len(seen) == 3  # the DP sizes feed different numbers of steps


def test_a_longer_blend_of_the_same_spec_continues_a_cursor(blend, cfg, demo, tmp_path):
    """A run whose train.steps grew builds a longer blend: its sequence and micro-step schedule
    extend the shorter blend's, so the saved cursor continues exactly where it stopped."""
    longer = build_blend(demo.spec, num_samples=2 * blend.num_samples + 17, seed=blend.seed, cache_dir=tmp_path)
    assert longer.fingerprint != blend.fingerprint and longer.sequence_id == blend.sequence_id
    n = blend.num_samples
    assert np.array_equal(longer.corpus_index[:n], blend.corpus_index)
    assert np.array_equal(longer.sample_index[:n], blend.sample_index)
    short_loader, long_loader = BlendLoader(blend, cfg, dp_rank=1, dp_size=2), BlendLoader(longer, cfg, dp_rank=1, dp_size=2)
    common = len(short_loader.schedule.modality)
    assert np.array_equal(long_loader.schedule.modality[:common], short_loader.schedule.modality)

    finished = BlendLoader(blend, cfg, dp_rank=1, dp_size=2)
    last = list(finished.iter_steps())[-1]  # the short blend used up
    continued = BlendLoader(longer, cfg, dp_rank=1, dp_size=2)
    continued.load_state_dict(finished.state_dict())
    reference = take(BlendLoader(longer, cfg, dp_rank=1, dp_size=2), finished.state_dict()["micro_step"] + 6)
    assert_same_batches(last, reference[-6 - len(last):-6])
    assert_same_batches(take(continued, 6), reference[-6:])


def test_trainer_rng_untouched_and_wrong_blend_state_refused(blend, cfg, demo, tmp_path, monkeypatch):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    # With 0 workers the loader runs in the trainer's process: torch.manual_seed per sample would
    # also reseed the CUDA generators, which fork_rng(devices=[]) does not restore.
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    batches = take(BlendLoader(blend, cfg), 4)
    assert any(isinstance(b, (ImageBatch, PairBatch)) for b in batches)  # augmentations were seeded
    assert torch.equal(torch.rand(3), expected) and cuda_seeds == []
    other = build_blend(demo.spec, num_samples=1500, seed=8, cache_dir=tmp_path)
    with pytest.raises(DataSpecError, match="saved with another blend"):
        BlendLoader(other, cfg).load_state_dict(BlendLoader(blend, cfg).state_dict())


def test_eval_transform_is_deterministic_and_augmentation_varies_by_sample(blend, cfg):
    aug = take(BlendLoader(blend, cfg), 6)
    plain = take(BlendLoader(blend, replace(cfg, augment=False, seed=99)), 6)
    plain_other_seed = take(BlendLoader(blend, replace(cfg, augment=False, seed=100)), 6)
    image = next(i for i, b in enumerate(aug) if isinstance(b, (ImageBatch, PairBatch)))
    assert torch.equal(plain[image].pixel_values_BCHW, plain_other_seed[image].pixel_values_BCHW)
    assert not torch.equal(plain[image].pixel_values_BCHW, aug[image].pixel_values_BCHW)
    px = aug[image].pixel_values_BCHW
    assert not torch.equal(px[0], px[1])
    assert np.unique(aug[image].mim_mask_BP.numpy(), axis=0).shape[0] > 1


def test_a_bad_samples_replacement_is_no_other_sample_of_the_micro_step(demo, tmp_path):
    """Replacing a bad sample by the corpus's next blend position put the next rank's sample (or its
    own next one) in twice. The seeded replacement does not, and is the same at any DP size."""
    records = [{"txt": "   " if i % 10 == 3 else f"sentence number {i}"} for i in range(5000)]  # 10% empty
    write_corpus(records, out_dir=tmp_path / "t", name="holey", modality="text", maxcount=2500)
    spec = write_spec(tmp_path / "s.yaml", [{"name": "holey", "modality": "text", "weight": 1,
                                             "manifest": "t/holey.manifest.json"}])
    blend = build_blend(spec, num_samples=96, seed=0, cache_dir=tmp_path / "c")
    cfg = LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes={"text": 8})
    loaders = [BlendLoader(blend, cfg, dp_rank=r, dp_size=2) for r in range(2)]
    ranks = [list(loader) for loader in loaders]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert sum(loader.bad_samples.total() for loader in loaders) >= 5
    steps = list(zip(*ranks))
    assert [set(a.sample_keys) & set(b.sample_keys) for a, b in steps] == [set()] * 6  # not on both ranks
    assert [len(set(a.sample_keys + b.sample_keys)) for a, b in steps] == [16] * 6  # nor twice on one
    whole = list(BlendLoader(blend, replace(cfg, micro_batch_sizes={"text": 16})))
    assert [b.sample_keys for b in whole] == [a.sample_keys + b.sample_keys for a, b in zip(*ranks)]


def _augmented(img, seeds):
    from xfm_scale.data.transforms import CaptionSafeRandAugment

    out = []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        out.append(np.asarray(CaptionSafeRandAugment(2, 7)(img)).astype(int))
    return out


def test_randaugment_keeps_the_colours_captions_name():
    """The reference's RandAugment(2, 7) (ALBEF's op list, no colour ops): a red patch on a grey
    noise background stays clearly red whichever ops are drawn. Measured over these 300 draws: the
    20 reddest pixels' red margin (R - max(G, B)) stays >= 194 (input ~240); torchvision's
    RandAugment(2, 7), which also draws Solarize, Posterize, Color and Contrast, brings it to 116."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.repeat(rng.integers(0, 256, (32, 32, 1)), 3, axis=2).astype(np.uint8)
    img[8:24, 8:24, 0] = rng.integers(150, 256, (16, 16))
    img[8:24, 8:24, 1:] = rng.integers(0, 60, (16, 16, 2))
    for seed, out in enumerate(_augmented(Image.fromarray(img), range(300))):
        margin = np.sort((out[..., 0] - out[..., 1:].max(-1)).ravel())[-20:].mean()
        assert margin > 160, (seed, margin)


def test_randaugment_applies_each_drawn_op_with_probability_one_half():
    """Unchanged when both draws are skipped (p 0.5 each) or are Identity (1 of 10): (0.5 + 0.05)^2."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    unchanged = np.mean([np.array_equal(out, np.asarray(img)) for out in _augmented(img, range(400))])
    assert 0.22 < unchanged < 0.39, unchanged
