#!/usr/bin/env python
"""Training-step throughput, TFLOP/s and MFU of xfm_scale, against X-FM built the reference's way.

For each case (a step of text micro-batches only, of image ones, of pair ones, and the blended step
the run's blend gives), with the data loader in the loop and without it (the same steps fetched
beforehand and kept in memory), it times optimizer steps of:

* xfm_scale: the real ``Trainer.train_step`` (megatron layers in a DeepSpeed ZeRO engine, SDPA,
  the ds_configs/ config of the device: zero3_bf16.json (``--zero-stage 2``: zero2_bf16.json) on
  GPU, cpu_fp32.json (with its stage set to ``--zero-stage``) on CPU);
* the baseline (benchmarks/baseline_xfm.py): transformers RoBERTa + timm BEiT-v2 + transformers
  cross-attention layers, eager attention, autocast, plain DistributedDataParallel;

on the same micro-batches, at the same batch sizes and precision (bf16 autocast vs DeepSpeed bf16 on
GPU, fp32 on CPU); without the loader their timed steps take turns, so that a drift in the machine's
speed reaches both. It reports samples/s, achieved TFLOP/s and MFU (model FLOPs from
xfm_scale.train.flops without the activation-checkpointing recompute, over the device peak of
xfm_scale.train.flops.device_peak_flops; the baseline is credited with the same count, though its MLM
heads compute logits at every position rather than at the masked ones), the ratio xfm_scale /
baseline per case, and how much slower
each is with the loader in the loop. The data is a generated corpus at the preset's image size
(the demo world's pairs and images, and ~128-token texts), so text micro-batches are full length;
``--text-words MEDIAN SIGMA`` draws the texts' word counts log-normally instead, and
``--length-group-size N`` turns on length grouping (data.length_group_size): run it with and
without to time what grouping saves (each row then carries its share of padded text positions).
``--cases`` times some of the cases only (``base`` on a CPU: ``--cases text``).

  DS_ACCELERATOR=cpu python benchmarks/train_step.py --preset tiny          # CPU, every session
  python benchmarks/train_step.py --preset base --record                    # one GPU, bf16
  python benchmarks/train_step.py --preset base --zero-stage 2 --record     # ZeRO-2: no gathers
  python benchmarks/train_step.py --preset base --zero-stage 2 --compile-blocks --record  # + torch.compile
  torchrun --nproc_per_node 8 benchmarks/train_step.py --preset large       # 8 GPUs, DP 8
  python benchmarks/train_step.py --preset base --text-words 40 0.8 [--length-group-size 1536] --record

``--record`` appends a dated row to benchmarks/RESULTS.md; ``--json PATH`` writes every figure;
``--profile DIR`` then profiles one step per implementation and case (benchmarks/profile_step.py:
Chrome traces, and the time by owner, so the next lever is chosen by where the time goes).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import results  # noqa: E402  (benchmarks/results.py)
from generated import lognormal_word_texts  # noqa: E402  (benchmarks/generated.py)
from profile_step import format_table, profile_step  # noqa: E402
from baseline_xfm import BaselineTrainer  # noqa: E402
from xfm_scale.config import run as run_config  # noqa: E402
from xfm_scale import distributed
from xfm_scale.batch import text_positions  # noqa: E402
from xfm_scale.config import XFMConfig  # noqa: E402
from xfm_scale.train.flops import achieved_tflops, device_peak_flops, micro_batch_flops, mfu  # noqa: E402

PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers", "timm")
CASES = ("text", "image", "pair", "blend")
CORPUS_OF = {"text": "long_text", "image": "demo_images", "pair": "demo_pairs"}
BLEND_WEIGHTS = {"demo_pairs": 0.5, "demo_images": 0.2, "long_text": 0.3}  # the demo's mixture


@dataclass
class Timing:
    """What one implementation did on one case, over the timed steps."""
    seconds: float
    """Wall time of the timed steps (each step synchronised with the device)."""
    samples: int
    """Samples of all data-parallel ranks in those steps."""
    flops: float
    """Model FLOPs per rank in those steps (no recompute; TP share)."""
    graphs_compiled: int = 0
    """torch.compile graphs built during the timed steps (a shape the warm-up did not show): the
    compilation is then inside the timing and the figures are too low."""
    process_max_allocated_gb: float | None = None
    """On a GPU: the process's peak allocated memory during these timed steps (GiB). Both
    implementations' weights and optimizer states are resident throughout."""
    text_positions: int = 0
    """Text positions (text micro-batches' and pair captions') the model computed, padding included."""
    real_text_positions: int = 0
    """Of those, the positions of real tokens."""

    def row(self, peak: float) -> dict[str, float]:
        row = {"samples_per_s": self.samples / self.seconds, "tflops": achieved_tflops(self.flops, self.seconds),
               "mfu": mfu(self.flops, self.seconds, peak), "step_s": self.seconds,
               "graphs_compiled_while_timed": self.graphs_compiled}
        if self.text_positions:
            row["text_padding"] = 1 - self.real_text_positions / self.text_positions
        if self.process_max_allocated_gb is not None:
            row["process_max_allocated_gb"] = self.process_max_allocated_gb
        return row


