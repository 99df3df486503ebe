"""Dotted overrides (--set, sweeps, model.overrides, deepspeed.overrides): one walker, one type
coercion, and a clear exit-2 error for a value of the wrong type."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine_fixtures import run_config_dict
from harness import tool_env

ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(ROOT / "launchers/pretrain_large.py")


def test_yaml_exponent_strings_become_numbers_in_every_kind_of_override(demo_world, tmp_path):
    from xfm_scale.config import run as run_config

    raw = run_config_dict(demo_world, tmp_path / "out", steps=3, micro_batch=4, global_batch=8)
    overrides = run_config.parse_overrides(["model.overrides={vision.drop_path_rate: 1e-1, text.num_layers: 3}",
                                            "optim.lr=2e-4", "deepspeed.overrides={zero_optimization.stage: 2}"])
    cfg = run_config.from_dict(raw, overrides=overrides)
    model = cfg.model_config()
    assert model.vision.drop_path_rate == 0.1 and isinstance(model.vision.drop_path_rate, float)
    assert model.text.num_layers == 3 and isinstance(model.text.num_layers, int)
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.deepspeed_config(1)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("dotted, value, message", [
    ("vision.drop_path_rate", "abc", "vision.drop_path_rate='abc' is not a number"),
    ("text.num_layers", 2.5, "text.num_layers=2.5 is not a whole number"),
    ("text.num_layers", True, "text.num_layers=True is not a number"),
    ("objectives.detach_text_for_fusion", "yes", "is not true or false"),
    ("vision.no_such_key", 1, "unknown config key 'vision.no_such_key'"),
])
def test_a_model_override_of_the_wrong_type_names_the_key(dotted, value, message):
    from xfm_scale.config import ConfigError, XFMConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        XFMConfig.from_preset("tiny", **{dotted: value})


def test_the_dotted_walkers_set_merge_and_get():
    from xfm_scale.config.overrides import get_dotted, set_dotted

    tree = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    set_dotted(tree, "zero_optimization", {"stage": 2}, merge=True)
    assert tree == {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    set_dotted(tree, "a.b.c", 1)
    assert get_dotted(tree, "a.b.c") == 1 and get_dotted(tree, "a.x.c", "none") == "none"


def check(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ENTRY, "--check", "--config", str(config), "--num_gpus", "1", *extra],
                          capture_output=True, text=True, env=tool_env(), timeout=120)


def test_check_takes_a_float_model_override_and_refuses_a_bad_one_with_exit_2(demo_world, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config_dict(demo_world, tmp_path / "out", steps=3, micro_batch=4,
                                                     global_batch=8)))
    good = check(config, "--set", "model.overrides={vision.drop_path_rate: 1e-1}")
    assert good.returncode == 0, good.stderr
    bad = check(config, "--set", "model.overrides={vision.drop_path_rate: fast}")
    assert bad.returncode == 2
    assert "vision.drop_path_rate='fast' is not a number" in bad.stderr
    assert "Traceback" not in bad.stderr
