#!/usr/bin/env bash
# The GPU benchmark of docs/BENCHMARKS.md for a CUDA box with nvcc, cmake and ninja but no
# internet: nothing here runs npm or downloads anything. docs/GPU.md says how to lend a box,
# what to carry there and how long each phase takes.
#
#   scripts/gpu-bench.sh pack          here, before going: llama.cpp's source (without its git
#                                      history, models and docs) as .cache/gpu-carry/ (~8 MB)
#   scripts/gpu-bench.sh build         there: ggml + engine with CUDA (CUDA_ARCH, default 90),
#                                      llama.cpp's reference tools, random-weight GGUFs
#   scripts/gpu-bench.sh run [FILE]    there: every benchmark row beside llama.cpp's own tools
#   scripts/gpu-bench.sh test          there, if time is left: the engine's ctest on that build
#   scripts/gpu-bench.sh all [FILE]    build, then run, in one call (FILE gets both): DEADLINE_S
#                                      counts from the script's start, so rows the build left no
#                                      time for say so
#
# GPU=0 rehearses all of it on the CPU at a tiny shape through the same code paths: every size
# scaled so that bytes are 1/1024 of the GPU run's (a 1 KiB-per-token model instead of 128 KiB,
# 1k prompts instead of 8k, a 139 MiB "device" instead of 139 GiB), the same session counts.
# Environment: GPU (1), CUDA_ARCH (90), JOBS (nproc), THREADS (nproc), BUILD_DIR, MODELS_DIR,
# TESTS (auto|0|1: build pkv-tests), DEADLINE_S (run's time budget, 540), ROW_TIMEOUT (240),
# DEVICE_MIB (memory the FullKV rows may plan with; GPU: nvidia-smi's total).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
GPU="${GPU:-1}"
JOBS="${JOBS:-$(nproc)}"
THREADS="${THREADS:-$(nproc)}"
CUDA_ARCH="${CUDA_ARCH:-90}"
LLAMA_DIR="$ROOT/gpu-host/engine/.deps/llama.cpp"
CARRY="$ROOT/.cache/gpu-carry"
LLAMA_TAR="$CARRY/llama.cpp-src.tar.gz"

# One model per mode: the GPU run's Llama-3.1-8B and the rehearsal's tiny shape with every
# matrix 256 wide, so that Q4_K_M gives it the same Q4_K/Q6_K tensors the 8B gets.
# KV_PER_TOKEN: f16 K and V bytes per token over all layers (layers x kv_heads x head_dim x 4).
if [[ "$GPU" == 1 ]]; then
  MODE="GPU (CUDA, sm_$CUDA_ARCH)"
  BUILD_DIR="${BUILD_DIR:-$ROOT/gpu-host/engine/build-cuda}"
  MODELS_DIR="${MODELS_DIR:-$ROOT/.cache/gpu-models}"
  MODEL_NAME="llama3.1-8b-random"
  MAKE_GGUF_ARGS=(--preset llama3-8b --rope-freqs --ctx 131072 --vocab 128256)
  KV_PER_TOKEN=$((32 * 8 * 128 * 4))
  DEVICE=gpu
  REPS=3
  PREFILL=512,8192
  DEPTH_MID=8192
  DEPTH_LONG=32768
  SESSIONS=(1 16 64 256)
  SESSION_PROMPT=8192
  POOL_PROMPT=32768
  POOL_BYTES=$((40 << 30))
  POOL_LABEL="40 GiB"
else
  MODE="CPU rehearsal (GPU=0, tiny shape)"
  BUILD_DIR="${BUILD_DIR:-$ROOT/gpu-host/engine/build-gpu-rehearsal}"
  MODELS_DIR="${MODELS_DIR:-$ROOT/.cache/gpu-rehearsal-models}"
  MODEL_NAME="tiny256-random"
  MAKE_GGUF_ARGS=(--preset tiny --embd 256 --heads 4 --kv-heads 2 --ff 512 --rope-freqs --ctx 16384 --vocab 2048)
  KV_PER_TOKEN=$((2 * 2 * 64 * 4))
  DEVICE=cpu
  REPS=2
  PREFILL=64,1024
  DEPTH_MID=1024
  DEPTH_LONG=4096
  SESSIONS=(1 16 64 256)
  SESSION_PROMPT=1024
  POOL_PROMPT=4096
  POOL_BYTES=$((40 << 20))
  POOL_LABEL="40 MiB"
