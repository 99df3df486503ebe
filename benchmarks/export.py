#!/usr/bin/env python
"""Export time and peak memory: tools/export_weights.py against DeepSpeed's zero_to_fp32, on the
same TP=1 ZeRO-3 checkpoint of the base preset, in one run; a dated row in benchmarks/RESULTS.md.

The checkpoint is made here: one optimizer step of the base preset (326M parameters) on a small
demo world, on one CPU rank, saved by the trainer (fp32 weights + Adam moments). Each tool then runs
in its own process; wall time and that process's peak RSS are recorded. zero_to_fp32 writes one
fp32 state dict (safetensors); export_weights writes three folders (xfm, transformers text encoder,
timm vision encoder), so it writes more bytes.

  DS_ACCELERATOR=cpu python benchmarks/export.py [--preset base] [--work /tmp/xfm_export_bench] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import results  # benchmarks/results.py

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "deepspeed", "megatron-core", "safetensors", "transformers", "timm")
MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
{body}
print("MEASURED " + json.dumps({{"seconds": time.perf_counter() - start,
      "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def measured(body: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    out = subprocess.run([sys.executable, "-c", MEASURE.format(body=body)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith("MEASURED "))
    return json.loads(line[len("MEASURED "):])


def make_checkpoint(work: Path, preset: str) -> Path:
    from xfm_scale.data import build_demo_data

    data = build_demo_data(work / "data", num_pairs=64, num_images=32, num_text=64, num_eval_pairs=8)
    config = {"model": {"preset": preset, "vocab_from_tokenizer": False},  # the preset's real vocabulary
              "data": {"spec": str(data.spec), "tokenizer_dir": str(data.tokenizer_dir), "cache_dir": str(work / "cache"),
                       "augment": False},
              "batch": {"micro_batch_size": 2, "global_batch_size": 2},
              "train": {"steps": 1, "output_dir": str(work / "run"), "save_every": 1, "eval_every": 0,
                        "progress_bar": False, "tensorboard": False},
              "deepspeed": {"config": "ds_configs/cpu_fp32.json"}}
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, str(ROOT / "launchers/pretrain_large.py"), "--config", str(work / "run.yaml")],
                   check=True, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    return work / "run" / "checkpoints" / "step00000001"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--preset", default="base")
    p.add_argument("--work", default="/tmp/xfm_export_bench")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    folder = make_checkpoint(work, args.preset)
    size_gb = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    ours = measured(f"from xfm_scale.interop.export import export_checkpoint\n"
                    f"export_checkpoint({str(folder)!r}, {str(work / 'export')!r}, progress=False)")
    theirs = measured(f"from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict\n"
                      f"convert_zero_checkpoint_to_fp32_state_dict({str(folder.parent)!r}, {str(work / 'zero_to_fp32')!r}, "
                      f"tag={folder.name!r}, safe_serialization=True)")
    from xfm_scale.checkpoint.reader import ZeroCheckpoint

    ck = ZeroCheckpoint(folder)
    params = sum(ck.full_shape(n).numel() for n in ck.param_names)
    largest = max(ck.full_shape(n).numel() for n in ck.param_names) * 4 / 2**30
    written = sum(f.stat().st_size for f in (work / "export").rglob("*.safetensors")) / 2**30
    result = (f"{args.preset} preset ({params / 1e6:.1f}M params), TP=1 DP=1 ZeRO-3 checkpoint of {size_gb:.2f} GB "
              f"(fp32 + Adam): export_weights (xfm + transformers text + timm vision, fp32, {written:.2f} GB written) "
              f"{ours['seconds']:.1f} s, peak RSS {ours['max_rss_gb']:.2f} GB; DeepSpeed zero_to_fp32 (one fp32 "
              f"safetensors) {theirs['seconds']:.1f} s, peak RSS {theirs['max_rss_gb']:.2f} GB; largest tensor "
              f"{largest:.2f} GB")
    print(result)
    results.add_row("benchmarks/export.py", result, PACKAGES)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
