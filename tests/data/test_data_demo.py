"""The demo world (captions really describe the images; the held-out set and its ceiling),
make_shards' input formats, and what writing a corpus leaves in its folder."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from xfm_scale.data.demo import (ALL_SCENES, COLOURS, Scene, caption, caption_content, draw,
                                  held_out_captions, held_out_scenes, other_sentence, unique_content_share)
from xfm_scale.data.loader import load_pair_eval_set, load_tokenizer
from xfm_scale.data.sources import read_images, read_pairs, read_text
from xfm_scale.data.shards import Skip, iter_tar_samples, verify_manifest, write_corpus
from conftest import png

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("position, box", [("left", (0, 0, 0.5, 1)), ("right", (0.5, 0, 1, 1)),
                                           ("top", (0, 0, 1, 0.5)), ("bottom", (0, 0.5, 1, 1)),
                                           ("centre", (0.2, 0.2, 0.8, 0.8))])
def test_drawn_shapes_have_the_captioned_colour_position_and_count(position, box):
    rng = random.Random(0)
    for colour in ("red", "blue", "green"):
        for count in (1, 2, 3):
            img = np.asarray(draw(Scene("square", colour, position, count), 32, rng)).astype(int)
            dist = np.abs(img - np.array(COLOURS[colour])).sum(-1)
            ys, xs = np.nonzero(dist < 60)  # pixels of the shape's colour
            assert len(xs) > 8 * count
            cx, cy = xs.mean() / 32, ys.mean() / 32
            assert box[0] <= cx <= box[2] and box[1] <= cy <= box[3], (position, cx, cy)
            blobs = _count_blobs(dist < 60)
            assert blobs == count, (position, colour, count, blobs)
    text = caption(Scene("circle", "red", position, 2), rng)
    assert "two red circles" in text and position.replace("centre", "centre") in text


def _count_blobs(mask: np.ndarray) -> int:
    seen, blobs = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        stack = [(y, x)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return blobs


def test_demo_outputs_tokenizer_and_eval_set(demo):
    tok = load_tokenizer(demo.tokenizer_dir)
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.mask_token_id == 4 and len(tok) <= 1000
    ids = tok("three blue triangles at the top").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids and len(ids) <= 10  # known words: few tokens, no <unk>
    manifests = {name: json.loads(path.read_text()) for name, path in demo.manifests.items()}
    assert {n: m["num_samples"] for n, m in manifests.items()} == {"demo_pairs": 300, "demo_images": 120,
                                                                    "demo_text": 300}
    assert all(verify_manifest(path) == [] for path in demo.manifests.values())
    ev = load_pair_eval_set(demo.eval_manifest, demo.tokenizer_dir, image_size=32, mim_grid=4)
    assert ev.pixel_values_BCHW.shape == (40, 3, 32, 32) and len(set(ev.sample_keys)) == 40
    train_captions = {s["txt"] for s in iter_tar_samples(demo.manifests["demo_pairs"].parent / "demo_pairs-000000.tar")}
    assert len(train_captions) > 50


def test_every_caption_phrasing_reads_back_as_its_scene_and_other_sentences_as_none():
    rng = random.Random(1)
    for scene in ALL_SCENES:
        for _ in range(6):  # the templates and the "a"/"one" choice vary
            text = caption(scene, rng)
            assert caption_content(text) == (scene.count, scene.colour, scene.shape, scene.position), text
    assert all(caption_content(other_sentence(rng)) is None for _ in range(200))  # "... a red apple"


def test_the_ceiling_is_the_share_of_captions_whose_content_no_other_caption_has():
    captions = ["two red circles on the left",
                "on the left , two red circles",  # the same content as the first, phrased otherwise
                "a blue square at the top",
                "there is one blue square at the top",  # "a" and "one" are the same count
                "three green triangles in the centre",
                "a picture of a purple diamond at the bottom",
                "a purple diamond at the top",  # differs from the one above in position only
                "the cat sees a red apple"]  # not a demo caption: never unique
    assert unique_content_share(captions) == 3 / 8
    assert unique_content_share(captions[4:7]) == 1.0 and unique_content_share([]) == 0.0


def test_held_out_scenes_are_distinct_until_the_world_runs_out():
    scenes = held_out_scenes(400, random.Random(0))
    assert len(set(scenes[:360])) == 360 and len(set(scenes[360:])) == 40  # 360 contents in all


def test_the_held_out_set_of_the_built_world_has_a_ceiling_of_one(demo):
    captions = held_out_captions(demo.eval_manifest)
    assert len(captions) == 40 and unique_content_share(captions) == 1.0


def test_the_shaded_background_tells_a_patch_where_it_is_and_the_plain_one_does_not():
    """The vision encoder has no absolute position embedding: in the demo world a patch's own
    pixels say where it is (redder to the right, bluer to the bottom)."""
    rng = random.Random(0)
    for shaded in (True, False):
        img = np.asarray(draw(Scene("circle", "black", "centre", 1), 32, rng, shaded=shaded)).astype(float)
        left, right = img[:, :8].reshape(-1, 3).mean(0), img[:, -8:].reshape(-1, 3).mean(0)
        top, bottom = img[:8].reshape(-1, 3).mean(0), img[-8:].reshape(-1, 3).mean(0)
        if shaded:
            assert right[0] - left[0] > 40 and bottom[2] - top[2] > 40
            assert abs(right[2] - left[2]) < 2 and abs(bottom[0] - top[0]) < 2
        else:
            assert np.abs(right - left).max() < 1 and np.abs(bottom - top).max() < 1


def test_source_formats(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"first line\n\n  \nsecond\n\xff\xfe broken\n")
    text = list(read_text(tmp_path / "t.txt"))
    assert [r["txt"] for r in text if not isinstance(r, Skip)] == ["first line", "second"]
    assert sorted(r.reason for r in text if isinstance(r, Skip)) == ["bad_utf8", "empty_text", "empty_text"]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    (tmp_path / "img" / "b.jpg").write_bytes(b"not a jpeg")
    images = list(read_images(tmp_path / "img"))
    assert [list(r) if isinstance(r, dict) else r.reason for r in images] == [["png"], "bad_image"]
    (tmp_path / "list.txt").write_text("img/a.png\nimg/missing.png\n")
    assert [isinstance(r, Skip) and r.reason for r in read_images(tmp_path / "list.txt")] == [False, "missing_image_file"]
    (tmp_path / "p.tsv").write_text("img/a.png\ta red square\nimg/a.png\t\n")
    tsv = list(read_pairs(tmp_path / "p.tsv"))
    assert tsv[0]["txt"] == "a red square" and tsv[1] == Skip("empty_caption")
    coco = {"images": [{"id": 1, "file_name": "img/a.png"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "two"},
                            {"image_id": 9, "caption": "orphan"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = list(read_pairs(tmp_path / "coco.json"))
    assert [r["txt"] if isinstance(r, dict) else r.reason for r in out] == ["one", "two", "missing_image_file"]


def _texts(prefix: str, n: int):
    return [{"txt": f"{prefix} {i}"} for i in range(n)]


def test_rewriting_a_corpus_deletes_and_lists_only_its_own_shards(tmp_path):
    """Corpora may share a folder: writing ``wiki`` must neither delete nor list ``wiki-en``'s
    shards (nor a user's ``wiki-backup.tar``), while its own stale shards do go."""
    write_corpus(_texts("en", 6), out_dir=tmp_path, name="wiki-en", modality="text", maxcount=2)
    (tmp_path / "wiki-backup.tar").write_bytes(b"not ours")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    first = write_corpus(_texts("wiki", 5), out_dir=tmp_path, name="wiki", modality="text", maxcount=2)
    listed = [s["name"] for s in json.loads(first.manifest_path.read_text())["shards"]]
    assert listed == ["wiki-000000.tar", "wiki-000001.tar", "wiki-000002.tar"]

    second = write_corpus(_texts("wiki", 2), out_dir=tmp_path, name="wiki", modality="text", maxcount=2)
    manifest = json.loads(second.manifest_path.read_text())
    assert [s["name"] for s in manifest["shards"]] == ["wiki-000000.tar"] and manifest["num_samples"] == 2
    ours = {p.name for p in tmp_path.iterdir()} - set(before)
    assert ours == {"wiki-000000.tar", "wiki-000000.tar.idx.json", "wiki.manifest.json"}  # stale 1, 2 gone
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the others untouched
    assert verify_manifest(tmp_path / "wiki-en.manifest.json") == []


def test_a_corpus_with_no_sample_lists_no_shard(tmp_path):
    result = write_corpus([Skip("empty_text")], out_dir=tmp_path, name="void", modality="text")
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["shards"] == [] and manifest["skipped"] == {"empty_text": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["void.manifest.json"]  # no empty tar left behind