# ---- data -------------------------------------------------------------------------------------------
def long_texts(n: int, rng: random.Random) -> list[str]:
    """Paragraphs of demo sentences, long enough (~800 characters) to fill text_max_length tokens."""
    from xfm_scale.data.demo import caption, other_sentence, random_scene

    out = []
    for _ in range(n):
        parts: list[str] = []
        while sum(len(p) + 2 for p in parts) < 800:
            parts.append(other_sentence(rng) if rng.random() < 0.5 else caption(random_scene(rng), rng))
        out.append(". ".join(parts) + ".")
    return out


def build_corpus(root: Path, image_size: int, num_samples: int,
                 text_words: tuple[float, float] | None = None) -> dict[str, Path]:
    """The demo world's pairs and images at ``image_size``, texts (long ones, or with log-normal
    word counts of (median, sigma) ``text_words``), and one blend spec per case."""
    import numpy as np

    from xfm_scale.data import build_demo_data
    from xfm_scale.data.shards import write_corpus

    demo = build_demo_data(root, image_size=image_size, num_pairs=num_samples, num_images=num_samples,
                           num_text=200, num_eval_pairs=10)
    texts = (lognormal_word_texts(np.random.default_rng(1), *text_words, num_samples) if text_words
             else long_texts(num_samples, random.Random(1)))
    text_manifest = write_corpus(({"txt": t} for t in texts), out_dir=root / "long_text", name="long_text",
                                 modality="text", maxcount=2000, source="generated").manifest_path
    manifests = {"demo_pairs": demo.manifests["demo_pairs"], "demo_images": demo.manifests["demo_images"],
                 "long_text": text_manifest}
    modality = {"demo_pairs": "pair", "demo_images": "image", "long_text": "text"}
    specs = {}
    for case in CASES:
        names = list(manifests) if case == "blend" else [CORPUS_OF[case]]
        specs[case] = root / f"{case}.yaml"
        specs[case].write_text(yaml.safe_dump({"corpora": [
            {"name": n, "modality": modality[n], "manifest": str(manifests[n]), "weight": BLEND_WEIGHTS[n]}
            for n in names]}, sort_keys=False))
    return {"tokenizer": demo.tokenizer_dir, **specs}


