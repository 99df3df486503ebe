"""Several captions per image (#23 item 4): ``make_shards --captions all`` writes one sample per
image holding all its captions (``KEY.txt`` the first, ``KEY.captions.json`` the list), and
``caption_choice: draw`` draws one of them per read, seeded by (seed, blend position), as the
reference's ``random.choice`` per read; ``first`` reads ``KEY.txt`` exactly as before."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import assert_same_batches, png, take, write_spec
import torch
import webdataset as wds

from xfm_scale.cli.make_shards import main as make_shards
from xfm_scale.config import run as run_config
from xfm_scale.data.blend import build_blend
from xfm_scale.data.demo import PHRASE_POSITION, POSITIONS, SHAPES
from xfm_scale.data.loader import (BlendLoader, LoaderConfig, caption_draw_rng, decode_sample, load_tokenizer,
                                   replacement_sample)
from xfm_scale.data.shards import DataSpecError, detect_modality, iter_tar_samples, load_index, write_corpus
from xfm_scale.data.sources import CAPTION_LIST_EXT, read_pairs

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
COLOURS = ("red", "green", "blue", "yellow")
NUMBERS = ("one", "two", "three", "one", "two")
# 4 images x 5 captions, all distinct: image r shows SHAPES[r]; caption j names POSITIONS[j]
CAPTIONS = [[f"{NUMBERS[j]} {COLOURS[r]} {SHAPES[r]} {PHRASE_POSITION[POSITIONS[j]]}" for j in range(5)]
            for r in range(4)]
MBS = 4


# (not imported from tests/data/conftest.py: run together with tests/model, ``conftest`` names that one)


def samples_of(out: Path, name: str) -> list[dict]:
    return [s for shard in sorted(out.glob(f"{name}-*.tar")) for s in iter_tar_samples(shard)]


# ---------------------------------------------------------------------------------- the converter
@pytest.fixture()
def pair_sources(tmp_path):
    for i, name in enumerate("abc"):
        (tmp_path / f"{name}.png").write_bytes(png((60 * i, 100, 200)))
    lines = [{"image": "a.png", "caption": CAPTIONS[0]},                  # 5 captions
             {"image": "b.png", "caption": "a single caption"},           # a string
             {"image": "c.png", "caption": ["only one", "   "]},          # 1 left, 1 empty_caption
             {"image": "missing.png", "caption": ["x", "y"]}]             # missing_image_file
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "c.png"}],  # image 3 has no annotation
            "annotations": [{"image_id": i, "caption": c} for i, c in
                            [(1, "c1"), (2, "d1"), (1, "c2"), (1, "c3"), (2, "d2"), (9, "lost"), (1, "c4"), (1, "c5")]]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return tmp_path


def convert(src: Path, name: str, *extra: str) -> tuple[int, dict]:
    code = make_shards(["--modality", "pair", "--input", str(src), "--out", str(src.parent / "out"), "--name", name,
                        *extra])
    manifest = src.parent / "out" / f"{name}.manifest.json"
    return code, json.loads(manifest.read_text()) if manifest.exists() else {}


def test_make_shards_writes_one_sample_per_image_with_its_caption_list(pair_sources, capsys):
    code, per_sample = convert(pair_sources / "pairs.jsonl", "per")
    assert code == 0
    assert per_sample["num_samples"] == 5 + 1 + 1  # today's default: one sample per caption
    assert per_sample["skipped"] == {"empty_caption": 1, "missing_image_file": 2}
    assert not any(CAPTION_LIST_EXT in s for s in samples_of(pair_sources / "out", "per"))

    code, grouped = convert(pair_sources / "pairs.jsonl", "all", "--captions", "all")
    assert code == 0
    assert grouped["num_samples"] == 3 and grouped["skipped"] == {"empty_caption": 1, "missing_image_file": 1}
    assert "1 samples hold several captions" in capsys.readouterr().out
    a, b, c = samples_of(pair_sources / "out", "all")
    assert a["txt"].decode() == CAPTIONS[0][0] and json.loads(a[CAPTION_LIST_EXT]) == CAPTIONS[0]
    assert a["png"] == (pair_sources / "a.png").read_bytes()
    # one caption: KEY.txt alone, as per-sample writes it
    assert (b["txt"].decode(), c["txt"].decode()) == ("a single caption", "only one")
    assert CAPTION_LIST_EXT not in b and CAPTION_LIST_EXT not in c
    # our index keeps the list as its own member and the sample stays a pair
    shard = sorted((pair_sources / "out").glob("all-*.tar"))[0]
    members = load_index(shard)["members"][0]
    assert set(members) == {"png", "txt", CAPTION_LIST_EXT} and detect_modality(members) == "pair"
    # a webdataset reader that decodes (img2dataset-style consumers) tolerates it: a decoded JSON list
    first = next(iter(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode("pil")))
    assert first[CAPTION_LIST_EXT] == CAPTIONS[0] and first["txt"] == CAPTIONS[0][0]
    assert first["png"].size == (16, 16)


def test_make_shards_groups_coco_annotations_per_image(pair_sources):
    code, per_sample = convert(pair_sources / "coco.json", "cocoper")
    assert code == 0 and per_sample["num_samples"] == 7 and per_sample["skipped"] == {"missing_image_file": 1}
    code, grouped = convert(pair_sources / "coco.json", "cocoall", "--captions", "all")
    assert code == 0 and grouped["num_samples"] == 2 and grouped["skipped"] == {"missing_image_file": 1}
    one, two = samples_of(pair_sources / "out", "cocoall")  # images in the order of their first annotation
    assert json.loads(one[CAPTION_LIST_EXT]) == ["c1", "c2", "c3", "c4", "c5"] and one["txt"] == b"c1"
    assert json.loads(two[CAPTION_LIST_EXT]) == ["d1", "d2"] and two["txt"] == b"d1"
    assert one["png"] == (pair_sources / "a.png").read_bytes() and two["png"] == (pair_sources / "b.png").read_bytes()


def test_captions_all_is_for_pairs_only(pair_sources, capsys):
    (pair_sources / "t.jsonl").write_text('{"text": "hello"}\n')
    code = make_shards(["--modality", "text", "--input", str(pair_sources / "t.jsonl"), "--out",
                        str(pair_sources / "out"), "--name", "t", "--captions", "all"])
    assert code == 2 and "--captions all is for --modality pair only" in capsys.readouterr().err
    with pytest.raises(DataSpecError, match="per-sample, all"):
        next(read_pairs(pair_sources / "pairs.jsonl", captions="every"))


# ---------------------------------------------------------------------------------- drawing one caption
def test_a_draw_is_a_function_of_the_position_and_covers_every_caption_in_proportion():
    members = {"png": png(), "txt": CAPTIONS[0][0].encode(), CAPTION_LIST_EXT: json.dumps(CAPTIONS[0]).encode()}
    n = 5000

    def drawn(seed, position):
        return decode_sample(members, "pair", caption_rng=caption_draw_rng(seed, position))["txt"]

    draws = [drawn(0, p) for p in range(n)]
    assert draws[:200] == [drawn(0, p) for p in range(200)]  # the same position draws the same caption
    shares = Counter(draws)
    assert set(shares) == set(CAPTIONS[0])
    # each of the 5 captions: 1/5 of the positions, within 0.02 (the binomial sd at n=5000 is 0.0057)
    assert all(abs(shares[c] / n - 0.2) < 0.02 for c in CAPTIONS[0]), shares
    # consecutive positions draw independently: a repeat as often as 1/5
    repeats = sum(a == b for a, b in zip(draws, draws[1:])) / (n - 1)
    assert abs(repeats - 0.2) < 0.03, repeats
    # another seed, other draws (as often as independent ones differ: 4/5)
    changed = sum(a != drawn(1, p) for p, a in enumerate(draws[:1000])) / 1000
    assert abs(changed - 0.8) < 0.05, changed


def test_decode_sample_checks_the_list_and_the_drawn_caption():
    rng = lambda: caption_draw_rng(0, 3)  # noqa: E731
    base = {"png": png(), "txt": b"the stored first caption"}
    for raw, reason in [(b"[]", "empty_caption_list"), (b'["a red circle", 3]', "bad_caption_list"),
                        (b'{"caption": "a"}', "bad_caption_list"), (b"not json", "bad_caption_list"),
                        (b'"a string"', "bad_caption_list"), (b"\xff\xfe[", "bad_caption_list"),
                        (b'["   "]', "empty_caption"), (json.dumps(["x" * 2001]).encode(), "overlong_caption")]:
        sample = {**base, CAPTION_LIST_EXT: raw}
        assert decode_sample(sample, "pair", caption_rng=rng()) == reason, raw
        # first (no generator) reads KEY.txt and never looks at the list, as before
        assert decode_sample(sample, "pair")["txt"] == "the stored first caption"
    # the drawn caption is stripped and cleaned like a stored one; no KEY.txt needed with a list
    listed = {"png": png(), CAPTION_LIST_EXT: json.dumps(["  Two RED circles, at the TOP!  "]).encode()}
    assert decode_sample(listed, "pair", caption_rng=rng())["txt"] == "Two RED circles, at the TOP!"
    assert decode_sample(listed, "pair", caption_rng=rng(), caption_cleaning=True)["txt"] == \
        "two red circles at the top"
    assert decode_sample(listed, "pair") == "missing_text"  # first needs KEY.txt, as before
    # a pair without a list reads KEY.txt under draw too
    assert decode_sample(base, "pair", caption_rng=rng())["txt"] == "the stored first caption"


# ---------------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same 4 images x 5 captions written two ways, as corpus 'caps' of two blends: with the
    lists (make_shards --captions all) and without them (the KEY.txt + image only: what the loader
    read before caption lists existed)."""
    root = tmp_path_factory.mktemp("several")
    for r in range(4):
        (root / f"{r}.png").write_bytes(png((50 * r, 120, 40 * r), size=24))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{r}.png", "caption": CAPTIONS[r]}) + "\n"
                                              for r in range(4)))
    records = list(read_pairs(root / "pairs.jsonl", captions="all"))
    assert all(CAPTION_LIST_EXT in x for x in records)
    blends = {}
    for kind, recs in (("lists", records), ("txt", [{k: v for k, v in x.items() if k != CAPTION_LIST_EXT}
                                                    for x in records])):
        write_corpus(recs, out_dir=root / kind, name="caps", modality="pair", maxcount=3)
        spec = write_spec(root / f"{kind}.yaml", [{"name": "caps", "modality": "pair",
                                                   "manifest": f"{kind}/caps.manifest.json", "weight": 1}])
        blends[kind] = build_blend(spec, num_samples=400, seed=5, cache_dir=root / f"cache-{kind}")
    assert np.array_equal(blends["lists"].sample_index, blends["txt"].sample_index)
    return blends


