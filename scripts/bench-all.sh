#!/usr/bin/env bash
# Every engine benchmark of docs/BENCHMARKS.md in one run, on this machine, beside llama.cpp's own
# tools built from the same source. Usage: [PART=single|serving] scripts/bench-all.sh [OUT_FILE]
# (make bench runs it all).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="$ROOT/gpu-host/engine/build"
OUT="${1:-/dev/stdout}"
THREADS="${THREADS:-$(nproc)}"
run() {
  echo "\$ $*" | sed "s|$ROOT/||g"
  "$@" 2>&1 | grep -v '^\[bench\]' | sed "s|$ROOT/||g" || echo "(exit status $?)"
  echo
}
PART="${PART:-all}"
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo
  if [[ "$PART" == all || "$PART" == single ]]; then
  run "$B/pkv-engine" bench --threads "$THREADS" --repetitions 5 --llama-bench "$B/bin/llama-bench"
  fi
  if [[ "$PART" == all || "$PART" == serving ]]; then
  run "$B/pkv-engine" bench --sessions 1,4,16,64 --prompt-len 4096 --threads "$THREADS" --llama-batched-bench "$B/bin/llama-batched-bench"
  run "$B/pkv-engine" bench --pool-fit 1 --prompt-len 8192 --kv-pool-bytes 1073741824 --threads "$THREADS"
  # 32k tokens exceed the embedded model's 8k context: a random-weight GGUF of its exact shape
  RANDOM_MODEL="$ROOT/.cache/smollm2-shape-32k.gguf"
  [[ -f "$RANDOM_MODEL" ]] || "$B/pkv-make-gguf" --preset smollm2-135m --type q4_1 --ctx 40000 --tied \
      --vocab-from "$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$RANDOM_MODEL" >/dev/null
  run "$B/pkv-engine" bench --prefill-memory 2048,8192 --chunk-size 1024 --threads "$THREADS"
  run "$B/pkv-engine" bench --prefill-memory 2048,8192,32768 --chunk-size 1024 --model "$RANDOM_MODEL" --threads "$THREADS"
  run "$B/pkv-engine" bench --prefill-memory 2048,8192 --chunk-size 0 --model "$RANDOM_MODEL" --threads "$THREADS"
  fi
} | tee "$OUT"
