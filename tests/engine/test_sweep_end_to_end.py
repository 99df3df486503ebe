"""A sweep over the real trainer: DeepSpeed's runner launches launchers/pretrain_large.py for each
grid point (learning rate x TP size), on 2 CPU ranks; a second invocation with a grown grid runs
only the new point; results.csv holds each run's real final metrics."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from engine_fixtures import run_config_dict
from harness import tool_env
from xfm_scale.launch.sweep import load_sweep, run_sweep

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"  # the runner installed beside this interpreter


def sweep_file(tmp_path: Path, base: Path, lrs: list[float], tps: list[int]) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base_config": str(base), "output_root": str(tmp_path / "sweep"),
        "command": f"{DEEPSPEED} --num_gpus {{num_gpus}} --master_port {{master_port}} {ROOT / 'launchers/pretrain_large.py'}",
        "grid": {"optim.lr": lrs, "parallel.tensor_parallel_size": tps},
        "fixed": {"num_gpus": 2, "train.steps": 3},
        "names": {"parallel.tensor_parallel_size": "tp"}}))
    return path


def test_sweep_runs_the_trainer_resumes_and_collects(demo_world, tmp_path):
    raw = run_config_dict(demo_world, tmp_path / "unused", steps=3, micro_batch=4, global_batch=8)
    raw["data"]["eval_manifest"] = str(demo_world.eval_manifest)
    raw["train"]["eval_every"] = 0
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(raw))
    logs: list[str] = []

    first = run_sweep(load_sweep(sweep_file(tmp_path, base, [1e-3], [2])), env=tool_env(), log=logs.append)
    assert first.complete and first.finished == ["lr=0.001,tp=2"], logs

    grown = load_sweep(sweep_file(tmp_path, base, [1e-3, 3e-3], [2]))
    second = run_sweep(grown, env=tool_env(), log=logs.append)
    assert second.already_finished == ["lr=0.001,tp=2"] and second.finished == ["lr=0.003,tp=2"], logs

    rows = {r["run"]: r for r in csv.DictReader((grown.output_root / "results.csv").open())}
    assert sorted(rows) == ["lr=0.001,tp=2", "lr=0.003,tp=2"]
    for name, row in rows.items():
        final = json.loads((grown.output_root / name / "final_metrics.json").read_text())
        assert final["step"] == 3 and 0 <= final["eval/i2t_r1"] <= 1
        assert float(row["loss/total"]) == pytest.approx(final["loss/total"], rel=1e-5)
        run_config = json.loads((grown.output_root / name / "run_config.json").read_text())
        assert run_config["parallel"]["tensor_parallel_size"] == 2
        assert run_config["optim"]["lr"] == float(name.split(",")[0].split("=")[1])