def run_settings(args, data: dict[str, Path], work: Path, dp: int, on_gpu: bool) -> run_config.RunConfig:
    ds = args.ds_config or str(ROOT / (f"ds_configs/zero{args.zero_stage or 3}_bf16.json" if on_gpu
                                       else "ds_configs/cpu_fp32.json"))
    stage = {"zero_optimization.stage": args.zero_stage} if args.zero_stage else {}  # else the config's
    return run_config.from_dict({
        "model": {"preset": args.preset, "activation_checkpointing": args.activation_checkpointing,
                  "compile_blocks": args.compile_blocks,
                  "vocab_from_tokenizer": False},  # keep the preset's vocabulary (e.g. RoBERTa's 50265)
        "data": {"spec": str(data["blend"]), "tokenizer_dir": str(data["tokenizer"]), "cache_dir": str(work / "cache"),
                 "num_workers": args.workers, "augment": True, "length_group_size": args.length_group_size,
                 "length_group_window": args.length_group_window},
        "batch": {"micro_batch_size": args.micro_batch, "text_micro_batch_size": args.text_micro_batch,
                  "global_batch_size": args.micro_batch * args.micro_steps * dp},
        "optim": {"warmup_steps": 1},
        "train": {"steps": args.warmup + args.steps + 2, "output_dir": str(work / "run"), "resume": False,
                  "progress_bar": False, "tensorboard": False, "log_every": 10 ** 9},
        "parallel": {"tensor_parallel_size": args.tensor_parallel_size},
        "deepspeed": {"config": ds, "overrides": stage, "zero3_gather_whole_blocks": not args.per_layer_gathers},
    })


# ---- timing -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fns: dict, steps: dict, *, warmup: int, count: int, with_loader: bool, device: torch.device,
               flops_of, dp: int) -> dict[str, Timing]:
    """Time ``count`` steps of each implementation (``step_fns[name]`` on ``steps[name]``'s steps)
    after ``warmup`` untimed ones each.

    Without the loader, the steps are fetched first and kept in (pinned) host memory (so each
    implementation still copies its micro-batches to the GPU as in training, and reads label
    counts on the host), and the timed steps alternate between the implementations, one step of
    each in turn, so a drift in the machine's speed reaches all of them alike (on the 2-core CPU
    the ratio of two implementations timed one after the other moved by 20% between runs).

    With the loader, fetching each step is inside the timed part, and each implementation runs
    its steps alone: alternating, its loader's workers would prepare its next step during the
    other implementation's step, hiding the loader's cost this measures. On a GPU each row also
    gets the peak memory of that implementation's timed steps."""
    on_gpu = device.type == "cuda"
    totals = {name: Timing(0.0, 0, 0.0, process_max_allocated_gb=0.0 if on_gpu else None) for name in step_fns}

    def timed_step(name: str) -> None:
        _sync(device)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        graphs_before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        batches = next(steps[name])
        step_fns[name](batches)
        _sync(device)
        t = totals[name]
        t.seconds += time.perf_counter() - start
        t.samples += sum(b.size for b in batches) * dp
        t.flops += sum(flops_of(b) for b in batches)
        t.graphs_compiled += counters["stats"]["unique_graphs"] - graphs_before
        for real, positions in text_positions(batches).values():
            t.real_text_positions += real
            t.text_positions += positions
        if on_gpu:
            peak_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
            t.process_max_allocated_gb = max(t.process_max_allocated_gb, peak_gb)

    def warm_up(name: str) -> None:
        for _ in range(warmup):
            step_fns[name](next(steps[name]))

    if with_loader:
        for name in step_fns:
            warm_up(name)
            for _ in range(count):
                timed_step(name)
    else:
        for name in step_fns:
            warm_up(name)
        steps = {name: iter([[b.pin_memory() if on_gpu else b for b in next(it)] for _ in range(count)])
                 for name, it in steps.items()}
        for _ in range(count):
            for name in step_fns:
                timed_step(name)
    return totals


