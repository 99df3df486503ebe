#!/usr/bin/env python
"""The main job: demo pre-training of the tiny X-FM on the embedded demo world, on CPU.

    python tools/demo.py [--out runs/demo] [--ranks 2] [--steps N] [--resume]

1. builds the demo world (procedural shapes + captions, images, text, tokenizer, held-out pairs);
2. launches ``--ranks`` CPU ranks with DeepSpeed's runner on launchers/pretrain_large.py and
   launchers/configs/demo_tiny.yaml (ZeRO-3, gloo), with a progress bar;
3. prints how the losses fell and the held-out zero-shot retrieval against chance.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_data(out: Path):
    from xfm_scale.data import build_demo_data

    start = time.time()
    # Pairs carry ITC/ITM/IMLM: the demo leans to them so the short run gets enough pair steps.
    data = build_demo_data(out, weights={"demo_pairs": 0.6, "demo_images": 0.15, "demo_text": 0.25})
    print(f"[demo] demo world built in {time.time() - start:.1f}s: {out}", flush=True)
    return data


def launch(data, run_dir: Path, ranks: int, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(ROOT / "launchers/pretrain_large.py"),
           "--config", str(ROOT / "launchers/configs/demo_tiny.yaml"),
           "--set", f"data.spec={data.spec}", "--set", f"data.tokenizer_dir={data.tokenizer_dir}",
           "--set", f"data.eval_manifest={data.eval_manifest}",
           "--set", f"data.cache_dir={run_dir.parent / 'cache'}", "--output-dir", str(run_dir), *extra]
    # One intra-op thread per rank unless told otherwise: the ranks already use every core, and
    # torch's default (a thread per core in every rank) oversubscribes them.
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    return subprocess.call(cmd, cwd=ROOT, env=env)


def summarise(run_dir: Path) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r]
    evals = [r for r in records if "eval/i2t_r1" in r]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    print("\n[demo] losses (mean over each logging window):")
    keys = [k for k in ("loss/total", "loss/mlm", "loss/itc", "loss/itm", "loss/imlm", "loss/mim") if k in losses[0]]
    print("  step  " + "  ".join(f"{k[5:]:>7}" for k in keys))
    for r in losses:
        print(f"  {r['step']:4d}  " + "  ".join(f"{r.get(k, float('nan')):7.3f}" for k in keys))
    if evals:
        print("\n[demo] held-out zero-shot retrieval (R@1; chance = 1/pairs):")
        for r in evals:
            print(f"  step {r['step']:4d}: image->text {r['eval/i2t_r1']:.3f}  text->image {r['eval/t2i_r1']:.3f}"
                  f"  (R@5 {r['eval/i2t_r5']:.3f} / {r['eval/t2i_r5']:.3f}; chance {r['eval/chance_r1']:.4f};"
                  f" MLM acc {r['eval/mlm_acc']:.3f})")
    ckpts = sorted((run_dir / "checkpoints").glob("step*"))
    print(f"\n[demo] final: {json.dumps({k: round(v, 4) for k, v in final.items() if k.startswith(('loss/total', 'eval/'))})}")
    print(f"[demo] checkpoints: {', '.join(str(c) for c in ckpts)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the demo data, cache and run")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (processes)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the demo config's)")
    parser.add_argument("--resume", action="store_true", help="continue an earlier demo run instead of starting over")
    parser.add_argument("--set", action="append", default=[], help="extra run-config overrides")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    run_dir = out / "run"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    data = build_data(out / "data")
    extra = [f"--set={s}" for s in args.set] + ([f"--set=train.steps={args.steps}"] if args.steps else [])
    start = time.time()
    code = launch(data, run_dir, args.ranks, extra)
    if code != 0:
        print(f"[demo] training failed with exit code {code}", file=sys.stderr)
        return code
    print(f"[demo] training took {time.time() - start:.0f}s", flush=True)
    summarise(run_dir)
    return export(run_dir, out / "export")


def export(run_dir: Path, out: Path) -> int:
    """The merged weights of the last checkpoint, as downstream users load them (README "Export")."""
    from xfm_scale.interop.export import export_checkpoint

    start = time.time()
    folders = export_checkpoint(run_dir / "checkpoints", out, progress=False)
    print(f"[demo] merged export in {time.time() - start:.1f}s: " + ", ".join(f"{k} {v}" for k, v in folders.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
