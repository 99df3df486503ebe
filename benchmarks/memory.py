#!/usr/bin/env python
"""Memory of one training step per preset, and the largest X-FM one machine trains.

Each measurement is a probe in a fresh process (so its peak is its own, and an out-of-memory kill
ends the probe, not the benchmark). A probe builds the model inside the ZeRO-3 engine
(xfm_scale.distributed.build_engine), then trains one optimizer step of three micro-batches (text,
image, pair, at the preset's full lengths) and reports:

* the resident state after the engine is built (GPU: allocated; CPU: process RSS);
* the step's peak (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS);
* the bytes the largest micro-batch forward (the pair one) keeps for backward: autograd's saved
  tensors (parameters excluded) plus the inputs each checkpointed block keeps for its recompute,
  i.e. the activation memory that activation checkpointing trades for recompute; on GPU also what
  the forward left allocated.

On CPU "state" is the process's RSS (torch's libraries included) and "peak" its lifetime peak RSS
(the engine build included).

  python benchmarks/memory.py --presets tiny base large [--micro-batch 32] [--record]
      peak memory per preset, with and without activation checkpointing
  python benchmarks/memory.py --largest [--offload cpu|nvme] [--offload-params] [--nvme-path DIR] [--record]
      the largest depth-scaled giant preset (--family) that trains one step with ZeRO-3 + offload of the
      optimizer (the parameters stay on the GPU unless --offload-params), against the bound host
      memory sets (bytes per parameter, --bytes-per-param, 16 by default: bf16 weights, fp32 master
      weights and two fp32 Adam moments), with what DeepSpeed's offload holds in host memory by kind

On CPU (DS_ACCELERATOR=cpu) the same probes run in fp32 (the presets table with
ds_configs/cpu_fp32.json; --largest with the shipped offload configs, bf16 switched off unless
--bf16), and the offload probe offloads the optimizer to DeepSpeedCPUAdam as on GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

PACKAGES = ("torch", "deepspeed", "megatron-core")
RESULT = "PROBE_RESULT "
GIB = 2 ** 30


@dataclass
class Probe:
    """One measurement: what to build and how."""
    preset: str
    """X-FM preset the model starts from."""
    overrides: dict = field(default_factory=dict)
    """Dotted-key overrides of the preset (the scaled presets change depths)."""
    activation_checkpointing: bool = False
    """Checkpoint every encoder block."""
    micro_batch: int = 8
    """Samples per micro-batch (text, image and pair alike)."""
    offload: str = "none"
    """ZeRO-3 offload of the optimizer state: none, cpu or nvme."""
    offload_params: bool = False
    """Offload the bf16 parameters too (ds_configs/zero3_offload.json, or the NVMe template's
    offload_param). False: they stay on the GPU (ds_configs/zero3_offload_optimizer.json), which
    saves host memory, the binding limit, 2 bytes per parameter."""
    nvme_path: str | None = None
    """Folder on a local NVMe drive for --offload nvme."""
    pin_memory: bool = True
    """Offloaded state in pinned (page-locked) host memory, as ds_configs/ has it."""
    bf16: bool = False
    """On CPU: bf16 weights with fp32 master weights, as on a GPU (a CPU probe runs fp32 by
    default; a GPU probe always runs bf16)."""
    exact_pinned: bool = True
    """The engine's exact-size pinned allocations and release of freed pinned blocks
    (deepspeed.exact_pinned_host_memory); False: torch's power-of-two rounding and caching."""


# ---- the probe (runs in its own process) ----------------------------------------------------------
def ds_config(probe: Probe, on_gpu: bool) -> dict:
    """The shipped DeepSpeed config of the probe's offload; bf16 on GPU, fp32 on CPU unless
    ``probe.bf16`` (the presets table without offload: cpu_fp32.json, the CPU tests' config)."""
    bf16 = on_gpu or probe.bf16
    cpu_offload = "zero3_offload.json" if probe.offload_params else "zero3_offload_optimizer.json"
    name = {"none": "zero3_bf16.json" if bf16 else "cpu_fp32.json", "cpu": cpu_offload,
            "nvme": "zero3_nvme_template.json"}[probe.offload]
    with open(ROOT / "ds_configs" / name) as f:
        ds = json.load(f)
    ds.pop("_comment", None)
    ds["bf16"] = {"enabled": bf16}
    zero = ds["zero_optimization"]
    if not probe.offload_params:
        zero.pop("offload_param", None)
    if probe.offload == "nvme" and not probe.nvme_path:
        raise SystemExit("--offload nvme needs --nvme-path (a folder on a local NVMe drive)")
    for key in ("offload_param", "offload_optimizer"):
        if isinstance(zero.get(key), dict):
            zero[key]["pin_memory"] = probe.pin_memory
            if probe.offload == "nvme":
                zero[key]["nvme_path"] = probe.nvme_path
    ds.update(train_batch_size=3 * probe.micro_batch, train_micro_batch_size_per_gpu=probe.micro_batch,
              gradient_accumulation_steps=3, gradient_clipping=1.0)
    return ds