def benchmark(args) -> dict:
    from xfm_scale.train.trainer import Trainer

    layout = distributed.initialize(args.tensor_parallel_size)
    on_gpu = distributed.device().type == "cuda"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="xfm_bench_"))
    image_size = XFMConfig.from_preset(args.preset).vision.image_size
    num_samples = max(64, args.micro_batch * args.micro_steps * layout.data_parallel_size * (args.warmup + args.steps + 2))
    if layout.rank == 0:
        data = build_corpus(work / "data", image_size, min(num_samples, args.max_corpus), args.text_words)
        (work / "data" / "ready.json").write_text(json.dumps({k: str(v) for k, v in data.items()}))
    dist.barrier()
    data = {k: Path(v) for k, v in json.loads((work / "data" / "ready.json").read_text()).items()}
    cfg = run_settings(args, data, work, layout.data_parallel_size, on_gpu)
    trainer = Trainer(cfg)
    device, model_config = trainer.device, trainer.model_config
    bf16 = trainer.engine.bf16()
    peak, peak_source = device_peak_flops(torch.bfloat16 if bf16 else torch.float32)
    tp, dp = layout.tensor_parallel_size, layout.data_parallel_size

    def flops_of(batch) -> float:  # model FLOPs: MFU's convention counts no recompute
        return micro_batch_flops(model_config, batch, activation_checkpointing=False,
                                 data_parallel_size=dp).model / tp

    def ours(batches):
        trainer.train_step([batches])  # one optimizer step (the mixed schedule)
        trainer.step += 1

    implementations = {"xfm_scale": ours}
    if not args.no_baseline:
        if tp > 1:
            raise SystemExit("the baseline has no tensor parallelism: use --no-baseline with TP > 1")
        baseline = BaselineTrainer(model_config, cfg.optim, device, bf16=bf16, seed=cfg.train.seed)
        implementations["baseline"] = baseline.train_step
    rows, profiles = [], {}
    for case in args.cases:
        for with_loader in (False, True):
            # a loader each, over the same steps: each implementation sees the same micro-batches
            steps = {name: trainer.build_loader(str(data[case])).iter_steps() for name in implementations}
            timings = time_steps(implementations, steps, warmup=args.warmup, count=args.steps,
                                 with_loader=with_loader, device=device, flops_of=flops_of, dp=dp)
            for name, timing in timings.items():
                row = {"implementation": name, "case": case, "loader": with_loader, **timing.row(peak)}
                rows.append(row)
                if layout.rank == 0:
                    print(_format_row(row), flush=True)
        if args.profile:
            profiles.update(profile_case(args.profile, case, implementations, trainer.build_loader(str(data[case])),
                                         layout.rank))
    return {"preset": args.preset, "device": results.hardware(), "precision": "bf16" if bf16 else "fp32",
            "peak_tflops": peak / 1e12, "peak_source": peak_source,
            "micro_batch": {"pair": args.micro_batch, "image": args.micro_batch,
                            "text": args.text_micro_batch or args.micro_batch},
            "micro_steps": args.micro_steps, "tensor_parallel": tp, "data_parallel": dp,
            "zero_stage": trainer.engine.zero_stage,
            "activation_checkpointing": args.activation_checkpointing, "compile_blocks": args.compile_blocks,
            "zero3_whole_block_gathers": trainer.engine.zero_stage == 3 and not args.per_layer_gathers,
            "loader_workers": args.workers, "cases": list(args.cases), "text_words": args.text_words,
            "length_group_size": args.length_group_size, "length_group_window": args.length_group_window,
            "steps": args.steps, "warmup": args.warmup, "rows": rows, "profile": profiles, **summarise(rows)}


def profile_case(out_dir: str, case: str, implementations: dict, loader, rank: int) -> dict:
    """One more step of each implementation on the case's next step, under the profiler (after the
    timed ones, so nothing compiles in it): its trace goes to OUT_DIR/IMPL_CASE_rankR.json.gz and
    its time-by-owner tables are returned (benchmarks/profile_step.py)."""
    batches = next(loader.iter_steps())
    summaries = {}
    for name, step_fn in implementations.items():
        trace = Path(out_dir) / f"{name}_{case}_rank{rank}.json.gz"
        summaries[f"{name}/{case}"] = summary = profile_step(lambda: step_fn(batches), trace)
        if rank == 0:
            print("\n".join(t for t in (format_table(f"{name} {case}", summary),
                                         format_table(f"{name} {case}", summary, "device")) if t), flush=True)
    return summaries