def config(tokenizer_dir, **kw) -> LoaderConfig:
    return LoaderConfig(**{"tokenizer_dir": str(tokenizer_dir), "micro_batch_sizes": {"pair": MBS},
                           "image_size": 32, "mim_grid": 4, "mim_num_masked": 6, "mim_min_block": 2, **kw})


def captions_read(batches) -> list[tuple[int, ...]]:
    """Each sample's caption token ids, unpadded."""
    return [tuple(ids[att.bool()].tolist()) for b in batches for ids, att in zip(b.caption_ids_BL, b.caption_mask_BL)]


def test_draw_reads_the_seeded_caption_of_every_blend_position(corpora, demo):
    blend, tok = corpora["lists"], load_tokenizer(demo.tokenizer_dir)
    ids = {tuple(tok(c, truncation=True, max_length=30).input_ids): (r, j)
           for r in range(4) for j, c in enumerate(CAPTIONS[r])}
    assert len(ids) == 20  # every caption tokenises apart
    loader = BlendLoader(blend, config(demo.tokenizer_dir, caption_choice="draw"))
    batches = take(loader)
    assert len(batches) == 100
    positions = loader.schedule.positions("pair", 0, 400)  # one rank: micro-step t reads 4t .. 4t+3
    read = [ids[c] for c in captions_read(batches)]
    keys = [k for b in batches for k in b.sample_keys]
    for position, (r, j), key in zip(positions, read, keys):
        assert key == f"caps/{r:09d}"
        assert j == int(caption_draw_rng(blend.seed, int(position)).integers(5))
    assert set(read) == set(ids.values())  # every caption of every image is read
    per_image = Counter(r for r, _ in read)
    for r in range(4):  # each caption about 1/5 of its image's ~100 reads (sd 0.04; the 5000-draw test is tighter)
        shares = [sum(1 for x in read if x == (r, j)) / per_image[r] for j in range(5)]
        assert 80 <= per_image[r] <= 120 and min(shares) >= 0.05 and max(shares) <= 0.4, (r, shares)


