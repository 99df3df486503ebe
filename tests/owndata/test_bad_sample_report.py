"""The loader's report of the bad samples it met since the last call: per corpus and reason, with
the first keys and shards named, for the trainer's log; and the join of the ranks' reports."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from PIL import Image

from xfm_scale.data.blend import build_blend
from xfm_scale.data.loader import (BlendLoader, LoaderConfig, format_bad_sample_report, merge_bad_sample_reports,
                                   replacement_sample)
from xfm_scale.data.shards import write_corpus

pytestmark = pytest.mark.unit
TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1" / "tokenizer"
REASONS = {2: "bad_image", 5: "empty_caption", 7: "missing_image"}  # record -> why it is bad
SHARD_OF = {2: 0, 5: 1, 7: 1}  # shards of 4 records


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shaky(tmp_path):
    records = [{"png": png(i), "txt": f"caption {i}"} for i in range(10)]
    records[2] = {"png": b"corrupt bytes", "txt": "caption 2"}
    records[5] = {"png": png(5), "txt": "   "}
    records[7] = {"txt": "caption without an image"}
    write_corpus(records, out_dir=tmp_path / "p", name="shaky", modality="pair", maxcount=4)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [{"name": "shaky", "modality": "pair",
                                                 "manifest": "p/shaky.manifest.json", "weight": 1}]}))
    return build_blend(spec, num_samples=20, seed=0, cache_dir=tmp_path / "c")


def expected_counts(blend, positions) -> dict[str, int]:
    """How often each reason is met reading these blend positions (bad draws, then their seeded
    replacements while those are bad)."""
    counts: dict[str, int] = {}
    for position in positions:
        sample, attempt = int(blend.sample_index[position]), 0
        while sample in REASONS:
            counts[REASONS[sample]] = counts.get(REASONS[sample], 0) + 1
            sample, attempt = replacement_sample(blend.seed, position, attempt, 10), attempt + 1
    return counts


@pytest.mark.parametrize("workers", [0, 2])
def test_new_bad_samples_since_the_last_call(shaky, workers):
    cfg = LoaderConfig(tokenizer_dir=str(TOKENIZER), micro_batch_sizes={"pair": 5}, image_size=16, mim_grid=4,
                       mim_num_masked=6, mim_min_block=2, num_workers=workers)
    loader = BlendLoader(shaky, cfg)
    shards = [str(Path(s)) for s in shaky.corpora[0].shards]
    batches = iter(loader)
    reports = []
    for _ in range(2):  # two micro-batches of 5, a report after each
        next(batches)
        reports.append(loader.new_bad_samples())
    for _ in batches:
        pass
    reports.append(loader.new_bad_samples())
    assert loader.new_bad_samples() == []  # nothing new since
    totals: dict[str, int] = {}
    for i, report in enumerate(reports):
        positions = range(5 * i, 5 * (i + 1)) if i < 2 else range(10, 20)
        counts = expected_counts(shaky, positions)
        assert {e["reason"]: e["count"] for e in report} == counts, i
        for entry in report:
            record = {r: n for n, r in REASONS.items()}[entry["reason"]]
            totals[entry["reason"]] = totals.get(entry["reason"], 0) + entry["count"]
            assert entry == {"corpus": "shaky", "reason": entry["reason"], "count": entry["count"],
                             "keys": [f"{record:09d}"], "shards": [shards[SHARD_OF[record]]]}
    assert totals == {k.split("/")[1]: n for k, n in loader.bad_samples.as_dict().items()} and sum(totals.values()) >= 6


def test_reports_of_the_ranks_are_joined_and_formatted():
    rank0 = [{"corpus": "web", "reason": "missing_text", "count": 1, "keys": ["000000000"],
              "shards": ["/d/web/00000.tar"]}]
    rank1 = [{"corpus": "coco", "reason": "bad_image", "count": 2, "keys": ["000000004", "000000009"],
              "shards": ["/d/coco-000000.tar"]},
             {"corpus": "web", "reason": "missing_text", "count": 3, "keys": ["000000000", "000010003", "000010005"],
              "shards": ["/d/web/00000.tar", "/d/web/00001.tar"]},
             {"corpus": "web", "reason": "missing_shard", "count": 1, "keys": [], "shards": ["/d/web/00002.tar"]}]
    merged = merge_bad_sample_reports([rank0, rank1])
    assert merged == [
        {"corpus": "coco", "reason": "bad_image", "count": 2, "keys": ["000000004", "000000009"],
         "shards": ["/d/coco-000000.tar"]},
        {"corpus": "web", "reason": "missing_shard", "count": 1, "keys": [], "shards": ["/d/web/00002.tar"]},
        {"corpus": "web", "reason": "missing_text", "count": 4, "keys": ["000000000", "000010003", "000010005"],
         "shards": ["/d/web/00000.tar", "/d/web/00001.tar"]}]
    assert format_bad_sample_report(merged) == (
        "coco/bad_image=2 (first keys 000000004, 000000009; shards /d/coco-000000.tar); "
        "web/missing_shard=1 (shards /d/web/00002.tar); "
        "web/missing_text=4 (first keys 000000000, 000010003, 000010005; shards /d/web/00000.tar, /d/web/00001.tar)")
    # Tensor parallelism: the TP ranks of a replica read the same samples; the trainer joins one
    # report per data-parallel rank (its TP rank 0), so one bad sample at TP=2 stays one, not 0 or 2
    assert merge_bad_sample_reports([rank0, []])[0]["count"] == 1
