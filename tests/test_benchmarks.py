"""The performance benchmarks measure what they claim.

* The baseline of benchmarks/train_step.py (transformers + timm + DDP, the reference's way) computes
  the same model: loaded with an XFM's weights it gives the same losses on every micro-batch kind,
  so the throughput ratio compares two implementations of one computation.
* benchmarks/train_step.py runs end to end at tiny size on CPU (as every session does) and reports
  consistent figures for both implementations, every case, with and without the loader; its
  profiles (benchmarks/profile_step.py) charge every traced microsecond once, to the code that
  asked for it.
* benchmarks/memory.py: activation checkpointing really shrinks what the forward keeps for backward,
  a one-step probe with ZeRO-3 + CPU offload trains, and the search for the largest model stops at
  the first size that does not fit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "model")]
from engine_fixtures import NEEDS_ASYNC_IO, async_io_builds  # noqa: E402
from model_fixtures import batches, relative_error, tiny_config  # noqa: E402

from xfm_scale import build_model  # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_script(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.unit
def test_the_baseline_computes_the_same_losses_as_xfm():
    from baseline_xfm import BaselineXFM, load_xfm_state

    cfg = tiny_config()
    torch.manual_seed(0)
    ours = build_model(cfg)
    baseline = BaselineXFM(cfg)
    load_xfm_state(baseline, ours.state_dict())
    padding_rows = cfg.padded_vocab_size(1) - cfg.text.vocab_size  # word embedding + 2 MLM biases
    assert (sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in baseline.parameters())
            == padding_rows * (cfg.text.hidden_size + 2))
    for batch in batches(cfg):
        torch.manual_seed(1)  # the ITM negatives are drawn from the default generator
        expected = ours(batch).losses
        torch.manual_seed(1)
        got = baseline(batch)
        assert set(got) == set(expected), batch.modality
        for name in expected:
            assert relative_error(got[name], expected[name]) < 1e-5, (batch.modality, name, got[name], expected[name])


@pytest.mark.unit
def test_the_baseline_takes_an_optimizer_step_over_accumulated_micro_batches():
    import torch.distributed as dist
    from baseline_xfm import BaselineTrainer

    from xfm_scale.config.run import OptimSection

    cfg = tiny_config()
    build_model(cfg)  # a world of one (DDP needs a process group)
    assert dist.is_initialized()
    trainer = BaselineTrainer(cfg, OptimSection(lr=1e-3, warmup_steps=0), torch.device("cpu"), bf16=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    text, image, _ = batches(cfg)
    trainer.train_step([text, image])
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert {"text", "vision", "text_mlm_head"} <= changed  # both micro-batches' gradients were applied
    assert "fusion" not in changed and "itm_head" not in changed  # no pair: untouched (no decay on zero grads)


@pytest.mark.unit
def test_train_step_benchmark_reports_both_implementations(tmp_path):
    out = tmp_path / "train_step.json"
    proc = run_script(["benchmarks/train_step.py", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                       "--micro-steps", "2", "--micro-batch", "8", "--zero-stage", "2", "--json", str(out),
                       "--work-dir", str(tmp_path), "--profile", str(tmp_path / "profile")])
    result = json.loads(out.read_text())
    assert result["zero_stage"] == 2  # the engine it timed, not only the flag
    rows = {(r["implementation"], r["case"], r["loader"]): r for r in result["rows"]}
    assert len(rows) == 16  # 2 implementations x 4 cases x with/without the loader
    for (impl, case, loader), r in rows.items():
        assert r["samples_per_s"] > 0 and r["tflops"] > 0, (impl, case, loader)
        assert 0 < r["mfu"] < 1, (impl, case, loader, r["mfu"])
        # one implementation, one case: the same steps, so the same FLOPs whatever the speed
        assert r["tflops"] * r["step_s"] == pytest.approx(rows[("xfm_scale", case, loader)]["tflops"]
                                                          * rows[("xfm_scale", case, loader)]["step_s"], rel=1e-6)
    for key, ratio in result["ratio_vs_baseline"].items():
        case, _, loader = key.partition("+")
        lo = bool(loader)
        assert ratio == pytest.approx(rows[("xfm_scale", case, lo)]["samples_per_s"]
                                      / rows[("baseline", case, lo)]["samples_per_s"])
    assert result["peak_tflops"] > 0 and "measured matmul peak" in result["peak_source"]
    assert "ratio xfm_scale / baseline" in proc.stdout
    # --profile: one traced step per implementation and case, its host time shared out by owner
    assert set(result["profile"]) == {f"{impl}/{case}" for impl in ("xfm_scale", "baseline")
                                      for case in ("text", "image", "pair", "blend")}
    for key, summary in result["profile"].items():
        impl, case = key.split("/")
        assert (tmp_path / "profile" / f"{impl}_{case}_rank0.json.gz").stat().st_size > 0
        assert summary["host_total_s"] == pytest.approx(summary["wall_s"], rel=0.1), key  # nothing counted twice
        owners = [r["owner"] for r in summary["host"]]
        assert any(o.startswith("deepspeed/") for o in owners) == (impl == "xfm_scale"), (key, owners)
        assert summary["device"] == []  # no GPU here
    assert "xfm_scale blend: host time by owner" in proc.stdout


@pytest.mark.unit
def test_train_step_benchmark_times_length_grouping_on_texts_of_natural_length(tmp_path, monkeypatch):
    """--text-words draws text lengths log-normally; --length-group-size turns grouping on; --cases
    picks the cases. A/B of two runs: grouped, the text micro-batches hold less padding and cost
    fewer FLOPs per sample, and the recorded row says what was run."""
    import results
    import train_step

    figures = {}
    for group in (0, 32):
        out = tmp_path / f"group{group}.json"
        run_script(["benchmarks/train_step.py", "--preset", "tiny", "--cases", "text", "--no-baseline",
                    "--text-words", "10", "0.8", "--length-group-size", str(group), "--length-group-window", "8",
                    "--steps", "2", "--warmup", "1", "--micro-steps", "2", "--zero-stage", "2",
                    "--json", str(out), "--work-dir", str(tmp_path / f"work{group}")])
        figures[group] = json.loads(out.read_text())
    plain, grouped = ({(r["case"], r["loader"]): r for r in figures[g]["rows"]} for g in (0, 32))
    assert sorted(plain) == sorted(grouped) == [("text", False), ("text", True)]
    flops_per_sample = lambda r: r["tflops"] / r["samples_per_s"]  # noqa: E731  (both per second)
    for key in plain:
        assert 0.3 < plain[key]["text_padding"] and grouped[key]["text_padding"] < plain[key]["text_padding"] - 0.2
        assert flops_per_sample(grouped[key]) < 0.95 * flops_per_sample(plain[key])  # the MLM head is not padded
    assert (figures[32]["length_group_size"], figures[32]["text_words"]) == (32, [10, 0.8])
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    train_step.record(figures[32])
    row = (tmp_path / "RESULTS.md").read_text().splitlines()[-1]
    assert "texts of log-normal word counts (median 10, sigma 0.8), length grouping 32 x window 8" in row
    assert f"text padding {grouped[('text', False)]['text_padding']:.1%}" in row and "blend" not in row


@pytest.mark.unit
@pytest.mark.parametrize("with_loader", [False, True])
def test_timed_steps_alternate_between_the_implementations_unless_the_loader_is_timed(with_loader):
    """Without the loader: each implementation warms up, then their timed steps take turns (a
    drift in the machine's speed reaches both alike). With it, each runs alone (alternating, a
    loader's workers would prepare its next step during the other's step, hiding its cost). Each
    implementation runs on its own copy of the same steps."""
    import train_step

    class Micro:  # a stand-in micro-batch: its step index and size (no text)
        text_mask_BL = None

        def __init__(self, step: int):
            self.step, self.size = step, 3

    calls = []
    step_fns = {name: (lambda batches, name=name: calls.append((name, batches[0].step))) for name in ("ours", "base")}
    steps = {name: iter([[Micro(i), Micro(i)] for i in range(10)]) for name in step_fns}
    timings = train_step.time_steps(step_fns, steps, warmup=2, count=3, with_loader=with_loader,
                                    device=torch.device("cpu"), flops_of=lambda b: 5.0, dp=4)
    if with_loader:
        assert calls == [("ours", i) for i in range(5)] + [("base", i) for i in range(5)]
    else:
        assert calls == [("ours", 0), ("ours", 1), ("base", 0), ("base", 1),
                         ("ours", 2), ("base", 2), ("ours", 3), ("base", 3), ("ours", 4), ("base", 4)]
    for timing in timings.values():
        assert timing.samples == 3 * 2 * 3 * 4  # steps x micro-batches x size x data-parallel ranks
        assert timing.flops == 3 * 2 * 5.0 and timing.seconds > 0


@pytest.mark.unit
def test_the_profile_tables_charge_each_microsecond_to_the_code_that_asked_for_it():
    from profile_step import BACKWARD, summarise_trace

    def span(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}

    trainer, forward = "xfm_scale/trainer.py(270): train_step", "deepspeed/runtime/engine.py(2100): forward"
    hook = "deepspeed/runtime/zero/stage_1_and_2.py(1414): reduce_hook"
    events = [
        span("python_function", trainer, 0, 100_000),
        # record_function's span starts inside its __enter__ frame and outlives it: must not count
        span("python_function", "torch/autograd/profiler.py(921): __enter__", 200, 500),
        span("user_annotation", "profiled step", 600, 99_000),
        span("python_function", forward, 5_000, 40_000),
        span("cpu_op", "aten::linear", 10_000, 20_000),
        span("cpu_op", "aten::mm", 12_000, 15_000),
        span("cuda_runtime", "cudaLaunchKernel", 13_000, 2_000, correlation=7),
        span("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 50_000, 30_000),
        span("cpu_op", "aten::mm", 52_000, 10_000),
        span("python_function", hook, 65_000, 10_000),
        span("cpu_op", "aten::copy_", 66_000, 8_000),
        span("kernel", "sm90_gemm", 14_000, 25_000, tid=7, correlation=7),
        span("kernel", "stray_kernel", 60_000, 1_000, tid=7, correlation=99),
    ]
    summary = summarise_trace(events)
    host = {r["owner"]: r for r in summary["host"]}
    assert summary["wall_s"] == pytest.approx(0.099) and summary["host_total_s"] == pytest.approx(0.1)
    assert host[trainer]["seconds"] == pytest.approx(0.030)  # its Python (with the unmarked __enter__): 100 - 40 - 30 ms
    assert host[forward]["seconds"] == pytest.approx(0.040)
    assert dict(map(tuple, host[forward]["operators"])) == pytest.approx({"aten::linear": 0.020, "Python": 0.020})
    assert host[BACKWARD]["seconds"] == pytest.approx(0.020)  # the engine's own op and the mm in it
    assert dict(map(tuple, host[hook]["operators"])) == pytest.approx({"aten::copy_": 0.008, "Python": 0.002})
    device = {r["owner"]: r for r in summary["device"]}
    assert device[forward]["operators"] == [["aten::linear", pytest.approx(0.025)]]  # launched under it
    assert device["unknown launch"]["seconds"] == pytest.approx(0.001)
    assert summary["device_total_s"] == pytest.approx(0.026)


@pytest.mark.unit
def test_memory_probes_show_what_activation_checkpointing_saves(tmp_path):
    out = tmp_path / "memory.json"
    run_script(["benchmarks/memory.py", "--presets", "tiny", "--micro-batch", "8", "--checkpointed-layers", "1",
                "--json", str(out)])
    plain, checkpointed, first_block = json.loads(out.read_text())["rows"]
    assert plain["ok"] and checkpointed["ok"] and first_block["ok"], (plain, checkpointed, first_block)
    assert (plain["activation_checkpointing"], checkpointed["activation_checkpointing"]) == (False, True)
    assert first_block["checkpointed_layers"] == 1
    assert plain["parameters"] == checkpointed["parameters"]
    # checkpointing keeps only each block's input: far less saved for backward by the pair forward;
    # checkpointing one block of two keeps about half of what the blocks saved
    assert 0 < checkpointed["saved_activation_gb"] < first_block["saved_activation_gb"] < plain["saved_activation_gb"]
    assert checkpointed["saved_activation_gb"] < 0.4 * plain["saved_activation_gb"]
    for r in (plain, checkpointed, first_block):
        assert r["peak_gb"] >= r["state_gb"] > 0 and r["loss"] == r["loss"]  # a finite step was taken


@pytest.mark.unit
@pytest.mark.parametrize("offload_params", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_largest_model_probe_trains_offloaded(tmp_path, offload_params, precision):
    """--largest end to end on CPU, one probe (the tiny family at twice its depth; the search over
    sizes is the next test's): the probe trains one step with the optimizer state offloaded to
    DeepSpeedCPUAdam in its own process, and the size that trained is reported with the bound.
    What the offload holds in host memory is DeepSpeed's layout, per parameter: master weights
    4 B, Adam moments 8 B, fp32 gradients 4 B, gradient partitions in the weights' dtype (bf16 as
    on a GPU: 2 B; fp32: 4 B), and the parameters only with --offload-params (ds_configs/
    zero3_offload.json against zero3_offload_optimizer.json): 18 against 20 B per parameter in bf16."""
    out = tmp_path / "largest.json"
    run_script(["benchmarks/memory.py", "--largest", "--family", "tiny", "--min-scale", "2", "--max-scale", "2",
                "--json", str(out), *(["--offload-params"] if offload_params else []),
                *(["--bf16"] if precision == "bf16" else [])], timeout=900)
    result = json.loads(out.read_text())
    (probe,) = result["probes"].values()
    assert probe["ok"] and probe["optimizer"] == "DeepSpeedCPUAdam" and probe["optimizer_offloaded"], probe
    assert probe["parameters_offloaded"] is offload_params and result["offload_params"] is offload_params
    assert result["largest_scale"] == 2.0 and result["largest_parameters"] == probe["parameters"]
    assert result["bound_parameters"] == int(result["host_memory_gib"] * 2 ** 30 / 16)
    weight_bytes = 2 if precision == "bf16" else 4
    per_parameter = {kind: n / probe["parameters"] for kind, n in probe["offloaded_state_bytes"].items()}
    assert per_parameter == {"master weights": 4, "Adam moments": 8, "fp32 gradients": 4,
                             "gradient partitions": weight_bytes,
                             "parameters": weight_bytes if offload_params else 0}, per_parameter


@pytest.mark.unit
@pytest.mark.skipif(not async_io_builds(), reason=NEEDS_ASYNC_IO)
def test_largest_model_probe_trains_with_nvme_offload(tmp_path):
    """--largest --offload nvme on CPU (a folder as the drive), one probe: the step trains with the
    optimizer's large sub-group swapped to the folder."""
    out = tmp_path / "largest.json"
    run_script(["benchmarks/memory.py", "--largest", "--family", "tiny", "--min-scale", "2", "--max-scale", "2",
                "--offload", "nvme", "--nvme-path", str(tmp_path / "swap"), "--json", str(out)], timeout=900)
    (probe,) = json.loads(out.read_text())["probes"].values()
    assert probe["ok"] and probe["optimizer_swapped_sub_groups"] >= 1 and probe["loss"] == probe["loss"], probe
    assert any((tmp_path / "swap").rglob("*.tensor.swp"))


