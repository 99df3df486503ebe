"""What a person sees in a log file: plain progress lines (no bar frames), a line per saved
checkpoint and one when the run finished, no known start-up noise, and 'nothing to do' for a
relaunch of a finished run."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine_fixtures import run_config_dict
from harness import free_port, tool_env

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]


def launch(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "launchers/pretrain_large.py"),
                           "--config", str(config)], capture_output=True, text=True, cwd=ROOT,
                          env=tool_env(), timeout=300)


def test_a_log_file_reads_as_plain_lines_and_a_finished_run_says_nothing_to_do(demo_world, tmp_path):
    raw = run_config_dict(demo_world, tmp_path / "run", steps=4, micro_batch=4, global_batch=8, save_every=2)
    raw["train"].update(progress_bar=True, log_every=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    first = launch(config)
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "\r" not in log
    progress = [line for line in log.splitlines() if line.startswith("step ") and " | loss " in line]
    assert [line.split(" | ")[0] for line in progress] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert f"checkpoint saved: {tmp_path / 'run' / 'checkpoints' / 'step00000002'}" in log
    assert f"run finished at step 4: {tmp_path / 'run' / 'final_metrics.json'}" in log
    for noise in ("Transformer Engine and Apex are not installed", "CUDA_DEVICE_MAX_CONNECTIONS",
                  "No CUDA runtime is found", "Megatron-FSDP", "shm_comm_op built successfully"):
        assert noise not in log, noise
    started = time.monotonic()
    again = launch(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nothing to do: the run in {tmp_path / 'run'} finished at step 4" in again.stdout
    assert "checkpoint saved" not in again.stdout + again.stderr
    assert time.monotonic() - started < 60
