"""The data side of the X-FM recipe as the reference (zhangxinsong-nlp/XFM) trains it, with exact
checks: BEiT's block masks (models/masking_generator.py), X-FM's text masking count
(TextMaskingGenerator), its caption cleaning (pre_caption), and launchers/configs/base.yaml
selecting all of them."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import png, write_spec
import torch

from xfm_scale.batch import IGNORE_INDEX, PairBatch, TextBatch
from xfm_scale.config import run as run_config
from xfm_scale.data.blend import build_blend
from xfm_scale.data.captions import EmptyCaption, pre_caption
from xfm_scale.data.loader import BlendLoader, LoaderConfig, decode_sample, load_tokenizer
from xfm_scale.data.masking import IMLM_MASKING, MLM_MASKING, BlockMaskGenerator, TokenMaskingConfig, mask_tokens
from xfm_scale.data.shards import DataSpecError, write_corpus

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


# (not imported from tests/data/conftest.py: run together with tests/model, ``conftest`` names that one)


# ---------------------------------------------------------------------------------- MIM block masks
class ReferenceBlockMasks:
    """BEiT's MaskingGenerator (models/masking_generator.py of X-FM, the same as unilm's beit2),
    re-implemented from its published code with its own random sources. ``clip_area`` is the
    variant xfm_scale used to have (area drawn from [min(min_block, left), left]): the test shows
    the block-count measure tells the two apart."""

    def __init__(self, grid: int, num_masked: int, min_block: int, seed: int, clip_area: bool = False):
        self.grid, self.num_masked, self.min_block, self.clip_area = grid, num_masked, min_block, clip_area
        self.log_aspect = (math.log(0.3), math.log(1 / 0.3))
        self.random, self.np_random = random.Random(seed), np.random.RandomState(seed)

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        delta = 0
        for _ in range(10):
            low = min(self.min_block, max_mask_patches) if self.clip_area else self.min_block
            target_area = self.random.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.grid and h < self.grid:
                top = self.random.randint(0, self.grid - h)
                left = self.random.randint(0, self.grid - w)
                num_masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self) -> np.ndarray:
        mask = np.zeros((self.grid, self.grid), dtype=np.int32)
        count = 0
        while count < self.num_masked:
            delta = self._mask(mask, self.num_masked - count)  # max_num_patches = num_masked
            if delta == 0:
                break
            count += delta
        if count > self.num_masked:
            ys, xs = mask.nonzero()
            drop = self.np_random.choice(ys.shape[0], count - self.num_masked, replace=False)
            mask[ys[drop], xs[drop]] = 0
        elif count < self.num_masked:
            ys, xs = (mask == 0).nonzero()
            add = self.np_random.choice(ys.shape[0], self.num_masked - count, replace=False)
            mask[ys[add], xs[add]] = 1
        assert mask.sum() == self.num_masked
        return mask.reshape(-1).astype(bool)


def blocks(mask_flat: np.ndarray, grid: int) -> int:
    """4-connected components of masked patches."""
    mask = mask_flat.reshape(grid, grid)
    seen, count = np.zeros_like(mask, dtype=bool), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < grid and 0 <= b < grid and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return count


N_MASKS = 2000


def xfm_masks(grid: int, num_masked: int, min_block: int, seed: int = 0) -> list[np.ndarray]:
    gen = BlockMaskGenerator(grid=grid, num_masked=num_masked, min_block=min_block)
    # one generator per mask, as the loader seeds each sample's mask from its own stream
    return [gen(np.random.default_rng([seed, i])) for i in range(N_MASKS)]


@pytest.mark.parametrize("grid,num_masked,min_block", [(14, 75, 16), (4, 6, 2)])  # 224/16 base; tiny 32/8
def test_block_masks_have_the_reference_block_count_and_exactly_num_masked(grid, num_masked, min_block):
    ours = xfm_masks(grid, num_masked, min_block)
    assert all(m.shape == (grid * grid,) and m.dtype == bool and int(m.sum()) == num_masked for m in ours)
    reference = ReferenceBlockMasks(grid, num_masked, min_block, seed=1)
    ref_masks = [reference() for _ in range(N_MASKS)]
    ours_mean = np.mean([blocks(m, grid) for m in ours])
    ref_mean = np.mean([blocks(m, grid) for m in ref_masks])
    assert abs(ours_mean / ref_mean - 1) <= 0.03, (ours_mean, ref_mean)
    if grid == 14:
        assert 1.7 < ref_mean < 1.9  # the reference's 1.79 blocks per image
        # the measure separates the old (area clipped to what is left) generator from BEiT's
        clipped = ReferenceBlockMasks(grid, num_masked, min_block, seed=1, clip_area=True)
        clipped_mean = np.mean([blocks(clipped(), grid) for _ in range(N_MASKS)])
        assert clipped_mean / ref_mean - 1 > 0.10, (clipped_mean, ref_mean)


def test_block_masks_are_a_function_of_the_generator_seed():
    gen = BlockMaskGenerator(grid=14, num_masked=75, min_block=16)
    a = [gen(np.random.default_rng([3, i])) for i in range(20)]
    b = [gen(np.random.default_rng([3, i])) for i in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) == 20


# ---------------------------------------------------------------------------------- text masking
REFERENCE_MLM = TokenMaskingConfig(prob=0.15, max_masks=20, scheme="reference")
REFERENCE_IMLM = TokenMaskingConfig(prob=0.5, max_masks=15, scheme="reference")
BOS, EOS, MASK, VOCAB = 0, 2, 4, 1000


def sequence(length: int) -> tuple[np.ndarray, np.ndarray]:
    """<s> w1 .. w_{length-2} </s> and its special-token flags (no padding)."""
    ids = np.array([BOS, *range(100, 100 + length - 2), EOS], dtype=np.int64)
    special = np.zeros(length, dtype=bool)
    special[[0, -1]] = True
    return ids, special


@pytest.mark.parametrize("cfg", [REFERENCE_MLM, REFERENCE_IMLM], ids=["mlm", "imlm"])
def test_reference_masking_counts_the_whole_sequence_and_protects_only_position_0(cfg):
    for length in range(2, 129):
        ids, special = sequence(length)
        want = min(cfg.max_masks, max(1, round(length * cfg.prob)))  # Python's round: half to even
        for seed in range(5):
            masked, labels = mask_tokens(ids, special, cfg, MASK, VOCAB, np.random.default_rng([length, seed]))
            chosen = np.flatnonzero(labels != IGNORE_INDEX)
            assert len(chosen) == want, (length, seed)
            assert chosen.min() >= 1 and np.array_equal(labels[chosen], ids[chosen])
            assert np.array_equal(masked[labels == IGNORE_INDEX], ids[labels == IGNORE_INDEX])


def test_reference_and_xfm_scale_counts_on_exact_lengths():
    # (length with <s> and </s>, prob, max): reference count, xfm_scale count
    cases = [(3, 0.5, 15, 2, 1), (5, 0.5, 15, 2, 2), (7, 0.5, 15, 4, 2), (9, 0.5, 15, 4, 4), (30, 0.5, 15, 15, 14),
             (10, 0.5, 15, 5, 4), (12, 0.15, 20, 2, 2), (30, 0.15, 20, 4, 4), (128, 0.15, 20, 19, 19),
             (24, 0.15, 20, 4, 3)]
    for length, prob, max_masks, ref_n, ours_n in cases:
        ids, special = sequence(length)
        for scheme, want in (("reference", ref_n), ("xfm_scale", ours_n)):
            cfg = TokenMaskingConfig(prob=prob, max_masks=max_masks, scheme=scheme)
            _, labels = mask_tokens(ids, special, cfg, MASK, VOCAB, np.random.default_rng(length))
            assert int((labels != IGNORE_INDEX).sum()) == want, (length, prob, scheme)


def test_only_the_reference_scheme_masks_the_end_of_text_token():
    # <s> w </s> at 0.5: the reference predicts round(1.5) = 2 of positions 1..2, so always </s>
    ids, special = sequence(3)
    for seed in range(50):
        _, labels = mask_tokens(ids, special, REFERENCE_IMLM, MASK, VOCAB, np.random.default_rng(seed))
        assert labels.tolist() == [IGNORE_INDEX, 100, EOS]
        _, labels = mask_tokens(ids, special, IMLM_MASKING, MASK, VOCAB, np.random.default_rng(seed))
        assert labels.tolist() == [IGNORE_INDEX, 100, IGNORE_INDEX]
    ids, special = sequence(30)
    eos_ref = eos_ours = 0
    for seed in range(400):
        eos_ref += mask_tokens(ids, special, REFERENCE_IMLM, MASK, VOCAB, np.random.default_rng(seed))[1][-1] == EOS
        eos_ours += mask_tokens(ids, special, IMLM_MASKING, MASK, VOCAB, np.random.default_rng(seed))[1][-1] == EOS
    assert eos_ours == 0 and 100 < eos_ref < 300  # 15 of 29 candidates: about half the time


def test_unknown_masking_scheme_is_refused():
    with pytest.raises(ValueError, match="token masking scheme 'bert'"):
        TokenMaskingConfig(prob=0.15, max_masks=20, scheme="bert")
    with pytest.raises(DataSpecError, match="data.mlm_masking='bert'"):
        LoaderConfig(tokenizer_dir=None, mlm_masking="bert").validate(set())


# ---------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("raw,want", [
    ("A Man riding a HORSE.", "a man riding a horse"),
    ("two dogs, playing (in) the 'park'!", "two dogs playing in the park"),
    ("well-known t-shirt/jeans brand", "well known t shirt jeans brand"),
    ('he said: "hi"; she said? ~no~ #tag *star*', "he said hi she said no tag star"),
    ("<person> holds a cup", "person holds a cup"),
    ("<PERSON> waves", "person waves"),  # lower-cased before the <person> rule
    ("  spaced   out \t words  ", "spaced out words"),
    ("tab\tinside", "tab\tinside"),  # a single whitespace character is not collapsed
    ("line end\n", "line end"),
    ("50% & more @ home + [x] {y} <b>", "50% & more @ home + [x] {y} <b>"),  # not in the set: kept
    ("Café ÉTÉ", "café été"),
    (" ".join(f"w{i}" for i in range(40)), " ".join(f"w{i}" for i in range(30))),
])
def test_pre_caption_exact(raw, want):
    assert pre_caption(raw) == want


def test_pre_caption_word_limit_and_empty():
    assert pre_caption("one, two three four", max_words=2) == "one two"
    assert pre_caption("a b c", max_words=3) == "a b c"
    for raw in ("...", " - / ", "?!", ""):
        with pytest.raises(EmptyCaption):
            pre_caption(raw)


def test_decode_sample_cleans_pair_captions_only_when_asked():
    pair = {"png": png(), "txt": "  Two RED circles, at the TOP!  ".encode()}
    assert decode_sample(pair, "pair")["txt"] == "Two RED circles, at the TOP!"
    assert decode_sample(pair, "pair", caption_cleaning=True)["txt"] == "two red circles at the top"
    assert decode_sample(pair, "pair", caption_cleaning=True, caption_max_words=3)["txt"] == "two red circles"
    assert decode_sample({"png": png(), "txt": b"?!..."}, "pair", caption_cleaning=True) == "empty_caption"
    assert decode_sample({"png": png(), "txt": b"?!..."}, "pair")["txt"] == "?!..."
    text = {"txt": b"Text, As Stored."}  # text samples are never cleaned (nor in the reference)
    assert decode_sample(text, "text", caption_cleaning=True)["txt"] == "Text, As Stored."


# ---------------------------------------------------------------------------------- the loader
RAW_CAPTIONS = ["Two RED circles, at the TOP!", "a picture of three blue squares (left)",
                "There are two GREEN triangles: at the bottom.", "one/two yellow circles - centre"]
MBS = {"text": 6, "pair": 4}


@pytest.fixture(scope="module")
def recipe_blend(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    records = ({"png": png((40 * i % 255, 90, 160)), "txt": RAW_CAPTIONS[i % 4]} for i in range(24))
    pairs = write_corpus(records, out_dir=root / "caps", name="caps", modality="pair", maxcount=8).manifest_path
    spec = write_spec(root / "spec.yaml", [
        {"name": "caps", "modality": "pair", "manifest": str(pairs), "weight": 0.5},
        {"name": "demo_text", "modality": "text", "manifest": str(demo.manifests["demo_text"]), "weight": 0.5}])
    return build_blend(spec, num_samples=240, seed=3, cache_dir=root / "cache")


def loader_batches(blend, tokenizer_dir, n=16, **kw):
    cfg = LoaderConfig(tokenizer_dir=str(tokenizer_dir), micro_batch_sizes=MBS, image_size=32, mim_grid=4,
                       mim_num_masked=6, mim_min_block=2, **kw)
    out = []
    for batch in BlendLoader(blend, cfg):
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_loader_cleans_captions_and_masks_as_the_reference(recipe_blend, demo):
    tok = load_tokenizer(demo.tokenizer_dir)
    batches = loader_batches(recipe_blend, demo.tokenizer_dir, caption_cleaning=True, mlm_masking="reference")
    kinds = {type(b) for b in batches}
    assert kinds == {TextBatch, PairBatch}
    clean = {tuple(tok(pre_caption(c)).input_ids) for c in RAW_CAPTIONS}
    raw = {tuple(tok(c).input_ids) for c in RAW_CAPTIONS}
    assert not clean & raw  # the cleaning changes every caption's tokens
    eos_targets = 0
    for b in batches:
        if isinstance(b, PairBatch):
            for ids, att in zip(b.caption_ids_BL, b.caption_mask_BL):
                assert tuple(ids[att.bool()].tolist()) in clean
            labels, length = b.imlm_labels_BL, b.caption_mask_BL.sum(1)
            want = torch.clamp(torch.round(length * 0.5), min=1, max=15)  # torch.round: half to even
        else:
            labels, length = b.mlm_labels_BL, b.attention_mask_BL.sum(1)
            want = torch.clamp(torch.round(length * 0.15), min=1, max=20)
        assert torch.equal((labels != IGNORE_INDEX).sum(1), want)
        assert (labels[:, 0] == IGNORE_INDEX).all()
        eos_targets += int((labels == tok.eos_token_id).sum())
    assert eos_targets > 0  # </s> is sometimes a target, as in the reference


def test_loader_default_keeps_captions_and_xfm_scale_masking(recipe_blend, demo):
    tok = load_tokenizer(demo.tokenizer_dir)
    raw = {tuple(tok(c).input_ids) for c in RAW_CAPTIONS}
    for b in loader_batches(recipe_blend, demo.tokenizer_dir):
        if isinstance(b, PairBatch):
            for ids, att in zip(b.caption_ids_BL, b.caption_mask_BL):
                assert tuple(ids[att.bool()].tolist()) in raw
            labels, real, prob, most = b.imlm_labels_BL, b.caption_mask_BL.sum(1) - 2, 0.5, 15
        else:
            labels, real, prob, most = b.mlm_labels_BL, b.attention_mask_BL.sum(1) - 2, 0.15, 20
        assert torch.equal((labels != IGNORE_INDEX).sum(1), torch.clamp(torch.round(real * prob), min=1, max=most))
        assert not (labels == tok.eos_token_id).any()  # </s> is never a target


def test_eval_set_cleans_captions_when_asked(demo):
    tok = load_tokenizer(demo.tokenizer_dir)
    plain, cleaned = load_pair_eval(demo), load_pair_eval(demo, caption_cleaning=True)
    assert plain.sample_keys == cleaned.sample_keys

    def texts(batch):
        return [tok.decode(ids[att.bool()], skip_special_tokens=True)
                for ids, att in zip(batch.caption_ids_BL, batch.caption_mask_BL)]

    assert texts(cleaned) == [pre_caption(t) for t in texts(plain)]
    assert texts(cleaned) != texts(plain)  # the demo template "at the top , two red circles" loses its comma


def load_pair_eval(demo, **kw):
    from xfm_scale.data.loader import load_pair_eval_set

    return load_pair_eval_set(demo.eval_manifest, demo.tokenizer_dir, image_size=32, mim_grid=4, **kw)


# ---------------------------------------------------------------------------------- base.yaml
def test_base_yaml_selects_the_reference_recipe():
    cfg = run_config.load(REPO / "launchers" / "configs" / "base.yaml")
    assert (cfg.data.caption_cleaning, cfg.data.mlm_masking) == (True, "reference")
    assert (cfg.optim.lr_x2, cfg.optim.no_decay_rule) == ("reference", "reference")
    assert (cfg.optim.lr, cfg.optim.new_param_lr_scale, cfg.optim.weight_decay) == (1e-4, 2.0, 0.01)
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.warmup_steps, cfg.optim.schedule) == (
        (0.9, 0.98), 1e-8, 2500, "linear")
    assert (cfg.optim.min_lr_ratio, cfg.optim.grad_clip) == (0.0, 1.0)
    assert (cfg.batch.micro_batch_size, cfg.batch.text_micro_batch_size) == (96, 256)
    assert cfg.batch.step_schedule == "per_modality"
    assert cfg.batch.modality_global_batch_sizes() == {"text": 256 * 32, "image": 96 * 32, "pair": 96 * 32}
    # the defaults existing configs and the demo get stay xfm_scale's
    demo = run_config.load(REPO / "launchers" / "configs" / "demo_tiny.yaml")
    assert (demo.data.caption_cleaning, demo.data.mlm_masking) == (False, "xfm_scale")
    assert (demo.optim.lr_x2, demo.optim.no_decay_rule) == ("new_modules", "xfm_scale")
    # the masking configs the loader starts from are the reference's probabilities and caps
    assert (MLM_MASKING.prob, MLM_MASKING.max_masks, IMLM_MASKING.prob, IMLM_MASKING.max_masks) == (0.15, 20, 0.5, 15)
    assert (MLM_MASKING.span_prob, MLM_MASKING.max_span) == (0.2, 3)
