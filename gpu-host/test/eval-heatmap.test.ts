// Needle pictures: every panel of the overview carries its own axis ticks, and no text (caption,
// titles, ticks) runs past the canvas, whatever the grid's shape.
import assert from "node:assert/strict";
import { test } from "node:test";

import { type HeatCell, heatmapSvg, overviewSvg, svgToPng, tickIndices, wrapText } from "../src/eval/heatmap.js";

type Tile = { row: number; col: number; title: string; cells: HeatCell[] };

const grid = (lengths: number[], depths: number[], seed = 0): HeatCell[] =>
  lengths.flatMap((length, i) =>
    depths.map((depth, j) => ({ length, depth, score: ((i * 7 + j * 3 + seed) % 10) / 9 })),
  );

const range = (n: number, from: number, step: number) => Array.from({ length: n }, (_, i) => from + i * step);

/** FullKV in row 0, then one row per method and one column per budget (as needle-run lays them out). */
function tiles(methods: string[], budgets: number[], lengths: number[], depths: number[]): Tile[] {
  const out: Tile[] = [{ row: 0, col: 0, title: "FullKV", cells: grid(lengths, depths) }];
  for (const [r, m] of methods.entries()) {
    for (const [c, b] of budgets.entries())
      out.push({ row: r + 1, col: c, title: `${m}@${b}`, cells: grid(lengths, depths, r + c) });
  }
  return out;
}

const SHAPES: [string, Tile[]][] = [
  [
    "the published grid",
    tiles(
      ["pyramidkv", "snapkv", "h2o", "streamingllm"],
      [64, 128, 256, 512],
      [1024, 2048, 4096, 8000],
      range(11, 0, 10),
    ),
  ],
  ["one budget, two lengths, one depth", tiles(["streamingllm"], [32], [400, 500], [50])],
  ["FullKV alone", [{ row: 0, col: 0, title: "FullKV", cells: grid([1024, 2048, 3072], range(11, 0, 10)) }]],
  ["15 lengths × 21 depths", tiles(["pyramidkv"], [128, 512], range(15, 1024, 512), range(21, 0, 5))],
];

interface SvgText {
  cls: string;
  x: number;
  y: number;
  size: number;
  anchor: string;
  body: string;
}

const texts = (svg: string): SvgText[] =>
  [
    ...svg.matchAll(
      /<text class="([^"]+)" x="([^"]+)" y="([^"]+)" font-size="([^"]+)" text-anchor="([^"]+)">([^<]*)<\/text>/g,
    ),
  ].map((m) => ({ cls: m[1]!, x: Number(m[2]), y: Number(m[3]), size: Number(m[4]), anchor: m[5]!, body: m[6]! }));

/** A bound on DejaVu Sans' advance: digits are 0.64 em wide, most letters less. */
const widthBound = (t: SvgText) => [...t.body.replace(/&amp;/g, "&")].length * t.size * 0.65;

function extent(t: SvgText): [number, number] {
  const w = widthBound(t);
  if (t.anchor === "middle") return [t.x - w / 2, t.x + w / 2];
  if (t.anchor === "end") return [t.x - w, t.x];
  return [t.x, t.x + w];
}

const canvas = (svg: string) => {
  const m = /<svg [^>]*width="(\d+)" height="(\d+)"/.exec(svg)!;
  return { width: Number(m[1]), height: Number(m[2]) };
};

