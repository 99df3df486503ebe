"""The run-config templates for your own data: every field a user must set reads CHANGE_ME; left
so, --check refuses naming it; filled, the template passes --check for the launch it is for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from owndata_fixtures import write_img2dataset, write_text
from harness import tool_env

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launchers" / "configs"
TOKENIZER = ROOT / "tests" / "fixtures" / "checkpoint_v1" / "tokenizer"
MUST_SET = {"own_data_cpu.yaml": {"data.spec", "data.tokenizer_dir"},
            "own_data_gpu.yaml": {"data.spec", "data.tokenizer_dir", "data.cache_dir", "batch.global_batch_size",
                                  "train.output_dir"}}


def marked(tree, prefix: str = "") -> set[str]:
    """Dotted keys whose value is CHANGE_ME."""
    if isinstance(tree, dict):
        return set().union(*(marked(v, f"{prefix}{k}.") for k, v in tree.items()))
    return {prefix[:-1]} if tree == "CHANGE_ME" else set()


def check(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain_large.py"), "--check", "--config",
                           str(config), *args], capture_output=True, text=True, env=tool_env(), cwd=cwd, timeout=120)


@pytest.fixture
def own_spec(tmp_path) -> Path:
    """A blend spec over img2dataset shards and a text corpus."""
    from xfm_scale.cli.make_shards import main as make_shards

    write_img2dataset(tmp_path / "web", shards=1)
    assert make_shards(["--modality", "text", "--input", str(write_text(tmp_path / "text.txt")), "--out",
                        str(tmp_path / "shards"), "--name", "text"]) == 0
    spec = tmp_path / "blend.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [
        {"name": "web", "modality": "pair", "shards": "web/*.tar", "weight": 0.6},
        {"name": "text", "modality": "text", "manifest": "shards/text.manifest.json", "weight": 0.4}]}))
    return spec


UNSET_SPEC = (f"error: data.spec: {CONFIGS / 'CHANGE_ME'} does not exist; fix the path (relative paths are read from "
              "the run config's folder, or from the current directory when given by --set)\n")


@pytest.mark.parametrize("name, message", [("own_data_cpu.yaml", UNSET_SPEC),
                                           ("own_data_gpu.yaml", "error: batch.global_batch_size='CHANGE_ME' is not "
                                                                 "a number\n")])
def test_the_fields_to_set_are_marked_and_check_names_them(name, message, tmp_path):
    assert marked(yaml.safe_load((CONFIGS / name).read_text())) == MUST_SET[name]
    result = check(CONFIGS / name, "--num_gpus", "2", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == message


FROM_SCRATCH = ("text: from scratch (random init; model.init_text_from is null)\n"
                "vision: from scratch (random init; model.init_vision_from is null)\n"
                "fusion: random init (X-FM does not pretrain it either)\n")
"""What --check says each encoder of the templates starts from."""


def test_the_cpu_template_filled_passes_check_for_two_ranks(own_spec, tmp_path):
    result = check(CONFIGS / "own_data_cpu.yaml", "--num_gpus", "2", "--set", f"data.spec={own_spec.name}",
                   "--set", f"data.tokenizer_dir={TOKENIZER}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok: 2 ranks, TP=1, DP=2, global batch 16\n" + FROM_SCRATCH


def test_the_gpu_template_filled_passes_check_for_eight_gpus(own_spec, tmp_path):
    filled = {"data.spec": own_spec, "data.tokenizer_dir": TOKENIZER, "data.cache_dir": tmp_path / "cache",
              "batch.global_batch_size": 768, "train.output_dir": tmp_path / "run"}
    assert set(filled) == MUST_SET["own_data_gpu.yaml"]
    settings = [arg for key, value in filled.items() for arg in ("--set", f"{key}={value}")]
    result = check(CONFIGS / "own_data_gpu.yaml", "--num_gpus", "8", *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok: 8 ranks, TP=1, DP=8, global batch 768\n" + FROM_SCRATCH
