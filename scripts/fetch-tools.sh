#!/usr/bin/env bash
# Obtain the pinned C++ formatter: clang-format 23.1.3 from the PyPI wheel `clang-format`
# (downloaded, SHA-256 verified, the static binary unpacked into .cache/tools/; never installed
# into a Python environment). Biome, the TypeScript formatter and linter, comes with `npm install`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="23.1.3"
WHEEL_NAME="clang_format-$VERSION-py2.py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
WHEEL_SHA="58bf1804216501669832a39f2415e14284337438a062ff564729792adec664ac"
DEST="$ROOT/.cache/tools/clang-format-$VERSION"
if [[ -x "$DEST" ]]; then exit 0; fi
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "[fetch-tools] the pinned clang-format wheel is for Linux x86-64; put clang-format $VERSION at $DEST" >&2
  exit 1
fi
mkdir -p "$ROOT/.cache/pypi" "$ROOT/.cache/tools"
WHEEL="$ROOT/.cache/pypi/$WHEEL_NAME"
if ! echo "$WHEEL_SHA  $WHEEL" | sha256sum --check --status 2>/dev/null; then
  echo "[fetch-tools] pip download clang-format==$VERSION" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    "clang-format==$VERSION" -d "$ROOT/.cache/pypi"
  if ! echo "$WHEEL_SHA  $WHEEL" | sha256sum --check --status; then
    echo "[fetch-tools] SHA-256 mismatch for $WHEEL (expected $WHEEL_SHA)" >&2
    rm -f "$WHEEL"; exit 1
  fi
fi
python3 - "$WHEEL" "$DEST.tmp" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("clang_format/data/bin/clang-format") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
chmod +x "$DEST.tmp"
mv "$DEST.tmp" "$DEST"
echo "[fetch-tools] $DEST ok" >&2
