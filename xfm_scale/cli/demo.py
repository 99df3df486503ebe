"""The main job: demo pre-training of a small X-FM on the embedded demo world, on CPU.

    make demo ARGS="..."  |  python tools/demo.py [--out runs/demo] [--ranks 2] [--steps N] [--seed S] [--resume]

1. builds the demo world (procedural shapes + captions, images, text, tokenizer, held-out pairs);
2. launches ``--ranks`` CPU ranks with DeepSpeed's runner on launchers/pretrain_large.py and
   launchers/configs/demo_tiny.yaml (ZeRO-3, gloo), with a progress bar; every objective is on;
3. prints how the losses fell and the held-out zero-shot retrieval against chance and against the
   ceiling (the share of held-out pairs whose caption content no other held-out caption has),
   draws both in OUT/summary.png and writes the merged export to OUT/export.
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

from xfm_scale.config.paths import REPOSITORY as ROOT

CONFIG = ROOT / "launchers/configs/demo_tiny.yaml"
# Sample shares of the blend. Pairs carry ITC, ITM, IMLM and MIM; each optimizer step here is one
# micro-batch of one kind, and the text (MLM) and image (MIM) steps between pair steps slow the
# binding ITC learns. Measured at 1000 steps of the demo preset: pairs 0.7 / images 0.1 / text 0.2
# reached R@1 0.24 on 2 ranks (0.22 in a single-process loop), pairs 0.85 / 0.05 / 0.1 0.47 in
# that loop (docs/demo.md). Every objective still trains: MLM on the text steps, MIM on the image
# steps and on every pair step.
WEIGHTS = {"demo_pairs": 0.85, "demo_images": 0.05, "demo_text": 0.10}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_data(out: Path, seed: int = 0, shaded: bool = True):
    from xfm_scale.data import build_demo_data

    start = time.time()
    data = build_demo_data(out, weights=WEIGHTS, seed=seed, shaded=shaded)
    print(f"[demo] demo world built in {time.time() - start:.1f}s: {out}", flush=True)
    return data


def launch(data, run_dir: Path, ranks: int, extra: list[str]) -> int:
    # --log_level error: on this one-machine path the runner and its per-node launcher only add
    # their INFO lines and the "Unable to find hostfile" warning; the ranks keep their own logging
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "error", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(ROOT / "launchers/pretrain_large.py"),
           "--config", str(CONFIG),
           "--set", f"data.spec={data.spec}", "--set", f"data.tokenizer_dir={data.tokenizer_dir}",
           "--set", f"data.eval_manifest={data.eval_manifest}",
           "--set", f"data.cache_dir={run_dir.parent / 'cache'}", "--output-dir", str(run_dir), *extra]
    # One intra-op thread per rank unless told otherwise: the ranks already use every core, and
    # torch's default (a thread per core in every rank) oversubscribes them.
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    return subprocess.call(cmd, cwd=ROOT, env=env)


def ceiling(eval_manifest: Path, pairs: int) -> float:
    """The share of the evaluated held-out pairs (the first ``pairs``) whose caption content
    (count, colour, shape, position) no other evaluated caption has."""
    from xfm_scale.data.demo import held_out_captions, unique_content_share

    return unique_content_share(held_out_captions(eval_manifest)[:pairs])


def summarise(run_dir: Path, eval_manifest: Path | None = None, picture: Path | None = None,
              title: str | None = None) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r]
    evals = [r for r in records if "eval/i2t_r1" in r]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    print("\n[demo] losses (mean over each logging window):")
    keys = [k for k in ("loss/total", "loss/mlm", "loss/itc", "loss/itm", "loss/imlm", "loss/mim") if k in losses[0]]
    print("  step  " + "  ".join(f"{k[5:]:>7}" for k in keys))
    for r in losses:
        print(f"  {r['step']:4d}  " + "  ".join(f"{r.get(k, float('nan')):7.3f}" for k in keys))
    top = None
    if evals:
        pairs = int(evals[-1]["eval/pairs"])
        top = ceiling(eval_manifest, pairs) if eval_manifest else None
        print(f"\n[demo] held-out zero-shot retrieval on {pairs} pairs (chance: R@1 {1 / pairs:.1%}, "
              f"R@5 {min(1.0, 5 / pairs):.1%})")
        print("  step   R@1 image->text  text->image   R@5 image->text  text->image   MLM acc")
        for r in evals:
            print(f"  {r['step']:4d}   {r['eval/i2t_r1']:15.1%}  {r['eval/t2i_r1']:11.1%}   {r['eval/i2t_r5']:15.1%}"
                  f"  {r['eval/t2i_r5']:11.1%}   {r['eval/mlm_acc']:7.1%}")
        if top is not None:
            print(f"  ceiling: R@1 {top:.1%}: the share of the {pairs} held-out pairs whose caption content (count,"
                  " colour, shape, position) no other held-out caption has; a model that reads all four retrieves"
                  " those first, and pairs that share content only by chance")
    if picture is not None:
        from xfm_scale.cli.plot_run import plot_run

        plot_run(run_dir, picture, ceiling=top, title=title or f"xfm_scale demo: {run_dir}")
        print(f"[demo] picture of the run: {picture}")
    ckpts = sorted((run_dir / "checkpoints").glob("step*"))
    print(f"\n[demo] final: {json.dumps({k: round(v, 4) for k, v in final.items() if k.startswith(('loss/total', 'eval/'))})}")
    print(f"[demo] checkpoints: {', '.join(str(c) for c in ckpts)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the demo data, cache, run, picture and export")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (processes)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the demo config's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the demo world (its samples and held-out pairs), of the blend and masks "
                             "(data.seed) and of the initial weights (train.seed); default 0")
    parser.add_argument("--plain-background", action="store_true",
                        help="an ablation: backgrounds of one colour, without the shading that shows position")
    parser.add_argument("--resume", action="store_true", help="continue an earlier demo run instead of starting over")
    parser.add_argument("--set", action="append", default=[], help="extra run-config overrides")
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.out).resolve()
    run_dir = out / "run"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    data = build_data(out / "data", args.seed, shaded=not args.plain_background)
    extra = ([f"--set=train.seed={args.seed}", f"--set=data.seed={args.seed}"] + [f"--set={s}" for s in args.set]
             + ([f"--set=train.steps={args.steps}"] if args.steps else []))
    started = time.time()
    code = launch(data, run_dir, args.ranks, extra)
    if code != 0:
        print(f"[demo] training failed with exit code {code}", file=sys.stderr)
        return code
    print(f"[demo] training took {time.time() - started:.0f}s", flush=True)
    steps = json.loads((run_dir / "final_metrics.json").read_text())["step"]
    summarise(run_dir, data.eval_manifest, out / "summary.png",
              title=f"make demo, seed {args.seed}: {steps:.0f} steps on {args.ranks} CPU ranks, every objective on")
    code = export(run_dir, out / "export")
    print(f"[demo] done in {time.time() - start:.0f}s (demo world, training, picture and export)")
    return code


def export(run_dir: Path, out: Path) -> int:
    """The merged weights of the last checkpoint, as downstream users load them (README "Export")."""
    from xfm_scale.interop.export import export_checkpoint

    start = time.time()
    folders = export_checkpoint(run_dir / "checkpoints", out, progress=False)
    print(f"[demo] merged export in {time.time() - start:.1f}s: " + ", ".join(f"{k} {v}" for k, v in folders.items()))
    return 0
