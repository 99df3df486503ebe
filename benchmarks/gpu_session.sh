#!/usr/bin/env bash
# What a session with a lent GPU runs there, one stage per device call (a call may take 10 minutes):
#
#   ../shared/tools/gpu-wheels.sh                         # here, once: fills .whl/ (megatron-core,
#                                                         # deepspeed, webdataset; the GPU image has torch,
#                                                         # transformers, timm, tokenizers)
#   device run, carry [".whl"]:  bash benchmarks/gpu_session.sh STAGE
#
# STAGE: tests       the GPU tests (fused SDPA kernels in bf16, inductor-compiled blocks against eager, bf16 ZeRO-3
#                    and ZeRO-2 steps on NCCL (ZeRO-2 also with compiled blocks), CPU offload,
#                    bf16 runs that save, resume and export); pytest options follow. Together they likely pass
#                    one call's 10 minutes (inductor compiles, three baseline runs, the cpu_adam build), so split
#                    them over three calls: `tests -k "fused or inductor"`, `tests -k nccl`,
#                    `tests -k "offload or bf16_run"`; the whole log lands in $OUT/pytest.log
#        train_step  base preset against the baseline, bf16, loader in the loop and not (benchmarks/train_step.py);
#                    ZeRO-3 by default, `train_step --zero-stage 2` for ZeRO-2 (parameters whole, no gathers),
#                    `train_step --zero-stage 2 --compile-blocks` with the encoder blocks compiled by inductor;
#                    add `--profile /tmp/xfm_profile` to profile one step per case after the timing (the time by
#                    owner lands in the JSON; the blended step's two traces are copied to $OUT for Perfetto);
#                    length grouping's A/B on texts of natural length, one call each:
#                    `train_step --cases text pair --text-words 40 0.8 [--length-group-size 768]` (768: a
#                    multiple of both global micro-batches, 96 pairs and 256 texts)
#        memory      state, step peak and saved activations of base and large, checkpointing off/on
#        largest     the largest depth-scaled giant that trains one step with ZeRO-3 + CPU offload of the
#                    optimizer, the bf16 parameters on the GPU (18 B per parameter of host memory); by default
#                    one probe, x1.75 = 6.52B parameters (the target is >= 6.4B; x1.7 = 6.30B, x1.8 = 6.73B,
#                    x1.9 = 7.05B), as a probe takes minutes: choose others per call, e.g.
#                    largest --min-scale 1.9 --max-scale 1.9; `largest --offload-params` offloads the
#                    parameters too (20 B per parameter), `largest --offload-params --torch-pinned-rounding`
#                    is the A/B of exact-size pinned host memory
# Each benchmark stage appends its dated row to benchmarks/RESULTS.md there and copies that file and
# its JSON to $OUT: take the new rows into this checkout's RESULTS.md.
set -euo pipefail
stage=${1:?usage: gpu_session.sh tests|train_step|memory|largest [memory.py options]}
shift
out=${OUT:-/tmp/xfm_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cuda PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The GPU image has its own torch (not this checkout's venv's): every stage prints what it ran with.
python3 -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "deepspeed",
  "megatron-core", "transformers", "timm", "webdataset")))'
# A failing stage still copies its log and RESULTS.md to $OUT, then exits with the stage's status.
status=0
case "$stage" in
  tests) python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_gpu.py "$@" > "$out/pytest.log" 2>&1 \
           || status=$?
         tail -60 "$out/pytest.log" ;;
  train_step) python3 benchmarks/train_step.py --preset base --micro-batch 96 --text-micro-batch 256 \
                --json "$out/train_step_base.json" --record "$@" 2>&1 | tee "$out/train_step.log" || status=$? ;;
  memory) python3 benchmarks/memory.py --presets base large --micro-batch 32 --timeout 240 --json "$out/memory.json" \
            --record "$@" 2>&1 | tee "$out/memory.log" || status=$? ;;
  largest) python3 benchmarks/memory.py --largest --offload cpu --min-scale 1.75 --max-scale 1.75 --scale-step 0.05 \
             --micro-batch 2 --timeout 450 --json "$out/largest.json" --record "$@" 2>&1 | tee "$out/largest.log" \
             || status=$? ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
cp benchmarks/RESULTS.md "$out/RESULTS.md"
# $OUT takes 8 files of 16 MiB at most: of the traces, the blended step's two only
for trace in /tmp/xfm_profile/{xfm_scale,baseline}_blend_rank0.json.gz; do
  [ -f "$trace" ] && cp "$trace" "$out/" || true
done
exit "$status"
