"""Where one training step spends its time, by the code that asked for the work.

torch.profiler's own tables rank operators ("aten::copy_ 1.7 s") but not who called them, and a
lever is chosen by the caller: a copy in DeepSpeed's gradient-norm code and one in our attention
are different problems. :func:`profile_step` records one step with Python stacks, writes the
Chrome trace (open it in https://ui.perfetto.dev) and returns two tables:

* ``host``: CPU time. Every traced event's self time (its duration less its children's) goes to
  its *owner*: the innermost Python frame of DeepSpeed, megatron-core, xfm_scale, transformers,
  timm, the baseline or torch's optimizers/DDP around it. Operators the autograd engine runs in
  backward are owned by "autograd backward", except where a library's Python runs inside it
  (megatron's autograd functions, DeepSpeed's gradient hooks).
* ``device``: GPU kernel, copy and memset time, owned by the owner of the host call that launched
  it (matched on the profiler's correlation id). Empty without a GPU.

Used by ``benchmarks/train_step.py --profile DIR``.
"""
from __future__ import annotations

import gzip
import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch

OWNER_MARKS = ("deepspeed/", "megatron/", "xfm_scale/", "transformers/", "timm/", "baseline_xfm.py",
               "torch/optim/", "torch/nn/parallel/")
"""A Python frame whose name contains one of these owns the work under it (innermost wins)."""
BACKWARD = "autograd backward"
# Not "user_annotation": a record_function span starts inside its own __enter__ frame and outlives
# it, so it does not nest and would be counted twice.
HOST_CATEGORIES = {"python_function", "cpu_op", "cuda_runtime", "cuda_driver"}
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
STEP_ANNOTATION = "profiled step"


def profile_step(step_fn, trace_path: Path) -> dict:
    """Run ``step_fn()`` once under the profiler; write the trace (gzipped) to ``trace_path``;
    return :func:`summarise_trace`'s tables."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, with_stack=True) as prof:
        with torch.profiler.record_function(STEP_ANNOTATION):
            step_fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    plain = trace_path.with_suffix("")  # torch writes plain JSON; keep the gzipped copy only
    prof.export_chrome_trace(str(plain))
    del prof  # its events can take gigabytes at base size: not held while the trace is read
    with open(plain, "rb") as src, gzip.open(trace_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with open(plain) as f:
        events = json.load(f)["traceEvents"]
    plain.unlink()
    return summarise_trace(events)


def summarise_trace(events: list[dict]) -> dict:
    """The tables of one step's trace events (Chrome trace ``traceEvents``), the step's wall time and
    the host and device totals the tables share out (host: over all traced threads)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    step = next((e for e in spans if e["name"] == STEP_ANNOTATION), None)
    host, launches = _host_time(spans)
    device: dict[tuple[str, str], float] = defaultdict(float)
    for e in spans:
        if e.get("cat") in DEVICE_CATEGORIES:
            owner, op = launches.get(e.get("args", {}).get("correlation"), ("unknown launch", e["name"]))
            device[(owner, op)] += e["dur"] / 1e6
    return {"wall_s": step["dur"] / 1e6 if step else None, "host_total_s": sum(host.values()),
            "device_total_s": sum(device.values()), "host": owner_table(host), "device": owner_table(device)}


def _host_time(spans: list[dict]):
    """Self time of every host event by (owner, operator), and the (owner, operator) of every launch
    (correlation id -> the pair) for the device table."""
    time: dict[tuple[str, str], float] = defaultdict(float)
    launches: dict[int, tuple[str, str]] = {}
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in spans:
        if e.get("cat") in HOST_CATEGORIES:
            by_thread[(e["pid"], e["tid"])].append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[dict, tuple[str, str]]] = []  # (event, its (owner, operator))
        children_time: dict[int, float] = defaultdict(float)

        def close(until: float) -> None:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= until:
                done, key = stack.pop()
                time[key] += max(done["dur"] - children_time.pop(id(done), 0.0), 0.0) / 1e6

        for e in thread:
            close(e["ts"])
            if stack:
                children_time[id(stack[-1][0])] += e["dur"]
            frames = [s for s, _ in stack] + [e]
            key = (_owner(frames), _operator(frames))
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]] = key
            stack.append((e, key))
        close(float("inf"))
    return time, launches


def _owner(stack: list[dict]) -> str:
    """The innermost marked Python frame; work the autograd engine runs in backward (on CPU in the
    caller's thread, under DeepSpeed's ``backward``) belongs to backward, not to that caller."""
    for e in reversed(stack):
        if e.get("cat") == "python_function" and any(mark in e["name"] for mark in OWNER_MARKS):
            return e["name"]
        if e.get("cat") == "cpu_op" and e["name"].startswith("autograd::engine::evaluate_function"):
            return BACKWARD
    frames = [e["name"] for e in stack if e.get("cat") == "python_function"]
    return frames[-1] if frames else BACKWARD


def _operator(stack: list[dict]) -> str:
    """The outermost operator under the innermost Python frame (``aten::linear`` rather than the
    ``aten::mm`` in it), or "Python" for the interpreter's own time in that frame."""
    frame_at = max((i for i, e in enumerate(stack) if e.get("cat") == "python_function"), default=-1)
    return next((e["name"] for e in stack[frame_at + 1:] if e.get("cat") == "cpu_op"), "Python")


def owner_table(time: dict[tuple[str, str], float], top: int = 15) -> list[dict]:
    """Owners by total seconds, heaviest first: [{"owner", "seconds", "operators": [[op, s], ...]}]."""
    owners: dict[str, dict[str, float]] = defaultdict(dict)
    for (owner, op), seconds in time.items():
        owners[owner][op] = owners[owner].get(op, 0.0) + seconds
    rows = [{"owner": owner, "seconds": sum(ops.values()),
             "operators": sorted(([op, s] for op, s in ops.items()), key=lambda r: -r[1])[:3]}
            for owner, ops in owners.items()]
    return sorted(rows, key=lambda r: -r["seconds"])[:top]


def format_table(title: str, summary: dict, kind: str = "host", top: int = 8) -> str:
    rows = summary[kind][:top]
    if not rows:
        return ""
    wall = f" (step {summary['wall_s']:.3f} s)" if summary.get("wall_s") else ""
    lines = [f"{title}: {kind} time by owner{wall}"]
    for r in rows:
        ops = ", ".join(f"{op} {s:.3f}" for op, s in r["operators"])
        lines.append(f"  {r['seconds']:8.3f} s  {r['owner']}  [{ops}]")
    return "\n".join(lines)
