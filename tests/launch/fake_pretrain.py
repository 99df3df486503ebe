#!/usr/bin/env python
"""A stand-in for launchers/pretrain_large.py, so the sweep's own logic is tested for real.

Same command line (``--config RUN.yaml --set key=value ... --output-dir DIR``, values parsed as YAML
like the real entry point) and the same outputs (``metrics.jsonl``, then ``final_metrics.json``),
computed from its arguments instead of trained:

  loss/total   = optim.lr * 1e4 + parallel.tensor_parallel_size
  samples_per_s = 100 * WORLD_SIZE          (WORLD_SIZE from the launcher, as real ranks get it)
  eval/i2t_r1  = 0.25 * tensor_parallel_size, written only when tensor_parallel_size == 2

Every start appends the run's folder name to the file named by $FAKE_COUNTER. It fails (exit 3)
when ``--set fake.fail_file=PATH`` names a file listing its optim.lr, and exits 0 without writing
final_metrics.json with ``--set fake.skip_final=true``. ``args.json`` records what it received.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--output-dir", required=True)
    args = p.parse_args()
    sets = {key: yaml.safe_load(raw) for key, raw in (pair.split("=", 1) for pair in args.set)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(os.environ["FAKE_COUNTER"], "a") as counter:
        counter.write(out.name + "\n")
    (out / "args.json").write_text(json.dumps({
        "config": args.config, "sets": sets, "world_size": os.environ.get("WORLD_SIZE"),
        "master_port": os.environ.get("MASTER_PORT")}))
    print(f"fake run {out.name}: {sets}")
    lr, tp = sets["optim.lr"], sets.get("parallel.tensor_parallel_size", 1)
    fail_file = sets.get("fake.fail_file")
    if fail_file and str(lr) in Path(fail_file).read_text().split():
        print(f"failing on purpose: optim.lr={lr} is listed in {fail_file}", file=sys.stderr)
        return 3
    metrics = {"loss/total": lr * 1e4 + tp, "samples_per_s": 100.0 * int(os.environ.get("WORLD_SIZE", 1))}
    if tp == 2:
        metrics["eval/i2t_r1"] = 0.25 * tp
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, **metrics}) + "\n")
    if not sets.get("fake.skip_final"):
        (out / "final_metrics.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
