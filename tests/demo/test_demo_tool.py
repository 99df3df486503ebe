"""The demo tool's wiring (xfm_scale.cli.demo, behind tools/demo.py) without training: the seed reaches the world and the run, and the summary
prints the retrieval beside chance and the ceiling, and draws the picture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from xfm_scale.cli.plot_run import SIZE

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_tool():
    import xfm_scale.cli.demo as module  # tools/demo.py and `make demo` run its main

    return module


def fake_run(run_dir: Path, pairs: int) -> None:
    """What the trainer leaves: metrics.jsonl, final_metrics.json, a checkpoint folder."""
    (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
    losses = {"loss/total": 3.0, "loss/mlm": 2.0, "loss/itc": 1.0, "loss/itm": 0.6, "loss/imlm": 2.5, "loss/mim": 0.1}
    ev = {"eval/i2t_r1": 0.25, "eval/t2i_r1": 0.2, "eval/i2t_r5": 0.55, "eval/t2i_r5": 0.6, "eval/mlm_acc": 0.3,
          "eval/imlm_acc": 0.4, "eval/pairs": float(pairs), "eval/chance_r1": 1 / pairs}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": 4, **r}) + "\n" for r in (losses, ev)))
    (run_dir / "final_metrics.json").write_text(json.dumps({**losses, **ev, "step": 4.0}))


def test_the_seed_reaches_the_world_and_the_run_and_the_summary_shows_the_ceiling(
        demo_tool, demo_world, tmp_path, monkeypatch, capsys):
    calls = {}

    def build_data(out, seed, shaded=True):
        calls["build"] = (out, seed, shaded)
        return demo_world

    def launch(data, run_dir, ranks, extra):
        calls["launch"] = (ranks, extra)
        fake_run(run_dir, pairs=40)
        return 0

    monkeypatch.setattr(demo_tool, "build_data", build_data)
    monkeypatch.setattr(demo_tool, "launch", launch)

    def export(run_dir, out):
        calls["export"] = (run_dir, out)
        return 0

    monkeypatch.setattr(demo_tool, "export", export)
    out = tmp_path / "demo"
    assert demo_tool.main(["--out", str(out), "--seed", "3", "--steps", "4"]) == 0
    assert calls["build"] == (out / "data", 3, True)
    ranks, extra = calls["launch"]
    assert ranks == 2 and {"--set=train.seed=3", "--set=data.seed=3", "--set=train.steps=4"} <= set(extra)
    assert calls["export"] == (out / "run", out / "export")
    printed = capsys.readouterr().out
    assert "held-out zero-shot retrieval on 40 pairs (chance: R@1 2.5%, R@5 12.5%)" in printed
    assert "25.0%" in printed and "60.0%" in printed
    # the demo world's 40 held-out pairs all differ in content
    assert "ceiling: R@1 100.0%: the share of the 40 held-out pairs whose caption content" in printed
    assert Image.open(out / "summary.png").size == SIZE


def test_the_demo_config_trains_the_demo_preset_with_every_objective_on(demo_tool, demo_world, tmp_path):
    from xfm_scale.config import run as run_config

    assert set(demo_tool.WEIGHTS) == {"demo_pairs", "demo_images", "demo_text"}
    assert all(w > 0 for w in demo_tool.WEIGHTS.values())  # MLM needs text steps, MIM image (and pair) steps

    raw = yaml.safe_load((ROOT / "launchers/configs/demo_tiny.yaml").read_text())
    raw["data"].update(spec=str(demo_world.spec), tokenizer_dir=str(demo_world.tokenizer_dir))
    raw["train"]["output_dir"] = str(tmp_path / "run")
    cfg = run_config.from_dict(raw, base_dir=ROOT / "launchers/configs")
    cfg.validate(2, check_data=True)  # the demo's 2 ranks
    model = cfg.model_config()
    assert cfg.model.preset == "demo" and model.text.hidden_size == model.vision.hidden_size == 128
    assert model.text.hidden_dropout == model.fusion.attention_dropout == 0.0
    assert model.objectives.mim_target == "unmasked_self" and model.objectives.detach_text_for_fusion
    assert cfg.batch.micro_batch_size * 2 == cfg.batch.global_batch_size  # one micro-batch per step
