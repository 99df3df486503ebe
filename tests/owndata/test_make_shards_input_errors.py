"""tools/make_shards.py on the inputs a newcomer gives it: shards that need no conversion, a wrong
--image-root or field name, corrupt images. Each: the exit code, and a message naming the cause
and the option or spec change that fixes it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from owndata_fixtures import jpeg, write_coco, write_img2dataset
from xfm_scale.cli.make_shards import main

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def make_shards(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("modality", ["pair", "image", "text"])
def test_a_shard_given_as_input_is_refused_pointing_at_the_spec(tmp_path, capsys, modality):
    shard = write_img2dataset(tmp_path / "web", shards=1)[0]
    code, out, err = make_shards(capsys, "--modality", modality, "--input", shard, "--out", tmp_path / "out",
                                 "--name", "web")
    assert code == 2 and out == ""
    assert err == (f"error: corpus 'web': --input {shard} is a webdataset tar shard already (img2dataset's output, "
                   f"or shards written before), which need no conversion: point the blend spec at the shards, e.g. "
                   f"{{name: web, modality: {modality}, shards: \"{shard}\", weight: 1}}\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_shards_is_refused_with_a_pattern(tmp_path, capsys):
    write_img2dataset(tmp_path / "web")
    code, _, err = make_shards(capsys, "--modality", "image", "--input", tmp_path / "web", "--out", tmp_path / "out",
                               "--name", "web")
    assert code == 2
    assert f"--input {tmp_path / 'web'} holds webdataset tar shards already" in err
    assert f"{{name: web, modality: image, shards: \"{tmp_path / 'web'}/*.tar\", weight: 1}}" in err


def test_the_tool_script_exits_2_on_a_shard(tmp_path):
    shard = write_img2dataset(tmp_path / "web", shards=1)[0]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--modality", "text", "--input",
                           str(shard), "--out", str(tmp_path / "out"), "--name", "web"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a webdataset tar shard already" in proc.stderr and not (tmp_path / "out").exists()


def test_a_wrong_image_root_writes_nothing_and_names_the_option(tmp_path, capsys):
    captions, images = write_coco(tmp_path / "coco", n_images=3)
    out_dir = tmp_path / "shards"
    code, _, _ = make_shards(capsys, "--modality", "pair", "--input", captions, "--image-root", images,
                             "--out", out_dir, "--name", "coco")
    assert code == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    wrong = tmp_path / "elsewhere"
    code, out, err = make_shards(capsys, "--modality", "pair", "--input", captions, "--image-root", wrong,
                                 "--out", out_dir, "--name", "coco")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: corpus 'coco': no sample could be read from {captions} (missing_image_file=6); nothing was "
        "written. Check the format options (--image-root, --image-field, --caption-field):",
        f"  missing_image_file=6: image files not found: image paths are read relative to --image-root {wrong}; "
        f"e.g. {wrong}/000.jpg, {wrong}/001.jpg, {wrong}/002.jpg"]
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # the earlier shards are intact


def test_a_wrong_caption_field_names_the_records_and_their_fields(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg("red"))
    lines = [{"image": "a.jpg", "caption": f"red {i}"} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = make_shards(capsys, "--modality", "pair", "--input", tmp_path / "pairs.jsonl", "--caption-field",
                               "text", "--out", tmp_path / "out", "--name", "p")
    assert code == 2 and not (tmp_path / "out").exists()
    assert "no sample could be read from" in err and "(empty_caption=3); nothing was written" in err
    assert ("  empty_caption=3: records with no caption (the caption is read from --caption-field 'text'); e.g. "
            "pairs.jsonl:1 has no 'text' (its fields: caption, image), pairs.jsonl:2 has no 'text' (its fields: "
            "caption, image), pairs.jsonl:3 has no 'text' (its fields: caption, image)") in err.splitlines()


def test_a_wrong_text_field_names_the_option(tmp_path, capsys):
    (tmp_path / "wiki.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    code, _, err = make_shards(capsys, "--modality", "text", "--input", tmp_path / "wiki.jsonl", "--out",
                               tmp_path / "out", "--name", "wiki")
    assert code == 2
    assert "Check the format options (--text-field):" in err
    assert ("  missing_field=2: records without the field named by --text-field 'text'; e.g. wiki.jsonl:1 has no "
            "string 'text' (its fields: body), wiki.jsonl:2 has no string 'text' (its fields: body)") in err.splitlines()


def test_corrupt_images_are_counted_and_named(tmp_path, capsys):
    captions, images = write_coco(tmp_path / "coco", n_images=4, corrupt=(1, 3))
    code, out, err = make_shards(capsys, "--modality", "pair", "--input", captions, "--image-root", images,
                                 "--out", tmp_path / "out", "--name", "coco")
    assert code == 0 and err == ""
    assert out.splitlines()[:2] == [
        "coco: wrote 4 samples; skipped: bad_image=4",
        f"  bad_image=4: images PIL cannot decode (corrupt, or not an image); e.g. {images}/001.jpg, {images}/003.jpg"]
    manifest = json.loads((tmp_path / "out" / "coco.manifest.json").read_text())
    assert manifest["skipped"] == {"bad_image": 4}
    assert manifest["skipped_examples"] == {"bad_image": [f"{images}/001.jpg", f"{images}/003.jpg"]}


def test_a_folder_or_non_json_file_for_pairs_is_refused(tmp_path, capsys):
    _, images = write_coco(tmp_path / "coco", n_images=1)
    code, _, err = make_shards(capsys, "--modality", "pair", "--input", images, "--out", tmp_path / "o",
                               "--name", "c")
    assert code == 2 and err == (f"error: corpus 'c': --input {images} is a folder; for --modality pair give the "
                                 "captions file (.jsonl/.json/.tsv/COCO captions) and --image-root its image folder\n")
    (tmp_path / "captions.json").write_text("not json")
    code, _, err = make_shards(capsys, "--modality", "pair", "--input", tmp_path / "captions.json", "--out",
                               tmp_path / "o", "--name", "c")
    assert code == 2 and f"error: --input {tmp_path / 'captions.json'} is not a JSON file (JSONDecodeError" in err


def test_help_shows_the_continued_example_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert ("--input captions_train2017.json --image-root coco/train2017 \\\n"
            "      --out shards/coco --name coco\n") in text
