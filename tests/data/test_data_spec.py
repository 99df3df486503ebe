"""check_spec (the cheap pre-launch check) and malformed spec/manifest input: every error is a
DataSpecError naming the corpus and the file or field to fix, from check_spec and from the build."""
from __future__ import annotations

import json
import shutil

import pytest

import xfm_scale.data.spec as spec_module
from xfm_scale.data.blend import build_blend
from xfm_scale.data.shards import DataSpecError, verify_manifest, write_corpus
from xfm_scale.data.spec import check_spec
from conftest import png, text_corpus, write_spec

pytestmark = pytest.mark.unit


@pytest.fixture()
def world(tmp_path):
    """Corpora alpha (text, 3 shards), beta (text) and duo (pairs), and a spec over them."""
    text_corpus(tmp_path, "alpha", 12, maxcount=5)
    text_corpus(tmp_path, "beta", 4)
    write_corpus([{"png": png(), "txt": f"caption {i}"} for i in range(3)], out_dir=tmp_path / "duo",
                 name="duo", modality="pair")
    return tmp_path


def _entry(name, modality="text", *, pattern=None, **kw):
    where = {"shards": pattern} if pattern else {"manifest": f"{name}/{name}.manifest.json"}
    return {"name": name, "modality": modality, **where, "weight": 1.0, **kw}


GOOD = [_entry("alpha"), _entry("beta", pattern="beta/beta-*.tar"), _entry("duo", "pair")]


def _corpora(**replaced):
    """GOOD with some entries replaced, by name."""
    return [replaced.get(entry["name"], entry) for entry in GOOD]


def _manifest(root, name):
    return root / name / f"{name}.manifest.json"


def _edit_manifest(root, name, edit):
    path = _manifest(root, name)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _both_raise(spec_path, root) -> list[str]:
    """The messages of check_spec and of build_blend on one spec."""
    messages = []
    for check in (lambda: check_spec(spec_path),
                  lambda: build_blend(spec_path, num_samples=50, cache_dir=root / "cache")):
        with pytest.raises(DataSpecError) as info:
            check()
        messages.append(str(info.value))
    return messages


def test_check_spec_passes_a_good_spec_without_reading_shard_indexes(world, monkeypatch):
    spec = write_spec(world / "good.yaml", _corpora())
    for sidecar in world.rglob("*.idx.json"):
        sidecar.unlink()
    monkeypatch.setattr(spec_module, "load_index", lambda *a, **k: pytest.fail("check_spec read a shard index"))
    check_spec(spec)
    check_spec(str(spec))
    assert not list(world.rglob("*.idx.json"))  # and wrote none


def _break_json(root):
    _manifest(root, "alpha").write_text('{"name": "alpha", "shards": [')


def _drop_field(field):
    return lambda root: _edit_manifest(root, "alpha", lambda m: m["shards"][1].pop(field))


def _cut_shard(root):
    shard = root / "alpha" / "alpha-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-512])


def _manifest_says(modality):
    return lambda root: _edit_manifest(root, "alpha", lambda m: m.update(modality=modality))


