#!/usr/bin/env bash
# `make lint`: clang-format over the engine's C++ (style in .clang-format) and Biome over the
# TypeScript and JSON (biome.json). Fails on the first mis-formatted line or lint finding, naming
# the file. `make format` (this script with --fix) rewrites the files in place instead.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CLANG_FORMAT="$ROOT/.cache/tools/clang-format-23.1.3"
BIOME="$ROOT/node_modules/.bin/biome"
mapfile -t CPP < <(git ls-files --cached --others --exclude-standard -- '*.cpp' '*.h')
if [[ "${1:-}" == "--fix" ]]; then
  "$CLANG_FORMAT" -i --style=file "${CPP[@]}"
  "$BIOME" check --write .
  exit 0
fi
echo "[lint] clang-format: ${#CPP[@]} C++ files" >&2
"$CLANG_FORMAT" --dry-run --Werror --style=file "${CPP[@]}"
echo "[lint] biome" >&2
"$BIOME" ci .
echo "[lint] versions" >&2
node scripts/check-versions.mjs
