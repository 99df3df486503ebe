"""The modality of a foreign corpus (img2dataset shards named by pattern) is judged from its first
samples: one sample that lost its caption neither decides it nor refuses the right one, and is
named; a wrong declared modality is refused naming the samples."""
from __future__ import annotations

import logging

import pytest
import yaml

from owndata_fixtures import write_img2dataset
from xfm_scale.cli.blend_data import main as blend_main
from xfm_scale.data.spec import parse_data_path, validate

pytestmark = pytest.mark.unit


def _spec(tmp_path, modality: str | None) -> str:
    entry = {"name": "web", "shards": "web/*.tar", "weight": 1, **({"modality": modality} if modality else {})}
    path = tmp_path / "blend.yaml"
    path.write_text(yaml.safe_dump({"corpora": [entry]}))
    return str(path)


def test_one_broken_first_sample_does_not_decide_the_modality(tmp_path, capsys, caplog):
    """img2dataset shards whose first sample lost its caption: a 'pair' corpus, as declared; the
    broken sample is named in a warning (the loader skips and counts it)."""
    write_img2dataset(tmp_path / "web", shards=1, first_without_caption=True)
    with caplog.at_level(logging.WARNING, logger="xfm_scale.data.spec"):
        code = blend_main([_spec(tmp_path, "pair"), "--num-samples", "20", "--out", str(tmp_path / "blend")])
    assert code == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"corpus 'web': 1 of the first 8 samples of {tmp_path / 'web' / '00000.tar'} are not 'pair' "
                        "samples (000000000 ['jpg', 'json']); the loader skips and counts such samples"]
    # undeclared (the Megatron form): the modality most of those samples have
    corpus, = validate(parse_data_path(f"1 {tmp_path / 'web' / '00000.tar'}"), tmp_path, tmp_path / "cache")
    assert corpus.modality == "pair"


def test_a_wrong_declared_modality_is_refused_naming_the_samples(tmp_path, capsys):
    write_img2dataset(tmp_path / "web", shards=1, per_shard=4)
    code = blend_main([_spec(tmp_path, "text"), "--num-samples", "20", "--out", str(tmp_path / "blend")])
    assert code == 2
    shard = tmp_path / "web" / "00000.tar"
    assert capsys.readouterr().err == (
        f"error: corpus 'web': declared modality 'text' but {shard} holds 'pair' samples (none of its first 4 is a "
        "'text' sample: 000000000 ['jpg', 'json', 'txt'], 000000001 ['jpg', 'json', 'txt'], 000000002 ['jpg', 'json', "
        "'txt'] (+1 more)); fix 'modality:'\n")