def summarise(rows: list[dict]) -> dict:
    """Ratios xfm_scale / baseline (samples/s) per case and loader setting, and each
    implementation's slowdown with the loader in the loop (1 - with / without)."""
    by = {(r["implementation"], r["case"], r["loader"]): r["samples_per_s"] for r in rows}
    ratio = {f"{case}{'+loader' if loader else ''}": by[("xfm_scale", case, loader)] / by[("baseline", case, loader)]
             for case in CASES for loader in (False, True) if ("baseline", case, loader) in by}
    slowdown = {f"{impl}/{case}": 1 - by[(impl, case, True)] / by[(impl, case, False)]
                for impl in ("xfm_scale", "baseline") for case in CASES if (impl, case, True) in by}
    return {"ratio_vs_baseline": ratio, "loader_slowdown": slowdown}


def _format_row(r: dict) -> str:
    memory = f"  process peak {r['process_max_allocated_gb']:.1f} GB" if "process_max_allocated_gb" in r else ""
    padding = f"  text padding {r['text_padding']:5.1%}" if "text_padding" in r else ""
    compiled = (f"  WARNING: {r['graphs_compiled_while_timed']} graphs compiled while timed (more --warmup)"
                if r["graphs_compiled_while_timed"] else "")
    return (f"{r['implementation']:>9} {r['case']:>5} {'loader' if r['loader'] else 'memory':>6}: "
            f"{r['samples_per_s']:9.1f} samples/s  {r['tflops']:8.3f} TFLOP/s  MFU {r['mfu']:6.1%}{padding}{memory}{compiled}")