@pytest.mark.parametrize("case, corpora, damage, expected", [
    ("nan_weight", _corpora(alpha=_entry("alpha", weight=float("nan"))), None,
     ["corpus 'alpha'", "weight nan is not a finite number"]),
    ("inf_weight", _corpora(alpha=_entry("alpha", weight=float("inf"))), None,
     ["corpus 'alpha'", "weight inf is not a finite number"]),
    ("negative", _corpora(alpha=_entry("alpha", weight=-1)), None, ["corpus 'alpha'", "weight -1 is negative"]),
    ("duplicate", _corpora(beta=_entry("alpha")), None, ["corpus name 'alpha' appears 2 times"]),
    ("modality", _corpora(alpha=_entry("alpha", "video")), None, ["corpus 'alpha'", "unknown modality 'video'"]),
    ("shards_null", _corpora(beta={"name": "beta", "modality": "text", "weight": 1, "shards": None}), None,
     ["corpus 'beta'", "'shards:' is None", "give a path string"]),
    ("manifest_null", _corpora(alpha={"name": "alpha", "modality": "text", "weight": 1, "manifest": None}), None,
     ["corpus 'alpha'", "'manifest:' is None"]),
    ("manifest_missing", _corpora(alpha=_entry("alpha", manifest="alpha/nope.manifest.json")), None,
     ["corpus 'alpha'", "nope.manifest.json does not exist", "fix 'manifest:'"]),
    ("manifest_is_folder", _corpora(alpha=_entry("alpha", manifest="alpha")), None,
     ["corpus 'alpha'", "is a folder, not a manifest file", "fix 'manifest:'"]),
    ("manifest_bad_json", _corpora(), _break_json,
     ["corpus 'alpha'", "alpha.manifest.json is not readable JSON", "tools/make_shards.py"]),
    ("entry_without_bytes", _corpora(), _drop_field("bytes"),
     ["corpus 'alpha'", "alpha.manifest.json, shard entry #2 has no valid 'bytes'", "tools/make_shards.py"]),
    ("entry_without_name", _corpora(), _drop_field("name"),
     ["corpus 'alpha'", "shard entry #2 has no valid 'name'"]),
    ("shards_not_a_list", _corpora(), lambda root: _edit_manifest(root, "alpha", lambda m: m.update(shards=None)),
     ["corpus 'alpha'", "alpha.manifest.json has no 'shards' list"]),
    ("shard_missing", _corpora(), lambda root: (root / "alpha" / "alpha-000002.tar").unlink(),
     ["corpus 'alpha'", "alpha-000002.tar listed in alpha.manifest.json is missing"]),
    ("shard_cut", _corpora(), _cut_shard, ["corpus 'alpha'", "alpha-000001.tar has", "truncated or rewritten"]),
    ("spec_vs_manifest_modality", _corpora(alpha=_entry("alpha", "pair")), None,
     ["corpus 'alpha'", "spec says modality 'pair'", "manifest says 'text'", "fix 'modality:'"]),
    ("manifest_vs_data_modality", _corpora(alpha=_entry("alpha", "image")), _manifest_says("image"),
     ["corpus 'alpha'", "declared modality 'image'", "alpha-000000.tar holds 'text' samples"]),
    ("pattern_vs_data_modality", _corpora(beta=_entry("beta", "pair", pattern="beta/beta-*.tar")), None,
     ["corpus 'beta'", "declared modality 'pair'", "beta-000000.tar holds 'text' samples"]),
    ("pattern_matches_nothing", _corpora(beta=_entry("beta", pattern="beta/gamma-*.tar")), None,
     ["corpus 'beta'", "shard pattern 'beta/gamma-*.tar' has missing shards", "fix the pattern"]),
    ("pattern_is_garbage", _corpora(beta=_entry("beta", pattern="beta/beta.manifest.json")), None,
     ["corpus 'beta'", "beta.manifest.json is not a readable tar"]),
])
def test_broken_input_raises_data_spec_error_naming_the_fix(world, case, corpora, damage, expected):
    if damage is not None:
        damage(world)
    for message in _both_raise(write_spec(world / f"{case}.yaml", corpora), world):
        for fragment in expected:
            assert fragment in message, (case, message)


def test_manifest_corpora_open_without_reading_any_shard_index(world, monkeypatch):
    """Every rank opens the blend's corpora: a manifest corpus's counts come from its manifest (at
    web scale, reading 10^5 indexes from shared storage on every rank would stall the start)."""
    import xfm_scale.data.spec as spec_module

    def no_index(shard, cache_dir=None):
        raise AssertionError(f"index of {shard} read")

    monkeypatch.setattr(spec_module, "load_index", no_index)
    manifests_only = write_spec(world / "m.yaml", [_entry("alpha"), _entry("duo", "pair")])
    check_spec(manifests_only)
    blend = build_blend(manifests_only, num_samples=50, cache_dir=world / "cache")
    assert [c.shard_samples for c in blend.corpora] == [[5, 5, 2], [3]]
    with pytest.raises(DataSpecError, match="index of .*beta-000000.tar read"):  # a pattern corpus needs them
        build_blend(write_spec(world / "p.yaml", GOOD), num_samples=50, cache_dir=world / "cache")


