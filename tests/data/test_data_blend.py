"""The blend: prefix-exact mixture (megatron's helper), per-epoch shuffles, cache, modality streams,
report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import xfm_scale.data.blend as blend_module
from xfm_scale.data.blend import build_blend, modality_streams, stream_file
from xfm_scale.data.shards import MODALITIES
from xfm_scale.data.spec import parse_data_path
from conftest import text_corpus, write_spec

pytestmark = pytest.mark.unit

SKEWED = {"big": 0.6, "mid": 0.25, "small": 0.1, "tiny": 0.049, "rare": 0.001}
SIZES = {"big": 40, "mid": 25, "small": 12, "tiny": 6, "rare": 3}


@pytest.fixture(scope="module")
def skewed_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("skewed")
    for name, n in SIZES.items():
        text_corpus(root, name, n)
    return write_spec(root / "spec.yaml", [
        {"name": name, "modality": "text", "manifest": f"{name}/{name}.manifest.json", "weight": w}
        for name, w in SKEWED.items()])


def test_realized_mixture_within_one_sample_at_every_prefix(skewed_spec, tmp_path):
    """Every corpus's count at every prefix n is within one sample of its ideal integer share
    (floor/ceil of w*n). megatron's helper decides sample i against the target w*i (the prefix
    before it), so in real numbers it can lag w*n by a bit more than 1 for a large weight (1.2
    for the 0.6 corpus here); every corpus below 0.5 stays within 1.0 even in real numbers."""
    n = 30_000
    blend = build_blend(skewed_spec, num_samples=n, seed=3, cache_dir=tmp_path)
    weights = np.array(list(SKEWED.values())) / sum(SKEWED.values())
    onehot = np.eye(len(SKEWED), dtype=np.int64)[np.asarray(blend.corpus_index)]
    counts = np.vstack([np.zeros(len(SKEWED), np.int64), np.cumsum(onehot, axis=0)])  # [prefix, corpus]
    target = weights[None, :] * np.arange(n + 1)[:, None]
    assert (counts >= np.floor(target - 1e-9) - 1).all() and (counts <= np.ceil(target + 1e-9) + 1).all()
    real = np.abs(counts - target).max(axis=0)
    assert (real[1:] <= 1.0).all(), f"per-corpus max deviation {real}"
    assert real[0] < 1.25
    assert counts[-1].tolist() == [18000, 7500, 3000, 1470, 30]
    first_rare = int(np.flatnonzero(np.asarray(blend.corpus_index) == 4)[0])
    assert first_rare < 1000  # the 0.001 corpus appears within its first 1/w samples


def test_each_epoch_visits_every_sample_once_in_a_seeded_order(skewed_spec, tmp_path):
    blend = build_blend(skewed_spec, num_samples=2000, seed=3, cache_dir=tmp_path)
    other = build_blend(skewed_spec, num_samples=2000, seed=4, cache_dir=tmp_path)
    c = list(SKEWED).index("mid")
    n = SIZES["mid"]
    draws = np.asarray(blend.sample_index)[np.asarray(blend.corpus_index) == c]
    epochs = [draws[e * n:(e + 1) * n] for e in range(len(draws) // n)]
    assert len(epochs) >= 10
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))  # a permutation: nothing repeated inside a pass
    assert len({tuple(e) for e in epochs}) == len(epochs)  # a fresh order per epoch
    other_draws = np.asarray(other.sample_index)[np.asarray(other.corpus_index) == c]
    assert not np.array_equal(draws, other_draws)  # the seed changes the order...
    assert np.array_equal(blend.corpus_index, other.corpus_index)  # ...not the mixture


def test_second_build_is_a_cache_hit(skewed_spec, tmp_path):
    first = build_blend(skewed_spec, num_samples=5000, seed=1, cache_dir=tmp_path)
    second = build_blend(skewed_spec, num_samples=5000, seed=1, cache_dir=tmp_path)
    third = build_blend(skewed_spec, num_samples=5000, seed=2, cache_dir=tmp_path)
    assert (first.cache_hit, second.cache_hit, third.cache_hit) == (False, True, False)
    assert second.path == first.path != third.path
    assert np.array_equal(first.sample_index, second.sample_index)
    assert np.array_equal(first.corpus_index, second.corpus_index)


def test_zero_weight_corpus_is_never_drawn(tmp_path):
    for name in ("a", "b", "c"):
        text_corpus(tmp_path, name, 5)
    spec = write_spec(tmp_path / "s.yaml", [
        {"name": n, "modality": "text", "manifest": f"{n}/{n}.manifest.json", "weight": w}
        for n, w in (("a", 0.0), ("b", 0.5), ("c", 0.5))])
    blend = build_blend(spec, num_samples=1000, cache_dir=tmp_path / "cache")
    assert np.bincount(blend.corpus_index, minlength=3).tolist() == [0, 500, 500]


def test_report_rows_and_megatron_data_path_form(skewed_spec, tmp_path):
    from blend_data_cli import main  # tools/blend_data.py

    root = skewed_spec.parent
    rc = main([str(skewed_spec), "--num-samples", "1000", "--out", str(tmp_path / "a"), "--seed", "5"])
    assert rc == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    rows = {r["name"]: r for r in report["corpora"]}
    assert rows["big"]["samples_drawn"] == 600 and rows["big"]["epochs"] == pytest.approx(600 / 40)
    assert rows["rare"]["samples_drawn"] == 1 and rows["rare"]["realized_share"] == pytest.approx(0.001)
    data_path = " ".join(f"{w} {root}/{n}/{n}.manifest.json" for n, w in SKEWED.items())
    assert [s.name for s in parse_data_path(data_path)] == list(SKEWED)
    rc = main(["--data-path", data_path, "--num-samples", "1000", "--out", str(tmp_path / "b"), "--seed", "5"])
    assert rc == 0
    via_path = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [r["samples_drawn"] for r in via_path["corpora"]] == [r["samples_drawn"] for r in report["corpora"]]
    assert main(["--data-path", data_path, "--num-samples", "1000", "--out", str(tmp_path / "b"),
                 "--seed", "5"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["cache_hit"] is True


def test_modality_streams_are_files_of_the_cache_mapped_on_load(demo, tmp_path, monkeypatch):
    """The loader's per-modality position streams are written once into the blend cache and
    memory-mapped by every loader (no [N] array per rank); they equal the split of the blend."""
    blend = build_blend(demo.spec, num_samples=3000, seed=1, cache_dir=tmp_path)
    codes = np.array([MODALITIES.index(c.modality) for c in blend.corpora])[np.asarray(blend.corpus_index)]
    expected = {m: np.flatnonzero(codes == i) for i, m in enumerate(MODALITIES)}
    for m in MODALITIES:
        assert isinstance(blend.streams[m], np.memmap) and Path(blend.streams[m].filename).parent == blend.path
        assert blend.streams[m].dtype == np.int64 and np.array_equal(blend.streams[m], expected[m])
    monkeypatch.setattr(blend_module, "STREAM_CHUNK", 7)  # the chunked build equals the whole one
    chunked = modality_streams(blend.corpus_index, blend.corpora)
    assert all(np.array_equal(chunked[m], expected[m]) for m in MODALITIES)

    for m in MODALITIES:  # a cache folder from before the streams were cached gets them added...
        (blend.path / stream_file(m)).unlink()

    def read_only(*args):
        raise PermissionError("read-only cache")

    with monkeypatch.context() as patch:  # ...or, where it is read-only, the loader builds them in memory
        patch.setattr(blend_module, "_add_streams", read_only)
        in_memory = build_blend(demo.spec, num_samples=3000, seed=1, cache_dir=tmp_path)
    assert all(np.array_equal(in_memory.streams[m], expected[m]) for m in MODALITIES)
    again = build_blend(demo.spec, num_samples=3000, seed=1, cache_dir=tmp_path)
    assert again.cache_hit and again.fingerprint == blend.fingerprint
    assert all(isinstance(again.streams[m], np.memmap) and np.array_equal(again.streams[m], expected[m])
               for m in MODALITIES)
    uncached = build_blend(demo.spec, num_samples=3000, seed=1)
    assert all(np.array_equal(uncached.streams[m], expected[m]) for m in MODALITIES)