@pytest.mark.unit
def test_largest_that_fits_is_a_binary_search_for_the_last_fitting_size():
    from memory import largest_that_fits

    sizes = list(range(1, 17))
    for limit in (0, 1, 7, 16):
        seen = []
        best, tried = largest_that_fits(sizes, lambda s: seen.append(s) or s <= limit)
        assert best == (limit or None)
        assert [s for s, _ in tried] == seen and len(seen) <= 5  # log2(16) + 1 probes, not 16


@pytest.mark.unit
def test_padding_benchmark_counts_what_length_grouping_saves(tmp_path):
    """benchmarks/data.py --only padding: on the generated corpus (captions of ~10 words, texts of
    ~40), grouped micro-batches pad less at the slowest rank's length and cost fewer FLOPs. The base
    preset's text caps (the tiny preset caps captions at 16 tokens: no room to differ)."""
    out = tmp_path / "padding.json"
    run_script(["benchmarks/data.py", "--only", "padding", "--no-write", "--preset", "base", "--dp-size", "2",
                "--micro-batch-pairs", "8", "--text-micro-batch", "16", "--window", "8",
                "--padding-micro-steps", "40", "--padding-corpus", "1500", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["group_size"] == 32  # lcm(8, 16) x DP 2
    plain, grouped = figures["plain"]["kinds"], figures["grouped"]["kinds"]
    assert sorted(plain) == sorted(grouped) == ["pair", "text"]
    for kind in ("pair", "text"):
        a, b = plain[kind], grouped[kind]
        assert 0 <= b["slowest_padding"] < a["slowest_padding"] - 0.1, (kind, a, b)
        for x in (a, b):  # each rank pads to its own longest, rounded up; all wait for the slowest
            assert x["unrounded_padding"] <= x["slowest_padding"] and x["own_padding"] <= x["slowest_padding"]
        assert b["tflops_per_micro_batch"] < a["tflops_per_micro_batch"]
    assert figures["grouped"]["window_seconds"] >= 0 and figures["plain"]["window_seconds"] is None