test("every panel of the overview shows its lengths on x and its depths on y, first and last included", () => {
  for (const [shape, ts] of SHAPES) {
    const svg = overviewSvg(ts);
    const panels = svg.split('<g class="panel">').slice(1);
    assert.equal(panels.length, ts.length, shape);
    ts.forEach((t, k) => {
      const mine = texts(panels[k]!.slice(0, panels[k]!.indexOf("</g>")));
      const xs = mine.filter((x) => x.cls === "tick-x").map((x) => Number(x.body));
      const ys = mine.filter((x) => x.cls === "tick-y").map((x) => Number(x.body));
      const lengths = [...new Set(t.cells.map((c) => c.length))].sort((a, b) => a - b);
      const depths = [...new Set(t.cells.map((c) => c.depth))].sort((a, b) => a - b);
      for (const [axis, got, all] of [
        ["x", xs, lengths],
        ["y", ys, depths],
      ] as const) {
        assert.ok(got.length >= Math.min(2, all.length), `${shape}, ${t.title}: ${axis} ticks ${got.join(",")}`);
        assert.ok(got.includes(all[0]!) && got.includes(all.at(-1)!), `${shape}, ${t.title}: ${axis} ${got.join(",")}`);
        assert.ok(
          got.every((v) => all.includes(v)),
          `${shape}, ${t.title}: ${axis} ticks are the grid's own values`,
        );
      }
      assert.ok(xs.length >= Math.min(lengths.length, 4), `${shape}: most lengths labelled`);
      assert.equal(mine.filter((x) => x.cls === "title").length, 1);
    });
  }
});

test("the whole caption is there, wrapped within the canvas, and no text runs past its edges", () => {
  for (const [shape, ts] of SHAPES) {
    const svg = overviewSvg(ts);
    const { width, height } = canvas(svg);
    const all = texts(svg);
    const caption = all.filter((t) => t.cls === "caption");
    assert.ok(caption.length >= 1, shape);
    const whole = caption.map((t) => t.body).join(" ");
    assert.match(
      whole,
      /^x: context length in tokens \(.+\), left to right; y: needle depth in % \(.+\), top to bottom;/,
    );
    assert.ok(whole.endsWith("colour: score 0–1"), `${shape}: '${whole}'`);
    for (const t of all) {
      const [left, right] = extent(t);
      assert.ok(
        left >= 0 && right <= width,
        `${shape}: '${t.body}' spans ${left.toFixed(0)}–${right.toFixed(0)} of ${width}`,
      );
      assert.ok(t.y > t.size * 0.8 && t.y + t.size * 0.25 <= height, `${shape}: '${t.body}' at y ${t.y} of ${height}`);
    }
    assert.equal(svgToPng(svg).subarray(1, 4).toString(), "PNG");
  }
});

test("the single heatmap labels its axes with ticks that fit", () => {
  const cells = grid(range(15, 1024, 512), range(21, 0, 5));
  const svg = heatmapSvg("streamingllm@512", cells);
  const { width } = canvas(svg);
  const ts = texts(svg);
  const xs = ts.filter((t) => t.cls === "tick-x");
  assert.ok(xs.length >= 5 && xs[0]!.body === "1024" && xs.at(-1)!.body === "8192");
  for (let i = 1; i < xs.length; i++)
    assert.ok(extent(xs[i - 1]!)[1] < extent(xs[i]!)[0], "x tick labels do not overlap");
  assert.equal(ts.filter((t) => t.cls === "tick-y").length, 21);
  for (const t of ts) assert.ok(extent(t)[0] >= 0 && extent(t)[1] <= width, t.body);
});

test("tick thinning keeps the ends and spaces the rest; wrapping keeps every word", () => {
  assert.deepEqual(tickIndices(4, 40, 20), [0, 1, 2, 3]);
  assert.deepEqual(tickIndices(15, 11.3, 20), [0, 3, 6, 9, 14]);
  assert.deepEqual(tickIndices(1, 100, 20), [0]);
  assert.deepEqual(tickIndices(0, 100, 20), []);
  const text = "x: context length in tokens (1024–8000), left to right; y: needle depth in % (0–100), top to bottom";
  const lines = wrapText(text, 11, 200);
  assert.ok(lines.length >= 4);
  assert.equal(lines.join(" "), text);
  for (const l of lines) assert.ok(l.length * 11 * 0.65 <= 200, l);
});