def test_draw_gives_the_same_batches_for_0_and_2_workers_any_dp_size_and_after_a_resume(corpora, demo):
    blend = corpora["lists"]
    cfg = config(demo.tokenizer_dir, caption_choice="draw")
    straight = take(BlendLoader(blend, cfg), 20)
    assert_same_batches(straight, take(BlendLoader(blend, config(demo.tokenizer_dir, caption_choice="draw",
                                                                 num_workers=2)), 20))
    # DP 2 with half the micro-batch: rank 0 then rank 1 hold the same global micro-batch
    half = config(demo.tokenizer_dir, caption_choice="draw", micro_batch_sizes={"pair": MBS // 2})
    ranks = [take(BlendLoader(blend, half, dp_rank=r, dp_size=2), 20) for r in (0, 1)]
    for t, batch in enumerate(straight):
        assert batch.sample_keys == ranks[0][t].sample_keys + ranks[1][t].sample_keys
        assert captions_read([batch]) == captions_read([ranks[0][t]]) + captions_read([ranks[1][t]])
        assert torch.equal(batch.pixel_values_BCHW, torch.cat([ranks[0][t].pixel_values_BCHW,
                                                               ranks[1][t].pixel_values_BCHW]))
    # resume after 8 micro-batches: the next 12 are those of the uninterrupted run
    first = BlendLoader(blend, cfg)
    take(first, 8)
    resumed = BlendLoader(blend, cfg)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 12), straight[8:])