fi
BUDGETS=128,512
DECODE_TOKENS=32
MODEL="$MODELS_DIR/$MODEL_NAME.Q4_K_M.gguf"
PKV="$BUILD_DIR/pkv-engine"
BIN="$BUILD_DIR/bin"

say() { echo "[gpu-bench] $*" | sed "s|$ROOT/||g"; }
die() {
  say "error: $*" >&2
  exit 1
}
elapsed() { printf '%dm%02ds' $((($1) / 60)) $((($1) % 60)); }

# ---------------------------------------------------------------------------------------------
# pack (here): what the box needs of llama.cpp, without what only its own tests, docs and
# converters use. The box has no npm, so scripts/fetch-llama.sh cannot run there.
cmd_pack() {
  [[ -f "$LLAMA_DIR/CMakeLists.txt" ]] || die "no llama.cpp at $LLAMA_DIR: run scripts/fetch-llama.sh first"
  mkdir -p "$CARRY"
  local ex=()
  for d in .git models docs media benches tests examples pocs app gguf-py conversion tools/ui; do
    ex+=(--exclude="llama.cpp/$d")
  done
  tar -C "$(dirname "$LLAMA_DIR")" -czf "$LLAMA_TAR.tmp" "${ex[@]}" llama.cpp
  mv "$LLAMA_TAR.tmp" "$LLAMA_TAR"
  {
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted files $(git status --porcelain 2>/dev/null | wc -l)"
    echo "llama.cpp $(cat "$LLAMA_DIR/.pkv-version" 2>/dev/null || echo unknown) (node-llama-cpp)"
    echo "packed $(date -u +%Y-%m-%dT%H:%MZ)"
  } >"$CARRY/SOURCE"
  say "wrote $LLAMA_TAR ($(du -h "$LLAMA_TAR" | cut -f1)); carry [\".cache/gpu-carry\"]"
}

# The checkout if it is there (here, or carried), else the packed source from `pack`.
ensure_llama() {
  [[ -f "$LLAMA_DIR/CMakeLists.txt" ]] && return 0
  [[ -f "$LLAMA_TAR" ]] || die "no llama.cpp: neither $LLAMA_DIR nor $LLAMA_TAR (run 'scripts/gpu-bench.sh pack' here and carry .cache/gpu-carry)"
  say "unpacking $LLAMA_TAR into $LLAMA_DIR"
  mkdir -p "$(dirname "$LLAMA_DIR")"
  tar -C "$(dirname "$LLAMA_DIR")" -xzf "$LLAMA_TAR"
}