def test_a_shard_holding_fewer_samples_than_its_manifest_yields_counted_bad_samples(world, demo):
    """The manifest's counts are trusted at start; the loader meets the difference when it reads the
    shard: the missing positions are bad samples (counted, replaced), not a crash."""
    from xfm_scale.data import BlendLoader, LoaderConfig

    _edit_manifest(world, "alpha", lambda m: m["shards"][2].update(samples=7))  # it holds 2
    spec = write_spec(world / "s.yaml", [_entry("alpha")])
    check_spec(spec)
    blend = build_blend(spec, num_samples=34, cache_dir=world / "cache")  # 2 epochs of the 17 promised
    loader = BlendLoader(blend, LoaderConfig(tokenizer_dir=str(demo.tokenizer_dir), micro_batch_sizes={"text": 2}))
    keys = [k for batch in loader for k in batch.sample_keys]
    assert len(keys) == 34 and all(k.startswith("alpha/") for k in keys)
    bad = loader.bad_samples.as_dict()
    assert set(bad) == {"alpha/truncated_shard"} and bad["alpha/truncated_shard"] >= 10  # 5 phantoms x 2 epochs


def test_a_shard_recorded_empty_fails_check_spec(world):
    _edit_manifest(world, "beta", lambda m: m["shards"][0].update(samples=0))
    with pytest.raises(DataSpecError, match=r"corpus 'beta': manifest .*beta.manifest.json lists shards with "
                                            r"no samples \(beta-000000.tar\)"):
        check_spec(write_spec(world / "s.yaml", _corpora(beta=_entry("beta"))))


@pytest.mark.parametrize("data_path, expected", [
    ("nan {m}", ["weight 'nan' is not a finite number"]),
    ("1 {m} inf {m}", ["weight 'inf' is not a finite number"]),
    ("1e999 {m}", ["weight '1e999' is not a finite number"]),
])
def test_data_path_rejects_non_finite_weights(world, data_path, expected):
    with pytest.raises(DataSpecError) as info:
        build_blend(None, data_path=data_path.format(m=_manifest(world, "alpha")), num_samples=10,
                    cache_dir=world / "cache")
    assert all(fragment in str(info.value) for fragment in expected), str(info.value)


def test_data_path_manifest_without_modality(world):
    _edit_manifest(world, "beta", lambda m: m.pop("modality"))
    with pytest.raises(DataSpecError) as info:
        build_blend(None, data_path=f"1 {_manifest(world, 'alpha')} 1 {_manifest(world, 'beta')}",
                    num_samples=10, cache_dir=world / "cache")
    message = str(info.value)
    assert "corpus 'beta'" in message and "records no 'modality'" in message and "'modality:'" in message
    # the YAML form gives the modality itself: the same manifest is fine there
    check_spec(write_spec(world / "s.yaml", _corpora(beta=_entry("beta"))))


def test_verify_manifest_on_malformed_json_names_the_file(world):
    _break_json(world)
    with pytest.raises(DataSpecError, match="corpus 'alpha': manifest .*alpha.manifest.json is not readable JSON"):
        verify_manifest(_manifest(world, "alpha"))
    shutil.rmtree(world / "beta")
    with pytest.raises(DataSpecError, match="beta.manifest.json does not exist"):
        verify_manifest(_manifest(world, "beta"))


def test_member_names_split_by_webdatasets_rule_without_importing_it():
    """The shard index splits member names as webdataset does (its own function, copied so that
    validating a spec, and so tools/blend_data.py, does not import webdataset and torch)."""
    import subprocess
    import sys

    from webdataset.tariterators import base_plus_ext as theirs

    from xfm_scale.data.shards import base_plus_ext

    names = ["000001.txt", "a/b/000001.jpg", "x.tar.gz", "noext", "dir.v2/key.seg.png", ".hidden", "k.", "__key__.json"]
    assert [base_plus_ext(n) for n in names] == [theirs(n) for n in names]
    code = "import sys, xfm_scale.data.blend, xfm_scale.data.spec; print('torch' in sys.modules, 'webdataset' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