def test_first_is_todays_behaviour_exactly(corpora, demo):
    assert LoaderConfig(tokenizer_dir=None).caption_choice == "first"
    today = take(BlendLoader(corpora["txt"], config(demo.tokenizer_dir)), 30)  # shards without lists
    # with lists in the shards, first reads exactly what was read before (KEY.txt, the first caption)
    assert_same_batches(take(BlendLoader(corpora["lists"], config(demo.tokenizer_dir)), 30), today)
    # a pair without a list reads its KEY.txt under draw too: per-sample shards are unchanged by draw
    assert_same_batches(take(BlendLoader(corpora["txt"], config(demo.tokenizer_dir, caption_choice="draw")), 30),
                        today)
    tok = load_tokenizer(demo.tokenizer_dir)
    firsts = {tuple(tok(CAPTIONS[r][0], truncation=True, max_length=30).input_ids) for r in range(4)}
    assert set(captions_read(today)) == firsts
    # draw changes only the caption (and the IMLM masks on it): same samples, pixels and MIM masks
    drawn = take(BlendLoader(corpora["lists"], config(demo.tokenizer_dir, caption_choice="draw")), 30)
    for x, y in zip(drawn, today):
        assert x.sample_keys == y.sample_keys and torch.equal(x.pixel_values_BCHW, y.pixel_values_BCHW)
        assert torch.equal(x.mim_mask_BP, y.mim_mask_BP)
    changed = sum(a != b for a, b in zip(captions_read(drawn), captions_read(today))) / (30 * MBS)
    assert 0.65 < changed < 0.95, changed  # 4/5 of the draws are not the first caption


def test_a_bad_caption_list_is_a_counted_bad_sample_with_its_reason(tmp_path, demo):
    lists = [json.dumps(["a red circle at the top", "a blue square on the left"]).encode(), b"[]",
             b'["a red circle", 3]', b'{"caption": "x"}', b"not json", json.dumps(["two green diamonds"] * 3).encode()]
    reasons = {1: "empty_caption_list", 2: "bad_caption_list", 3: "bad_caption_list", 4: "bad_caption_list"}
    records = [{"png": png((40 * i, 0, 0)), "txt": f"caption {i}".encode(), CAPTION_LIST_EXT: raw}
               for i, raw in enumerate(lists)]
    write_corpus(records, out_dir=tmp_path / "p", name="shaky", modality="pair", maxcount=4)
    spec = write_spec(tmp_path / "s.yaml", [{"name": "shaky", "modality": "pair",
                                             "manifest": "p/shaky.manifest.json", "weight": 1}])
    blend = build_blend(spec, num_samples=24, seed=0, cache_dir=tmp_path / "c")
    cfg = config(demo.tokenizer_dir, caption_choice="draw", micro_batch_sizes={"pair": 4})
    loader = BlendLoader(blend, cfg)
    keys = [k for b in loader for k in b.sample_keys]
    expected: Counter[str] = Counter()
    for position in range(24):  # each bad draw, and each bad replacement of one, is counted
        sample, attempt = int(blend.sample_index[position]), 0
        while sample in reasons:
            expected[f"shaky/{reasons[sample]}"] += 1
            sample, attempt = replacement_sample(blend.seed, position, attempt, len(lists)), attempt + 1
    counts = loader.bad_samples.as_dict()
    assert counts == dict(expected) and set(counts) == {"shaky/empty_caption_list", "shaky/bad_caption_list"}
    assert sum(counts.values()) >= 4 * 24 // 6
    report = {e["reason"]: set(e["keys"]) for e in loader.new_bad_samples()}
    assert report == {"empty_caption_list": {"000000001"},
                      "bad_caption_list": {"000000002", "000000003", "000000004"}}
    assert len(keys) == 24 and not {f"shaky/{i:09d}" for i in reasons} & set(keys)
    # first reads KEY.txt and never opens the list: no bad sample, as before
    plain = BlendLoader(blend, config(demo.tokenizer_dir, micro_batch_sizes={"pair": 4}))
    assert len([k for b in plain for k in b.sample_keys]) == 24 and plain.bad_samples.as_dict() == {}


# ---------------------------------------------------------------------------------- the run config
def test_run_config_has_caption_choice_default_first(demo):
    assert run_config.load(REPO / "launchers" / "configs" / "demo_tiny.yaml").data.caption_choice == "first"
    drawn = run_config.load(REPO / "launchers" / "configs" / "demo_tiny.yaml", {"data.caption_choice": "draw"})
    assert drawn.data.caption_choice == "draw"
    with pytest.raises(DataSpecError, match="caption_choice='random': use one of first, draw"):
        config(demo.tokenizer_dir, caption_choice="random").validate({"pair"})
