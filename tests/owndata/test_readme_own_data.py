"""README "Your own data", run as written: its bash block (make_shards, train_tokenizer, the spec,
--check, `deepspeed --num_gpus 2`, the export) and its python block (a transformers and a timm
forward on the export), in a folder holding a small corpus in each input form (tests/owndata/
conftest.py). Two changes only, both asserted to apply: a few steps instead of the template's 200,
and a free master port (other runs may share the machine)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port, tool_env

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def readme_blocks() -> tuple[str, str]:
    """The bash and the python block of README's "Your own data" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(bash) == 1 and len(python) == 1, "the section has one bash and one python block"
    return bash[0], python[0]


def shortened(bash: str, port: int) -> str:
    settings = "--set data.tokenizer_dir=tokenizer"
    assert bash.count(settings) == 2 and bash.count("deepspeed --num_gpus 2 ") == 1
    bash = bash.replace(settings, f"{settings} --set train.steps={STEPS} --set train.log_every=2")
    return bash.replace("deepspeed --num_gpus 2 ", f"deepspeed --master_port {port} --num_gpus 2 ")


def test_readme_own_data_from_raw_files_to_a_transformers_and_timm_forward(mydata, tmp_path):
    bash, python = readme_blocks()
    work = mydata.parent
    for folder in ("tools", "launchers"):  # the commands name them from the repository root
        (work / folder).symlink_to(ROOT / folder)
    env = tool_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                   OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", shortened(bash, free_port())], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]

    # 1. the corrupt JPEG's two captions skipped and the file named; the text file whole
    assert "pairs: wrote 22 samples; skipped: bad_image=2" in run.stdout
    assert "bad_image=2: images PIL cannot decode (corrupt, or not an image); e.g. mydata/images/011.jpg" in run.stdout
    assert "text: wrote 60 samples; skipped: none" in run.stdout
    # 2. trained on 60 texts + 24 captions + the 15 captions the web shards hold
    tokens = re.search(r"tokenizer: (\d+) tokens, trained on 99 texts; data.tokenizer_dir: tokenizer", run.stdout)
    assert tokens, run.stdout
    # 4. --check: the web corpus's first sample lost its caption, which is named, not fatal
    assert "ok: 2 ranks, TP=1, DP=2, global batch 16" in run.stdout
    assert re.search(r"corpus 'web': 1 of the first 8 samples of \S+/00000.tar are not 'pair' samples "
                     r"\(000000000 \['jpg', 'json'\]\)", run.stderr), run.stderr[-3000:]
    records = [json.loads(line) for line in (work / "runs/own_data/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [2, 4]
    complete = json.loads((work / f"runs/own_data/checkpoints/step{STEPS:08d}/COMPLETE.json").read_text())
    assert complete["world_size"] == 2 and complete["step"] == STEPS
    # 5. the export
    assert {p.name for p in (work / "export").iterdir()} >= {"xfm", "text_encoder", "vision_encoder"}

    forward = subprocess.run([sys.executable, "-c", python], cwd=work, env=env, capture_output=True, text=True,
                             timeout=300)
    assert forward.returncode == 0, forward.stderr[-3000:]
    assert forward.stdout.splitlines() == [f"torch.Size([1, 38, {tokens.group(1)}])", "torch.Size([1, 17, 64])"]
