#!/usr/bin/env bash
# The GPU check: run this once on a machine with CUDA GPUs (e.g. the lent device machine).
# It installs what is missing, then runs, each step timed and logged under $OUT (default runs/gpu_check):
#   1. make test-gpu: the gpu-marked tests (TE + bf16 RL step, CPU-fp32 vs GPU-bf16 log-probs, THD packing,
#      distributed optimizer + exact resume, speculative decoding exactness);
#   2. the demo on CUDA with NCCL (warm start + RL steps with OCC), 1 GPU: steps/s and peak memory;
#   3. the same job under torchrun with DP=2 when there are >= 2 GPUs;
#   4. tools/bench_logprobs.py (T=8192, V=151,936, bf16) against naive log_softmax and megatron's fused CE;
#   5. tools/bench_step.py (regime step-time ratios) on CUDA;
#   6. the SGLang rollout path (export -> engines -> weight sync) when sglang is importable.
# Usage: bash tools/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

log() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$OUT/summary.txt"; }

"$PY" - <<'PYEOF' | tee -a "$OUT/summary.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} × {torch.cuda.get_device_name()}")
PYEOF

if ! "$PY" -c "import megatron_mtp_rl, megatron.core" 2>/dev/null; then
  log "installing the package (megatron-core, deps) with pip"
  "$PY" -m pip install -q -e '.[test]' >"$OUT/pip.log" 2>&1
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

log "1. gpu tests (make test-gpu)"
MTP_RL_TEST_GPU=1 "$PY" -m pytest -q -rs -m gpu tests/gpu 2>&1 | tail -12 | tee -a "$OUT/summary.txt" || true

STEPS=10
[[ $QUICK == 1 ]] && STEPS=3
log "2. the demo on CUDA (NCCL), $STEPS RL steps"
/usr/bin/time -f "%e s wall" "$PY" -m megatron_mtp_rl.cli pretrain --config examples/tiny_cpu/pretrain.yaml \
  --num-steps 300 --save "$OUT/warmstart" --quiet 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
/usr/bin/time -f "%e s wall" "$PY" -m megatron_mtp_rl.cli train --config examples/tiny_cpu/demo.yaml \
  --load "$OUT/warmstart" --finetune --num-steps "$STEPS" --metrics-jsonl "$OUT/tiny.jsonl" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"

if [[ "$NGPU" -ge 2 ]]; then
  log "3. torchrun DP=2"
  "$PY" -m torch.distributed.run --nproc_per_node 2 -m megatron_mtp_rl.train --config examples/tiny_cpu/demo.yaml \
    --load "$OUT/warmstart" --finetune --num-steps 3 --metrics-jsonl "$OUT/dp2.jsonl" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
else
  log "3. skipped: one GPU"
fi

log "2b. steps/s and peak memory of the demo"
"$PY" - "$OUT/tiny.jsonl" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
rows = [r for r in rows if r.get("step", 0) > 0]
t = sum(r["perf/step_time"] for r in rows)
peak = max((r.get("perf/peak_memory_gb", float("nan")) for r in rows), default=float("nan"))
print(f"demo on GPU: {len(rows)} steps, {len(rows) / t:.2f} steps/s, peak memory {peak:.2f} GB")
PYEOF

log "4. bench_logprobs on CUDA (T=8192, V=151936, bf16)"
"$PY" tools/bench_logprobs.py --tokens 8192 --vocab 151936 --dtype bf16 2>&1 | tail -6 | tee -a "$OUT/summary.txt"

log "5. bench_step on CUDA"
"$PY" tools/bench_step.py --preset tiny-moe --load "$OUT/warmstart" --finetune --rollout-batch-size 64 \
  --global-batch-size 256 --micro-batch-size 64 --seq-length 16 --reps 7 2>&1 | tail -8 | tee -a "$OUT/summary.txt"

if "$PY" -c "import sglang" 2>/dev/null; then
  log "6. SGLang rollout (tiny model exported as HF, 1 engine, 2 RL steps)"
  "$PY" -m megatron_mtp_rl.cli train --config examples/tiny_cpu/demo.yaml --load "$OUT/warmstart" --finetune \
    --num-steps 2 --rollout-engine sglang --rollout-hf-dir "$OUT/hf" --weight-sync-mode disk \
    --sglang-mem-fraction-static 0.3 2>&1 | tail -5 | tee -a "$OUT/summary.txt" || log "SGLang path failed (see above)"
else
  log "6. skipped: sglang not importable"
fi
log "done; summary in $OUT/summary.txt"
