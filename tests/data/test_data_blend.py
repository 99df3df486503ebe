"""The blend: prefix-exact mixture (megatron's helper), per-epoch shuffles, cache, report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from xfm_scale.data.blend import build_blend
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
