"""The trainer's account of bad samples at TP=2 (two ranks reading the same samples): the log warns
of them per corpus and reason with the first key and shard, metrics.jsonl counts them per corpus
and reason, and the rate-limit stop names the same count as its total."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from owndata_fixtures import write_tar
from engine_fixtures import run_config_dict
from harness import free_port, tool_env

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "fixtures" / "checkpoint_v1" / "tokenizer"


def test_bad_samples_at_tp2_are_logged_counted_per_reason_and_named(tmp_path):
    members = [("000000000.json", b"{}")]  # the first sample lost its text
    members += [(f"{i:09d}.txt", f"sentence number {i} about a cat".encode()) for i in range(1, 16)]
    shard = write_tar(tmp_path / "text-000000.tar", members)
    spec = tmp_path / "blend.yaml"
    spec.write_text(yaml.safe_dump({"corpora": [{"name": "text", "modality": "text", "shards": shard.name,
                                                 "weight": 1}]}))
    raw = run_config_dict(SimpleNamespace(spec=spec, tokenizer_dir=TOKENIZER), tmp_path / "run", steps=6,
                          micro_batch=8, global_batch=8, tp=2)
    raw["data"].update(max_bad_sample_rate=0.0, bad_sample_grace=0)  # stop at the first bad sample
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "launchers" / "pretrain_large.py"),
                           "--config", str(config)], capture_output=True, text=True, env=tool_env(), cwd=ROOT,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 3" in out, out[-3000:]
    total = re.search(r"(\d+) of \d+ samples read were bad", out)
    assert total, out[-3000:]
    n = int(total.group(1))
    assert f"> data.max_bad_sample_rate=0.0): text/missing_text={n}; repair or drop" in out
    assert (f"bad samples skipped since the last log (each replaced by another sample of its corpus): "
            f"text/missing_text={n} (first keys 000000000; shards {shard})") in out
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_samples"] == n and last["bad_samples/text/missing_text"] == n
    # the case that exposed the old count (each TP rank's count halved by integer division): odd
    assert n % 2 == 1, n