def synthetic_batches(config, B: int, seed: int = 0) -> list:
    """A text, an image and a pair micro-batch of B samples at the config's full lengths (15% MLM
    masking, 50% IMLM masking, mim_num_masked patches), on the CPU."""
    import torch

    from xfm_scale.batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch

    g = torch.Generator().manual_seed(seed)
    o, v = config.objectives, config.vision

    def text(L: int, rate: float):
        ids = torch.randint(5, config.text.vocab_size, (B, L), generator=g)
        chosen = torch.rand(B, L, generator=g) < rate
        chosen[:, 0] = False
        chosen[:, 1] = True
        return ids, torch.ones(B, L, dtype=torch.long), torch.where(chosen, 4, ids), torch.where(chosen, ids, IGNORE_INDEX)

    def pixels_and_mask():
        order = torch.rand(B, v.num_patches, generator=g).argsort(dim=1)
        mask = torch.zeros(B, v.num_patches, dtype=torch.bool).scatter_(1, order[:, :o.mim_num_masked], True)
        return torch.randn(B, v.num_channels, v.image_size, v.image_size, generator=g), mask

    _, attention, masked, labels = text(o.text_max_length, 0.15)
    ids, caption_mask, imlm_ids, imlm_labels = text(o.caption_max_length, 0.5)
    image_pixels, image_mask = pixels_and_mask()
    pair_pixels, pair_mask = pixels_and_mask()
    return [TextBatch(input_ids_BL=masked, attention_mask_BL=attention, mlm_labels_BL=labels),
            ImageBatch(pixel_values_BCHW=image_pixels, mim_mask_BP=image_mask),
            PairBatch(pixel_values_BCHW=pair_pixels, caption_ids_BL=ids, caption_mask_BL=caption_mask,
                      imlm_input_ids_BL=imlm_ids, imlm_labels_BL=imlm_labels, mim_mask_BP=pair_mask)]


