#!/usr/bin/env bash
# GPU step benchmarks (bf16 compute, float32 adapters/optimizer), one JSON line per run.
#   bash benchmarks/gpu_suite.sh vit  OUT.jsonl     ViT-B/16, batch 128, every method
#   bash benchmarks/gpu_suite.sh llama OUT.jsonl    1B-parameter LLaMA shape, batch 4 x 1024 tokens
# PEAK_GFLOPS (default 989000, the H100 SXM bf16 dense spec) sets the reported fraction of peak.
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${1:-vit}
out=${2:-/dev/stdout}
peak=${PEAK_GFLOPS:-989000}
if [ "$suite" = vit ]; then
  for m in frozen lora dora doran full; do
    python3 benchmarks/step.py --model vit-b16 --method $m --batch 128 --dtype bfloat16 \
      --targets query,value --rank 8 --steps 15 --warmup 3 --peak-gflops "$peak" --tag gpu-vit >> "$out" \
      || echo "{\"failed\": \"vit $m\"}" >> "$out"
  done
  python3 benchmarks/step.py --model vit-b16 --method dora --mode merged --batch 128 --dtype bfloat16 \
    --rank 8 --steps 15 --warmup 3 --peak-gflops "$peak" --tag gpu-vit-merged >> "$out"
else
  for m in lora dora doran; do
    python3 benchmarks/step.py --model llama-1b --method $m --batch 4 --seq 1024 --dtype bfloat16 \
      --param-dtype bfloat16 --targets all --rank 16 --alpha 32 --steps 10 --warmup 2 \
      --peak-gflops "$peak" --tag gpu-llama1b >> "$out" || echo "{\"failed\": \"llama $m\"}" >> "$out"
  done
fi