def record(out: dict) -> None:
    rows = {(r["implementation"], r["case"], r["loader"]): r for r in out["rows"]}
    cases = out.get("cases", CASES)
    words = out.get("text_words")
    parts = [f"{out['preset']} preset, {out['precision']}, micro-batch pair/image {out['micro_batch']['pair']} "
             f"text {out['micro_batch']['text']} x {out['micro_steps']} micro-steps, TP {out['tensor_parallel']} "
             f"DP {out['data_parallel']}, ZeRO-{out['zero_stage']}, activation checkpointing {'on' if out['activation_checkpointing'] else 'off'}, "
             f"{'blocks compiled (torch.compile, inductor), ' if out.get('compile_blocks') else ''}"
             f"{'per-layer ZeRO-3 gathers, ' if out['zero_stage'] == 3 and not out.get('zero3_whole_block_gathers') else ''}"
             f"{f'texts of log-normal word counts (median {words[0]:g}, sigma {words[1]:g}), ' if words else ''}"
             f"{'length grouping {} x window {}, '.format(out['length_group_size'], out['length_group_window']) if out.get('length_group_size') else ''}"
             f"{out['steps']} timed steps; peak {out['peak_tflops']:.1f} TFLOP/s ({out['peak_source']})"]
    if "blend" in cases:
        blend = rows[("xfm_scale", "blend", False)]
        parts.append(f"xfm_scale blended step: {blend['samples_per_s']:.1f} samples/s, {blend['tflops']:.2f} TFLOP/s, "
                     f"MFU {blend['mfu']:.1%}")
    for case in cases:
        r = rows[("xfm_scale", case, False)]
        per_case = f"{case} {r['samples_per_s']:.1f} samples/s, MFU {r['mfu']:.1%}"
        if "text_padding" in r:
            per_case += f", text padding {r['text_padding']:.1%}"
        if ("baseline", case, False) in rows:
            per_case += (f", vs baseline {rows[('baseline', case, False)]['samples_per_s']:.1f}"
                         f" samples/s = {out['ratio_vs_baseline'][case]:.2f}x")
        parts.append(per_case)
    for key, summary in out.get("profile", {}).items():
        if key.startswith("xfm_scale/"):
            parts.append(f"profiled {key.split('/')[1]} step {summary['wall_s']:.3f} s, host time by owner: " + ", ".join(
                f"{r['owner']} {r['seconds']:.3f} s" for r in summary["host"][:3]) + "".join(
                f", device: {r['owner']} {r['seconds']:.3f} s" for r in summary["device"][:2]))
    late = sum(r.get("graphs_compiled_while_timed", 0) for r in out["rows"])
    if late:
        parts.append(f"{late} torch.compile graphs were built inside timed steps (figures too low)")
    slow = out["loader_slowdown"]
    slowed = ["blend"] if "blend" in cases else cases
    parts.append(f"with the loader ({out['loader_workers']} workers): " + ", ".join(
        f"{impl} {case} {-slow[f'{impl}/{case}']:+.1%}" for impl in ("xfm_scale", "baseline") for case in slowed
        if f"{impl}/{case}" in slow))
    results.add_row("benchmarks/train_step.py", "; ".join(parts), PACKAGES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="X-FM preset (tiny on CPU; base/large on GPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="pair/image micro-batch per rank (default: tiny 16, else 96)")
    p.add_argument("--text-micro-batch", type=int, default=None, help="text micro-batch per rank (default: the pair one)")
    p.add_argument("--micro-steps", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (ZeRO-3 traces its prefetch)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers per rank (default: 0 on CPU; on GPU the node's cores per rank, less 2)")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every encoder block (ours)")
    p.add_argument("--compile-blocks", action="store_true",
                   help="compile ours' encoder blocks with torch.compile (model.compile_blocks); "
                        "the warm-up steps include the compilation")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--zero-stage", type=int, choices=(2, 3), default=None,
                   help="ZeRO stage of ours (default: 3, or --ds-config's): 3 partitions parameters (gathered "
                        "around each module), 2 keeps them whole on every rank")
    p.add_argument("--per-layer-gathers", action="store_true",
                   help="ZeRO-3: gather parameters per layer, as DeepSpeed does by default, rather than each "
                        "block whole (deepspeed.zero3_gather_whole_blocks: false)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: by device and stage, from ds_configs/)")
    p.add_argument("--no-baseline", action="store_true", help="time xfm_scale only")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                   help="the cases to time (default: all; base on a CPU: text)")
    p.add_argument("--text-words", nargs=2, type=float, metavar=("MEDIAN", "SIGMA"), default=None,
                   help="generate texts with log-normal word counts (about one token per word) instead of "
                        "full-length ones, e.g. 40 0.8 (base) or 10 0.8 (tiny)")
    p.add_argument("--length-group-size", type=int, default=0,
                   help="data.length_group_size: group texts and pairs of similar length (0: off); a multiple "
                        "of the global micro-batch")
    p.add_argument("--length-group-window", type=int, default=64, help="data.length_group_window")
    p.add_argument("--max-corpus", type=int, default=4000, help="at most this many generated samples per corpus")
    p.add_argument("--work-dir", default=None, help="where the generated data and run files go (default: a temp dir)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timing, profile one more step of each implementation per case: Chrome traces "
                        "to DIR, time by owner (DeepSpeed, megatron, xfm_scale, ...) printed and in --json")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--record", action="store_true", help="append a dated row to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or (16 if args.preset == "tiny" else 96)
    if args.workers is None:
        on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.workers = max(1, per_rank - 2) if on_gpu else 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = benchmark(args)
    if dist.get_rank() == 0:
        print("ratio xfm_scale / baseline (samples/s): " + json.dumps({k: round(v, 3) for k, v in out["ratio_vs_baseline"].items()}))
        print("slowdown with the loader in the loop: " + json.dumps({k: round(v, 3) for k, v in out["loader_slowdown"].items()}))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        if args.record:
            record(out)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