has_gtest() {
  compgen -G "/usr/include/gtest/gtest.h" >/dev/null || compgen -G "/usr/local/include/gtest/gtest.h" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# build: configure (only when the flags changed), the five binaries, then the models.
cmd_build() {
  local t0=$SECONDS
  ensure_llama
  if [[ "$GPU" == 1 ]] && ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
  [[ "$GPU" != 1 ]] || command -v nvcc >/dev/null || die "GPU=1 needs nvcc on PATH (or GPU=0 to rehearse on the CPU)"
  local tests="${TESTS:-auto}"
  if [[ "$tests" == auto ]]; then
    if has_gtest; then tests=1; else tests=0; fi
  fi
  local flags=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DPKV_WERROR=OFF)
  if [[ "$GPU" == 1 ]]; then
    # PKV_CUDA sets GGML_CUDA (gpu-host/engine/CMakeLists.txt forces it from PKV_CUDA).
    flags+=(-DPKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH")
  else
    flags+=(-DPKV_CUDA=OFF)
  fi
  if [[ "$tests" == 1 ]]; then flags+=(-DPKV_TESTS=ON); else flags+=(-DPKV_TESTS=OFF); fi
  if command -v ccache >/dev/null; then
    export CCACHE_BASEDIR="$ROOT"
    flags+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  fi
  say "mode: $MODE; build dir $BUILD_DIR; $JOBS jobs"
  [[ "$tests" == 1 ]] || say "pkv-tests not built (TESTS=${TESTS:-auto}; GoogleTest headers: $(has_gtest && echo found || echo 'not found'))"
  [[ "$GPU" != 1 ]] || say "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
  mkdir -p "$BUILD_DIR"
  if [[ ! -f "$BUILD_DIR/build.ninja" ]] || ! echo "${flags[*]}" | cmp -s - "$BUILD_DIR/gpu-bench-flags"; then
    say "\$ cmake -S gpu-host/engine -B $BUILD_DIR ${flags[*]}"
    cmake -S gpu-host/engine -B "$BUILD_DIR" "${flags[@]}" >"$BUILD_DIR/gpu-bench-configure.log" 2>&1 ||
      { tail -n 30 "$BUILD_DIR/gpu-bench-configure.log"; die "cmake failed (log: $BUILD_DIR/gpu-bench-configure.log)"; }
    echo "${flags[*]}" >"$BUILD_DIR/gpu-bench-flags"
  fi
  local targets=(pkv-engine pkv-make-gguf llama-bench llama-batched-bench llama-quantize)
  [[ "$tests" != 1 ]] || targets+=(pkv-tests)
  say "\$ ninja -C $BUILD_DIR -j $JOBS ${targets[*]}"
  ninja -C "$BUILD_DIR" -j "$JOBS" "${targets[@]}" >"$BUILD_DIR/gpu-bench-ninja.log" 2>&1 ||
    { grep -E -B2 -A8 'error|FAILED' "$BUILD_DIR/gpu-bench-ninja.log" | head -n 60; die "build failed (log: $BUILD_DIR/gpu-bench-ninja.log)"; }
  say "built in $(elapsed $((SECONDS - t0)))"
  make_model
  say "build phase done in $(elapsed $((SECONDS - t0)))"
}

# pkv-make-gguf writes only f32|f16|q8_0|q4_0|q4_1 matrices; llama-quantize from the same source
# turns its q4_0 file into llama.cpp's own Q4_K_M mix (Q4_K, with Q6_K for output and half of
# attn_v/ffn_down). Random weights: speed and memory do not depend on the values.
make_model() {
  local t0=$SECONDS stamp="$MODEL.args" args="${MAKE_GGUF_ARGS[*]} --type q4_0 | Q4_K_M"
  if [[ -s "$MODEL" && -f "$stamp" && "$(cat "$stamp")" == "$args" ]]; then
    say "model $MODEL exists ($(du -h "$MODEL" | cut -f1)), made by: $args"
    return 0
  fi
  mkdir -p "$MODELS_DIR"
  local raw="$MODELS_DIR/$MODEL_NAME.q4_0.gguf"
  say "disk free in $MODELS_DIR: $(df -h --output=avail "$MODELS_DIR" | tail -n 1 | xargs)"
  say "\$ $BUILD_DIR/pkv-make-gguf ${MAKE_GGUF_ARGS[*]} --type q4_0 --out $raw"
  "$BUILD_DIR/pkv-make-gguf" "${MAKE_GGUF_ARGS[@]}" --type q4_0 --out "$raw" 2>&1 | tail -n 2 | sed "s|$ROOT/||g"
  say "\$ $BIN/llama-quantize --allow-requantize $raw $MODEL Q4_K_M $JOBS"
  "$BIN/llama-quantize" --allow-requantize "$raw" "$MODEL" Q4_K_M "$JOBS" >"$MODELS_DIR/quantize.log" 2>&1 ||
    { tail -n 20 "$MODELS_DIR/quantize.log"; die "llama-quantize failed"; }
  grep -E 'model size|quant size' "$MODELS_DIR/quantize.log" | sed 's/^llama_model_quantize_impl: */  /'
  rm -f "$raw"
  echo "$args" >"$stamp"
  say "model $MODEL ($(du -h "$MODEL" | cut -f1)) in $(elapsed $((SECONDS - t0)))"
}

# ---------------------------------------------------------------------------------------------
# run: every row prints its command, then its output (JSON results as a table, followed by the
# JSON line itself so the numbers stay exact); a row that cannot run says why.
T0=$SECONDS  # the script's start: `all` spends part of the deadline on the build
DEADLINE_S="${DEADLINE_S:-540}"
ROW_TIMEOUT="${ROW_TIMEOUT:-240}"
TMP=""

skip() { echo "(not run: $*)"; echo; }

# row TITLE CMD...: runs CMD under the row timeout and the run's deadline.
row() {
  local title="$1"
  shift
  echo "### $title"
  local left=$((DEADLINE_S - (SECONDS - T0)))
  if ((left < 20)); then
    skip "only ${left}s left of the run's ${DEADLINE_S}s budget (DEADLINE_S)"
    return 0
  fi
  local limit=$((ROW_TIMEOUT < left ? ROW_TIMEOUT : left))
  show "$@"
  local t0=$EPOCHREALTIME rc=0
  timeout --kill-after=10 "$limit" "$@" >"$TMP/out" 2>"$TMP/err" || rc=$?
  # the reference tools the engine ran for this row, as the commands they were
  grep -E '^\[bench\] .*llama-(batched-)?bench' "$TMP/err" | sed -e 's|^\[bench\] |$ |' -e "s|$ROOT/||g" || true
  if grep -q '^{' "$TMP/out" && command -v python3 >/dev/null; then
    python3 "$ROOT/scripts/gpu/json-table.py" <"$TMP/out"
  else
    sed "s|$ROOT/||g" "$TMP/out"
  fi
  if ((rc == 124 || rc == 137)); then
    echo "(timed out after ${limit}s: ROW_TIMEOUT=${ROW_TIMEOUT}, DEADLINE_S=${DEADLINE_S})"
  elif ((rc != 0)); then
    echo "(exit status $rc; stderr:)"
    grep -v '^\[bench\]' "$TMP/err" | tail -n 15 | sed "s|$ROOT/||g"
  fi
  echo "(row took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s)"
  echo
}

# `bench FLAG VALUE` is accepted by this build: unknown options are refused before any model
# is loaded ("error: FLAG: unknown option"), so probing against no model costs nothing.
bench_accepts() {
  local err
  err="$("$PKV" bench "$@" --model /nonexistent/probe.gguf 2>&1 >/dev/null || true)"
  [[ "$err" != *"$1: unknown option"* ]]
}

# A command as it can be pasted back into a shell: arguments with spaces in single quotes.
show() {
  local a out="\$"
  for a in "$@"; do
    if [[ "$a" == *[[:space:]]* ]]; then out+=" '$a'"; else out+=" $a"; fi
  done
  echo "${out//"$ROOT"\//}"
}

# The device memory the FullKV rows may plan with, in MiB.
device_mib() {
  if [[ -n "${DEVICE_MIB:-}" ]]; then
    echo "$DEVICE_MIB"
  elif [[ "$GPU" == 1 ]]; then
    nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ' || echo 0
  else
    echo 139  # the H200's 139 GiB at the rehearsal's 1/1024 scale
  fi
}

cmd_run() {
  local out="${1:-}"
  [[ -x "$PKV" && -x "$BIN/llama-bench" && -x "$BIN/llama-batched-bench" ]] ||
    die "no build at $BUILD_DIR: run 'scripts/gpu-bench.sh build' first (GPU=$GPU)"
  [[ -s "$MODEL" ]] || die "no model $MODEL: run 'scripts/gpu-bench.sh build' first (GPU=$GPU)"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  if [[ -n "$out" ]]; then
    mkdir -p "$(dirname "$out")"
    run_all | tee "$out"
  else
    run_all
  fi
}

run_all() {
  local lb="$BIN/llama-bench -ngl 99"
  local common=(--model "$MODEL" --device "$DEVICE" --threads "$THREADS")
  local kvt=() mem weights_mib
  mem="$(device_mib)"
  weights_mib=$(($(stat -c %s "$MODEL") >> 20))
  echo "# scripts/gpu-bench.sh run — $MODE — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# host: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  if [[ "$GPU" == 1 ]]; then
    echo "# gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
    echo "# nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"
  fi
  local src
  if src="$(git rev-parse --short HEAD 2>/dev/null)"; then
    src="commit $src, $(git status --porcelain -- . 2>/dev/null | wc -l) files uncommitted here"
  else
    src="$(head -n 2 "$CARRY/SOURCE" 2>/dev/null | paste -sd, - || echo unknown) (packed)"
  fi
  echo "# source: $src"
  echo "# model: ${MODEL#"$ROOT"/} ($weights_mib MiB), made by pkv-make-gguf ${MAKE_GGUF_ARGS[*]} --type q4_0, then llama-quantize Q4_K_M"
  echo "# KV per token (f16): $KV_PER_TOKEN bytes; memory for the FullKV rows: $mem MiB (DEVICE_MIB); llama tools: -ngl 99"
  # Flags of issue 15 that this build may not have yet: each row without one says so.
  local layouts=() probe=""
  if bench_accepts --kv-type q8_0; then kvt=(--kv-type q8_0); fi
  if bench_accepts --decode-attention both; then layouts=(--decode-attention both); fi
  probe="--kv-type $([[ ${#kvt[@]} -gt 0 ]] && echo yes || echo no), --decode-attention $([[ ${#layouts[@]} -gt 0 ]] && echo yes || echo no)"

  echo "# threads $THREADS, repetitions $REPS, $DECODE_TOKENS tokens per decode sample, run budget ${DEADLINE_S}s, row limit ${ROW_TIMEOUT}s"
  echo "# this pkv-engine bench accepts: $probe"
  echo

  echo "## Prefill and single-session decode vs llama-bench (median of $REPS; PyramidKV forked from the FullKV prefill)"
  echo
  row "prefill ${PREFILL//,/ and }; decode at depth 0 and $DEPTH_MID; PyramidKV@${BUDGETS//,/, @} at $DEPTH_MID" \
    "$PKV" bench "${common[@]}" --repetitions "$REPS" --decode-tokens "$DECODE_TOKENS" --prefill "$PREFILL" \
    --depths "0,$DEPTH_MID" --budgets "$BUDGETS" --budget-depth "$DEPTH_MID" --llama-bench "$lb" --json
  row "decode at depth $DEPTH_LONG; PyramidKV@${BUDGETS//,/, @} at $DEPTH_LONG (prefill ${PREFILL%%,*} again: the bench needs one)" \
    "$PKV" bench "${common[@]}" --repetitions "$REPS" --decode-tokens "$DECODE_TOKENS" --prefill "${PREFILL%%,*}" \
    --depths "$DEPTH_LONG" --budgets "$BUDGETS" --budget-depth "$DEPTH_LONG" --llama-bench "$lb" --json

  echo "## Aggregate decode: N sessions sharing one $SESSION_PROMPT-token prefill, $DECODE_TOKENS tokens each"
  echo
  # FullKV needs the whole prompt per session (the engine sizes its pool for N+1 such sessions,
  # llama-batched-bench its cache for N): counts beyond the device's memory run PyramidKV alone.
  if ((${#layouts[@]})); then
    echo "Each count twice, interleaved: decode attention batched (one kernel per layer) and per-session (one per session and layer)."
  else
    echo "(one attention layout only: this pkv-engine bench does not accept --decode-attention)"
  fi
  echo
  local fit=() over=() n need
  for n in "${SESSIONS[@]}"; do
    need=$(((n + 1) * (SESSION_PROMPT + SESSION_PROMPT / 8 + DECODE_TOKENS + 128) * KV_PER_TOKEN >> 20))
    if ((need + weights_mib < mem * 9 / 10)); then fit+=("$n"); else over+=("$n"); fi
  done
  if ((${#fit[@]})); then
    local fit_list most=${fit[-1]}
    fit_list="$(IFS=,; echo "${fit[*]}")"
    row "FullKV vs PyramidKV@128 at $fit_list sessions" \
      "$PKV" bench "${common[@]}" --sessions "$fit_list" --prompt-len "$SESSION_PROMPT" --decode-tokens "$DECODE_TOKENS" \
      --methods full,pyramidkv --budget 128 "${layouts[@]}" --json
    # In a process of its own, not through --llama-batched-bench: the engine would still hold
    # its pool (N + 1 FullKV sessions) while llama.cpp allocates its own cache, and at 64 x 8k
    # the two do not fit in one H200 together. Same command as the engine builds (bench.cpp).
    row "llama-batched-bench (FullKV) at $fit_list sessions" \
      "$BIN/llama-batched-bench" -ngl 99 -m "$MODEL" -t "$THREADS" -fa 1 -pps -npp "$SESSION_PROMPT" \
      -ntg "$DECODE_TOKENS" -c $(((SESSION_PROMPT + DECODE_TOKENS) * (most + 1))) -npl "$fit_list" --output-format jsonl
  fi
  for n in "${over[@]}"; do
    need=$(((n + 1) * (SESSION_PROMPT + SESSION_PROMPT / 8 + DECODE_TOKENS + 128) * KV_PER_TOKEN >> 20))
    echo "FullKV and llama-batched-bench at $n sessions: not run, their KV (~$need MiB) and the weights ($weights_mib MiB) exceed 90 % of $mem MiB"
    # the FullKV source prefill, plus at most 4 x budget + 256 entries per layer per session
    local pool=$(((SESSION_PROMPT + SESSION_PROMPT / 8 + DECODE_TOKENS + 128 + n * (4 * 128 + 256 + DECODE_TOKENS)) * KV_PER_TOKEN))
    row "PyramidKV@128 alone at $n sessions" \
      "$PKV" bench "${common[@]}" --sessions "$n" --prompt-len "$SESSION_PROMPT" --decode-tokens "$DECODE_TOKENS" \
      --methods pyramidkv --budget 128 --kv-pool-bytes "$pool" "${layouts[@]}" --json
  done

  echo "## Sessions of $POOL_PROMPT tokens that fit in a $POOL_LABEL pool (forked from one prefill until the pool refuses)"
  echo
  row "FullKV and PyramidKV@128, f16 KV" \
    "$PKV" bench "${common[@]}" --pool-fit 1 --prompt-len "$POOL_PROMPT" --budget 128 --kv-pool-bytes "$POOL_BYTES"
  if ((${#kvt[@]})); then
    row "FullKV and PyramidKV@128, q8_0 KV" \
      "$PKV" bench "${common[@]}" --pool-fit 1 --prompt-len "$POOL_PROMPT" --budget 128 --kv-pool-bytes "$POOL_BYTES" "${kvt[@]}"
  else
    echo "### FullKV and PyramidKV@128, q8_0 KV"
    skip "this pkv-engine's bench does not accept --kv-type (issue 15 item 3 has not landed in this build)"
  fi
  echo "# run done in $(elapsed $((SECONDS - T0)))"
}

# ---------------------------------------------------------------------------------------------
# test: the engine's suite on this build (tests that need models/SmolLM2-… fail where it was
# not carried: it is larger than what the device tool carries).
cmd_test() {
  [[ -x "$BUILD_DIR/pkv-tests" ]] || die "no pkv-tests in $BUILD_DIR (built only with GoogleTest: TESTS=1)"
  [[ -s "$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]] || say "models/SmolLM2-135M-Instruct.Q4_1.gguf is missing: the tests that load it fail"
  (cd "$BUILD_DIR" && ctest --output-on-failure -j "$JOBS" --timeout 300) 2>&1 | tail -n 40
}

case "${1:-}" in
  pack) cmd_pack ;;
  build) cmd_build ;;
  run) cmd_run "${2:-}" ;;
  test) cmd_test ;;
  all)
    if [[ -n "${2:-}" ]]; then
      mkdir -p "$(dirname "$2")"
      { cmd_build; cmd_run; } 2>&1 | tee "$2"
    else
      cmd_build
      cmd_run
    fi
    ;;
  *)
    echo "usage: [GPU=0|1] scripts/gpu-bench.sh pack|build|run [OUT_FILE]|test|all [OUT_FILE]   (docs/GPU.md)" >&2
    exit 2
    ;;
esac
