"""A checkpoint written before the package redesign (tests/fixtures/checkpoint_v1, made at
8fd7441) still loads into a run and exports, giving the numbers that code gave: the on-disk format
did not change."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from harness import run_ranks

pytestmark = pytest.mark.dist
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def load_step_probe(raw: dict, checkpoints: str) -> dict:
    """Rank body: a fresh run loads the fixture's step-2 checkpoint, is probed on the fixed batch,
    takes one optimizer step on it, and is probed again."""
    from export_fixtures import FIXED_BATCH, fixed_pair_batch, probe, rows

    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale import distributed
    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    trainer = Trainer(run_config.from_dict(raw, base_dir=os.getcwd()))
    client = checkpoint.load(trainer.engine, checkpoints, EXPECTED["saved_step"])
    before = probe(trainer, raw)
    cfg = trainer.model_config
    batch = fixed_pair_batch(raw, cfg.vision.image_size, cfg.vision.grid_size)
    per = FIXED_BATCH // trainer.layout.data_parallel_size
    d = trainer.layout.data_parallel_rank
    distributed.seed_everything(7)
    trainer.engine.train()
    trainer.engine.step([rows(batch, d * per, (d + 1) * per)])
    after = probe(trainer, raw)
    return {"step": client["step"], "before": before["losses"], "after": after["losses"],
            "lr": trainer.engine.scheduler.get_last_lr()[0]}


def fixture_run_config(demo_world, output_dir: Path) -> dict:
    raw = json.loads(json.dumps(EXPECTED["run_config"]))
    raw["data"].update(spec=str(demo_world.spec), tokenizer_dir=str(FIXTURE / "tokenizer"),
                       eval_manifest=str(FIXTURE / "eval" / "demo_eval.manifest.json"),
                       cache_dir=str(output_dir.parent / "cache"))
    raw["train"].update(output_dir=str(output_dir), resume=False, save_every=0)
    return raw


def assert_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert abs(got[name] - want[name]) <= rel * abs(want[name]), (name, got[name], want[name])


def test_a_checkpoint_from_before_the_redesign_loads_and_trains_as_it_did(demo_world, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoints", checkpoints)
    got = run_ranks(load_step_probe, 2, fixture_run_config(demo_world, tmp_path / "run"), str(checkpoints))[0]
    want = EXPECTED["after_load"]
    assert got["step"] == want["step"] == 2
    assert_close(got["before"], want["before"])  # the weights
    assert_close(got["after"], want["after"])  # the Adam moments and step count (one step later)
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)


def test_a_checkpoint_from_before_the_redesign_exports_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    from xfm_scale.interop.export import export_checkpoint

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoints", checkpoints)
    out = tmp_path / "export"
    export_checkpoint(checkpoints, out, tag="step00000002", progress=False,
                      tokenizer_dir=FIXTURE / "tokenizer")
    got = {}
    for path in sorted(out.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            got[f"{path.relative_to(out)}:{name}"] = (list(tensor.shape), float(tensor.double().sum()),
                                                      float(tensor.double().abs().sum()))
    want = EXPECTED["export"]
    assert sorted(got) == sorted(want)
    for key, (shape, total, absolute) in want.items():
        assert got[key][0] == shape, key
        assert got[key][1] == pytest.approx(total, rel=1e-6, abs=1e-6), key
        assert got[key][2] == pytest.approx(absolute, rel=1e-6), key
