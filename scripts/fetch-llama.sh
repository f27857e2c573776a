#!/usr/bin/env bash
# Clone llama.cpp (ggml + libllama) from the git bundle shipped inside the pinned npm package
# node-llama-cpp. Only the package tarball is fetched (npm pack), never its platform binaries.
# Idempotent: does nothing when the checkout already exists at the pinned version.
set -euo pipefail
VERSION="${NODE_LLAMA_CPP_VERSION:-3.22.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/gpu-host/engine/.deps/llama.cpp"
CACHE="$ROOT/.cache/node-llama-cpp-$VERSION"
STAMP="$DEST/.pkv-version"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
  exit 0
fi
mkdir -p "$CACHE"
if [[ ! -f "$CACHE/package/llama/gitRelease.bundle" ]]; then
  echo "[fetch-llama] npm pack node-llama-cpp@$VERSION" >&2
  (cd "$CACHE" && npm pack --silent "node-llama-cpp@$VERSION" >/dev/null && tar xzf "node-llama-cpp-$VERSION.tgz" package/llama/gitRelease.bundle package/llama/llama.cpp.info.json && rm -f "node-llama-cpp-$VERSION.tgz")
fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
echo "[fetch-llama] cloning llama.cpp from the bundle ($(cat "$CACHE/package/llama/llama.cpp.info.json" | tr -d '\n ' ))" >&2
git clone --quiet "$CACHE/package/llama/gitRelease.bundle" "$DEST" 2>/dev/null
echo "$VERSION" > "$STAMP"
