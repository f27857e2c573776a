#!/usr/bin/env python3
"""Prints `pkv-engine bench ... --json` output as a table for scripts/gpu-bench.sh.

A JSON line with "results" becomes: its top-level fields on one line, then one row per entry of
"results" with every key any entry has (so fields added later, such as graph_nodes, show up
without a change here) and ours / llama.cpp where both speeds are there. Consecutive flat JSON
lines (llama-batched-bench --output-format jsonl) become one table, a row each. The JSON lines
follow unchanged, so the exact numbers stay in the output. Lines that are not JSON pass through.
Standard library only: the GPU box has no PyPI.
"""

import json
import sys

NAMES = {
    "tokens_per_second": "tok/s",
    "llama_cpp_tokens_per_second": "llama.cpp tok/s",
    "kv_mib": "KV MiB",
    "kv_mib_per_session": "KV MiB/session",
    "speedup_vs_full": "vs FullKV",
}
RATIO = "ours/llama.cpp"


def cell(v):
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def table(obj):
    head = [f"{k} {cell(v)}" for k, v in obj.items() if k != "results"]
    print(" | ".join(head))
    print_rows(obj.get("results", []))


def print_rows(rows):
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and k not in ("samples", "budget") and not isinstance(v, list):
                cols.append(k)
    if any("llama_cpp_tokens_per_second" in r for r in rows):
        cols.append(RATIO)
    lines = [[NAMES.get(c, c) for c in cols]]
    for r in rows:
        line = []
        for c in cols:
            if c == "method" and r.get("budget"):
                line.append(f"{r['method']}@{r['budget']}")
            elif c == RATIO:
                ours, ref = r.get("tokens_per_second"), r.get("llama_cpp_tokens_per_second")
                line.append(f"{ours / ref:.2f}x" if ours and ref else "-")
            else:
                line.append(cell(r[c]) if c in r else "-")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    for n, line in enumerate(lines):
        # text columns left, numbers right, as in the engine's own tables
        print(
            "  ".join(
                v.ljust(w) if cols[i] in ("test", "method") else v.rjust(w)
                for i, (v, w) in enumerate(zip(line, widths))
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main():
    flat = []  # consecutive flat objects and their lines, printed as one table

    def flush():
        if flat:
            print_rows([o for o, _ in flat])
            for _, line in flat:
                print("json:", line)
            flat.clear()

    for raw in sys.stdin:
        line = raw.strip()
        try:
            obj = json.loads(line) if line.startswith("{") else None
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "results" not in obj:
            flat.append((obj, line))
            continue
        flush()
        if obj is None:
            print(raw, end="")
            continue
        table(obj)
        print("json:", line)
    flush()


if __name__ == "__main__":
    main()