class SavedActivations:
    """Counts the bytes a forward keeps for backward (each storage once): what autograd saves
    (parameters, saved by reference, excluded) and the inputs every checkpointed block keeps for
    its recompute. Those inputs need counting apart: inside a checkpointed block DeepSpeed's own
    saved-tensor hooks take over (torch runs only the innermost), and the inputs live in its closure."""

    def __init__(self, parameters):
        import torch

        from xfm_scale.model import hooks

        self._params = {id(p) for p in parameters}
        self._storages: set[int] = set()
        self.bytes = 0
        self._saved_tensor_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._runtime = hooks.HOOKS
        self._checkpoint = hooks.HOOKS.checkpoint

    def _count(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._storages:
            self._storages.add(storage.data_ptr())
            self.bytes += storage.nbytes()

    def _pack(self, tensor):
        if id(tensor) not in self._params:
            self._count(tensor)
        return tensor

    def _counting_checkpoint(self, fn, *args):
        import torch

        for arg in args:
            if isinstance(arg, torch.Tensor):
                self._count(arg)
        return self._checkpoint(fn, *args)

    def __enter__(self):
        self._saved_tensor_hooks.__enter__()
        self._runtime.checkpoint = self._counting_checkpoint
        return self

    def __exit__(self, *exc):
        self._runtime.checkpoint = self._checkpoint
        self._saved_tensor_hooks.__exit__(*exc)


def _host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _host_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_probe(probe: Probe) -> dict:
    """Build, train one step, measure (in this process)."""
    import torch

    from xfm_scale import distributed
    from xfm_scale.config import XFMConfig
    from xfm_scale.config.run import OptimSection
    from xfm_scale.engine import memory as engine_memory
    from xfm_scale.engine.build import build_engine
    from xfm_scale.engine.checkpoint_io import nvme_swap_ids
    from xfm_scale.engine.memory import offloaded_state_bytes
    from xfm_scale.model.info import parameter_counts

    distributed.initialize(tensor_parallel_size=1)
    device = distributed.device()
    on_gpu = device.type == "cuda"
    config = XFMConfig.from_preset(probe.preset, **probe.overrides)
    config.set_activation_checkpointing(probe.activation_checkpointing)
    config.validate(1)
    params = parameter_counts(config)["total"]
    start = time.perf_counter()
    engine = build_engine(config, OptimSection(warmup_steps=1), ds_config(probe, on_gpu), total_steps=10,
                          exact_pinned_host_memory=probe.exact_pinned)
    build_s = time.perf_counter() - start
    host_state = _host_bytes()
    pinned_after_build = _pinned_host_memory(on_gpu, "pinned_after_build")
    state = torch.cuda.memory_allocated(device) if on_gpu else host_state
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    batches = synthetic_batches(config, probe.micro_batch)
    start = time.perf_counter()
    peaks = {"saved": 0, "forward_allocated": 0}

    @contextlib.contextmanager
    def measured_forward():
        before = torch.cuda.memory_allocated(device) if on_gpu else 0
        with SavedActivations(engine.module.parameters()) as counter:
            yield
        peaks["saved"] = max(peaks["saved"], counter.bytes)
        if on_gpu:
            peaks["forward_allocated"] = max(peaks["forward_allocated"], torch.cuda.memory_allocated(device) - before)

    losses = engine.step(batches, device, around_forward=measured_forward)
    saved, forward_allocated = peaks["saved"], peaks["forward_allocated"]
    if on_gpu:
        torch.cuda.synchronize(device)
    result = {"ok": True, "parameters": params, "build_s": build_s, "step_s": time.perf_counter() - start,
              "state_gb": state / GIB, "saved_activation_gb": saved / GIB,
              **({"forward_allocated_gb": forward_allocated / GIB} if on_gpu else {}),
              "peak_gb": (torch.cuda.max_memory_allocated(device) if on_gpu else _host_peak_bytes()) / GIB,
              "host_peak_gb": _host_peak_bytes() / GIB, "host_state_gb": host_state / GIB,
              "host_peak_bytes_per_param": _host_peak_bytes() / params, **pinned_after_build,
              "pinned_exact_size": engine_memory.pinned_allocations_exact(),
              **_pinned_host_memory(on_gpu, "pinned"),
              "device": "gpu" if on_gpu else "cpu",
              "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
              "optimizer_offloaded": engine.offloads_optimizer,
              "parameters_offloaded": engine.offloads_parameters,
              "offloaded_state_bytes": offloaded_state_bytes(engine.optimizer) if probe.offload != "none" else {},
              "optimizer_swapped_sub_groups": sum(i is not None for i in nvme_swap_ids(engine.deepspeed) or []),
              "loss": float(losses[-1]["total"])}
    distributed.shutdown()
    return result


def _pinned_host_memory(on_gpu: bool, prefix: str) -> dict:
    """torch's pinned host allocator: bytes in use and held (in use + cached, at the rounded sizes
    it asked CUDA for), now and at peak, in GB, as ``{prefix}_{in_use,in_use_peak,held,held_peak}_gb``
    (GPU only; a torch without these statistics reports nothing)."""
    import torch

    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if not on_gpu or stats is None:
        return {}
    s = stats()
    return {f"{prefix}_{name}_gb": s[key] / GIB for name, key in (
        ("in_use", "active_bytes.current"), ("in_use_peak", "active_bytes.peak"),
        ("held", "allocated_bytes.current"), ("held_peak", "allocated_bytes.peak")) if key in s}


_WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_child(option: str, payload, timeout: float | None = None, **env_overrides: str):
    """Run this script with ``option payload`` (JSON) in a fresh process of its own world (none of
    this process's rendezvous variables) and return the JSON it printed after RESULT, or raise
    ChildFailed (a crash, a kill such as the host's OOM killer, or no result) or TimeoutExpired."""
    env = {**{k: v for k, v in os.environ.items() if k not in _WORLD_VARIABLES}, **env_overrides}
    proc = subprocess.run([sys.executable, __file__, option, json.dumps(payload)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    raise ChildFailed(f"{how}: {tail[-300:]}")


class ChildFailed(RuntimeError):
    """A child run of this script ended without a result."""


def probe_in_subprocess(probe: Probe, timeout: float) -> dict:
    """Run a probe in a fresh process; a crash, a kill (host OOM) or a timeout is a failed probe."""
    try:
        return run_child("--probe", asdict(probe), timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    except ChildFailed as err:
        return {"ok": False, "error": str(err)}


# ---- per-preset memory -----------------------------------------------------------------------------
def presets_table(presets: list[str], micro_batch: int, timeout: float, selective: int | None = None) -> list[dict]:
    """Per preset: checkpointing off, on, and (``selective``) on for each encoder's first N blocks."""
    from xfm_scale.config import XFMConfig

    rows = []
    for preset in presets:
        depths = {e: getattr(XFMConfig.from_preset(preset), e).num_layers for e in ("text", "vision", "fusion")}
        for checkpointing, layers in ((False, None), (True, None), *([(True, selective)] if selective is not None else [])):
            overrides = {}
            if layers is not None:  # an encoder shallower than N has all its blocks checkpointed
                overrides = {f"{e}.checkpointed_layers": min(layers, depth) for e, depth in depths.items()}
            probe = Probe(preset=preset, overrides=overrides, activation_checkpointing=checkpointing, micro_batch=micro_batch)
            result = probe_in_subprocess(probe, timeout)
            rows.append({"preset": preset, "activation_checkpointing": checkpointing, "checkpointed_layers": layers,
                         **result})
            print(_format(rows[-1]), flush=True)
    return rows


def _checkpointing_label(r: dict) -> str:
    if not r["activation_checkpointing"]:
        return "ckpt off"
    return "ckpt on" if r.get("checkpointed_layers") is None else f"ckpt first {r['checkpointed_layers']}"


def _format(r: dict) -> str:
    what = f"{r['preset']:>6} {_checkpointing_label(r):>13}"
    if not r["ok"]:
        return f"{what}: failed ({r['error']})"
    return (f"{what}: {r['parameters'] / 1e6:9.1f}M params  state {r['state_gb']:7.2f} GB  peak "
            f"{r['peak_gb']:7.2f} GB  saved for backward (largest forward) {r['saved_activation_gb']:7.3f} GB  "
            f"step {r['step_s']:.1f}s")


# ---- the largest model -----------------------------------------------------------------------------
def scaled_depths(preset: str, depth_scale: float) -> dict:
    """Overrides that scale a preset's depths (text, vision, fusion) by ``depth_scale``."""
    from xfm_scale.config import XFMConfig

    base = XFMConfig.from_preset(preset)
    return {f"{name}.num_layers": max(1, round(getattr(base, name).num_layers * depth_scale))
            for name in ("text", "vision", "fusion")}


def count_parameters(configs: list[tuple[str, dict]]) -> list[int]:
    """Parameters of each (preset, overrides), counted on the meta device in this process."""
    from xfm_scale import distributed
    from xfm_scale.config import XFMConfig
    from xfm_scale.model.info import parameter_counts

    distributed.initialize(tensor_parallel_size=1)
    counts = [parameter_counts(XFMConfig.from_preset(preset, **overrides))["total"] for preset, overrides in configs]
    distributed.shutdown()
    return counts


def parameters_of(configs: list[tuple[str, dict]]) -> list[int]:
    """:func:`count_parameters` in a CPU child process: the benchmark process itself never opens a
    process group or a CUDA context (the probes each need the GPU to themselves)."""
    return run_child("--count", configs, DS_ACCELERATOR="cpu")


def largest_that_fits(candidates: list, fits) -> tuple[object | None, list]:
    """Binary search over ``candidates`` (ascending size; fitting is monotone: if one fits, every
    smaller one does) for the largest ``c`` with ``fits(c)``. Returns (it or None, [(c, fits)])."""
    lo, hi, best, tried = 0, len(candidates) - 1, None, []
    while lo <= hi:
        mid = (lo + hi) // 2
        ok = fits(candidates[mid])
        tried.append((candidates[mid], ok))
        if ok:
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best, tried


def host_bound(bytes_per_param: float) -> tuple[int, float]:
    """(parameters host memory can hold at ``bytes_per_param``, host memory in GiB)."""
    import psutil

    total = psutil.virtual_memory().total
    return int(total / bytes_per_param), total / GIB


def find_largest(args) -> dict:
    bound, host_gib = host_bound(args.bytes_per_param)
    scales = [round(s, 3) for s in _frange(args.min_scale, args.max_scale, args.scale_step)]
    sizes = dict(zip(scales, parameters_of([(args.family, scaled_depths(args.family, s)) for s in scales])))
    print(f"host memory {host_gib:.1f} GiB -> bound {_count(bound)} parameters at {args.bytes_per_param:g} B/param; "
          f"candidates: " + ", ".join(f"x{s}={_count(sizes[s])}" for s in scales), flush=True)
    results = {}

    def fits(scale):
        probe = Probe(preset=args.family, overrides=scaled_depths(args.family, scale), activation_checkpointing=True,
                      micro_batch=args.micro_batch, offload=args.offload, offload_params=args.offload_params,
                      nvme_path=args.nvme_path, pin_memory=not args.no_pin_memory, bf16=args.bf16,
                      exact_pinned=not args.torch_pinned_rounding)
        results[scale] = probe_in_subprocess(probe, args.timeout)
        r = results[scale]
        print(f"  {args.family} x{scale} ({_count(sizes[scale])}): " + (
            f"trains one step (state {r['state_gb']:.1f} GB, peak {r['peak_gb']:.1f} GB, host after build "
            f"{r['host_state_gb']:.1f} GB, host peak {r['host_peak_gb']:.1f} GB = {r['host_peak_bytes_per_param']:.1f} B "
            f"per parameter{_offloaded_text(r)}{_pinned_text(r)}, build {r['build_s']:.0f}s, step {r['step_s']:.0f}s)"
            if r["ok"]
            else f"does not ({r['error']})"), flush=True)
        return r["ok"]

    best, tried = largest_that_fits(scales, fits)
    largest = sizes[best] if best is not None else 0
    return {"family": args.family, "bound_parameters": bound, "pin_memory": not args.no_pin_memory,
            "exact_pinned": not args.torch_pinned_rounding, "host_memory_gib": host_gib, "bytes_per_param": args.bytes_per_param,
            "offload": args.offload, "offload_params": args.offload_params, "bf16": args.bf16, "micro_batch": args.micro_batch, "largest_scale": best, "largest_parameters": largest,
            "fraction_of_bound": largest / bound, "probes": {str(s): {"parameters": sizes[s], **results[s]} for s, _ in tried}}


def _offloaded_text(r: dict) -> str:
    """What DeepSpeed's offload holds in host memory, in bytes per parameter by kind."""
    held = r.get("offloaded_state_bytes") or {}
    if not held:
        return ""
    kinds = ", ".join(f"{kind} {n / r['parameters']:.1f}" for kind, n in held.items() if n)
    return f" (offloaded state {sum(held.values()) / r['parameters']:.1f} B per parameter: {kinds})"


def _pinned_text(r: dict) -> str:
    if "pinned_held_peak_gb" not in r:
        return ""
    return (f", pinned after build: in use {r.get('pinned_after_build_in_use_gb', 0):.1f} GB, held "
            f"{r.get('pinned_after_build_held_gb', 0):.1f} GB; pinned held at peak {r['pinned_held_peak_gb']:.1f} GB")


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _frange(lo: float, hi: float, step: float) -> list[float]:
    return [lo + i * step for i in range(int(math.floor((hi - lo) / step + 1e-9)) + 1)]


# ---- command line ----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny"], help="presets for the per-preset table")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--checkpointed-layers", type=int, default=None,
                   help="also measure selective checkpointing of each encoder's first N blocks")
    p.add_argument("--largest", action="store_true", help="search the largest depth-scaled preset instead")
    p.add_argument("--family", default="giant", help="preset whose depths --largest scales")
    p.add_argument("--offload", choices=("none", "cpu", "nvme"), default="cpu",
                   help="ZeRO-3 offload of the optimizer state for --largest")
    p.add_argument("--offload-params", action="store_true",
                   help="--largest: offload the parameters too (by default they stay on the GPU: 2 bytes per "
                        "parameter less host memory, the binding limit)")
    p.add_argument("--nvme-path", default=None, help="NVMe folder for --offload nvme")
    p.add_argument("--no-pin-memory", action="store_true", help="--largest: offload to pageable host memory")
    p.add_argument("--bf16", action="store_true",
                   help="--largest on CPU: bf16 weights with fp32 master weights, as on a GPU (CPU default: fp32)")
    p.add_argument("--torch-pinned-rounding", action="store_true",
                   help="--largest: keep torch's power-of-two rounding and caching of pinned host memory "
                        "(deepspeed.exact_pinned_host_memory: false), for the A/B")
    p.add_argument("--bytes-per-param", type=float, default=16.0,
                   help="host bytes per parameter of the bound (the issue's 16: bf16 weights, fp32 master "
                        "weights, two Adam moments; DeepSpeed 0.19.8's ZeRO-3 offload needs 20: bf16 and fp32 gradients too)")
    p.add_argument("--min-scale", type=float, default=1.0, help="smallest depth scale tried")
    p.add_argument("--max-scale", type=float, default=2.6, help="largest depth scale tried")
    p.add_argument("--scale-step", type=float, default=0.2, help="step between the depth scales tried")
    p.add_argument("--timeout", type=float, default=900, help="seconds a probe may take")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--record", action="store_true", help="append a dated row to benchmarks/RESULTS.md")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: run one probe here
    p.add_argument("--count", default=None, help=argparse.SUPPRESS)  # internal: count parameters here
    args = p.parse_args(argv)
    if args.micro_batch < 2:  # ITM draws each pair's hard negatives from the other pairs of its micro-batch
        p.error("--micro-batch must be >= 2 (a pair micro-batch of one has no ITM negatives)")
    if args.offload_params and args.offload == "none":
        p.error("--offload-params needs --offload cpu or nvme")
    return args


def record(out: dict) -> None:
    import results  # benchmarks/results.py

    if "rows" in out:
        parts = [f"micro-batch {out['micro_batch']} (one text, image, pair micro-batch)"]
        for r in out["rows"]:
            if r["ok"]:
                on = "GPU allocated" if r["device"] == "gpu" else "RSS"
                parts.append(f"{r['preset']} {_checkpointing_label(r)}: state ({on}) {r['state_gb']:.2f} GB, peak "
                             f"{r['peak_gb']:.2f} GB, saved for backward by the largest forward "
                             f"{r['saved_activation_gb']:.3f} GB")
            else:
                parts.append(f"{r['preset']} {_checkpointing_label(r)}: failed")
        results.add_row("benchmarks/memory.py presets", "; ".join(parts), PACKAGES)
    else:
        best = out["probes"].get(str(out["largest_scale"]), {})
        host = (f"; host peak {best['host_peak_gb']:.1f} GB = {best['host_peak_bytes_per_param']:.1f} B per parameter"
                f"{_offloaded_text(best)}{_pinned_text(best)}" if best.get("ok") else "")
        pinning = "pageable"
        if out["pin_memory"]:  # what the probe's torch did, which the request does not decide alone
            exact = best.get("pinned_exact_size", out["exact_pinned"])
            pinning = "exact-size pinned" if exact else "pinned (torch's rounding)"
            if out["exact_pinned"] and not exact:
                pinning += " though exact sizes were asked for: this torch lacks the setting"
        pinning = f"bf16, {pinning} host memory"
        if best.get("device") == "cpu":
            pinning = f"{'bf16' if out.get('bf16') else 'fp32'} on the CPU, nothing pinned"
        results.add_row("benchmarks/memory.py --largest", (
            f"ZeRO-3 + {out['offload']} offload of the optimizer"
            f"{' and the parameters' if out['offload_params'] else ', parameters on the device'} ({pinning}), "
            f"activation checkpointing, micro-batch "
            f"{out['micro_batch']}: largest {out['family']} depth-scale x"
            f"{out['largest_scale']} = {_count(out['largest_parameters'])} parameters trains one step; host "
            f"bound {_count(out['bound_parameters'])} ({out['host_memory_gib']:.0f} GiB / {out['bytes_per_param']:g} B "
            f"per param): {out['fraction_of_bound']:.1%} of it{host}"), PACKAGES)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(RESULT + json.dumps(run_probe(Probe(**json.loads(args.probe)))), flush=True)
        return 0
    if args.count:
        print(RESULT + json.dumps(count_parameters(json.loads(args.count))), flush=True)
        return 0
    if args.largest:
        out = find_largest(args)
        print(f"largest: {_count(out['largest_parameters'])} parameters ({out['fraction_of_bound']:.1%} of the "
              f"{_count(out['bound_parameters'])} host-memory bound)")
    else:
        out = {"micro_batch": args.micro_batch,
               "rows": presets_table(args.presets, args.micro_batch, args.timeout, args.checkpointed_layers)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.record:
        record(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
