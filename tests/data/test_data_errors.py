"""Broken specs and shards give errors naming the corpus and the fix; bad records are counted."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xfm_scale.data.blend import build_blend
from xfm_scale.data.loader import BlendLoader, LoaderConfig, replacement_sample
from xfm_scale.data.shards import DataSpecError, write_corpus
from blend_data_cli import main as blend_main
from conftest import png, text_corpus, write_spec

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def two_corpora(tmp_path):
    text_corpus(tmp_path, "alpha", 12, maxcount=5)
    text_corpus(tmp_path, "beta", 4)
    return tmp_path


def _entry(name, **kw):
    return {"name": name, "modality": "text", "manifest": f"{name}/{name}.manifest.json", "weight": 1.0, **kw}


def _error(spec_path, tmp_path) -> str:
    with pytest.raises(DataSpecError) as info:
        build_blend(spec_path, num_samples=100, cache_dir=tmp_path / "cache")
    return str(info.value)


@pytest.mark.parametrize("case, corpora, expected", [
    ("negative", [_entry("alpha", weight=-0.5), _entry("beta")],
     ["corpus 'alpha'", "weight -0.5 is negative", "must be >= 0"]),
    ("all_zero", [_entry("alpha", weight=0), _entry("beta", weight=0)],
     ["all corpus weights are zero (alpha, beta)", "give at least one corpus a positive weight"]),
    ("modality", [_entry("alpha", modality="video"), _entry("beta")],
     ["corpus 'alpha'", "unknown modality 'video'", "use one of text, image, pair"]),
    ("duplicate", [_entry("alpha"), _entry("alpha")],
     ["corpus name 'alpha' appears 2 times", "give every corpus a unique name"]),
    ("wrong_modality", [_entry("alpha", modality="pair"), _entry("beta")],
     ["corpus 'alpha'", "spec says modality 'pair'", "manifest says 'text'", "fix 'modality:'"]),
    ("missing_pattern", [{"name": "gamma", "modality": "text", "weight": 1,
                          "shards": "alpha/alpha-{000000..000006}.tar"}],
     ["corpus 'gamma'", "missing shards", "alpha-000003.tar", "(+1 more)", "fix the pattern"]),
])
def test_broken_spec_names_corpus_and_fix(two_corpora, tmp_path, case, corpora, expected):
    message = _error(write_spec(two_corpora / f"{case}.yaml", corpora), tmp_path)
    for fragment in expected:
        assert fragment in message, message


def test_missing_empty_and_corrupt_shards(two_corpora, tmp_path):
    spec = write_spec(two_corpora / "s.yaml", [_entry("alpha"), _entry("beta")])
    (two_corpora / "alpha" / "alpha-000001.tar").unlink()
    message = _error(spec, tmp_path)
    assert "corpus 'alpha'" in message and "alpha-000001.tar" in message and "is missing" in message
    assert "tools/make_shards.py" in message

    (two_corpora / "beta" / "beta-000000.tar").write_bytes(b"\0" * 1024)  # an all-zero tar: no members
    spec = write_spec(two_corpora / "t.yaml", [
        {"name": "beta", "modality": "text", "shards": "beta/beta-000000.tar", "weight": 1}])
    message = _error(spec, tmp_path)
    assert "corpus 'beta'" in message and "holds no samples" in message and "remove it" in message

    (two_corpora / "beta" / "beta-000000.tar").write_bytes(b"this is not a tar file" * 100)
    message = _error(spec, tmp_path)
    assert "corpus 'beta'" in message and "not a readable tar" in message


def test_truncated_shard_against_manifest(two_corpora, tmp_path):
    shard = two_corpora / "alpha" / "alpha-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    message = _error(write_spec(two_corpora / "s.yaml", [_entry("alpha")]), tmp_path)
    assert "corpus 'alpha'" in message and "truncated or rewritten" in message


def test_blend_cli_exit_code_2_with_message(two_corpora, tmp_path, capsys):
    spec = write_spec(two_corpora / "s.yaml", [_entry("alpha", weight=-1), _entry("beta")])
    assert blend_main([str(spec), "--num-samples", "10", "--out", str(tmp_path / "o")]) == 2
    assert "corpus 'alpha': weight -1 is negative" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "blend_data.py"), str(spec), "--num-samples", "10",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "corpus 'alpha'" in proc.stderr, proc.stderr


def test_make_shards_counts_skipped_records_per_reason(tmp_path):
    good, bad = png(), b"\x89PNG\r\n\x1a\n garbage"
    (tmp_path / "ok.png").write_bytes(good)
    (tmp_path / "broken.png").write_bytes(bad)
    lines = [json.dumps({"image": "ok.png", "caption": "a red square"}),
             json.dumps({"image": "ok.png", "caption": ["one", "two", "  "]}),  # 2 ok, 1 empty
             json.dumps({"image": "broken.png", "caption": "x"}),                # bad_image
             json.dumps({"image": "nowhere.png", "caption": "x"}),               # missing_image_file
             json.dumps({"image_base64": base64.b64encode(good).decode(), "caption": "inline"}),
             json.dumps({"image_base64": "%%%notbase64", "caption": "x"}),       # bad_base64
             json.dumps({"image": "ok.png", "caption": ""}),                     # empty_caption
             "{not json"]                                                        # bad_json
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--modality", "pair",
                           "--input", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "out"),
                           "--name", "mix", "--maxcount", "2"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "mix.manifest.json").read_text())
    expected = {"bad_base64": 1, "bad_image": 1, "bad_json": 1, "empty_caption": 2, "missing_image_file": 1}
    assert manifest["skipped"] == expected
    assert manifest["num_samples"] == 4 and [s["samples"] for s in manifest["shards"]] == [2, 2]
    assert "wrote 4 samples; skipped: bad_base64=1, bad_image=1, bad_json=1, empty_caption=2" in proc.stdout


def test_bad_records_met_at_load_time_are_counted_and_replaced(tmp_path, demo):
    # write_corpus trusts its records, so these reach the shards as they would from a foreign tool.
    records = [{"png": png((i * 20, 0, 0)), "txt": f"caption {i}"} for i in range(10)]
    records[2] = {"png": b"corrupt bytes", "txt": "caption 2"}
    records[5] = {"png": png(), "txt": "   "}
    records[7] = {"txt": "caption without an image"}
    write_corpus(records, out_dir=tmp_path / "p", name="shaky", modality="pair", maxcount=4)
    spec = write_spec(tmp_path / "s.yaml", [{"name": "shaky", "modality": "pair",
                                             "manifest": "p/shaky.manifest.json", "weight": 1}])
    blend = build_blend(spec, num_samples=20, seed=0, cache_dir=tmp_path / "c")
    cfg = LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes={"pair": 5}, image_size=16,
                       mim_grid=4, mim_num_masked=6, mim_min_block=2)
    runs = []
    for workers in (0, 2):
        loader = BlendLoader(blend, LoaderConfig(**{**vars(cfg), "num_workers": workers}))
        keys = [k for batch in loader for k in batch.sample_keys]
        runs.append((keys, loader.bad_samples.as_dict()))
    (keys, counts), (keys2, counts2) = runs
    # 20 draws = 2 epochs of 10: each bad record is met twice as a draw, plus whenever it is the
    # replacement of a bad one (the seeded draw of replacement_sample, retried while bad).
    reasons = {2: "bad_image", 5: "empty_caption", 7: "missing_image"}
    expected: dict[str, int] = {}
    for position in range(20):
        sample, attempt = int(blend.sample_index[position]), 0
        while sample in reasons:
            expected[f"shaky/{reasons[sample]}"] = expected.get(f"shaky/{reasons[sample]}", 0) + 1
            sample, attempt = replacement_sample(blend.seed, position, attempt, 10), attempt + 1
    assert counts == expected and sum(counts.values()) >= 6
    assert len(keys) == 20 and not {"shaky/000000002", "shaky/000000005", "shaky/000000007"} & set(keys)
    assert (keys2, counts2) == (keys, counts)  # replacement is deterministic
